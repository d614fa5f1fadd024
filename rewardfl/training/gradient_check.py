"""The first update's gradient reaches every trainable tensor, or a warning names those it missed.

A gradient that silently stops (a forward-only attention kernel, a detached tensor, a module the
loss never uses) trains nothing and reports nothing. The check runs once, on the gradients of the
first update after the first real one: on the very first, LoRA's zero-initialised up-projection
``B`` makes the down-projection's gradient exactly zero by construction (``dL/dA = B^T ...``).
Tensors of an expert that no gradient step runs are left out (the plan says they get none).
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch

__all__ = ["ZeroGradientCheck"]

log = logging.getLogger("rewardfl")

#: names listed in the warning, the rest counted
SHOWN = 8


class ZeroGradientCheck:
    """``before_update(named_params)`` before each optimizer step, ``after_update(status)`` after it.

    ``idle_experts``: expert names (the first component of a parameter's name) that no gradient
    step runs."""

    def __init__(self, idle_experts: Iterable[str] = ()):
        self.idle_experts = set(idle_experts)
        self.real_updates = 0
        self.done = False
        #: names warned about (for tests and logs)
        self.zero: list[str] = []

    def before_update(self, named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
        if self.done or self.real_updates < 1:
            return
        named = [(n, p) for n, p in named_params if n.split(".", 1)[0] not in self.idle_experts]
        if not named or all(p.grad is None for _, p in named):
            return  # the gradients live elsewhere (DeepSpeed's partitions): nothing to see here
        with torch.no_grad():  # one host sync for all of them
            flags = [p.grad.ne(0).any() if p.grad is not None else torch.zeros((), dtype=torch.bool, device=p.device)
                     for _, p in named]
            reached = [bool(f) for f in torch.stack([f.cpu() for f in flags]).tolist()]
        self.done = True
        self.zero = [n for (n, _), ok in zip(named, reached) if not ok]
        if self.zero:
            more = f" and {len(self.zero) - SHOWN} more" if len(self.zero) > SHOWN else ""
            log.warning("gradient check: %d of %d trainable tensors got exactly zero gradient in the first update "
                        "after the first: %s%s. Nothing reaches them: check the attention kernel (SageAttention has "
                        "no backward pass), lora_target_modules, and that the reward depends on the video",
                        len(self.zero), len(named), ", ".join(self.zero[:SHOWN]), more)

    def after_update(self, status: str) -> None:
        if status == "updated":
            self.real_updates += 1
