"""``model.merge_loras``: LoRA files (distilled few-step weights, styles) merged into the frozen
base experts when the model loads, before the trainable LoRA is added.

Each entry is ``{path, strength, expert}``::

    model:
      merge_loras:
        - {path: lightning/high_noise_model.safetensors, strength: 1.0}   # expert from the name
        - {path: lightning/low_noise_model.safetensors}
        - {path: style.safetensors, expert: both, strength: 0.6}

``expert``: ``dit``/``high_noise``, ``dit2``/``low_noise`` or ``both``; left out, the file name
says it (``high_noise`` or ``low_noise`` in it, as Wan2.2 LoRA pairs are named), or the model
has one expert. Each layer's weight becomes ``W + strength * alpha / rank * up @ down``
(``lora.merge_lora_into``, fp32, rounded once to the weight's dtype). The layouts read:

* ComfyUI / DiffSynth / diffusers keys (``lora_formats.read_lora``): ``lora_A``/``lora_B`` with
  or without ``diffusion_model.``, an optional ``.alpha``; ``transformer.`` diffusers names;
* kohya / ComfyUI ``lora_down``/``lora_up`` (the same as ``lora_A``/``lora_B``), also with
  kohya's ``lora_unet_blocks_0_self_attn_q`` module names;
* ``<module>.diff`` / ``<module>.diff_b``: a full weight / bias difference (ComfyUI's rule: added
  times ``strength``), as some distilled LoRAs carry for norms and biases.

A key that matches no module or parameter of the expert, or a shape that differs, is an error
naming the file and the key, raised before any weight changes (no partial merge).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from rewardfl.config import ConfigError

from .lora import merge_lora_into
from .lora_formats import COMFYUI_PREFIX, DIFFUSERS_PREFIX, LoraLayer, diffusers_module, read_lora

__all__ = ["MergeLora", "EXPERT_ALIASES", "validate_merge_loras", "merge_plan", "read_merge_file", "merge_loras",
           "describe_merges", "expert_merges", "apply_merges"]

#: what ``expert`` may say -> the model's expert names
EXPERT_ALIASES = {"dit": ("dit",), "high_noise": ("dit",), "dit2": ("dit2",), "low_noise": ("dit2",),
                  "both": ("dit", "dit2")}
_ENTRY_KEYS = ("path", "strength", "expert")
_KOHYA = re.compile(r"^lora_unet_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")


@dataclasses.dataclass(frozen=True)
class MergeLora:
    """One file to merge: absolute ``path``, ``strength``, the ``experts`` it goes into, and
    ``key`` (``model.merge_loras[i]``) for messages."""

    path: str
    strength: float
    experts: tuple[str, ...]
    key: str


def validate_merge_loras(entries) -> None:
    """The shape of ``model.merge_loras`` (checked where the config enters); ConfigError naming the entry."""
    if entries is None:
        return
    if not isinstance(entries, list):
        raise ConfigError(f"model.merge_loras: expected a list of {{path, strength, expert}}, got {entries!r}")
    for i, e in enumerate(entries):
        key = f"model.merge_loras[{i}]"
        if isinstance(e, str):
            continue  # a bare path: strength 1, expert from the name
        if not isinstance(e, dict):
            raise ConfigError(f"{key}: expected {{path, strength, expert}} or a path, got {e!r}")
        unknown = sorted(set(e) - set(_ENTRY_KEYS))
        if unknown:
            raise ConfigError(f"{key}: unknown key {', '.join(unknown)} (keys: path, strength, expert)")
        if not isinstance(e.get("path"), str) or not e["path"].strip():
            raise ConfigError(f"{key}.path: the LoRA file to merge is missing")
        strength = e.get("strength", 1.0)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise ConfigError(f"{key}.strength: expected a number, got {strength!r}")
        expert = e.get("expert")
        if expert is not None and expert not in EXPERT_ALIASES:
            raise ConfigError(f"{key}.expert: '{expert}' is not one of {', '.join(EXPERT_ALIASES)}")


def _experts_from_name(path: str) -> Optional[tuple[str, ...]]:
    name = os.path.basename(path).lower()
    high, low = "high_noise" in name or "high-noise" in name, "low_noise" in name or "low-noise" in name
    if high != low:
        return EXPERT_ALIASES["high_noise" if high else "low_noise"]
    return None


def merge_plan(config, entries, experts: tuple[str, ...]) -> list[MergeLora]:
    """The validated entries with paths resolved (relative to the config) and experts decided;
    FileNotFoundError / ConfigError naming the entry."""
    plan = []
    for i, e in enumerate(entries or ()):
        key = f"model.merge_loras[{i}]"
        e = {"path": e} if isinstance(e, str) else e
        path = config.resolve_path(os.path.expanduser(e["path"]))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{key}.path: file not found: {path}")
        expert = e.get("expert")
        if expert is not None and expert != "both":
            chosen = EXPERT_ALIASES[expert]
        elif len(experts) == 1:
            chosen = experts
        elif expert == "both":
            chosen = EXPERT_ALIASES["both"]
        else:
            chosen = _experts_from_name(path)
            if chosen is None:
                raise ConfigError(f"{key}.expert: {os.path.basename(path)} does not say which expert it is for "
                                  "(no high_noise/low_noise in its name); set expert: high_noise, low_noise or both")
        missing = [x for x in chosen if experts and x not in experts]
        if missing:
            raise ConfigError(f"{key}.expert: the model has no expert {missing[0]} (it has {', '.join(experts)})")
        plan.append(MergeLora(path, float(e.get("strength", 1.0)), tuple(chosen), key))
    return plan


def _load(path: str, key: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{key}: {path} is not a readable safetensors file: {e}") from e


def read_merge_file(state: dict[str, torch.Tensor], where: str,
                    module_names: set[str]) -> tuple[dict[str, LoraLayer], dict[str, torch.Tensor], dict[str, str]]:
    """``(layers, diffs, keys)`` of a LoRA state dict in any layout the module docstring lists.

    ``layers``: Wan module name -> :class:`LoraLayer`; ``diffs``: Wan parameter name
    (``<module>.weight``/``.bias``) -> difference; ``keys``: each module / parameter -> a key of
    the file (for messages). ``module_names``: the expert's Wan module names (kohya's underscored
    names are resolved against them).
    """
    underscored = {n.replace(".", "_"): n for n in module_names}
    lora: dict[str, torch.Tensor] = {}
    diffs: dict[str, torch.Tensor] = {}
    keys: dict[str, str] = {}
    for key, value in state.items():
        name = key
        m = _KOHYA.match(name)
        if m:
            module = underscored.get(m[1])
            if module is None:
                raise ValueError(f"{where}: key {key} matches no module of the model")
            name = f"{module}.{m[2]}"
        if name.endswith((".diff", ".diff_b")):
            name = name.removeprefix(COMFYUI_PREFIX)
            param = name[: -len(".diff")] + ".weight" if name.endswith(".diff") else name[: -len(".diff_b")] + ".bias"
            diffs[param] = value
            keys[param] = key
            continue
        name = name.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight")
        lora[name] = value
        module = re.sub(r"\.(lora_A\.weight|lora_B\.weight|alpha)$", "", name)
        keys.setdefault(module.removeprefix(COMFYUI_PREFIX).removeprefix(DIFFUSERS_PREFIX), key)
    layers: dict[str, LoraLayer] = {}
    if lora:
        fmt, layers = read_lora(lora, where)
        if fmt == "diffusers":  # keys were recorded in diffusers' names: index them by Wan name too
            keys.update({wan: keys.get(diffusers_module(wan), wan) for wan in layers})
    return layers, diffs, keys


def merge_loras(dits: dict[str, torch.nn.Module], plan: list[MergeLora], *,
                wan_name: Callable[[str], str] = lambda n: n) -> list[str]:
    """Merge every file of ``plan`` into its experts of ``dits`` (in place, frozen weights).

    ``wan_name`` maps a DiT module/parameter name to the Wan layout (the identity for DiffSynth's
    ``WanModel``, ``diffusers_to_wan_key`` for diffusers'). Every file is read and checked
    against its experts before any weight changes. Returns one line per merge (for the log).
    """
    if not plan:
        return []
    named = {}
    for r, dit in dits.items():
        modules = {wan_name(n): m for n, m in dit.named_modules() if n}
        params = {wan_name(n): p for n, p in dit.named_parameters()}
        named[r] = (modules, params)
    work = []
    for item in plan:
        state = _load(item.path, item.key)
        for r in item.experts:
            modules, params = named[r]
            where = f"{item.key} ({item.path})"
            layers, diffs, keys = read_merge_file(state, where, set(modules))
            for module, layer in layers.items():
                target = modules.get(module)
                weight = getattr(target, "weight", None)
                if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                    raise ValueError(f"{where}: key {keys.get(module, module)} matches no linear module of expert {r} "
                                     f"(no {module}); is this LoRA for another model?")
                if tuple(weight.shape) != (layer.up.shape[0], layer.down.shape[1]):
                    raise ValueError(f"{where}: key {keys.get(module, module)}: the LoRA makes a "
                                     f"{layer.up.shape[0]}x{layer.down.shape[1]} update, {module}.weight of expert {r} "
                                     f"is {weight.shape[0]}x{weight.shape[1]}; is this LoRA for another model?")
            for param, diff in diffs.items():
                p = params.get(param)
                if p is None or tuple(p.shape) != tuple(diff.shape):
                    what = "matches no parameter" if p is None else f"is {tuple(diff.shape)}, the parameter {tuple(p.shape)}"
                    raise ValueError(f"{where}: key {keys[param]} {what} of expert {r}")
            work.append((item, r, layers, diffs))
    lines = []
    with torch.no_grad():
        for item, r, layers, diffs in work:
            modules, params = named[r]
            for module, layer in layers.items():
                weight = modules[module].weight
                weight.copy_(merge_lora_into(f"{module}.weight", weight.detach().cpu(), layers, item.strength))
            for param, diff in diffs.items():
                p = params[param]
                p.copy_((p.detach().float() + item.strength * diff.float().to(p.device)).to(p.dtype))
            lines.append(f"merged {item.path} into {r}: {len(layers)} LoRA layers, {len(diffs)} differences, "
                         f"strength {item.strength:g}")
    return lines


def describe_merges(plan: list[MergeLora]) -> list[str]:
    """``run --check``: what will be merged, from the files' headers (no tensor is read)."""
    lines = []
    for item in plan:
        with safe_open(item.path, framework="pt") as f:
            names = list(f.keys())
        layers = {re.sub(r"\.(lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha)$", "", k)
                  for k in names if not k.endswith((".diff", ".diff_b"))}
        diffs = sum(k.endswith((".diff", ".diff_b")) for k in names)
        lines.append(f"merge_loras: {item.path} -> {', '.join(item.experts)} strength {item.strength:g} "
                     f"({len(layers)} LoRA layer(s), {diffs} difference(s))")
    return lines


def expert_merges(config, entries, expert: str, param_shapes: dict[str, tuple]) -> list[tuple]:
    """For ``export --merge`` (tensor by tensor, no model built): the files of ``entries`` that go into
    ``expert``, read and checked against the expert's Wan parameter names and shapes, as
    ``[(MergeLora, layers, diffs)]`` for :func:`apply_merges`."""
    validate_merge_loras(entries)  # a config read without its plugins: not validated yet
    modules = {n.rsplit(".", 1)[0] for n in param_shapes}
    out = []
    for item in merge_plan(config, entries, ("dit", "dit2")):
        if expert not in item.experts:
            continue
        where = f"{item.key} ({item.path})"
        layers, diffs, keys = read_merge_file(_load(item.path, item.key), where, modules)
        for module, layer in layers.items():
            shape = param_shapes.get(f"{module}.weight")
            if shape is None or tuple(shape) != (layer.up.shape[0], layer.down.shape[1]):
                raise ValueError(f"{where}: key {keys.get(module, module)} matches no linear module of expert {expert} "
                                 "of this shape; is this LoRA for another model?")
        for param, diff in diffs.items():
            if tuple(param_shapes.get(param, ())) != tuple(diff.shape):
                raise ValueError(f"{where}: key {keys[param]} matches no parameter of expert {expert} of its shape")
        out.append((item, layers, diffs))
    return out


def apply_merges(name: str, tensor: torch.Tensor, merges: list[tuple]) -> torch.Tensor:
    """``tensor`` (the expert's parameter ``name``, Wan layout) with :func:`expert_merges`' files merged,
    in order, as :func:`merge_loras` does at load."""
    for item, layers, diffs in merges:
        tensor = merge_lora_into(name, tensor, layers, item.strength)
        if name in diffs:
            tensor = (tensor.float() + item.strength * diffs[name].float()).to(tensor.dtype)
    return tensor
