"""Run one ONNX face model on torch tensors: onnxruntime without gradient, a torch twin with it.

* onnxruntime (``onnxruntime-gpu``): CPU tensors run on ``CPUExecutionProvider``; CUDA
  tensors on ``CUDAExecutionProvider`` through IOBinding (input and outputs stay on the GPU,
  no host copies).
* The torch twin: the same (folded) graph converted with onnx2torch, an ``nn.Module`` in eval
  mode with frozen weights; differentiable in its input. Also used without gradient where
  onnxruntime has no provider for the tensor's device.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import typing
from typing import Literal, Optional

import numpy as np
import onnx
import torch

from .onnx_fold import INTERLEAVED, prepare_graph, real_inputs

__all__ = ["OnnxModel", "Backend", "BACKENDS", "load_onnx_model"]

log = logging.getLogger("rewardfl")

#: no-gradient backend: onnxruntime where it has a provider for the device, else the torch twin (auto)
Backend = Literal["auto", "onnxruntime", "torch"]
BACKENDS = typing.get_args(Backend)
# onnx2torch has converters up to these opsets; newer graphs are converted down first
_TWIN_OPSET = 17


class OnnxModel:
    """One ONNX model file, loaded once, run on any batch.

    ``path``: the .onnx file (quantised weights are folded to fp32 at load, and the graph is
    rewritten to take any batch: ``batch_rewrites`` says what changed, see ``onnx_fold``).
    ``backend``: ``auto`` (onnxruntime when it has a provider for the tensor's device, else the
    torch twin), ``onnxruntime`` or ``torch``, for :meth:`run` (no gradient).
    """

    def __init__(self, path: str, *, backend: Backend = "auto", intra_op_threads: int = 0):
        self.path = path
        self.backend = backend
        self.intra_op_threads = intra_op_threads
        try:
            raw = onnx.load(path)
        except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
            raise ValueError(f"reward_model_path: cannot read ONNX model {path}: {type(e).__name__}: {e}") from e
        #: input (C, H, W) as declared before freeing the batch dim (0 where symbolic)
        self.input_chw = tuple(d.dim_value for d in real_inputs(raw)[0].type.tensor_type.shape.dim[1:])
        #: op types of the first compute nodes (for insightface's normalisation rule)
        self.first_ops = tuple(n.op_type for n in raw.graph.node
                               if n.op_type not in ("DequantizeLinear", "Reshape", "Constant"))[:8]
        #: output dims (without batch) as declared before freeing the batch dim (0 where symbolic)
        self.output_dims = [tuple(d.dim_value for d in o.type.tensor_type.shape.dim[1:]) for o in raw.graph.output]
        self.proto, self.batch_rewrites = prepare_graph(raw)
        if INTERLEAVED in self.batch_rewrites.head_layouts:
            log.info("face model %s: heads put out rows (h, w, batch, anchor) (insightface's export); "
                     "rewritten to rows per frame", path)
        if self.batch_rewrites.batch_reshapes:
            log.info("face model %s: Reshape %s fixed the batch at 1; rewritten to take any batch", path,
                     ", ".join(self.batch_rewrites.batch_reshapes))
        self.input_name = real_inputs(self.proto)[0].name
        self.output_names = [o.name for o in self.proto.graph.output]
        self._sessions: dict = {}
        self._twins: dict = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ onnxruntime

    def _session(self, device: torch.device):
        import onnxruntime as ort

        key = (device.type, _cuda_index(device) if device.type == "cuda" else None)
        with self._lock:
            if key not in self._sessions:
                opts = ort.SessionOptions()
                opts.log_severity_level = 3  # no warnings about pruned initializers
                if self.intra_op_threads:
                    opts.intra_op_num_threads = self.intra_op_threads
                if device.type == "cuda":
                    # share the GPU with a training run: grow the arena only as needed, no
                    # exhaustive cuDNN search (its workspaces spike memory)
                    cuda = {"device_id": _cuda_index(device), "arena_extend_strategy": "kSameAsRequested",
                            "cudnn_conv_algo_search": "HEURISTIC"}
                    providers = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
                else:
                    providers = ["CPUExecutionProvider"]
                self._sessions[key] = ort.InferenceSession(self.proto.SerializeToString(), opts, providers=providers)
            return self._sessions[key]

    def _ort_available(self, device: torch.device) -> bool:
        if device.type == "cpu":
            return True
        if device.type != "cuda":
            return False
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers() and \
            "CUDAExecutionProvider" in self._session(device).get_providers()

    def run_onnxruntime(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs for input ``x`` (N, C, H, W) float32, on ``x``'s device, without gradient."""
        x = x.detach().to(torch.float32).contiguous()
        session = self._session(x.device)
        if x.device.type == "cpu":
            outs = session.run(self.output_names, {self.input_name: x.numpy()})
            return [torch.from_numpy(o) for o in outs]
        binding = session.io_binding()
        index = _cuda_index(x.device)
        binding.bind_input(self.input_name, "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, "cuda", index)
        torch.cuda.current_stream(x.device).synchronize()  # x must be written before ORT's stream reads it
        session.run_with_iobinding(binding)
        # clone: torch's own memory, independent of the OrtValues' lifetime (outputs are small)
        return [torch.from_dlpack(v).clone() for v in binding.get_outputs()]

    # ------------------------------------------------------------------ torch twin

    def twin(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The graph as a frozen torch module on ``device`` (cached), differentiable in its input."""
        device = torch.device(device)
        key = (device.type, device.index, dtype)
        with self._lock:
            if key not in self._twins and self._twins:  # another device/dtype: copy the converted one
                self._twins[key] = copy.deepcopy(next(iter(self._twins.values()))).to(device=device, dtype=dtype)
            if key not in self._twins:
                from onnx2torch import convert

                graph = self.proto
                opset = max((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), default=0)
                if opset > _TWIN_OPSET:
                    graph = onnx.version_converter.convert_version(graph, _TWIN_OPSET)
                module = convert(graph).eval().requires_grad_(False)
                self._twins[key] = module.to(device=device, dtype=dtype)
            return self._twins[key]

    def run_twin(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the torch twin (keeps autograd when ``x`` requires grad)."""
        out = self.twin(x.device, x.dtype)(x)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    # ------------------------------------------------------------------ either

    def run(self, x: torch.Tensor, backend: Optional[Backend] = None) -> list[torch.Tensor]:
        """Outputs without gradient, by ``backend`` (default: the model's)."""
        backend = backend or self.backend
        if backend == "onnxruntime" or (backend == "auto" and self._ort_available(x.device)):
            return self.run_onnxruntime(x)
        with torch.no_grad():
            return self.run_twin(x.to(torch.float32))


def _cuda_index(device: torch.device) -> int:
    """``cuda`` alone means torch's current device (set per rank by the launcher)."""
    return device.index if device.index is not None else torch.cuda.current_device()


_LOADED: dict = {}
_LOADED_LOCK = threading.Lock()


def load_onnx_model(path: str, *, backend: Backend = "auto") -> OnnxModel:
    """The :class:`OnnxModel` of ``path``, shared by everything in the process that loads the same
    file (unchanged on disk) with the same backend: reward instances, the CLI, tests."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size, backend)
    with _LOADED_LOCK:
        if key not in _LOADED:
            _LOADED[key] = OnnxModel(path, backend=backend)
        return _LOADED[key]
