"""DiffSynth's Wan attention kernel, and one with a backward pass whenever gradients flow.

``diffsynth.models.wan_video_dit`` picks its kernel from what imports when it is imported, and
``flash_attention`` reads the flags at each call: flash-attention 3 (``flash_attn_interface``)
if ``FLASH_ATTN_3_AVAILABLE``, else flash-attention 2 (``flash_attn``) if
``FLASH_ATTN_2_AVAILABLE``, else SageAttention (``sageattention``) if ``SAGE_ATTN_AVAILABLE``,
else torch's ``scaled_dot_product_attention``. SageAttention has no backward pass: with it
installed and no flash-attention, a reward's gradient through every attention layer would be
cut without an error. :func:`ensure_attention_backward`, called before each forward that runs
with autograd on, switches such a process to torch's SDPA (warned once); steps without gradient
before that keep DiffSynth's choice.
"""

from __future__ import annotations

import logging

__all__ = ["attention_kernel", "ensure_attention_backward", "KERNEL_PACKAGES"]

log = logging.getLogger("rewardfl")

#: DiffSynth's kernels in its order of preference -> (its flag in wan_video_dit, the package that provides it)
KERNEL_PACKAGES = {
    "flash_attention_3": ("FLASH_ATTN_3_AVAILABLE", "flash_attn_interface"),
    "flash_attention_2": ("FLASH_ATTN_2_AVAILABLE", "flash-attn"),
    "sage_attention": ("SAGE_ATTN_AVAILABLE", "sageattention"),
}
#: kernels without a backward pass
FORWARD_ONLY = ("sage_attention",)


def attention_kernel() -> str:
    """The kernel DiffSynth's Wan attention runs now: a key of :data:`KERNEL_PACKAGES` or ``"sdpa"``."""
    from diffsynth.models import wan_video_dit

    for kernel, (flag, _) in KERNEL_PACKAGES.items():
        if getattr(wan_video_dit, flag, False):
            return kernel
    return "sdpa"


def ensure_attention_backward() -> None:
    """Make DiffSynth's Wan attention differentiable for the rest of the process: a forward-only
    kernel's flag is cleared (so DiffSynth falls through to the next kernel, torch's SDPA at the
    latest, which always has a backward pass), with one warning naming the package."""
    from diffsynth.models import wan_video_dit

    kernel = attention_kernel()
    while kernel in FORWARD_ONLY:
        flag, package = KERNEL_PACKAGES[kernel]
        setattr(wan_video_dit, flag, False)
        chosen, kernel = kernel, attention_kernel()
        log.warning("attention: DiffSynth chose %s (package %s), which has no backward pass; from the first step "
                    "with gradient on, attention runs %s (install flash-attn for a fast differentiable kernel)",
                    chosen, package, kernel)
