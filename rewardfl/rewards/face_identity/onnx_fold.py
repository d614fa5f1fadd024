"""Make shipped face ONNX graphs loadable and batchable: fold quantised weights, free the batch dim.

The OpenCV-zoo models (YuNet, SFace ``*_int8bq``) store every weight as int8 with a
``DequantizeLinear`` (opset 21 block quantisation: ``block_size`` along ``axis``) and a
``Reshape``. onnxruntime rejects them as shipped and onnx2torch cannot convert them;
computing those constant subgraphs once into fp32 initializers fixes both.

Then every graph is rewritten to take any batch (:func:`prepare_graph`), on both backends alike
(onnx2torch converts the rewritten graph):

* detector heads put out per-frame rows ``(N, M, C)``. Exports differ in where the batch lands
  in a head's rows: the registry SCRFD-2.5G and YuNet do ``Transpose [0, 2, 3, 1] + Reshape
  [1, -1, C]`` (rows batch, h, w, anchor); insightface's own packs (``det_10g``,
  ``scrfd_10g_bnkps``, ``det_2.5g``, ``det_500m``) do ``Transpose [2, 3, 0, 1] + Reshape [-1, C]``
  (rows h, w, batch, anchor: frames interleaved). Both become ``Transpose [0, 2, 3, 1] +
  Reshape [0, -1, C]`` (:func:`rows_per_frame`); an output fed any other way is reported
  ``unknown`` and its caller runs one frame per call;
* a ``Reshape`` whose constant shape fixes the batch at 1 (an export traced at batch 1 and
  constant-folded: ``Reshape [1, 25088]`` where ``Flatten`` was) copies the batch instead
  (:func:`copy_batch_in_reshapes`);
* a ``Resize`` to fixed ``sizes`` becomes the equivalent ``scales``; inputs and outputs get
  symbolic dims (:func:`free_batch_dim`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["dequantize", "fold_quantized_weights", "free_batch_dim", "is_quantized", "prepare_graph",
           "rows_per_frame", "copy_batch_in_reshapes", "real_inputs", "BatchRewrites",
           "PER_FRAME", "INTERLEAVED", "UNKNOWN"]

#: how a detector head's output rows were ordered in the file (see :func:`rows_per_frame`)
PER_FRAME = "per_frame"  # Transpose [0, 2, 3, 1]: rows (batch, h, w, anchor)
INTERLEAVED = "interleaved"  # Transpose [2, 3, 0, 1] (insightface's export): rows (h, w, batch, anchor)
UNKNOWN = "unknown"  # not fed by Transpose + Reshape: the batch cannot be told apart
_HEAD_PERMS = {(0, 2, 3, 1): PER_FRAME, (2, 3, 0, 1): INTERLEAVED}
# ops that act on each element alone (a head's Sigmoid, a scale): row order does not matter to them
_ELEMENTWISE = frozenset({"Sigmoid", "Relu", "Exp", "Tanh", "Identity", "Cast", "Neg", "Abs", "Sqrt"})
_SCALAR_BINARY = frozenset({"Mul", "Add", "Sub", "Div"})  # elementwise when the other input is one constant


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
    fixed ``sizes`` turned into the equivalent ``scales``. Where outputs put the batch is
    :func:`rows_per_frame`'s business; a ``Reshape`` that fixes it, :func:`copy_batch_in_reshapes`'s.
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


def _graph_maps(graph) -> tuple[dict, dict, dict]:
    """``(producer of each tensor, consumers of each tensor, constant values)``."""
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producers, consumers, _constants(graph)


def _above(name: str, producers: dict, consumers: dict, consts: dict, uses: int = 1):
    """The first node above tensor ``name`` that is not elementwise, following the data input; None
    when a tensor on the way has other consumers than the path (``uses`` for ``name`` itself):
    rewriting the path would change what they see."""
    while True:
        node = producers.get(name)
        if node is None or len(consumers.get(name, ())) != uses:
            return None
        if node.op_type in _ELEMENTWISE:
            name = node.input[0]
        elif node.op_type in _SCALAR_BINARY:
            data = [i for i in node.input if i not in consts]
            if len(data) != 1 or any(consts[i].size != 1 for i in node.input if i in consts):
                return None
            name = data[0]
        else:
            return node
        uses = 1


def _heads(model: onnx.ModelProto) -> list:
    """Per graph output ``(layout, transpose, reshape, channels)``; ``(UNKNOWN, None, None, 0)``
    for an output not fed by ``Transpose [0, 2, 3, 1] or [2, 3, 0, 1] -> Reshape [..., C]``
    (elementwise ops allowed around them)."""
    producers, consumers, consts = _graph_maps(model.graph)
    heads = []
    for out in model.graph.output:
        head = (UNKNOWN, None, None, 0)
        reshape = _above(out.name, producers, consumers, consts, uses=0)
        shape = consts.get(reshape.input[1]) if reshape is not None and reshape.op_type == "Reshape" else None
        if shape is not None and shape.ndim == 1 and 2 <= shape.size <= 3 and shape[-1] > 0:
            transpose = _above(reshape.input[0], producers, consumers, consts)
            if transpose is not None and transpose.op_type == "Transpose":
                perm = next((tuple(a.ints) for a in transpose.attribute if a.name == "perm"), ())
                if perm in _HEAD_PERMS:
                    head = (_HEAD_PERMS[perm], transpose, reshape, int(shape[-1]))
        heads.append(head)
    return heads


def rows_per_frame(model: onnx.ModelProto) -> list[str]:
    """Rewrite every recognised detector head of ``model`` (in place) to put out ``(N, M, C)``
    with each frame's rows ordered (h, w, anchor): ``Transpose [0, 2, 3, 1] + Reshape [0, -1, C]``.

    Returns each output's layout as exported: ``per_frame`` (rows batch, h, w, anchor),
    ``interleaved`` (rows h, w, batch, anchor: insightface's ``permute(2, 3, 0, 1).reshape(-1, C)``)
    or ``unknown`` (left as it is). Either recognised layout has a frame's rows in the same
    (h, w, anchor) order; only where the batch sits differs, so the rewrite keeps every number.
    """
    layouts = []
    for out, (layout, transpose, reshape, channels) in zip(model.graph.output, _heads(model)):
        layouts.append(layout)
        if layout == UNKNOWN:
            continue
        for a in transpose.attribute:
            if a.name == "perm":
                a.ints[:] = [0, 2, 3, 1]
        shape_name = f"{reshape.output[0]}_rows_per_frame"  # own constant: others may share the old one
        model.graph.initializer.append(numpy_helper.from_array(np.array([0, -1, channels], np.int64), shape_name))
        reshape.input[1] = shape_name
        _drop_allowzero(reshape)
        dims = out.type.tensor_type.shape.dim
        del dims[:]
        for name in ("batch", "rows"):
            dims.add().dim_param = f"{out.name}_{name}"
        dims.add().dim_value = channels
    if any(layout != UNKNOWN for layout in layouts):
        del model.graph.value_info[:]  # shapes recorded for the old layout
        _prune(model.graph)
    return layouts


def copy_batch_in_reshapes(model: onnx.ModelProto) -> list[str]:
    """Make ``Reshape`` nodes that fix the batch at 1 copy it instead (in place); their names.

    Only for a graph whose input declares batch 1: there a constant shape ``[1, ...]`` applied to
    a tensor whose leading dim is 1 carries the batch (``Reshape [1, 25088]`` for ``Flatten``);
    ``0`` copies the input's leading dim, whatever the batch. A graph with a symbolic batch chose
    its constant 1s knowing the batch varies, and is left alone.
    """
    graph = model.graph
    dims = real_inputs(model)[0].type.tensor_type.shape.dim
    if not dims or dims[0].dim_param or dims[0].dim_value != 1:
        return []
    consts = _constants(graph)
    candidates = [n for n in graph.node if n.op_type == "Reshape" and n.input[1] in consts
                  and consts[n.input[1]].size >= 1 and int(consts[n.input[1]][0]) == 1]
    if not candidates:
        return []
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - ops shape inference does not know: nothing is proven, leave it
        return []
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    rewritten = []
    for n in candidates:
        src = shapes.get(n.input[0])
        if not src or src[0] != 1:
            continue  # a leading 1 made from another dim is no batch
        shape = consts[n.input[1]].astype(np.int64).copy()
        shape[0] = 0
        name = f"{n.output[0]}_copies_batch"
        graph.initializer.append(numpy_helper.from_array(shape, name))
        n.input[1] = name
        _drop_allowzero(n)
        rewritten.append(n.name or n.output[0])
    if rewritten:
        del graph.value_info[:]  # shapes recorded at batch 1
        _prune(graph)
    return rewritten


def real_inputs(model: onnx.ModelProto) -> list:
    """The graph inputs fed at run time (older exports also list every weight as an input)."""
    inits = {i.name for i in model.graph.initializer}
    used = {i for n in model.graph.node for i in n.input}
    inputs = [i for i in model.graph.input if i.name not in inits and i.name in used]
    if not inputs:
        raise ValueError(f"ONNX model {model.graph.name!r} has no input")
    return inputs


def _drop_allowzero(reshape) -> None:
    """With ``allowzero=1`` a 0 in the shape means an empty dim, not "copy the input's"."""
    keep = [a for a in reshape.attribute if a.name != "allowzero"]
    del reshape.attribute[:]
    reshape.attribute.extend(keep)


@dataclasses.dataclass(frozen=True)
class BatchRewrites:
    """What :func:`prepare_graph` changed so the graph takes any batch.

    ``head_layouts``: per graph output, as exported (``per_frame``, ``interleaved``, ``unknown``;
    see :func:`rows_per_frame`); ``batch_reshapes``: names of the ``Reshape`` nodes that fixed the
    batch at 1 (see :func:`copy_batch_in_reshapes`).
    """

    head_layouts: tuple[str, ...] = ()
    batch_reshapes: tuple[str, ...] = ()


def prepare_graph(model: onnx.ModelProto, *, batch: bool = True) -> tuple[onnx.ModelProto, BatchRewrites]:
    """Fold quantised weights, then (``batch``) make the graph take any batch (see the module
    docstring): what every loader does. Modifies (and returns) ``model`` itself; the public
    functions above that return a model work on copies."""
    if is_quantized(model):
        model = fold_quantized_weights(model)
    if not batch:
        return model, BatchRewrites()
    rewrites = BatchRewrites(head_layouts=tuple(rows_per_frame(model)),
                             batch_reshapes=tuple(copy_batch_in_reshapes(model)))
    return free_batch_dim(model, copy=False), rewrites
