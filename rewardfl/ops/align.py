"""``face_align``: Python front end of the C++/CUDA op in ``csrc/`` (torchvision's ``ops/*.py`` layout).

It lives in the core (``rewardfl.ops``), not in the face reward that is its main user: the op is
compiled into the package's own extension ``rewardfl._C``, and the planner and any reward may use it.

``face_align`` crops, aligns and normalises faces for a recognizer in one fused op:
per face, the least-squares similarity transform (Umeyama) from its five landmarks to the
ArcFace template, bilinear sampling of only the ``size x size`` crop pixels from its frame,
channel reordering and ``(p - mean) / std`` normalisation.

Two implementations compute the same thing:

* ``torch.ops.rewardfl.face_align`` from ``rewardfl._C`` (``csrc/ops/face_align.cpp``,
  CPU kernel ``csrc/ops/cpu/face_align_kernel.cpp``, CUDA kernel
  ``csrc/ops/cuda/face_align_kernel.cu``, backward ``csrc/ops/autograd/face_align_autograd.cpp``),
  with fake (meta) kernels registered here for ``torch.compile`` (the extension is loaded by
  ``rewardfl.ops._extension``);
* a pure-torch path (``affine_grid`` + ``grid_sample`` on the crop grid only), used when the
  extension or its kernel for the device is missing, and as the second oracle in the tests.

Both follow OpenCV ``warpAffine``'s conventions: pixel centres at integer coordinates, bilinear
interpolation, zero (black, on the 0..255 scale) outside the frame.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ._extension import _C

__all__ = ["ARCFACE_TEMPLATE", "arcface_template", "similarity_transforms", "landmark_problems", "face_align"]

# ArcFace 112x112 template, (x, y) crop pixels: left eye, right eye, nose, left and right
# mouth corner (image-left first). insightface.utils.face_align.arcface_dst.
ARCFACE_TEMPLATE = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)

# Landmarks are rejected as degenerate when their RMS distance to their mean is below this
# (pixels: all five coincide) or when they lie on a line: smallest / largest principal
# standard deviation below _COLLINEAR_RATIO. A real face is nowhere near either.
_MIN_SPREAD_PX = 1e-3
_COLLINEAR_RATIO = 1e-3

_FRAME_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Number = Union[int, float]
PerChannel = Union[Number, Sequence[Number]]


def arcface_template(size: int = 112) -> torch.Tensor:
    """ArcFace 5-point template for a ``size x size`` crop, ``(5, 2)`` float64 (x, y) pixels.

    insightface's ``estimate_norm`` rule: sizes divisible by 112 scale the 112 template by
    ``size / 112``; otherwise (divisible by 128) it is scaled by ``size / 128`` and shifted
    right by ``8 * size / 128`` (at 128: the 112 template moved 8 pixels right)."""
    if not isinstance(size, numbers.Integral) or size <= 0:
        raise ValueError("face_align: size must be a positive int, got %r" % (size,))
    if size % 112 == 0:
        ratio, shift_x = size / 112.0, 0.0
    elif size % 128 == 0:
        ratio = size / 128.0
        shift_x = 8.0 * ratio
    else:
        raise ValueError(
            "face_align: template='arcface' needs size divisible by 112 or 128 (e.g. 112, 128, 224), "
            "got size=%d; pass template=<(5, 2) target points> for other sizes" % size
        )
    template = torch.tensor(ARCFACE_TEMPLATE, dtype=torch.float64) * ratio
    template[:, 0] += shift_x
    return template


def similarity_transforms(landmarks: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity transforms from ``landmarks`` to ``template``, batched.

    landmarks: ``(N, K, 2)`` source points (x, y); template: ``(K, 2)`` target points.
    Returns ``(N, 2, 3)`` float64 matrices ``M`` with ``target ~ M @ [x, y, 1]``, the
    rotation + uniform scale + translation minimising the squared distances: what
    ``skimage.transform.SimilarityTransform.estimate`` (Umeyama 1991, no reflection) gives.

    In 2-D a rotation and scale is a multiplication by a complex number ``a``, so the SVD in
    Umeyama's method reduces to ``a = sum(conj(z) w) / sum(|z|^2)`` over the centred source
    points ``z`` and targets ``w``: no SVD, no host sync, any device. Degenerate landmarks (all
    equal) give non-finite matrices here; ``face_align`` rejects them before."""
    src = landmarks.to(torch.float64)
    dst = template.to(device=src.device, dtype=torch.float64)
    src_mean = src.mean(dim=1, keepdim=True)  # (N, 1, 2)
    dst_mean = dst.mean(dim=0)  # (2,)
    x, y = (src - src_mean).unbind(-1)  # (N, K) each
    u, v = (dst - dst_mean).unbind(-1)  # (K,) each
    norm = (x * x + y * y).sum(dim=1)
    a = (x * u + y * v).sum(dim=1) / norm  # scale * cos(angle)
    b = (x * v - y * u).sum(dim=1) / norm  # scale * sin(angle)
    mx, my = src_mean[:, 0, 0], src_mean[:, 0, 1]
    tx = dst_mean[0] - (a * mx - b * my)
    ty = dst_mean[1] - (b * mx + a * my)
    return torch.stack([torch.stack([a, -b, tx], dim=-1), torch.stack([b, a, ty], dim=-1)], dim=1)


