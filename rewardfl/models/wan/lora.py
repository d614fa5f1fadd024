"""LoRA on a Wan DiT through peft: inject, list, bypass, and hand the trained layers to the file formats.

peft computes ``W x + (lora_alpha / r) * B A x`` with the Wan module names (``blocks.0.self_attn.q``);
:func:`lora_layers` gives each adapted layer as a :class:`~.lora_formats.LoraLayer` (A, B, alpha),
which ``lora_formats`` writes in ComfyUI's, DiffSynth-Studio's or diffusers' key layout.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from .lora_formats import LoraLayer

__all__ = ["check_lora_targets", "add_lora", "lora_named_parameters", "adapters_disabled",
           "diffsynth_lora_key", "lora_layers", "merge_lora_into"]


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


def lora_layers(dit: torch.nn.Module, alpha: float) -> dict[str, LoraLayer]:
    """``{Wan module name: LoraLayer}`` of ``dit``'s adapters as trained: ``up`` = B (unscaled),
    ``alpha`` = lora_alpha (scale alpha / rank), detached fp32 copies on the CPU."""
    params = {diffsynth_lora_key(n): p for n, p in lora_named_parameters(dit)}
    layers = {}
    for key, down in params.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            up = params[f"{module}.lora_B.weight"]
            layers[module] = LoraLayer(down.detach().float().cpu().contiguous(),
                                       up.detach().float().cpu().contiguous(), float(alpha))
    return layers


def merge_lora_into(name: str, weight: torch.Tensor, layers: dict[str, LoraLayer], strength: float = 1.0) -> torch.Tensor:
    """``weight + strength * scale * B @ A`` (computed in fp32, returned in the weight's dtype) when
    ``name`` (``<module>.weight``) has a LoRA layer, else ``weight``."""
    module = name[: -len(".weight")] if name.endswith(".weight") else None
    if module is None or module not in layers:
        return weight
    merged = weight.float() + strength * layers[module].delta()
    return merged.to(weight.dtype)
