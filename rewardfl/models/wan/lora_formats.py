"""LoRA files for Wan DiTs in the three key layouts the tools read: ComfyUI's, DiffSynth-Studio's, diffusers'.

All three store one layer as two factors, ``lora_A`` (rank x in, "down") and ``lora_B`` (out x
rank, "up"); a loader adds ``scale * B @ A`` to the layer's weight. They differ in the module
names and in where ``scale`` lives (Wan names are the original Wan / DiffSynth / ComfyUI module
names, ``blocks.0.self_attn.q``)::

    format     keys of one layer (blocks.0.self_attn.q)                      scale
    comfyui    diffusion_model.blocks.0.self_attn.q.lora_A.weight            alpha / rank, alpha from
               diffusion_model.blocks.0.self_attn.q.lora_B.weight            ``.alpha`` (block layers);
               diffusion_model.blocks.0.self_attn.q.alpha      (0-dim)       folded into B elsewhere
    diffsynth  blocks.0.self_attn.q.lora_A.weight / .lora_B.weight           folded into B
    diffusers  transformer.blocks.0.attn1.to_q.lora_A.weight / .lora_B.weight  folded into B

The loaders' rules, read in their source:

- ComfyUI (``comfy/lora.py``, ``model_lora_keys_unet``): every model weight
  ``diffusion_model.<module>.weight`` is reachable by the LoRA prefix ``diffusion_model.<module>``
  ("generic lora format"); ``comfy/weight_adapter/lora.py`` (``LoRAAdapter.load``) reads
  ``<prefix>.lora_B.weight`` as up, ``<prefix>.lora_A.weight`` as down and adds
  ``strength * alpha / rank * up @ down``, alpha from ``<prefix>.alpha`` (1 when absent: scale 1).
  Its Wan model (``comfy/ldm/wan/model.py``) keeps the original Wan module names.
- diffusers (``loaders/lora_conversion_utils.py``, ``_convert_non_diffusers_wan_lora_to_diffusers``,
  reached from ``WanLoraLoaderMixin.lora_state_dict`` when any key starts with ``diffusion_model.``):
  strips ``diffusion_model.`` from *every* key, renames the layers :data:`BLOCK_MODULES` /
  :data:`TOP_MODULES` (named by ``diffusers_keys``' table), folds ``alpha / rank`` into A and B for the block layers (self/cross
  attention, ffn) only, and raises on any key left over, so an ``.alpha`` of a non-block layer
  would make the file unloadable: there the scale is folded into B instead. A file already in
  diffusers' names (``transformer.`` prefix) is loaded as it is, with scale 1.
- DiffSynth-Studio (``diffsynth/utils/lora/general.py``, ``GeneralLoRALoader``): drops a leading
  ``diffusion_model.``, reads ``.alpha`` when present (scaling A by alpha / rank, with a warning),
  so it loads both the comfyui and the diffsynth layout.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Literal, Optional

import torch

from .diffusers_keys import BLOCK_NAMES, TOP_NAMES

__all__ = ["FORMATS", "LoraFormat", "LoraLayer", "BLOCK_MODULES", "TOP_MODULES", "diffusers_module", "wan_module",
           "detect_format", "read_lora", "write_lora", "convert_lora", "expert_file", "EXPERT_FILE_SUFFIX"]

LoraFormat = Literal["comfyui", "diffsynth", "diffusers"]
FORMATS: tuple[str, ...] = ("comfyui", "diffsynth", "diffusers")

COMFYUI_PREFIX = "diffusion_model."
DIFFUSERS_PREFIX = "transformer."

#: the Wan layers diffusers' Wan LoRA loader converts (``_convert_non_diffusers_wan_lora_to_diffusers``):
#: the Linear layers of a block, then those outside the blocks (the same function's "Remaining" part);
#: their diffusers names come from the one table of both layouts (``diffusers_keys``)
BLOCK_MODULES = {w: BLOCK_NAMES[w] for w in (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v",
    "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2")}
TOP_MODULES = {w: TOP_NAMES[w] for w in (
    "time_projection.1", "head.head", "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
    "img_emb.proj.1", "img_emb.proj.3")}
_BLOCK_BACK = {v: k for k, v in BLOCK_MODULES.items()}
_TOP_BACK = {v: k for k, v in TOP_MODULES.items()}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")

#: the file of each expert when both are exported: ``<stem>_high_noise.safetensors`` / ``_low_noise``
#: (the names Wan2.2's own folders and ComfyUI's high/low LoRA pairs use)
EXPERT_FILE_SUFFIX = {"dit": "high_noise", "dit2": "low_noise"}


@dataclasses.dataclass
class LoraLayer:
    """One adapted linear layer: ``weight += scale * up @ down``.

    ``down`` (rank, in) and ``up`` (out, rank) as stored; ``alpha`` None means scale 1 (any scale
    already folded into ``up``), else ``scale = alpha / rank``.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: Optional[float] = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def folded_up(self) -> torch.Tensor:
        """``up`` with the scale multiplied in (computed in fp32, returned in ``up``'s dtype)."""
        if self.scale == 1.0:
            return self.up
        return (self.up.float() * self.scale).to(self.up.dtype)

    def delta(self) -> torch.Tensor:
        """``scale * up @ down`` in fp32: what a loader adds to the weight, (out, in)."""
        return self.scale * (self.up.float() @ self.down.float())


