"""Find the detector and recognizer ONNX files of a face model pack directory.

Recognised by file name (first match wins, per pack):

=================  ==============================  ================================
pack               detector (type)                 recognizer
=================  ==============================  ================================
antelopev2         ``scrfd_10g_bnkps.onnx`` (scrfd) ``glintr100.onnx``
buffalo_l          ``det_10g.onnx`` (scrfd)         ``w600k_r50.onnx``
OpenCV zoo         ``face_detection_yunet_*.onnx``  ``face_recognition_sface_*.onnx``
                   (yunet)
=================  ==============================  ================================

and generically any ``scrfd*.onnx`` / ``det_*.onnx`` (scrfd), ``*yunet*.onnx`` (yunet),
``w600k_*.onnx`` / ``glint*.onnx`` / ``arcface*.onnx`` / ``*sface*.onnx`` (recognizer).
Explicit options (``reward.detector``, ``reward.detector_type``, ``reward.recognizer``)
override the name rules.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import typing
from typing import Literal, Optional

__all__ = ["DETECTOR_PATTERNS", "RECOGNIZER_PATTERNS", "DetectorType", "ModelPack", "find_model_pack"]

#: (glob, detector type); more specific first
DETECTOR_PATTERNS = (
    ("scrfd_10g_bnkps.onnx", "scrfd"),
    ("det_10g.onnx", "scrfd"),
    ("face_detection_yunet*.onnx", "yunet"),
    ("scrfd*.onnx", "scrfd"),
    ("det_*.onnx", "scrfd"),
    ("*yunet*.onnx", "yunet"),
)
RECOGNIZER_PATTERNS = ("glintr100.onnx", "w600k_*.onnx", "face_recognition_sface*.onnx", "glint*.onnx",
                       "arcface*.onnx", "*sface*.onnx")
#: the detector decoders (``detectors.FaceDetector``)
DetectorType = Literal["scrfd", "yunet"]
DETECTOR_TYPES = typing.get_args(DetectorType)

_EXPECTED = ("expected one detector (scrfd_10g_bnkps.onnx, det_10g.onnx, scrfd*.onnx or "
             "face_detection_yunet_*.onnx) and one recognizer (glintr100.onnx, w600k_*.onnx or "
             "face_recognition_sface_*.onnx), e.g. insightface's antelopev2 or buffalo_l, or the OpenCV zoo pair")


@dataclasses.dataclass(frozen=True)
class ModelPack:
    """The two model files of a face pack (absolute paths) and the detector's decoder."""

    detector: str
    detector_type: DetectorType
    recognizer: str


def _detector_type_of(name: str) -> Optional[str]:
    for pattern, kind in DETECTOR_PATTERNS:
        if fnmatch.fnmatch(name.lower(), pattern):
            return kind
    return None


def _is_recognizer(name: str) -> bool:
    return any(fnmatch.fnmatch(name.lower(), p) for p in RECOGNIZER_PATTERNS)


def _resolve(directory: str, value: str, key: str) -> str:
    path = value if os.path.isabs(value) else os.path.join(directory, value)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: file not found: {path} (give a file name inside reward_model_path "
                                f"{directory} or an absolute path)")
    return path


def find_model_pack(directory: Optional[str], *, detector: Optional[str] = None,
                    detector_type: Optional[DetectorType] = None, recognizer: Optional[str] = None) -> ModelPack:
    """The detector and recognizer in ``directory`` (``reward_model_path``).

    ``detector``/``recognizer`` name files explicitly (relative to ``directory`` or absolute);
    ``detector_type`` (``scrfd``/``yunet``) is needed when the detector's name says nothing.
    Raises FileNotFoundError/ValueError that list the ``.onnx`` files found and what is expected.
    """
    if directory is None:
        if detector is None or recognizer is None:
            raise ValueError("reward_model_path: not set; point it at a face model pack directory "
                             "(e.g. `python -m rewardfl.demo.assets fetch` prints one) or set reward.detector and "
                             "reward.recognizer to files")
        directory = "."
    directory = os.path.abspath(os.path.expanduser(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"reward_model_path: not a directory: {directory} (a face model pack: {_EXPECTED})")
    found = sorted(n for n in os.listdir(directory) if n.lower().endswith(".onnx"))
    listing = f"found {found or 'no .onnx files'} in {directory}"

    if detector is not None:
        det_path = _resolve(directory, detector, "reward.detector")
        det_type = detector_type or _detector_type_of(os.path.basename(det_path))
        if det_type is None:
            raise ValueError(f"reward.detector_type: cannot tell the decoder of {os.path.basename(det_path)} from its "
                             f"name; set reward.detector_type to one of {list(DETECTOR_TYPES)}")
    else:
        dets = [(n, _detector_type_of(n)) for n in found if _detector_type_of(n) and not _is_recognizer(n)]
        if len(dets) != 1:
            what = "no detector" if not dets else f"several detectors {[n for n, _ in dets]}"
            raise (FileNotFoundError if not dets else ValueError)(
                f"reward_model_path: {what}: {listing}; {_EXPECTED}; or name the file with reward.detector "
                f"(and reward.detector_type)")
        det_path = os.path.join(directory, dets[0][0])
        det_type = detector_type or dets[0][1]

    if recognizer is not None:
        rec_path = _resolve(directory, recognizer, "reward.recognizer")
    else:
        recs = [n for n in found if _is_recognizer(n) and os.path.join(directory, n) != det_path]
        if len(recs) != 1:
            what = "no recognizer" if not recs else f"several recognizers {recs}"
            raise (FileNotFoundError if not recs else ValueError)(
                f"reward_model_path: {what}: {listing}; {_EXPECTED}; or name the file with reward.recognizer")
        rec_path = os.path.join(directory, recs[0])
    return ModelPack(detector=det_path, detector_type=det_type, recognizer=rec_path)

