"""Gradients cannot silently vanish: a forward-only attention kernel (SageAttention, simulated on
the CPU by a stand-in whose output is detached, behind DiffSynth's own flag) is replaced as soon
as a step runs with gradient, and the training check names the trainable tensors a cut
gradient never reaches."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from train_fixtures import make_config, small_dataset  # noqa: F401  (fixtures)
from wan_fixtures import tiny_dir  # noqa: F401  (session fixture)

from rewardfl.config import load_config
from rewardfl.registry import resolve_plugins
from rewardfl.training import Trainer
from rewardfl.training.gradient_check import ZeroGradientCheck


@pytest.fixture
def forward_only_kernel(monkeypatch):
    """DiffSynth as it imports with sageattention installed and no flash-attention; the stand-in
    computes attention exactly (SDPA) and, like SageAttention, has no backward pass."""
    from diffsynth.models import wan_video_dit

    calls = {"n": 0}

    def sageattn(q, k, v, **kwargs):
        calls["n"] += 1
        return F.scaled_dot_product_attention(q, k, v).detach()

    monkeypatch.setattr(wan_video_dit, "FLASH_ATTN_3_AVAILABLE", False)
    monkeypatch.setattr(wan_video_dit, "FLASH_ATTN_2_AVAILABLE", False)
    monkeypatch.setattr(wan_video_dit, "SAGE_ATTN_AVAILABLE", True)
    monkeypatch.setattr(wan_video_dit, "sageattn", sageattn, raising=False)
    return calls


def _two_updates(make_config):
    cfg = load_config(make_config(max_steps=2))
    trainer = Trainer(cfg, resolve_plugins(cfg))
    records = [trainer.train_step(), trainer.train_step()]
    assert all(r["updated"] for r in records)
    return trainer


def test_steps_with_gradient_run_a_kernel_with_a_backward_pass(make_config, forward_only_kernel, monkeypatch, caplog):
    from diffsynth.models import wan_video_dit

    with caplog.at_level(logging.WARNING, logger="rewardfl"):
        trainer = _two_updates(make_config)
    # the no-gradient steps before the first gradient step (0 and 1 of 4) kept DiffSynth's choice
    assert forward_only_kernel["n"] > 0 and wan_video_dit.SAGE_ATTN_AVAILABLE is False
    assert any("sage_attention (package sageattention), which has no backward pass" in r.getMessage()
               for r in caplog.records)
    assert trainer.gradient_check.done and trainer.gradient_check.zero == []
    # reference: the same run where DiffSynth never had the forward-only kernel (SDPA throughout)
    monkeypatch.setattr(wan_video_dit, "SAGE_ATTN_AVAILABLE", False)
    reference = _two_updates(make_config)
    got, want = trainer.model.trainable_state_dict(), reference.model.trainable_state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7)


def test_a_gradient_cut_by_the_kernel_is_named(make_config, forward_only_kernel, monkeypatch, caplog):
    from rewardfl.models.wan import dit_forward

    monkeypatch.setattr(dit_forward, "ensure_attention_backward", lambda: None)  # the code before the fix
    with caplog.at_level(logging.WARNING, logger="rewardfl"):
        trainer = _two_updates(make_config)
    names = [n for n, _ in trainer.model.trainable_parameters()]
    # what the architecture says a detached attention output cuts: every LoRA on q, k, v (self- and
    # cross-attention, and the image keys/values); o and the FFN still get gradient
    upstream = [n for n in names if any(f".{m}." in n for m in ("q", "k", "v", "k_img", "v_img"))]
    assert upstream and len(upstream) < len(names)
    assert sorted(trainer.gradient_check.zero) == sorted(upstream)
    warning = [r.getMessage() for r in caplog.records if "gradient check" in r.getMessage()]
    assert len(warning) == 1 and f"{len(upstream)} of {len(names)} trainable tensors" in warning[0]
    assert upstream[0] in warning[0]


def test_the_check_waits_for_a_real_update_and_skips_idle_experts():
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(2))
    idle = torch.nn.Parameter(torch.ones(2))
    named = [("dit.a", a), ("dit.b", b), ("dit2.x", idle)]
    check = ZeroGradientCheck(idle_experts={"dit2"})
    a.grad, b.grad = torch.tensor([0.0, 1e-30]), torch.zeros(2)
    check.before_update(named)  # the first update: LoRA's A has zero gradient by construction
    assert not check.done
    check.after_update("gradient")  # a skipped update is not a real one
    check.before_update(named)
    assert not check.done
    check.after_update("updated")
    b.grad = None  # no gradient at all: not in the graph
    check.before_update(named)
    assert check.done and check.zero == ["dit.b"]  # a's tiny gradient counts; dit2 is never run with gradient
