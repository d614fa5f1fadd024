"""The ``face_identity`` reward: how much a generated video's face looks like the reference's.

Per step, for a batch of videos ``(B, 3, F, H, W)`` in [-1, 1]:

1. detect faces in all ``B*F`` frames at once (no gradient; onnxruntime or the torch twin), and
   drop faces whose landmarks ``face_align`` would reject (``rewardfl.ops.landmark_problems``:
   non-finite, coincident, collinear): one odd detection must not end a run;
2. pick a face per frame (largest, most similar to the reference, or all); frames without one
   optionally borrow the reference video's landmarks for that frame (``landmark_fallback``);
3. align those faces with ``rewardfl.ops.face_align`` (differentiable in the frames) and embed
   them with the recognizer's torch twin (differentiable);
4. score against the reference's cached embeddings with :func:`pooled_identity_score`.

Steps 1-3 are :class:`FaceReward`'s, shared with ``identity_consistency`` (``consistency.py``):
their results go through the micro-batch's ``StepCache`` (``Reward.cache``), keyed by the videos
tensor and by what they depend on (:attr:`FaceReward.detections_key`, :attr:`FaceReward.faces_key`),
so that two face rewards of one step detect and embed once.

Reference embeddings are computed once per sample (``prepare``), kept in memory by
``sample_id`` and on disk keyed by the reference file's sha256, the model files and the
detection options.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F

from rewardfl.archives import cache_dir, file_sha256
from rewardfl.config import ConfigError, top_level_option
from rewardfl.fileio import atomic_write
from rewardfl.interfaces import Reward, RewardOutput, SampleContext
from rewardfl.ops import ARCFACE_TEMPLATE, landmark_problems

from .augment import AugmentOptions, color_jitter, draw_views, gaussian_blur, transform_landmarks
from .detectors import Detections, FaceDetector
from .model_pack import DetectorType, ModelPack, find_model_pack
from .onnx_runner import Backend
from .recognizer import ChannelOrder, FaceRecognizer
from .scoring import facesim_arc, facesim_consisid, pooled_identity_score, shaped_reward_loss

__all__ = ["FaceReward", "FaceModelOptions", "GeneratedFaces", "FaceIdentityReward", "ReferenceFaces"]

log = logging.getLogger("rewardfl")

#: the ArcFace template's eye distance in its 112 px crop (``rewardfl.ops.ARCFACE_TEMPLATE``)
ARCFACE_EYE_DISTANCE = math.dist(ARCFACE_TEMPLATE[0], ARCFACE_TEMPLATE[1])
#: a reference face the recognizer's crop magnifies more than this is refused by ``prepare`` (at
#: 112 px: eyes under 9 px apart, a face about 22 px wide): magnified further, the embedding comes
#: from a blur. A floor, not a quality guarantee (the demo's 64x64 clips have eyes 10-12 px apart)
MAX_REFERENCE_UPSCALE = 4.0

#: part of the reference cache key: bump when the same models and options give other references
#: (2: insightface heads read per frame, unalignable faces dropped)
REFERENCE_VERSION = 2


@dataclasses.dataclass
class ReferenceFaces:
    """The reference video's faces, one (largest) per frame, on the CPU.

    ``embeddings`` ``(Fr, D)`` normalised (zero rows where no face), ``found`` ``(Fr,)`` bool,
    ``landmarks`` ``(Fr, 5, 2)`` frame pixels of a ``height`` x ``width`` frame; ``degenerate``:
    detected faces dropped because their landmarks cannot be aligned.
    """

    embeddings: torch.Tensor
    found: torch.Tensor
    landmarks: torch.Tensor
    height: int
    width: int
    degenerate: int = 0

    def usable(self, exclude_frame0: bool) -> torch.Tensor:
        """Frames that count: with a face, frame 0 left out (when asked and there are others)."""
        use = self.found.clone()
        if exclude_frame0 and use.shape[0] > 1:
            use[0] = False
        return use

    def mean_embedding(self, exclude_frame0: bool) -> Optional[torch.Tensor]:
        """Mean of the usable normalised embeddings ``(D,)`` or None when no frame counts."""
        use = self.usable(exclude_frame0)
        return self.embeddings[use].mean(0) if bool(use.any()) else None


@dataclasses.dataclass
class FaceModelOptions:
    """Options of every face reward: the models, detection, which face counts, references."""

    #: the face model pack folder (the seed recipe's key)
    reward_model_path: Optional[str] = top_level_option(None, path=True)
    #: detector file (in reward_model_path or absolute); default: recognised by name
    detector: Optional[str] = None
    #: the detector's decoder; default: from the detector's file name
    detector_type: Optional[DetectorType] = None
    #: recognizer file; default: recognised by name
    recognizer: Optional[str] = None
    #: detector canvas side (letterbox), a multiple of 32
    det_size: int = 640
    #: detection score threshold (default 0.5 for scrfd, 0.6 for yunet)
    det_threshold: Optional[float] = None
    #: NMS IoU threshold (default 0.4 for scrfd, 0.3 for yunet)
    nms_threshold: Optional[float] = None
    #: frames per detector call
    det_batch_size: int = 16
    #: which face of a generated frame counts
    face_select: Literal["largest", "most_similar", "all"] = "largest"
    #: frames without a detected face use the reference video's landmarks of that frame
    #: (scaled to the generated size); counted in metrics as fallback_frames. Not with face_select: all
    landmark_fallback: bool = False
    #: leave the reference's frame 0 out of its embedding (when it has other frames)
    exclude_reference_frame0: bool = True
    #: leave the generated frame 0 (the conditioning image) out of the score
    exclude_generated_frame0: bool = True
    #: no-gradient backend: auto is onnxruntime where it has a provider, else the torch twin
    backend: Backend = "auto"
    #: recognizer preprocessing overrides (default: read from the graph, insightface's rule)
    recognizer_channel_order: Optional[ChannelOrder] = None
    recognizer_mean: Optional[float] = None
    recognizer_std: Optional[float] = None
    #: where reference embeddings are cached on disk; default $REWARDFL_CACHE/face_references;
    #: "none" disables the disk cache
    reference_cache_dir: Optional[str] = None
    #: expectation over transformations (augment.py), where the score carries gradient (training):
    #: each face is scored as the mean of this many randomly transformed views (0: off; cost: views
    #: times the recognizer's forward and backward)
    augment_views: int = AugmentOptions.views
    #: a view's scale U(1 -+ augment_scale), rotation U(-+ degrees), shift and per-landmark jitter
    #: U(-+ face sizes), Gaussian blur sigma U(0, augment_blur) crop pixels, contrast/brightness U(-+ augment_color)
    #: (defaults: augment.AugmentOptions)
    augment_scale: float = AugmentOptions.scale
    augment_rotation: float = AugmentOptions.rotation
    augment_shift: float = AugmentOptions.shift
    augment_jitter: float = AugmentOptions.jitter
    augment_blur: float = AugmentOptions.blur
    augment_color: float = AugmentOptions.color

    # Checked where the config enters (run --check too), before any model loads; the values of
    # the Literal fields are checked by the config's type check. The modules below trust these.
    def __post_init__(self):
        if self.landmark_fallback and self.face_select == "all":
            raise ConfigError("reward.landmark_fallback: needs face_select largest or most_similar "
                              "(one face per frame)")
        if self.det_size <= 0 or self.det_size % 32:
            raise ConfigError(f"reward.det_size: must be a positive multiple of 32, got {self.det_size}")
        if self.recognizer_std == 0:
            raise ConfigError("reward.recognizer_std: must be non-zero")
        if self.det_batch_size <= 0:
            raise ConfigError(f"reward.det_batch_size: must be > 0, got {self.det_batch_size}")
        if self.augment_views < 0:
            raise ConfigError(f"reward.augment_views: must be >= 0 (0: off), got {self.augment_views}")
        for key, upper in (("augment_scale", 1.0), ("augment_rotation", 180.0), ("augment_shift", None),
                           ("augment_jitter", None), ("augment_blur", None), ("augment_color", 1.0)):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0 or (upper is not None and value >= upper):
                bound = f" and < {upper:g}" if upper is not None else ""
                raise ConfigError(f"reward.{key}: must be a finite number >= 0{bound}, got {value}")

    @property
    def augment(self) -> AugmentOptions:
        """The ``augment_*`` options as one value."""
        return AugmentOptions(self.augment_views, self.augment_scale, self.augment_rotation, self.augment_shift,
                              self.augment_jitter, self.augment_blur, self.augment_color)


@dataclasses.dataclass
class GeneratedFaces:
    """The faces of a batch of generated videos that count, one row per face.

    ``embeddings`` ``(K, D)`` float32 normalised (differentiable in the videos when they require
    grad; with ``augment_views``, the mean of the views' normalised embeddings, so its length is <= 1); ``index`` ``(K,)`` int64 flat frame index ``b * F + f``; ``fallback`` ``(K,)`` bool
    (landmarks borrowed from the reference); ``degenerate`` 0-dim int64: detections dropped because
    ``face_align`` would reject their landmarks.
    """

    embeddings: torch.Tensor
    index: torch.Tensor
    fallback: torch.Tensor
    degenerate: torch.Tensor


class FaceReward(Reward):
    """What every face reward does: the model pack of ``reward_model_path`` (see ``model_pack``),
    reference faces (memory and disk cache), and detection, face choice, alignment and embedding of
    the generated frames, shared between the face rewards of a step through ``self.cache``."""

    differentiable = True
    Options = FaceModelOptions
    #: the plugin's name in messages
    plugin_name = "face_reward"

    @classmethod
    def check(cls, config, options) -> list[str]:
        """The face model pack's files, found by name without loading them (``run --check``)."""
        pack = cls._find_pack(config, options)
        return [f"detector   {pack.detector} ({pack.detector_type})", f"recognizer {pack.recognizer}"]

    @staticmethod
    def _find_pack(config, opts) -> ModelPack:
        path = config.resolve_path(opts.reward_model_path) if opts.reward_model_path else None
        return find_model_pack(path, detector=opts.detector, detector_type=opts.detector_type,
                               recognizer=opts.recognizer)

    def __init__(self, config, options: Optional[FaceModelOptions] = None, *, device=None, **_runtime):
        opts = options if options is not None else self.Options()
        self.options = opts
        self.pack: ModelPack = self._find_pack(config, opts)
        self.device = torch.device(device) if device not in (None, "auto") else torch.device("cpu")
        self._detector: Optional[FaceDetector] = None
        self._recognizer: Optional[FaceRecognizer] = None
        self._references: dict[str, Optional[ReferenceFaces]] = {}
        self._model_key: Optional[str] = None
        self._seed = int(getattr(config, "seed", 0) or 0)
        self._augment_calls = 0  # draws of augmented views so far (a training checkpoint keeps it)

    # ------------------------------------------------------------------ models (loaded on first use)

    @property
    def detector(self) -> FaceDetector:
        if self._detector is None:
            o = self.options
            self._detector = FaceDetector(self.pack.detector, self.pack.detector_type, size=o.det_size,
                                          score_threshold=o.det_threshold, nms_threshold=o.nms_threshold,
                                          batch_size=o.det_batch_size, backend=o.backend)
        return self._detector

    @property
    def recognizer(self) -> FaceRecognizer:
        if self._recognizer is None:
            o = self.options
            self._recognizer = FaceRecognizer(self.pack.recognizer, backend=o.backend,
                                              channel_order=o.recognizer_channel_order, mean=o.recognizer_mean,
                                              std=o.recognizer_std)
        return self._recognizer

    def model_key(self) -> str:
        """Hash of what reference embeddings depend on: model files, detection and preprocessing."""
        if self._model_key is None:
            h = hashlib.sha256(f"references v{REFERENCE_VERSION}".encode())
            for path in (self.pack.detector, self.pack.recognizer):
                h.update(_file_sha256(path).encode())
            d = self.detector
            h.update(repr((self.pack.detector_type, d.size, d.score_threshold, d.nms_threshold,
                           dataclasses.astuple(self.recognizer.preprocessing))).encode())
            self._model_key = h.hexdigest()[:16]
        return self._model_key

    # ------------------------------------------------------------------ references

    def _cache_dir(self) -> Optional[str]:
        value = self.options.reference_cache_dir
        if value is not None and value.lower() == "none":
            return None
        if value is None:
            value = os.path.join(cache_dir(), "face_references")
        return os.path.expanduser(value)

    def embed_reference(self, frames: torch.Tensor) -> ReferenceFaces:
        """Faces of a reference video ``(F, 3, H, W)`` in [-1, 1] (no gradient, no caching)."""
        frames = frames.detach().to(self.device)
        det, degenerate = _drop_unalignable(self.detector(frames))
        landmarks, _, found = det.largest()
        idx = found.nonzero().flatten()
        emb_dim = self.recognizer.embedding_dim or 1
        embeddings = torch.zeros(frames.shape[0], emb_dim)
        if idx.numel():
            with torch.no_grad():
                crops = self.recognizer.align(frames, landmarks[idx], idx)
                e = self.recognizer.embed(crops).cpu()
            if embeddings.shape[1] != e.shape[1]:
                embeddings = torch.zeros(frames.shape[0], e.shape[1])
            embeddings[idx.cpu()] = e
        return ReferenceFaces(embeddings=embeddings, found=found.cpu(), landmarks=landmarks.cpu().float(),
                              height=int(frames.shape[2]), width=int(frames.shape[3]), degenerate=int(degenerate))

    def reference(self, context: SampleContext) -> Optional[ReferenceFaces]:
        """The reference faces of a sample: memory cache, then disk cache, then computed."""
        key = context.sample_id
        if key in self._references:
            return self._references[key]
        if context.reference is None:
            raise ValueError(f"{self.plugin_name} reward: sample {context.sample_id!r} has no reference video "
                             "(SampleContext.reference is None)")
        ref = context.reference
        cache_file = None
        cache_root = self._cache_dir()
        if cache_root and context.reference_path and os.path.isfile(context.reference_path):
            name = f"{_file_sha256(context.reference_path)[:24]}-{self.model_key()}-{'x'.join(map(str, ref.shape))}.pt"
            cache_file = os.path.join(cache_root, name)
            if os.path.isfile(cache_file):
                try:
                    faces = ReferenceFaces(**torch.load(cache_file, map_location="cpu", weights_only=True))
                    self._references[key] = faces
                    return faces
                except Exception as e:  # noqa: BLE001 - a corrupt cache entry is recomputed
                    log.warning("%s: ignoring unreadable reference cache %s (%s)", self.plugin_name, cache_file, e)
        faces = self.embed_reference(ref)
        if faces.degenerate:
            log.warning("%s: %d face(s) in the reference of sample %r (%s) have landmarks that cannot "
                        "be aligned; their frames count as frames without a face", self.plugin_name, faces.degenerate,
                        context.sample_id, context.reference_path or "in memory")
        if cache_file:
            with atomic_write(cache_file, "wb") as f:
                torch.save(dataclasses.asdict(faces), f)
        self._references[key] = faces
        return faces

    def prepare(self, contexts: Sequence[SampleContext]) -> torch.Tensor:
        """``(B,)`` bool: False for samples whose reference has no usable face (warned once)."""
        valid = torch.zeros(len(contexts), dtype=torch.bool)
        for i, ctx in enumerate(contexts):
            seen = ctx.sample_id in self._references
            faces = self.reference(ctx)
            valid[i] = faces.mean_embedding(self.options.exclude_reference_frame0) is not None
            if not valid[i] and not seen:
                log.warning("%s: no face found in the reference of sample %r (%s); the sample is "
                            "skipped", self.plugin_name, ctx.sample_id, ctx.reference_path or "in memory")
        return valid

    def reference_problem(self, frame: torch.Tensor) -> Optional[str]:
        """``"no face"``, ``"several faces: ..."`` or ``"face too small: ..."`` for a first frame
        ``(3, H, W)`` in [-1, 1] that cannot be a reference; None when it holds exactly one face
        that the recognizer's crop magnifies at most ``MAX_REFERENCE_UPSCALE`` times."""
        det, _ = _drop_unalignable(self.detector(frame[None].detach().to(self.device)))
        if len(det) == 0:
            return "no face"
        if len(det) > 1:
            return f"several faces: {len(det)} found, a reference needs exactly one"
        size = self.recognizer.preprocessing.size
        eye_distance = float((det.landmarks[0, 1] - det.landmarks[0, 0]).norm())
        needed = ARCFACE_EYE_DISTANCE * size / 112 / MAX_REFERENCE_UPSCALE
        if eye_distance < needed:
            return (f"face too small: its eyes are {eye_distance:.0f} px apart, the recognizer's {size} px crop "
                    f"needs at least {needed:.0f} (a closer shot, or larger frames: data.height/width)")
        return None

    # ------------------------------------------------------------------ scoring

    @staticmethod
    def source_frames(contexts: Sequence[SampleContext], num_frames: int) -> torch.Tensor:
        """``(B, F)`` int64: which frame of the full generated video each given frame is
        (``SampleContext.frames`` when a composition scores a subset; else 0..F-1)."""
        rows = []
        for ctx in contexts:
            if ctx.frames is not None and len(ctx.frames) != num_frames:
                raise ValueError(f"face reward: sample {ctx.sample_id!r} lists {len(ctx.frames)} frames "
                                 f"(SampleContext.frames) for a video of {num_frames}")
            rows.append(list(ctx.frames) if ctx.frames is not None else list(range(num_frames)))
        return torch.tensor(rows, dtype=torch.long).view(len(contexts), num_frames)

    def _faces(self, frames: torch.Tensor, det: Detections, refs: list[Optional[ReferenceFaces]],
               ref_mean: torch.Tensor, batch: int, num_frames: int, source: torch.Tensor):
        """``(landmarks (K, 5, 2), flat frame index (K,), fallback (K,) bool)`` of the faces that count;
        ``source`` ``(B, F)`` the frames' indices in the full video (see :meth:`source_frames`)."""
        o = self.options
        n = batch * num_frames
        fallback = torch.zeros(n, dtype=torch.bool, device=frames.device)
        if o.face_select == "all":
            landmarks, index = det.landmarks, det.frame_index
        else:
            if o.face_select == "largest" or len(det) == 0:
                landmarks, _, found = det.largest()
            else:  # most similar to the sample's reference, judged without gradient
                with torch.no_grad():
                    e = self.recognizer.embed(self.recognizer.align(frames.detach(), det.landmarks, det.frame_index))
                sims = (e * ref_mean.to(e.device)[det.frame_index // num_frames]).sum(-1)
                landmarks, _, found = det.pick(sims)
            if o.landmark_fallback:
                landmarks, fallback = self._fallback(landmarks, found, refs, source, frames.shape[-2:])
                found = found | fallback
            index = found.nonzero().flatten()
            landmarks = landmarks[index]
        if o.exclude_generated_frame0 and num_frames > 1:
            keep = source.flatten().to(index.device)[index] != 0
            landmarks, index = landmarks[keep], index[keep]
        return landmarks, index, fallback[index]

    def _fallback(self, landmarks, found, refs, source, size):
        """Reference landmarks of the same frame (scaled to the generated frame size) where no face was found."""
        height, width = int(size[0]), int(size[1])
        batch, num_frames = source.shape
        ref_lm = torch.zeros(batch, num_frames, 5, 2)
        ref_ok = torch.zeros(batch, num_frames, dtype=torch.bool)
        for b, ref in enumerate(refs):
            if ref is None:
                continue
            inside = source[b] < ref.found.shape[0]  # generated frames the reference has
            src = source[b][inside]
            scale = torch.tensor([width / ref.width, height / ref.height])
            ref_lm[b, inside] = ref.landmarks[src] * scale
            ref_ok[b, inside] = ref.found[src]
        ref_lm, ref_ok = ref_lm.view(-1, 5, 2).to(landmarks.device), ref_ok.view(-1).to(found.device)
        use = ~found & ref_ok
        return torch.where(use[:, None, None], ref_lm.to(landmarks.dtype), landmarks), use

    @property
    def detections_key(self) -> str:
        """The ``StepCache`` name of the detections: detector file, decoder, canvas, thresholds, backend
        (what the faces found depend on; the batch size does not change them)."""
        d, o = self.detector, self.options
        return (f"face_detections/{os.path.abspath(self.pack.detector)}:{self.pack.detector_type}/size={d.size}"
                f"/score={d.score_threshold}/nms={d.nms_threshold}/backend={o.backend}")

    @property
    def faces_key(self) -> str:
        """The ``StepCache`` name of the generated faces' embeddings: the detections, the recognizer and
        its preprocessing, and the options that choose the faces that count."""
        o = self.options
        choice = o.face_select + (f"/ref_frame0={not o.exclude_reference_frame0}" if o.face_select == "most_similar"
                                  else "")
        recognizer = f"{os.path.abspath(self.pack.recognizer)}:{dataclasses.astuple(self.recognizer.preprocessing)}"
        augment = f"/augment={dataclasses.astuple(o.augment)}" if o.augment.enabled else ""
        return (f"face_embeddings/{self.detections_key}/{recognizer}/{choice}/fallback={o.landmark_fallback}"
                f"/gen_frame0={not o.exclude_generated_frame0}{augment}")

    def state_dict(self) -> dict:
        return {"augment_calls": self._augment_calls} if self.options.augment.enabled else {}

    def load_state_dict(self, state: dict) -> None:
        self._augment_calls = int(state.get("augment_calls", 0))

    def augmented_embeddings(self, frames: torch.Tensor, landmarks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` the mean of ``augment_views`` views' normalised embeddings per face (augment.py),
        differentiable in ``frames`` ``(F, 3, H, W)``; ``landmarks`` ``(N, 5, 2)``, ``index`` ``(N,)``."""
        a = self.options.augment
        n = index.numel()
        generator = torch.Generator().manual_seed(self._seed * 1_000_003 + self._augment_calls)
        self._augment_calls += 1
        views = draw_views(a, n, generator)
        moved = transform_landmarks(landmarks.repeat(a.views, 1, 1), views)
        crops = self.recognizer.align(frames, moved, index.repeat(a.views))
        p = self.recognizer.preprocessing
        crops = color_jitter(gaussian_blur(crops, views.sigma), views, p.mean, p.std)
        return self.recognizer.embed(crops, grad=True).view(a.views, n, -1).mean(0)

    def reference_means(self, contexts: Sequence[SampleContext], device) -> tuple[list, torch.Tensor, torch.Tensor]:
        """``(refs, ref_mean (B, D) on device, ref_valid (B,) bool)``: each sample's reference faces and
        the mean of their usable embeddings (zeros and False where the reference has no face)."""
        refs = [self.reference(c) for c in contexts]
        means = [r.mean_embedding(self.options.exclude_reference_frame0) if r is not None else None for r in refs]
        emb_dim = next((m.shape[0] for m in means if m is not None), self.recognizer.embedding_dim or 1)
        ref_valid = torch.tensor([m is not None for m in means], dtype=torch.bool)
        ref_mean = torch.stack([m if m is not None else torch.zeros(emb_dim) for m in means]).to(device)
        return refs, ref_mean, ref_valid

    def generated_faces(self, videos: torch.Tensor, refs: list[Optional[ReferenceFaces]], ref_mean: torch.Tensor,
                        source: torch.Tensor) -> GeneratedFaces:
        """Detect (no gradient), choose, align and embed the faces of ``videos`` ``(B, 3, F, H, W)`` in
        [-1, 1]; embeddings differentiable in ``videos`` when it requires grad. ``source`` ``(B, F)``:
        the frames' indices in the full video (:meth:`source_frames`).

        Both steps go through ``self.cache`` keyed by ``videos``: another face reward of the same
        micro-batch, given the same tensor, reuses the detections (same detector options) and the
        embeddings (same recognizer and face choice) instead of computing them again."""
        cache = self.cache  # read once: a reward used alone gets a fresh cache per read
        batch, _, num_frames, height, width = videos.shape
        frames = videos.transpose(1, 2).reshape(batch * num_frames, 3, height, width)
        det, degenerate = cache.get(videos, self.detections_key,
                                    lambda: _drop_unalignable(self.detector(frames.detach())))
        grad = torch.is_grad_enabled() and videos.requires_grad

        def embed() -> GeneratedFaces:
            landmarks, index, fallback = self._faces(frames, det, refs, ref_mean, batch, num_frames, source)
            if index.numel() and grad and self.options.augment.enabled:
                embeddings = self.augmented_embeddings(frames, landmarks, index)
            elif index.numel():
                crops = self.recognizer.align(frames, landmarks, index)
                embeddings = self.recognizer.embed(crops, grad=grad)
            else:
                embeddings = torch.zeros(0, ref_mean.shape[1], device=videos.device)
            return GeneratedFaces(embeddings=embeddings, index=index, fallback=fallback, degenerate=degenerate)

        return cache.get(videos, f"{self.faces_key}/grad={grad}", embed)


class FaceIdentityReward(FaceReward):
    """Face identity reward on ONNX face models from ``reward_model_path`` (see ``model_pack``)."""

    plugin_name = "face_identity"
    #: of :meth:`evaluate`'s numbers: the similarities (frames_with_face and the other counts have no
    #: quality direction; degenerate_faces is lower-is-better)
    higher_is_better = ("score", "facesim_arc")

    @dataclasses.dataclass
    class Options(FaceModelOptions):
        #: loss shaping: loss = -(score - score_mean) / score_std * loss_scale
        score_mean: float = 0.54
        score_std: float = 0.16
        loss_scale: float = 0.1
        #: frames sampled per video for FaceSim-Arc (evaluation)
        eval_num_frames: int = 16
        #: evaluation protocol: "rewardfl" (``score``, ``facesim_arc`` against the reference clip's
        #: faces) or "consisid", which adds ``facesim_arc_consisid`` (and ``facesim_cur_consisid``
        #: with ``facesim_cur_recognizer``) computed as ConsisID's evaluation does (scoring.facesim_consisid)
        eval_protocol: Literal["rewardfl", "consisid"] = "rewardfl"
        #: a second recognizer ONNX file for FaceSim-Cur (CurricularFace in ConsisID); in
        #: reward_model_path or absolute
        facesim_cur_recognizer: Optional[str] = None

        def __post_init__(self):
            super().__post_init__()
            if self.score_std <= 0:
                raise ConfigError(f"reward.score_std: must be > 0, got {self.score_std}")
            if self.eval_num_frames <= 0:
                raise ConfigError(f"reward.eval_num_frames: must be > 0, got {self.eval_num_frames}")
            if self.facesim_cur_recognizer is not None and self.eval_protocol != "consisid":
                raise ConfigError("reward.facesim_cur_recognizer: only the consisid protocol reports FaceSim-Cur; "
                                  "set eval_protocol: consisid")

    def __call__(self, videos: torch.Tensor, contexts: Sequence[SampleContext]) -> RewardOutput:
        """Scores ``(B,)`` of videos ``(B, 3, F, H, W)`` in [-1, 1], differentiable in ``videos``."""
        if videos.dim() != 5 or videos.shape[1] != 3:
            raise ValueError(f"face_identity reward: videos must be (B, 3, F, H, W), got {tuple(videos.shape)}")
        if len(contexts) != videos.shape[0]:
            raise ValueError(f"face_identity reward: {videos.shape[0]} videos but {len(contexts)} contexts")
        o = self.options
        batch, num_frames = videos.shape[0], videos.shape[2]
        refs, ref_mean, ref_valid = self.reference_means(contexts, videos.device)
        source = self.source_frames(contexts, num_frames)
        faces = self.generated_faces(videos, refs, ref_mean, source)
        embeddings, index, fallback, degenerate = faces.embeddings, faces.index, faces.fallback, faces.degenerate
        grad = torch.is_grad_enabled() and videos.requires_grad
        scores, has_face, frame_sim = pooled_identity_score(embeddings, index // num_frames, index % num_frames,
                                                            ref_mean, num_frames)
        if grad and index.numel() == 0:  # keep the graph: the loss backpropagates zeros
            scores = scores + videos.flatten(1)[:, 0].float() * 0.0
        valid = has_face.cpu() & ref_valid
        faced_frames = int((~torch.isnan(frame_sim)).sum())
        counted = int((source != 0).sum()) if o.exclude_generated_frame0 and num_frames > 1 else batch * num_frames
        metrics = {
            "face_frames": float(faced_frames),
            "face_frame_fraction": faced_frames / max(counted, 1),
            "fallback_frames": float(fallback.sum().cpu()),
            "degenerate_faces": float(degenerate.cpu()),
            "reference_degenerate_faces": float(sum(r.degenerate for r in refs if r is not None)),
            "samples_without_face": float((~has_face).sum().cpu()),
            "references_without_face": float((~ref_valid).sum()),
        }
        self.last_frame_similarity = frame_sim
        return RewardOutput(scores=scores.float(), valid=valid, metrics=metrics)

    def loss(self, output: RewardOutput) -> torch.Tensor:
        """``-(score - score_mean) / score_std * loss_scale`` averaged over valid samples (0 if none)."""
        o = self.options
        return shaped_reward_loss(output.scores, output.valid, mean=o.score_mean, std=o.score_std, scale=o.loss_scale)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def frame_embeddings(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Largest face per frame of ``(F, 3, H, W)`` in [-1, 1]: ``(embeddings (F, D), found (F,))``."""
        faces = self.embed_reference(frames)
        return faces.embeddings, faces.found

    @torch.no_grad()
    def evaluate(self, video: torch.Tensor, context: SampleContext) -> dict:
        """Scores of one video ``(3, F, H, W)`` in [-1, 1] without gradient: the training score
        (pooled), FaceSim-Arc over ``eval_num_frames`` frames, and per-frame similarities."""
        o = self.options
        ref = self.reference(context)
        # the video's faces do not depend on the context: scored against every clip (rewardfl.evaluate's
        # specificity), they are found once per cache (judge_scores gives one per video)
        faces = self.cache.get(video, f"video_faces/{self.faces_key}",
                               lambda: self.embed_reference(video.transpose(0, 1)))
        emb, found = faces.embeddings, faces.found
        ref_use = ref.usable(o.exclude_reference_frame0)
        num_frames = emb.shape[0]
        index = found.nonzero().flatten()
        if o.exclude_generated_frame0 and num_frames > 1:
            index = index[index != 0]
        ref_mean = ref.mean_embedding(o.exclude_reference_frame0)
        ref_mean = torch.zeros(emb.shape[1]) if ref_mean is None else ref_mean
        score, has_face, frame_sim = pooled_identity_score(emb[index], torch.zeros_like(index), index,
                                                           ref_mean[None], num_frames)
        arc = facesim_arc(emb, found, ref.embeddings[ref_use], o.eval_num_frames)
        valid = bool(has_face[0]) and bool(ref_use.any())
        result = {
            "score": float(score[0]) if valid else None,
            "facesim_arc": None if torch.isnan(arc) else float(arc),
            "frames": int(video.shape[1]),
            "frames_with_face": int(found.sum()),
            "reference_frames_with_face": int(ref_use.sum()),
            "degenerate_faces": faces.degenerate,
            "frame_similarity": [None if torch.isnan(s) else round(float(s), 6) for s in frame_sim[0]],
        }
        if o.eval_protocol == "consisid":
            result.update(self._consisid_scores(video.transpose(0, 1), context))
        return result

    # ------------------------------------------------------------------ ConsisID's evaluation protocol

    @property
    def cur_recognizer(self) -> Optional[FaceRecognizer]:
        """The FaceSim-Cur recognizer (``facesim_cur_recognizer``), loaded on first use."""
        path = self.options.facesim_cur_recognizer
        if path is None:
            return None
        if getattr(self, "_cur_recognizer", None) is None:
            root = os.path.dirname(self.pack.recognizer)
            full = path if os.path.isabs(path) else os.path.join(root, path)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"reward.facesim_cur_recognizer: file not found: {full}")
            self._cur_recognizer = FaceRecognizer(full, backend=self.options.backend)
        return self._cur_recognizer

    def consisid_faces(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The largest face per frame as ConsisID finds it: ``(landmarks (F, 5, 2), found (F,))`` of
        frames ``(F, 3, H, W)`` in [-1, 1]; a frame without one is padded by a quarter of its height
        and width on each side with gray (128) and searched again (its ``pad_np_bgr_image``)."""
        frames = frames.detach().to(self.device)
        det, _ = _drop_unalignable(self.detector(frames))
        landmarks, _, found = det.largest()
        missing = (~found).nonzero().flatten()
        if missing.numel():
            h, w = frames.shape[-2:]
            top, left = int(h * 0.25), int(w * 0.25)
            gray = 128 / 127.5 - 1.0
            padded = F.pad(frames[missing], (left, left, top, top), value=gray)
            det2, _ = _drop_unalignable(self.detector(padded))
            lm2, _, found2 = det2.largest()
            shift = torch.tensor([left, top], dtype=lm2.dtype, device=lm2.device)
            landmarks[missing] = torch.where(found2[:, None, None], lm2 - shift, landmarks[missing])
            found[missing] = found2
        return landmarks, found

    def _consisid_embeddings(self, frames: torch.Tensor, recognizer: FaceRecognizer) -> tuple[torch.Tensor, torch.Tensor]:
        landmarks, found = self.consisid_faces(frames)
        idx = found.nonzero().flatten()
        emb = None
        if idx.numel():
            e = recognizer.embed(recognizer.align(frames.to(self.device), landmarks[idx], idx)).cpu()
            emb = torch.zeros(frames.shape[0], e.shape[1])
            emb[idx.cpu()] = e
        return emb, found.cpu()

    @torch.no_grad()
    def _consisid_scores(self, frames: torch.Tensor, context: SampleContext) -> dict:
        """``facesim_arc_consisid`` (and ``facesim_cur_consisid``) of generated ``frames`` ``(F, 3, H, W)``
        against the face of the reference's frame 0 (the conditioning image: ConsisID's reference image).
        None when the reference image has no face (ConsisID stops there)."""
        out = {}
        for name, recognizer in (("arc", self.recognizer), ("cur", self.cur_recognizer)):
            if recognizer is None:
                continue
            cache = self.__dict__.setdefault("_consisid_refs", {})
            key = (name, context.sample_id)
            if key not in cache:
                ref_emb, ref_found = self._consisid_embeddings(context.reference[:1], recognizer)
                cache[key] = ref_emb[0] if bool(ref_found[0]) else None
            ref = cache[key]
            emb, found = self._consisid_embeddings(frames, recognizer)
            if ref is None:
                value = None
            elif emb is None:
                value = 0.0
            else:
                value = float(facesim_consisid(emb, found, ref))
            out[f"facesim_{name}_consisid"] = value
        return out


def _drop_unalignable(det: Detections) -> tuple[Detections, torch.Tensor]:
    """``det`` without the faces ``face_align`` would reject (non-finite, coincident or collinear
    landmarks), and how many were dropped (0-dim int64). A frame left without faces counts as a
    frame without a face (it may then borrow the reference's landmarks: ``landmark_fallback``)."""
    bad = landmark_problems(det.landmarks).any(0)
    return det.select(~bad), bad.sum()


def _file_sha256(path: str, _memo: dict = {}) -> str:  # noqa: B006 - process-wide memo by (path, mtime, size)
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    if key not in _memo:
        _memo[key] = file_sha256(path)
    return _memo[key]
