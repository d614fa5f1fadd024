"""LoRA on a Wan DiT through peft, in DiffSynth-Studio's file format.

DiffSynth-Studio's LoRA files name a layer's factors ``<module>.lora_A.weight`` (rank x in) and
``<module>.lora_B.weight`` (out x rank) and its loader adds ``alpha * B @ A`` (alpha = 1 by
default) to ``<module>.weight``. peft computes ``W x + (lora_alpha / r) * B A x``, so files
written here carry ``B * lora_alpha / r`` and load unchanged in both.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch

__all__ = ["check_lora_targets", "add_lora", "lora_named_parameters", "adapters_disabled",
           "diffsynth_lora_key", "lora_file_state", "merge_lora_into"]


def _linear_names(module: torch.nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]


def check_lora_targets(module: torch.nn.Module, targets: Sequence[str], key: str = "lora_target_modules") -> None:
    """Every target matches at least one Linear (peft's rule: the name or its dotted suffix)."""
    names = _linear_names(module)
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            suffixes = sorted({".".join(n.split(".")[-2:]) for n in names if n.startswith("blocks.0.")})
            raise ValueError(f"{key}: '{target}' matches no linear layer of the DiT; linear layers inside a "
                             f"block end with: {', '.join(suffixes)} (default q,k,v,o,ffn.0,ffn.2)")


def add_lora(dit: torch.nn.Module, targets: Sequence[str], rank: int, alpha: float) -> None:
    """Inject fresh LoRA adapters (B = 0: an identity at start) in fp32 into ``dit``, in place."""
    from peft import LoraConfig, inject_adapter_in_model

    check_lora_targets(dit, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                        init_lora_weights=True)
    inject_adapter_in_model(config, dit)
    for name, p in dit.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        p.requires_grad_(is_lora)
        if is_lora:
            p.data = p.data.float()


def lora_named_parameters(dit: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    for name, p in dit.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            yield name, p


@contextlib.contextmanager
def adapters_disabled(dit: torch.nn.Module):
    """Run ``dit`` as its base model (peft LoRA layers bypassed), restoring the state after."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in dit.modules() if isinstance(m, BaseTunerLayer)]
    enabled = [m for m in layers if not m.disable_adapters]
    # enable_adapters also sets requires_grad of the adapter weights (False, then True): what trains
    # is the caller's choice, so it is put back as it was
    requires_grad = [(p, p.requires_grad) for m in enabled for p in m.parameters()]
    for m in enabled:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in enabled:
            m.enable_adapters(True)
        for p, flag in requires_grad:
            p.requires_grad_(flag)


def diffsynth_lora_key(peft_name: str) -> str:
    """``blocks.0.self_attn.q.lora_A.default.weight`` -> ``blocks.0.self_attn.q.lora_A.weight``."""
    return peft_name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def lora_file_state(dit: torch.nn.Module, scale: float, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """DiffSynth-format LoRA tensors of ``dit`` with ``scale`` (lora_alpha / r) folded into B."""
    out = {}
    for name, p in lora_named_parameters(dit):
        t = p.detach().float()
        if ".lora_B." in name:
            t = t * scale
        out[diffsynth_lora_key(name)] = t.to(dtype or t.dtype).cpu().contiguous()
    return out


def lora_pairs(lora: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (A, B) from a DiffSynth-format LoRA state dict (via diffsynth's own loader rules)."""
    from diffsynth.utils.lora.general import GeneralLoRALoader

    converted = GeneralLoRALoader().convert_state_dict(lora)
    return {k[: -len(".lora_A.weight")]: (converted[k], converted[k.replace(".lora_A.", ".lora_B.")])
            for k in converted if k.endswith(".lora_A.weight")}


def merge_lora_into(name: str, weight: torch.Tensor, pairs: dict, alpha: float = 1.0) -> torch.Tensor:
    """``weight + alpha * B @ A`` (computed in fp32, returned in the weight's dtype) when ``name``
    (``<module>.weight``) has a LoRA pair, else ``weight``."""
    module = name[: -len(".weight")] if name.endswith(".weight") else None
    if module is None or module not in pairs:
        return weight
    a, b = pairs[module]
    merged = weight.float() + alpha * (b.float() @ a.float())
    return merged.to(weight.dtype)
