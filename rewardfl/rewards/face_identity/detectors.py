"""Batched face detection: letterbox, one model call for all frames, vectorised decoding, NMS.

Two decoders share everything but the output layout:

* SCRFD (insightface: antelopev2's ``scrfd_10g_bnkps``, buffalo_l's ``det_10g``, SCRFD-2.5G):
  RGB input ``(p - 127.5) / 128``; per stride 8/16/32 scores, box distances and keypoint
  offsets in units of the stride, ``A`` anchors per cell (2 for the ``bnkps`` models).
* YuNet (OpenCV zoo, ``face_detection_yunet_2023mar``): BGR raw 0..255 input; per stride
  class and objectness scores (``score = sqrt(cls * obj)``), box centre offset and log size,
  keypoint offsets; decoded as OpenCV's ``FaceDetectorYN`` does.

Frames are resized (bilinear, antialiased when shrinking, aspect kept) into the top-left of a
``size x size`` canvas (insightface's letterbox), so all frames of a batch share one scale.
Decoding, thresholding
and NMS (``torchvision.ops.batched_nms``, one call for all frames) run as tensor ops on the
frames' device: no Python loop over frames, no host sync per frame.

Exports differ in where a head puts the batch (insightface's packs interleave frames in the
rows); the loader rewrites the recognised layouts to per-frame rows (``onnx_fold``), and a
detector whose heads it cannot recognise runs one frame per call.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch
import torch.nn.functional as F

from .model_pack import DetectorType
from .onnx_fold import UNKNOWN
from .onnx_runner import Backend, OnnxModel, load_onnx_model

__all__ = ["Detections", "FaceDetector", "DEFAULT_THRESHOLDS", "letterbox"]

STRIDES = (8, 16, 32)
#: detector type -> (score threshold, NMS IoU threshold)
DEFAULT_THRESHOLDS = {"scrfd": (0.5, 0.4), "yunet": (0.6, 0.3)}
#: detector type -> (channel order, mean, std) of its input on the 0..255 scale
INPUT_NORMALISATION = {"scrfd": ("rgb", 127.5, 128.0), "yunet": ("bgr", 0.0, 1.0)}
#: detector type -> (number of outputs, what they are, each per stride 8, 16, 32)
OUTPUTS = {"scrfd": (9, "scores, boxes, keypoints"), "yunet": (12, "class scores, object scores, boxes, keypoints")}

log = logging.getLogger("rewardfl")


@dataclasses.dataclass
class Detections:
    """All faces found in ``num_frames`` frames, in frame pixel coordinates.

    ``boxes`` ``(K, 4)`` x1, y1, x2, y2; ``scores`` ``(K,)``; ``landmarks`` ``(K, 5, 2)`` (x, y)
    of left eye, right eye, nose, left and right mouth corner (image-left first);
    ``frame_index`` ``(K,)`` int64. Sorted by frame, then by score (highest first).
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    landmarks: torch.Tensor
    frame_index: torch.Tensor
    num_frames: int

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def select(self, keep: torch.Tensor) -> "Detections":
        """The faces where ``keep`` ``(K,)`` bool is True (order kept; one host sync)."""
        return Detections(boxes=self.boxes[keep], scores=self.scores[keep], landmarks=self.landmarks[keep],
                          frame_index=self.frame_index[keep], num_frames=self.num_frames)

    @property
    def areas(self) -> torch.Tensor:
        wh = (self.boxes[:, 2:] - self.boxes[:, :2]).clamp(min=0)
        return wh[:, 0] * wh[:, 1]

    def largest(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The largest face per frame: ``(landmarks (F, 5, 2), boxes (F, 4), found (F,) bool)``.

        Frames without a face get zeros and ``found = False``. Pure tensor ops (no host sync)."""
        return self.pick(self.areas)

    def pick(self, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per frame the face with the highest ``key`` (``(K,)``); same return as :meth:`largest`."""
        n, device = self.num_frames, self.scores.device
        order = torch.argsort(key, descending=True, stable=True)
        order = order[torch.argsort(self.frame_index[order], stable=True)]
        frames = self.frame_index[order]
        first = torch.ones_like(frames, dtype=torch.bool)
        first[1:] = frames[1:] != frames[:-1]
        # scatter the first (best) face of each frame into dense per-frame tensors
        slot = torch.where(first, frames, torch.full_like(frames, n))  # n: a dump row
        landmarks = torch.zeros(n + 1, 5, 2, dtype=self.landmarks.dtype, device=device)
        boxes = torch.zeros(n + 1, 4, dtype=self.boxes.dtype, device=device)
        found = torch.zeros(n + 1, dtype=torch.bool, device=device)
        landmarks.index_put_((slot,), self.landmarks[order])
        boxes.index_put_((slot,), self.boxes[order])
        found.index_put_((slot,), torch.ones_like(slot, dtype=torch.bool))
        return landmarks[:n], boxes[:n], found[:n]


def letterbox(frames: torch.Tensor, size: int, input_range=(-1.0, 1.0)) -> tuple[torch.Tensor, float]:
    """Frames ``(N, 3, H, W)`` in ``input_range`` -> ``(N, 3, size, size)`` float32 on 0..255 and the
    scale (canvas pixels per frame pixel). The frame fills the top-left, the rest is 0 (black)."""
    n, _, h, w = frames.shape
    scale = min(size / h, size / w)
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    low, high = input_range
    x = (frames.detach().to(torch.float32) - low) * (255.0 / (high - low))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
    canvas = x.new_zeros(n, 3, size, size)
    canvas[:, :, :nh, :nw] = x
    return canvas, nw / w


class FaceDetector:
    """A face detector (SCRFD or YuNet ONNX) over batches of frames.

    ``kind``: ``scrfd`` or ``yunet``; ``size``: letterbox canvas side (a multiple of 32);
    ``score_threshold``/``nms_threshold``: default per kind (:data:`DEFAULT_THRESHOLDS`);
    ``batch_size``: frames per model call (bounds memory; 1 when the model's head layout is not
    recognised, see ``frames_per_call``); ``backend``: see ``OnnxModel``.
    """

    def __init__(self, path: str, kind: DetectorType, *, size: int = 640, score_threshold: Optional[float] = None,
                 nms_threshold: Optional[float] = None, batch_size: int = 16, backend: Backend = "auto",
                 model: Optional[OnnxModel] = None):
        self.kind = kind
        self.size = size
        default_score, default_nms = DEFAULT_THRESHOLDS[kind]
        self.score_threshold = default_score if score_threshold is None else score_threshold
        self.nms_threshold = default_nms if nms_threshold is None else nms_threshold
        self.batch_size = batch_size
        self.model = model or load_onnx_model(path, backend=backend)
        outputs = len(self.model.output_names)
        expected, what = OUTPUTS[kind]
        if outputs != expected:
            hint = {n: f"; it looks like a {other} detector: check reward.detector_type"
                    for other, (n, _) in OUTPUTS.items()}
            hint[1] = "; it looks like a face recognizer (one embedding output): give it as reward.recognizer"
            raise ValueError(f"reward.detector: {path} has {outputs} output(s); expected a face detector of type "
                             f"{kind} with keypoints ({expected} outputs: {what} per stride 8, 16, 32)"
                             f"{hint.get(outputs, '')}")
        layouts = self.model.batch_rewrites.head_layouts
        #: frames per model call: batch_size, or 1 where a head's rows cannot be split per frame
        self.frames_per_call = batch_size
        if UNKNOWN in layouts and batch_size > 1:
            self.frames_per_call = 1
            log.warning("face detector %s: output %s is not fed by a Transpose + Reshape this loader knows, so its "
                        "rows cannot be split per frame; detecting one frame per call", path,
                        self.model.output_names[layouts.index(UNKNOWN)])
        self._centres: dict = {}

    # ------------------------------------------------------------------ model input / output

    def _normalise(self, canvas: torch.Tensor) -> torch.Tensor:
        order, mean, std = INPUT_NORMALISATION[self.kind]
        x = canvas.flip(1) if order == "bgr" else canvas
        return (x - mean) / std if (mean, std) != (0.0, 1.0) else x

    def _raw_outputs(self, frames: torch.Tensor, input_range, backend: Optional[Backend]):
        """Model outputs for frames ``(N, 3, H, W)``, each ``(N, anchors, C)``, and the letterbox
        scale. Letterboxed and run ``frames_per_call`` frames at a time (bounds memory)."""
        per_chunk, scale = [], 1.0
        for start in range(0, frames.shape[0], self.frames_per_call):
            canvas, scale = letterbox(frames[start:start + self.frames_per_call], self.size, input_range)
            outs = self.model.run(self._normalise(canvas), backend)
            # recognised heads put out (N, M, C); an unknown one runs a single frame: (1, M, C) or (M, C)
            per_chunk.append([o.reshape(canvas.shape[0], -1, o.shape[-1]).to(frames.device) for o in outs])
        return [torch.cat(level) for level in zip(*per_chunk)], scale

    def _grid(self, stride: int, anchors: int, device) -> torch.Tensor:
        """``(cells * anchors, 2)`` (column, row) of each anchor, row-major, anchors innermost."""
        key = (stride, anchors, device)
        if key not in self._centres:
            cells = self.size // stride
            rows, cols = torch.meshgrid(torch.arange(cells, device=device), torch.arange(cells, device=device),
                                        indexing="ij")
            grid = torch.stack([cols, rows], dim=-1).reshape(-1, 1, 2).expand(-1, anchors, 2).reshape(-1, 2)
            self._centres[key] = grid.to(torch.float32)
        return self._centres[key]

    def _decode(self, outs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(scores (N, M), boxes (N, M, 4), landmarks (N, M, 5, 2))`` on the canvas, all anchors."""
        scores, boxes, points = [], [], []
        for level, stride in enumerate(STRIDES):
            if self.kind == "scrfd":
                score, dist, kps = outs[level], outs[level + 3], outs[level + 6]
                anchors = score.shape[1] // (self.size // stride) ** 2
                centre = self._grid(stride, anchors, score.device) * stride  # insightface: no half-cell offset
                box = torch.cat([centre - dist[..., :2] * stride, centre + dist[..., 2:] * stride], dim=-1)
                kp = centre[:, None, :] + kps.reshape(*kps.shape[:2], 5, 2) * stride
                score = score[..., 0]
            else:
                cls, obj, bbox, kps = outs[level], outs[level + 3], outs[level + 6], outs[level + 9]
                cell = self._grid(stride, 1, cls.device)
                score = torch.sqrt(cls[..., 0].clamp(0, 1) * obj[..., 0].clamp(0, 1))
                centre = (cell + bbox[..., :2]) * stride
                wh = torch.exp(bbox[..., 2:]) * stride
                box = torch.cat([centre - wh / 2, centre + wh / 2], dim=-1)
                kp = (kps.reshape(*kps.shape[:2], 5, 2) + cell[:, None, :]) * stride
            scores.append(score)
            boxes.append(box)
            points.append(kp)
        return torch.cat(scores, 1), torch.cat(boxes, 1), torch.cat(points, 1)

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor, *, input_range=(-1.0, 1.0),
                 backend: Optional[Backend] = None) -> Detections:
        """Detect faces in ``frames`` ``(N, 3, H, W)`` RGB in ``input_range`` (any device).

        One model call per ``frames_per_call`` frames, one host sync in all (the number of faces)."""
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"face detection: frames must be (N, 3, H, W), got {tuple(frames.shape)}")
        from torchvision.ops import batched_nms  # imported here: torchvision's import takes ~2 s

        n = frames.shape[0]
        outs, scale = self._raw_outputs(frames, input_range, backend)
        scores, boxes, landmarks = self._decode(outs)
        # NaN scores compare False; non-finite boxes or points (a diverged generator) are dropped too
        finite = torch.isfinite(boxes).all(-1) & torch.isfinite(landmarks).flatten(2).all(-1)
        keep = (scores >= self.score_threshold) & finite
        frame_index, _ = keep.nonzero(as_tuple=True)
        scores, boxes, landmarks = scores[keep], boxes[keep] / scale, landmarks[keep] / scale
        kept = batched_nms(boxes, scores, frame_index, self.nms_threshold)  # sorted by score
        kept = kept[torch.argsort(frame_index[kept], stable=True)]
        return Detections(boxes=boxes[kept], scores=scores[kept], landmarks=landmarks[kept],
                          frame_index=frame_index[kept], num_frames=n)
