"""Make shipped face ONNX graphs loadable and batchable: fold quantised weights, free the batch dim.

The OpenCV-zoo models (YuNet, SFace ``*_int8bq``) store every weight as int8 with a
``DequantizeLinear`` (opset 21 block quantisation: ``block_size`` along ``axis``) and a
``Reshape``. onnxruntime rejects them as shipped and onnx2torch cannot convert them;
computing those constant subgraphs once into fp32 initializers fixes both.
Detectors exported with a fixed ``1x3x640x640`` input (and ``Resize`` to fixed sizes)
are rewritten to take any batch.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["dequantize", "fold_quantized_weights", "free_batch_dim", "is_quantized", "prepare_graph"]


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int = 1,
               block_size: int = 0) -> np.ndarray:
    """ONNX ``DequantizeLinear`` in float32: ``(q - zero_point) * scale``.

    ``scale``/``zero_point`` are scalars (per tensor), 1-D along ``axis`` (per axis), or, with
    ``block_size > 0``, the shape of ``q`` with ``axis`` divided into blocks of ``block_size``
    (the last block may be short).
    """
    q = q.astype(np.float32)
    zp = np.zeros_like(scale, dtype=np.float32) if zero_point is None else zero_point.astype(np.float32)
    scale = scale.astype(np.float32)
    axis = axis % max(q.ndim, 1)
    if scale.size == 1:  # per tensor (YuNet's biases carry a meaningless block_size)
        return (q - zp.reshape(())) * scale.reshape(())
    if block_size > 0:
        scale = np.repeat(scale, block_size, axis=axis).take(np.arange(q.shape[axis]), axis=axis)
        zp = np.repeat(zp, block_size, axis=axis).take(np.arange(q.shape[axis]), axis=axis)
        return (q - zp) * scale
    shape = [1] * q.ndim
    shape[axis] = -1
    return (q - zp.reshape(shape)) * scale.reshape(shape)


def is_quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type == "DequantizeLinear" for n in model.graph.node)


def _constants(graph) -> dict:
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return values


def _prune(graph) -> None:
    """Drop initializers, Constant nodes and graph inputs no node or output uses."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep_nodes = [n for n in graph.node if n.op_type != "Constant" or n.output[0] in used]
    del graph.node[:]
    graph.node.extend(keep_nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    init_names = {i.name for i in graph.initializer}
    # SFace lists every weight as a graph input too: unused (or shadowed by an initializer)
    inputs = [i for i in graph.input if i.name in used and i.name not in init_names]
    del graph.input[:]
    graph.input.extend(inputs)


def fold_quantized_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every ``DequantizeLinear`` of a constant (and the ``Reshape`` of
    its result by a constant shape) replaced by an fp32 initializer. Unchanged when none."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    if not is_quantized(model):
        return model
    graph = model.graph
    consts = _constants(graph)
    folded: dict[str, np.ndarray] = {}
    keep = []
    for n in graph.node:
        if n.op_type == "DequantizeLinear" and all(i in consts for i in n.input if i):
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            zp = consts[n.input[2]] if len(n.input) > 2 and n.input[2] else None
            folded[n.output[0]] = dequantize(consts[n.input[0]], consts[n.input[1]], zp,
                                             axis=attrs.get("axis", 1), block_size=attrs.get("block_size", 0))
            consts[n.output[0]] = folded[n.output[0]]
        elif n.op_type == "Reshape" and n.input[0] in folded and n.input[1] in consts:
            shape = [int(s) for s in consts[n.input[1]]]
            src = folded[n.input[0]]
            shape = [src.shape[i] if s == 0 else s for i, s in enumerate(shape)]
            folded[n.output[0]] = src.reshape(shape)
            consts[n.output[0]] = folded[n.output[0]]
        else:
            keep.append(n)
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), name) for name, v in folded.items()
                             if name in used)
    _prune(graph)
    del graph.value_info[:]
    return model


def free_batch_dim(model: onnx.ModelProto, *, copy: bool = True) -> onnx.ModelProto:
    """A copy taking any batch (and any input size): symbolic input/output dims, ``Resize`` by a
    fixed ``sizes`` turned into the equivalent ``scales``.

    Outputs of graphs that reshape to ``(1, -1, C)`` or ``(-1, C)`` then hold the batch
    flattened batch-major; callers reshape them to ``(N, -1, C)``.
    """
    if copy:
        model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    consts = _constants(graph)
    fixed_resizes = [n for n in graph.node if n.op_type == "Resize" and len(n.input) == 4 and n.input[3] in consts]
    shapes = {}
    if fixed_resizes:
        inferred = onnx.shape_inference.infer_shapes(model)
        shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                  for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    for n in fixed_resizes:
        sizes = consts[n.input[3]].astype(np.float64)
        src = shapes.get(n.input[0])
        if not src or len(src) != len(sizes) or not all(src):
            raise ValueError(f"cannot free the batch dim of Resize {n.name or n.output[0]}: unknown input shape")
        scales = (sizes / np.asarray(src, dtype=np.float64)).astype(np.float32)
        scales[0] = 1.0
        name = n.output[0] + "_scales"
        graph.initializer.append(numpy_helper.from_array(scales, name))
        if not n.input[1]:
            roi = n.output[0] + "_roi"
            graph.initializer.append(numpy_helper.from_array(np.zeros(0, np.float32), roi))
            n.input[1] = roi
        n.input[2] = name
        del n.input[3]
    for is_input, values in ((True, graph.input), (False, graph.output)):
        for vi in values:
            for j, d in enumerate(vi.type.tensor_type.shape.dim):
                if is_input and j == 1:  # keep the channel count
                    continue
                d.Clear()
                d.dim_param = f"{vi.name}_d{j}"
    _prune(graph)
    del graph.value_info[:]
    return model


def prepare_graph(model: onnx.ModelProto, *, batch: bool = True) -> onnx.ModelProto:
    """Fold quantised weights, then (``batch``) free the batch dim: what every loader does.
    Modifies (and returns) ``model`` itself; the public functions above work on copies."""
    if is_quantized(model):
        model = fold_quantized_weights(model)
    return free_batch_dim(model, copy=False) if batch else model