def _invert_similarity(transforms: torch.Tensor) -> torch.Tensor:
    """Inverse of ``(N, 2, 3)`` similarity matrices ``[[a, -b, tx], [b, a, ty]]``."""
    a, b = transforms[:, 0, 0], transforms[:, 1, 0]
    tx, ty = transforms[:, 0, 2], transforms[:, 1, 2]
    det = a * a + b * b
    ia, ib = a / det, -b / det  # inverse rotation/scale is conj(a) / |a|^2
    itx = -(ia * tx - ib * ty)
    ity = -(ib * tx + ia * ty)
    return torch.stack([torch.stack([ia, -ib, itx], dim=-1), torch.stack([ib, ia, ity], dim=-1)], dim=1)


# --------------------------------------------------------------------------- input checks


def _per_channel(name: str, value: PerChannel) -> Tuple[float, float, float]:
    """``mean``/``std`` as three finite floats, one per crop channel."""
    wrong = "face_align: %s must be a number or 3 numbers (one per crop channel), got %r" % (name, value)
    if isinstance(value, numbers.Real):
        values = (float(value),) * 3
    else:
        try:
            values = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(wrong) from None
        if len(values) != 3:
            raise ValueError(wrong)
    if not all(math.isfinite(v) for v in values):
        raise ValueError("face_align: %s must be finite, got %r" % (name, value))
    return values