def diffusers_module(wan: str) -> str:
    """``blocks.3.self_attn.q`` -> ``blocks.3.attn1.to_q``; ValueError for a layer diffusers cannot name."""
    m = _BLOCK.fullmatch(wan)
    if m and m[2] in BLOCK_MODULES:
        return f"blocks.{m[1]}.{BLOCK_MODULES[m[2]]}"
    if wan in TOP_MODULES:
        return TOP_MODULES[wan]
    raise ValueError(f"LoRA layer {wan}: diffusers' Wan LoRA loader has no name for it (it knows "
                     f"blocks.N.{{{','.join(BLOCK_MODULES)}}} and {', '.join(TOP_MODULES)}); "
                     "export in the comfyui or diffsynth format instead")


def wan_module(diffusers: str) -> str:
    """Inverse of :func:`diffusers_module`."""
    m = _BLOCK.fullmatch(diffusers)
    if m and m[2] in _BLOCK_BACK:
        return f"blocks.{m[1]}.{_BLOCK_BACK[m[2]]}"
    if diffusers in _TOP_BACK:
        return _TOP_BACK[diffusers]
    raise ValueError(f"LoRA layer transformer.{diffusers}: not a Wan transformer layer this converter knows")


def _alpha_in_comfyui_file(wan: str) -> bool:
    """Whether a comfyui-format file may carry ``<module>.alpha``: diffusers' converter reads it
    only for the block layers and raises on any other left-over key."""
    m = _BLOCK.fullmatch(wan)
    return bool(m and m[2] in BLOCK_MODULES)


def detect_format(state: dict[str, torch.Tensor], where: str = "LoRA") -> str:
    """``comfyui``, ``diffusers`` or ``diffsynth`` from the key names; ValueError for none of them."""
    keys = list(state)
    if keys and all(k.startswith(COMFYUI_PREFIX) for k in keys):
        return "comfyui"
    if keys and all(k.startswith(DIFFUSERS_PREFIX) for k in keys):
        return "diffusers"
    if any(k.endswith(".lora_A.weight") for k in keys):
        return "diffsynth"
    example = keys[0] if keys else "(no tensors)"
    raise ValueError(f"{where}: not a Wan LoRA in a known layout (e.g. key {example}); expected "
                     "diffusion_model.<module>.lora_A.weight (comfyui), <module>.lora_A.weight (diffsynth) or "
                     "transformer.<module>.lora_A.weight (diffusers)")


