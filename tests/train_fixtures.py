"""Fixtures for training runs: a small real dataset and tiny-model configs written as YAML."""

from __future__ import annotations

import os

import pytest
import yaml

from wan_fixtures import tiny_dir  # noqa: F401  (session fixture)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory, face_assets):
    """Two short 64x64 clips of two fetched face photos (pan/zoom), with their metadata.csv."""
    from rewardfl.demo.example_data import build_from_face_assets

    out = str(tmp_path_factory.mktemp("dataset"))
    return build_from_face_assets(out, assets=face_assets, photo_names=("person_a_1", "person_b_1"),
                                  num_frames=5, size=(64, 64), clips_per_photo=1)


def _uses_the_face_pack(raw: dict) -> bool:
    """Whether the reward (one, or a list) or a judge of ``raw`` is a face reward (``reward_model_path``'s users)."""
    reward = raw.get("reward")
    entries = (reward if isinstance(reward, list) else [reward]) + list((raw.get("eval") or {}).get("judges") or [])
    names = [e.get("name") if isinstance(e, dict) else e for e in entries]
    return any(name in ("face_identity", "identity_consistency") for name in names)


@pytest.fixture
def make_config(tmp_path, tiny_dir, small_dataset, face_assets):  # noqa: F811
    """Write a YAML config for a tiny run into tmp_path; returns its path."""

    def make(**overrides):
        raw = {
            "model_name": "wan2_2_tiny",
            "model_paths": os.path.join(tiny_dir, "model_paths.json"),
            "reward_model_path": face_assets.scrfd_sface,
            "lora_rank": 4,
            "mixed_precision": "fp32",
            "device": "cpu",
            "num_inference_steps": 4,
            "mid_timestep": 2,
            "final_timestep": 3,
            "learning_rate": 1e-3,
            "warmup_steps": 1,
            "max_steps": 3,
            "save_steps": 2,
            "seed": 3,
            "output_dir": str(tmp_path / "out"),
            "reward": {"name": "face_identity", "landmark_fallback": True, "det_size": 160,
                       "reference_cache_dir": str(tmp_path / "refcache")},
            "data": {"metadata_path": small_dataset, "num_frames": 5, "height": 64, "width": 64},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(raw.get(key), dict):
                raw[key] = {**raw[key], **value}
            else:
                raw[key] = value
        if not _uses_the_face_pack(raw):  # the top-level key only where a configured plugin declares it
            raw.pop("reward_model_path", None)
        path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    return make