def _check_arguments(frames, landmarks, frame_index, size, template, input_range, channel_order, mean, std):
    """Checks everything that needs no look at tensor values.

    Returns the template ``(5, 2)`` float64, ``(low, high)``, mean and std per crop channel."""
    for name, t in (("frames", frames), ("landmarks", landmarks), ("frame_index", frame_index)):
        if not isinstance(t, torch.Tensor):
            raise ValueError("face_align: %s must be a torch.Tensor, got %s" % (name, type(t).__name__))
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError("face_align: frames must have shape (F, 3, H, W), got %s" % (tuple(frames.shape),))
    if frames.shape[2] == 0 or frames.shape[3] == 0:
        raise ValueError("face_align: frames must have H, W >= 1, got %s" % (tuple(frames.shape),))
    if frames.dtype not in _FRAME_DTYPES:
        raise ValueError("face_align: frames must be float32, bfloat16, float16 or float64, got %s" % frames.dtype)
    if landmarks.dim() != 3 or tuple(landmarks.shape[1:]) != (5, 2):
        raise ValueError("face_align: landmarks must have shape (N, 5, 2), got %s" % (tuple(landmarks.shape),))
    if not landmarks.is_floating_point():
        raise ValueError("face_align: landmarks must be a floating-point tensor (pixels), got %s" % landmarks.dtype)
    if frame_index.dim() != 1 or frame_index.shape[0] != landmarks.shape[0]:
        raise ValueError(
            "face_align: frame_index must have shape (N,) = (%d,) matching landmarks, got %s"
            % (landmarks.shape[0], tuple(frame_index.shape))
        )
    if frame_index.is_floating_point() or frame_index.is_complex() or frame_index.dtype == torch.bool:
        raise ValueError("face_align: frame_index must be an integer tensor (int64), got %s" % frame_index.dtype)
    if not (frames.device == landmarks.device == frame_index.device):
        raise ValueError(
            "face_align: frames, landmarks and frame_index must be on one device, got %s, %s, %s"
            % (frames.device, landmarks.device, frame_index.device)
        )
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
        raise ValueError("face_align: size must be a positive int, got %r" % (size,))
    if isinstance(template, str):
        if template != "arcface":
            raise ValueError(
                "face_align: template must be 'arcface' or a (5, 2) array of crop pixels, got %r" % template
            )
        template_points = arcface_template(size)
    else:
        template_points = torch.as_tensor(template, dtype=torch.float64).cpu()
        if tuple(template_points.shape) != (5, 2) or not bool(torch.isfinite(template_points).all()):
            raise ValueError(
                "face_align: template must be 'arcface' or a finite (5, 2) array of crop pixels, got shape %s"
                % (tuple(template_points.shape),)
            )
    try:
        low, high = (float(v) for v in input_range)
    except (TypeError, ValueError):
        raise ValueError(
            "face_align: input_range must be (low, high), e.g. (-1, 1) or (0, 255), got %r" % (input_range,)
        ) from None
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise ValueError("face_align: input_range must be finite with low < high, got %r" % (input_range,))
    if channel_order not in ("rgb", "bgr"):
        raise ValueError("face_align: channel_order must be 'rgb' or 'bgr', got %r" % (channel_order,))
    mean3, std3 = _per_channel("mean", mean), _per_channel("std", std)
    if any(s == 0 for s in std3):
        raise ValueError("face_align: std must be non-zero, got %r" % (std,))
    return template_points, (low, high), mean3, std3


def landmark_problems(landmarks: torch.Tensor) -> torch.Tensor:
    """Which faces ``face_align`` would reject, without a host sync: ``(3, N)`` bool rows
    (non-finite, all five points coincide, all five on one line). ``landmarks``: ``(N, 5, 2)``.

    A caller that must not stop on odd detections (a training step) drops faces with
    ``landmark_problems(landmarks).any(0)`` before aligning."""
    pts = landmarks.detach().to(torch.float64)
    finite = torch.isfinite(pts).flatten(1).all(dim=1)
    pts = torch.where(finite[:, None, None], pts, torch.zeros_like(pts))
    centred = pts - pts.mean(dim=1, keepdim=True)
    sxx = (centred[..., 0] ** 2).mean(dim=1)
    syy = (centred[..., 1] ** 2).mean(dim=1)
    sxy = (centred[..., 0] * centred[..., 1]).mean(dim=1)
    # principal variances of the five points: eigenvalues of [[sxx, sxy], [sxy, syy]]
    half_trace = (sxx + syy) / 2
    root = torch.sqrt(torch.clamp(half_trace * half_trace - (sxx * syy - sxy * sxy), min=0))
    var_max, var_min = half_trace + root, torch.clamp(half_trace - root, min=0)
    coincide = finite & ((sxx + syy) < _MIN_SPREAD_PX**2)
    collinear = finite & ~coincide & (var_min < (_COLLINEAR_RATIO**2) * var_max)
    return torch.stack([~finite, coincide, collinear])


def _check_values(landmarks: torch.Tensor, frame_index: torch.Tensor, num_frames: int) -> None:
    """Value checks, computed on the device with a single host sync; the ValueError lists faces."""
    in_range = (frame_index >= 0) & (frame_index < num_frames)
    non_finite, coincide, collinear = landmark_problems(landmarks)
    bad = torch.stack([non_finite, ~in_range, coincide, collinear])
    if not bool(bad.any()):
        return
    bad = bad.cpu()
    problems = []
    for row, what in zip(bad, ("non-finite landmarks", "frame_index outside [0, %d)" % num_frames,
                                "degenerate landmarks (all five points coincide)",
                                "degenerate landmarks (all five points on one line)")):
        faces = row.nonzero().flatten().tolist()
        if faces:
            shown = ", ".join(str(i) for i in faces[:8]) + (", ..." if len(faces) > 8 else "")
            problems.append("%s at face %s" % (what, shown))
    raise ValueError(
        "face_align: " + "; ".join(problems) + ". Drop those faces before aligning (see landmark_problems)."
    )


