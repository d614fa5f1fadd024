"""Face recognizer: aligned crops -> L2-normalised embeddings, with and without gradient.

Preprocessing is read from the ONNX graph the way insightface's ``ArcFaceONNX`` does: a graph
whose first compute nodes include ``Sub`` and ``Mul`` normalises itself (mxnet-exported
ArcFace, OpenCV's SFace) and takes raw 0..255 pixels (mean 0, std 1); otherwise the input is
``(p - 127.5) / 127.5`` (glintr100, w600k_r50). Channel order RGB for both (insightface
feeds ``swapRB=True`` blobs; SFace was trained on RGB). The input size comes from the
graph's declared input (112 for all of these). Every field can be overridden in the config.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from rewardfl.ops import face_align

from .onnx_runner import Backend, OnnxModel, load_onnx_model

__all__ = ["ChannelOrder", "Preprocessing", "FaceRecognizer", "detect_preprocessing"]

#: channel order of the crops a recognizer takes
ChannelOrder = Literal["rgb", "bgr"]


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What a recognizer expects: ``size x size`` crops, ``channel_order``, ``(p - mean) / std``
    for ``p`` on the 0..255 scale."""

    size: int = 112
    channel_order: ChannelOrder = "rgb"
    mean: float = 127.5
    std: float = 127.5


def detect_preprocessing(model: OnnxModel) -> Preprocessing:
    """insightface's rule (see the module docstring) applied to ``model``."""
    normalises_itself = "Sub" in model.first_ops and "Mul" in model.first_ops
    _, h, w = model.input_chw if len(model.input_chw) == 3 else (3, 112, 112)
    size = h or w or 112
    return Preprocessing(size=size, channel_order="rgb", mean=0.0 if normalises_itself else 127.5,
                         std=1.0 if normalises_itself else 127.5)


class FaceRecognizer:
    """An ArcFace-style recognizer ONNX model (glintr100, w600k_r50, SFace, ...).

    ``preprocessing`` overrides the auto-detected one field by field (None keeps detected).
    """

    def __init__(self, path: str, *, backend: Backend = "auto", size: Optional[int] = None,
                 channel_order: Optional[ChannelOrder] = None, mean: Optional[float] = None,
                 std: Optional[float] = None, batch_size: int = 64):
        self.model = load_onnx_model(path, backend=backend)
        outputs = self.model.output_dims  # declared, without the batch dim
        if len(outputs) != 1 or sum(d != 1 for d in outputs[0]) > 1:  # one output, one feature dim
            found = f"{len(outputs)} outputs" if len(outputs) != 1 else \
                "one output of shape (N, " + ", ".join(str(d or "?") for d in outputs[0]) + ")"
            raise ValueError(f"reward.recognizer: {path} has {found}; expected a face recognizer (one (N, D) "
                             f"embedding output of an aligned face crop); it looks like a face detector: give it "
                             f"as reward.detector")
        detected = detect_preprocessing(self.model)
        self.preprocessing = dataclasses.replace(
            detected, **{k: v for k, v in (("size", size), ("channel_order", channel_order), ("mean", mean),
                                           ("std", std)) if v is not None})
        self.batch_size = batch_size

    @property
    def embedding_dim(self) -> int:
        dims = self.model.output_dims[0]
        return int(dims[-1]) if dims else 0

    def align(self, frames: torch.Tensor, landmarks: torch.Tensor, frame_index: torch.Tensor,
              input_range=(-1.0, 1.0)) -> torch.Tensor:
        """Aligned, normalised crops ``(N, 3, size, size)`` float32 of faces in ``frames``
        ``(F, 3, H, W)`` (RGB, ``input_range``); differentiable in ``frames``."""
        p = self.preprocessing
        crops, _ = face_align(frames, landmarks.to(torch.float32), frame_index, size=p.size,
                              input_range=input_range, channel_order=p.channel_order, mean=p.mean, std=p.std)
        return crops

    def embed(self, crops: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
        """L2-normalised embeddings ``(N, D)`` float32 of aligned crops (from :meth:`align`).

        ``grad=False``: onnxruntime (or the twin where it cannot run), chunked by batch_size;
        ``grad=True``: the torch twin, differentiable in ``crops``."""
        if crops.shape[0] == 0:
            return crops.new_zeros(0, max(self.embedding_dim, 1))
        if grad:
            out = self.model.run_twin(crops.to(torch.float32))[0]
        else:
            out = torch.cat([self.model.run(crops[i:i + self.batch_size])[0]
                             for i in range(0, crops.shape[0], self.batch_size)]).to(crops.device)
        return F.normalize(out.float().flatten(1), dim=1)
