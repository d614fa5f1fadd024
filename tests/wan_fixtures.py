"""Fixtures for the Wan model tests: the tiny twin's files, written once per session.

Import the fixtures into a test module with ``from wan_fixtures import tiny_dir, build_tiny``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """A folder written by ``make_tiny`` (identity VAE): checkpoints, tokenizer, model_paths.json."""
    from rewardfl.demo.make_tiny import make_tiny

    out = str(tmp_path_factory.mktemp("wan_tiny"))
    make_tiny(out)
    return out


def tiny_config(tiny_dir: str, **overrides):
    """A TrainConfig for the tiny twin (fp32, CPU); ``overrides`` are top-level keys."""
    from rewardfl.config import config_from_dict

    raw = {"model_name": "wan2_2_tiny", "model_paths": os.path.join(tiny_dir, "model_paths.json"),
           "lora_rank": 4, "mixed_precision": "fp32"}
    raw.update(overrides)
    return config_from_dict(raw)


def tiny_options(config, options=None):
    """The ``wan2_2_tiny`` options of ``config``: ``options`` (a mapping) with the top-level keys the model
    declares (``model_paths``, ``lora_rank``, ...) routed in, as the registry resolves them."""
    from rewardfl import registry

    cls = registry.load_plugin("model", "wan2_2_tiny")
    return registry.build_options("model", "wan2_2_tiny", cls, options or {}, config.plugin_keys)


def build_tiny(tiny_dir: str, options=None, **overrides):
    """A ``wan2_2_tiny`` model on the CPU through the registry (the real loading path)."""
    from rewardfl import registry

    return registry.create("model", "wan2_2_tiny", tiny_config(tiny_dir, **overrides), options or {},
                           device=torch.device("cpu"))


def write_paths(folder: str, spec, name: str = "paths.json") -> str:
    """Write a model_paths JSON (dict or list form) into ``folder``; returns its path."""
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    return path


def perturb_lora(model, seed: int = 0, scale: float = 0.05) -> None:
    """Give every trainable LoRA weight a deterministic random value (fresh B is 0: an identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