# --------------------------------------------------------------------------- implementations


def _extension_op(device: torch.device):
    """``torch.ops.rewardfl.face_align`` when rewardfl._C has a kernel for ``device``, else None."""
    if not _EXTENSION:
        return None
    if device.type == "cpu" or (device.type == "cuda" and _C.cuda_compiled()):
        return torch.ops.rewardfl.face_align.default
    return None


def _face_align_torch(frames, inverse, frame_index, size, channel_map, input_low, scale, bias):
    """Pure-torch twin of ``torch.ops.rewardfl.face_align`` (same arguments, same result).

    ``inverse``: ``(N, 2, 3)`` float64 crop pixel -> frame pixel maps. Samples with
    ``grid_sample`` on the crop grid only; the frames of the faces are gathered first."""
    num_faces = inverse.shape[0]
    out_dtype = torch.float64 if frames.dtype == torch.float64 else torch.float32
    height, width = frames.shape[2], frames.shape[3]
    src = frames.index_select(0, frame_index)[:, list(channel_map)].to(out_dtype) - input_low
    # theta maps normalised crop coordinates to normalised frame coordinates
    # (align_corners=False: pixel i of n sits at (2i + 1) / n - 1, OpenCV's pixel centres).
    eye3 = torch.eye(3, dtype=torch.float64, device=inverse.device)
    from_crop = eye3.clone()
    from_crop[0, 0] = from_crop[1, 1] = size / 2.0
    from_crop[0, 2] = from_crop[1, 2] = (size - 1) / 2.0
    to_frame = eye3.clone()
    to_frame[0, 0], to_frame[0, 2] = 2.0 / width, 1.0 / width - 1.0
    to_frame[1, 1], to_frame[1, 2] = 2.0 / height, 1.0 / height - 1.0
    inverse3 = torch.cat([inverse, eye3[2:].expand(num_faces, 1, 3)], dim=1)
    theta = (to_frame @ inverse3 @ from_crop)[:, :2]
    if num_faces == 0:  # affine_grid refuses empty batches; keep the (empty) autograd link
        crops = src[:, :, :1, :1].expand(0, 3, size, size)
    else:
        grid = F.affine_grid(theta.to(out_dtype), [num_faces, 3, size, size], align_corners=False)
        crops = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    scale_t = torch.tensor(scale, dtype=out_dtype, device=crops.device).view(1, 3, 1, 1)
    bias_t = torch.tensor(bias, dtype=out_dtype, device=crops.device).view(1, 3, 1, 1)
    return crops * scale_t + bias_t