def read_lora(state: dict[str, torch.Tensor], where: str = "LoRA") -> tuple[str, dict[str, LoraLayer]]:
    """``(format, {Wan module name: LoraLayer})`` of a LoRA state dict in any of :data:`FORMATS`.

    Every key must belong to a layer (``lora_A.weight``, ``lora_B.weight``, ``alpha``); anything
    else is a ValueError naming the key, since a loader would silently skip it.
    """
    fmt = detect_format(state, where)
    prefix = {"comfyui": COMFYUI_PREFIX, "diffusers": DIFFUSERS_PREFIX, "diffsynth": ""}[fmt]
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name = key[len(prefix):]
        for suffix, part in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".alpha", "alpha")):
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[part] = value
                break
        else:
            raise ValueError(f"{where}: key {key} is not part of a LoRA layer (<module>.lora_A.weight, "
                             ".lora_B.weight or .alpha)")
    layers = {}
    for module, p in parts.items():
        if "down" not in p or "up" not in p:
            missing = "lora_A" if "down" not in p else "lora_B"
            raise ValueError(f"{where}: layer {prefix}{module} has no {missing}.weight")
        if p["down"].dim() != 2 or p["up"].dim() != 2 or p["up"].shape[1] != p["down"].shape[0]:
            raise ValueError(f"{where}: layer {prefix}{module}: lora_B {tuple(p['up'].shape)} and lora_A "
                             f"{tuple(p['down'].shape)} are not (out, rank) and (rank, in)")
        alpha = float(p["alpha"].item()) if "alpha" in p else None
        wan = wan_module(module) if fmt == "diffusers" else module
        layers[wan] = LoraLayer(p["down"], p["up"], alpha)
    return fmt, layers


def write_lora(layers: dict[str, LoraLayer], fmt: str) -> dict[str, torch.Tensor]:
    """The state dict of ``layers`` in ``fmt`` (see the module docstring for the layouts).

    Tensors are passed through unchanged where the format keeps the scale apart (comfyui block
    layers) or the scale is 1; otherwise ``up`` gets the scale multiplied in (fp32).
    """
    if fmt not in FORMATS:
        raise ValueError(f"LoRA format '{fmt}': choose one of {', '.join(FORMATS)}")
    out: dict[str, torch.Tensor] = {}
    for wan, layer in layers.items():
        down = layer.down.contiguous()
        if fmt == "comfyui":
            key = COMFYUI_PREFIX + wan
            keep_alpha = layer.alpha is not None and _alpha_in_comfyui_file(wan)
            out[f"{key}.lora_A.weight"] = down
            out[f"{key}.lora_B.weight"] = (layer.up if keep_alpha else layer.folded_up()).contiguous()
            if keep_alpha:
                out[f"{key}.alpha"] = torch.tensor(float(layer.alpha), dtype=torch.float32)
        elif fmt == "diffsynth":
            out[f"{wan}.lora_A.weight"] = down
            out[f"{wan}.lora_B.weight"] = layer.folded_up().contiguous()
        else:
            key = DIFFUSERS_PREFIX + diffusers_module(wan)
            out[f"{key}.lora_A.weight"] = down
            out[f"{key}.lora_B.weight"] = layer.folded_up().contiguous()
    return out


def convert_lora(state: dict[str, torch.Tensor], to: str, where: str = "LoRA") -> dict[str, torch.Tensor]:
    """``state`` (any of :data:`FORMATS`) in the ``to`` layout; the update each layer adds is unchanged."""
    _, layers = read_lora(state, where)
    return write_lora(layers, to)


def expert_file(path: str, expert: str, model_experts: tuple[str, ...]) -> str:
    """Where ``expert``'s file goes when it is exported to ``path`` from a model with ``model_experts``:
    ``path`` itself for a one-expert model (TI2V-5B); for a two-expert model (A14B)
    ``<stem>_high_noise.safetensors`` (dit) or ``<stem>_low_noise.safetensors`` (dit2), whether one
    or both of them trained, so the file says which expert it fits (ComfyUI users load it by name)."""
    if len(model_experts) == 1:
        return path
    return f"{os.path.splitext(path)[0]}_{EXPERT_FILE_SUFFIX.get(expert, expert)}.safetensors"
