"""The expert boundary a LoRA trained with travels in the exported file's safetensors metadata
(``expert_boundary``), survives a format conversion, and generate's reader warns when the config
samples with another one."""

from __future__ import annotations

import logging

import torch
from safetensors import safe_open

from wan_fixtures import build_tiny, perturb_lora, tiny_dir  # noqa: F401  (session fixture)

from rewardfl.sampling.weights import trainable_weights_of


def _meta(path):
    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {})


def test_exported_lora_names_its_boundary_and_generate_checks_it(tiny_dir, tmp_path, caplog):  # noqa: F811
    from rewardfl.export import main as export_main

    trained = build_tiny(tiny_dir, {"boundary": 0.875})
    perturb_lora(trained)
    (path,) = trained.save_trainable(str(tmp_path / "lora.safetensors"))
    assert _meta(path)["expert_boundary"] == "0.875"
    converted = str(tmp_path / "lora_diffusers.safetensors")
    assert export_main(["--to", "diffusers", "--lora", path, "--out", converted]) == 0
    assert _meta(converted)["expert_boundary"] == "0.875"

    same = build_tiny(tiny_dir, {"boundary": 0.875})
    with caplog.at_level(logging.WARNING, logger="rewardfl"):
        weights = trainable_weights_of(path, model=same)
    assert not [r for r in caplog.records if "expert_boundary" in r.getMessage()]
    want = trained.trainable_state_dict()
    assert weights.keys() == want.keys() and all(torch.allclose(weights[k], want[k]) for k in want)

    other = build_tiny(tiny_dir)  # model.boundary 0.9, the I2V default
    with caplog.at_level(logging.WARNING, logger="rewardfl"):
        trainable_weights_of(converted, model=other)
    warned = [r.getMessage() for r in caplog.records if "expert_boundary" in r.getMessage()]
    assert len(warned) == 1 and "0.875" in warned[0] and "0.9" in warned[0] and "model.boundary: 0.875" in warned[0]