def face_align(
    frames: torch.Tensor,
    landmarks: torch.Tensor,
    frame_index: torch.Tensor,
    *,
    size: int = 112,
    template: Union[str, Sequence[Sequence[float]], torch.Tensor] = "arcface",
    input_range: Tuple[float, float] = (-1.0, 1.0),
    channel_order: str = "rgb",
    mean: PerChannel = 127.5,
    std: PerChannel = 127.5,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Crop, align and normalise faces for a face recognizer, differentiably in ``frames``.

    Args:
        frames: ``(F, 3, H, W)`` RGB frames, float32 / bfloat16 / float16 (float64 for tests),
            values in ``input_range`` (decoded videos: [-1, 1]).
        landmarks: ``(N, 5, 2)`` float, frame pixel coordinates (x, y) of left eye, right eye,
            nose, left and right mouth corner (image-left first), pixel centres at integers.
        frame_index: ``(N,)`` int64, the frame of each face: any number of faces per frame,
            frames without faces allowed.
        size: crop side in pixels (112 for ArcFace/SFace recognizers).
        template: ``"arcface"`` (insightface's template for ``size``, see
            :func:`arcface_template`) or a ``(5, 2)`` array of target crop pixels.
        input_range: ``(low, high)`` of the frame values; mapped linearly to 0..255.
        channel_order: ``"rgb"`` or ``"bgr"``, the channel order of the crops.
        mean, std: the crops are ``(p - mean) / std`` for p the sampled pixel on the 0..255
            scale; a number or one per crop channel. ``127.5, 127.5`` gives ArcFace/glintr100
            input in [-1, 1]; ``0, 1`` gives SFace's raw 0..255.
        backend: ``"auto"`` (the compiled op when ``rewardfl._C`` has a kernel for the device,
            else pure torch), ``"extension"`` or ``"torch"``.

    Returns:
        crops: ``(N, 3, size, size)`` float32 (float64 for float64 frames). Pixels whose
            source lies outside the frame are black (p = 0), as OpenCV ``warpAffine``'s
            default border.
        transforms: ``(N, 2, 3)`` in the landmarks' dtype, frame pixel -> crop pixel, OpenCV's
            convention: ``cv2.warpAffine(image, transforms[i], (size, size))`` gives the crop.

    Gradients flow to ``frames`` only (bilinear weights scattered back). ``landmarks`` and the
    transforms carry no gradient: the landmarks come from a detector run without gradient.
    The compiled backward is deterministic on CPU (each frame accumulated by one thread in
    face order) and uses atomic adds on CUDA (float32 sums in arbitrary order; flagged to
    ``torch.use_deterministic_algorithms``).

    Raises:
        ValueError: wrong ranks or shapes, dtypes, devices, or options; non-finite landmarks;
            ``frame_index`` outside ``[0, F)``; degenerate landmarks (all five equal, or on
            one line; :func:`landmark_problems` finds them without a sync). Checking values
            costs one host sync.
    """
    template_points, (low, high), mean3, std3 = _check_arguments(
        frames, landmarks, frame_index, size, template, input_range, channel_order, mean, std
    )
    if backend not in ("auto", "extension", "torch"):
        raise ValueError("face_align: backend must be 'auto', 'extension' or 'torch', got %r" % (backend,))
    op = None if backend == "torch" else _extension_op(frames.device)
    if backend == "extension" and op is None:
        raise ValueError(
            "face_align: backend='extension' but rewardfl._C has no face_align kernel for %s "
            "(extension built: %s); rebuild with `python setup.py build_ext --inplace` or use backend='auto'"
            % (frames.device, _EXTENSION)
        )
    frame_index = frame_index.to(torch.int64)
    _check_values(landmarks, frame_index, frames.shape[0])

    transforms = similarity_transforms(landmarks.detach(), template_points)
    inverse = _invert_similarity(transforms)
    # p = (x - low) * 255 / (high - low); crop = (p - mean) / std = (x - low) * scale + bias.
    # Sampling (x - low) makes the zero border black on the 0..255 scale, like OpenCV's.
    to_255 = 255.0 / (high - low)
    scale = [to_255 / s for s in std3]
    bias = [-m / s for m, s in zip(mean3, std3)]
    channel_map = [0, 1, 2] if channel_order == "rgb" else [2, 1, 0]
    if op is not None:
        crops = op(frames, inverse, frame_index, size, channel_map, low, scale, bias)
    else:
        crops = _face_align_torch(frames, inverse, frame_index, size, channel_map, low, scale, bias)
    return crops, transforms.to(landmarks.dtype)


# --------------------------------------------------------------------------- op registration

# The autograd kernels are C++ (csrc/ops/autograd/face_align_autograd.cpp); torch.compile needs
# the fake kernels below, which give output shapes and dtypes without computing.
_EXTENSION = _C is not None and hasattr(torch.ops.rewardfl, "face_align")


if _EXTENSION:

    @torch.library.register_fake("rewardfl::face_align")
    def _face_align_fake(frames, inverse, frame_index, size, channel_map, input_low, scale, bias):
        out_dtype = torch.float64 if frames.dtype == torch.float64 else torch.float32
        return frames.new_empty((inverse.shape[0], 3, size, size), dtype=out_dtype)

    @torch.library.register_fake("rewardfl::face_align_backward")
    def _face_align_backward_fake(grad, inverse, frame_index, num_frames, height, width, channel_map, scale, dtype):
        return grad.new_empty((num_frames, 3, height, width), dtype=dtype)
