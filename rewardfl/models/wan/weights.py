"""Weight files of the Wan models: where they are, what they hold, how to read them.

These are the pretrained DiTs, text encoder and VAE a model is built from, not training
checkpoints (``rewardfl.training.checkpoints``); files are written with ``rewardfl.fileio.write_safetensors``.

A ``model_paths`` JSON (the user's key) lists the weight files of each role:

* dict form: ``{"high_noise_model": ..., "low_noise_model": ..., "text_encoder": ..., "vae": ...}``
  (``dit``/``dit2`` are accepted for the two DiTs);
* list form (the reference implementation's): the same files in any order; each entry's role is
  read from its tensor names, and the first DiT listed is the high-noise expert.

An entry is one file (``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with
``weights_only=True``), a sharded safetensors index (``*.safetensors.index.json``), a list of
shards, or a directory holding one of those. Relative paths are relative to the JSON file.

Only file *headers* are read before the models are built (keys and shapes), so a missing,
truncated or unknown file fails in seconds whatever its size.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Callable, Optional

import torch

__all__ = [
    "ROLES",
    "WeightFile",
    "resolve_model_paths",
    "read_shapes",
    "load_state_dict",
    "detect_role",
]

#: role -> names accepted for it in the dict form of model_paths
ROLES = {
    "dit": ("high_noise_model", "dit"),
    "dit2": ("low_noise_model", "dit2"),
    "text_encoder": ("text_encoder",),
    "vae": ("vae",),
    "tokenizer": ("tokenizer",),  # a folder, not weights
}
_PTH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


@dataclasses.dataclass
class WeightFile:
    """One role's weights: ``files`` (shards, in order), ``where`` (how the config named it)."""

    role: Optional[str]
    files: list[str]
    where: str

    @property
    def label(self) -> str:
        return f"{self.where} ({', '.join(self.files) if len(self.files) < 4 else self.files[0] + ', ...'})"


def _expand_entry(entry, base_dir: str, where: str) -> list[str]:
    """Files of one model_paths entry (file, index JSON, shard list or directory); checks they exist."""
    if isinstance(entry, (list, tuple)):
        if not entry:
            raise ValueError(f"{where}: empty list of files")
        out = []
        for i, item in enumerate(entry):
            out += _expand_entry(item, base_dir, f"{where}[{i}]")
        return out
    if not isinstance(entry, str) or not entry:
        raise ValueError(f"{where}: expected a file path or a list of paths, got {entry!r}")
    path = os.path.expanduser(entry)
    path = path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{where}: file not found: {path} (download it there or fix the path in the "
                                "model_paths JSON)")
    if os.path.isdir(path):
        index = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
        if index:
            return _expand_entry(index[0], base_dir, where)
        shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not shards:
            raise FileNotFoundError(f"{where}: directory {path} holds no .safetensors file or index")
        return shards
    if path.endswith(".index.json"):
        try:
            with open(path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{where}: {path} is not a safetensors index (needs a 'weight_map'): {e}") from e
        folder = os.path.dirname(path)
        shards = sorted(set(weight_map.values()))
        return [p for s in shards for p in _expand_entry(os.path.join(folder, s), folder, f"{where} shard {s}")]
    if not (path.endswith(".safetensors") or path.endswith(_PTH_SUFFIXES)):
        raise ValueError(f"{where}: {path}: unknown weights format (expected .safetensors, "
                         ".safetensors.index.json or .pth)")
    return [path]


def _resolve_origin_paths(spec: str, base_dir: str) -> list:
    """``model_id:pattern,...`` (DiffSynth-Studio's syntax) against local folders only; never downloads.

    Looked up under ``$DIFFSYNTH_MODEL_BASE_PATH`` (DiffSynth-Studio's download folder) or
    ``./models`` next to the config, as ``<base>/<model_id>/<pattern>``.
    """
    base = os.environ.get("DIFFSYNTH_MODEL_BASE_PATH") or os.path.join(base_dir, "models")
    entries = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if ":" not in item:
            raise ValueError(f"model_id_with_origin_paths: '{item}' is not 'model_id:file_pattern' "
                             "(e.g. Wan-AI/Wan2.2-I2V-A14B:high_noise_model/diffusion_pytorch_model*.safetensors)")
        model_id, pattern = item.split(":", 1)
        found = sorted(glob.glob(os.path.join(base, model_id, pattern)))
        if not found:
            raise FileNotFoundError(
                f"model_id_with_origin_paths: no local file matches {os.path.join(base, model_id, pattern)}; "
                f"rewardfl never downloads: fetch '{pattern}' of {model_id} (ModelScope or Hugging Face) into "
                f"{os.path.join(base, model_id)} or set DIFFSYNTH_MODEL_BASE_PATH, or list the files in model_paths")
        entries.append(found if len(found) > 1 else found[0])
    return entries


def resolve_model_paths(model_paths: Optional[str], origin_paths: Optional[str] = None,
                        config_dir: str = ".") -> list[WeightFile]:
    """The weight files the config names, roles known for the dict form (``role=None`` else).

    Raises FileNotFoundError/ValueError naming the JSON key (or list index) and the path.
    """
    if model_paths is None and not origin_paths:
        raise ValueError("model_paths: not set; give the JSON listing high_noise_model, low_noise_model, "
                         "text_encoder and vae (or model_id_with_origin_paths)")
    out: list[WeightFile] = []
    if model_paths is not None:
        if not os.path.isfile(model_paths):
            raise FileNotFoundError(f"model_paths: JSON file not found: {model_paths}")
        try:
            with open(model_paths, encoding="utf-8") as f:
                spec = json.load(f)
        except ValueError as e:
            raise ValueError(f"model_paths: {model_paths} is not valid JSON: {e}") from e
        base_dir = os.path.dirname(os.path.abspath(model_paths))
        if isinstance(spec, dict):
            alias = {name: role for role, names in ROLES.items() for name in names}
            for key, entry in spec.items():
                if key not in alias:
                    raise ValueError(f"model_paths: unknown role '{key}' in {model_paths}; known roles: "
                                     f"{', '.join(n for names in ROLES.values() for n in names)}")
                where = f"model_paths[{key!r}]"
                if key == "tokenizer":
                    folder = entry if os.path.isabs(entry) else os.path.normpath(os.path.join(base_dir, entry))
                    if not os.path.isdir(folder):
                        raise FileNotFoundError(f"{where}: tokenizer folder not found: {folder}")
                    out.append(WeightFile("tokenizer", [folder], where))
                    continue
                out.append(WeightFile(alias[key], _expand_entry(entry, base_dir, where), where))
        elif isinstance(spec, list):
            for i, entry in enumerate(spec):
                where = f"model_paths[{i}]"
                out.append(WeightFile(None, _expand_entry(entry, base_dir, where), where))
        else:
            raise ValueError(f"model_paths: {model_paths} must hold a JSON object (role -> file) or a list of files")
    if origin_paths:
        for i, entry in enumerate(_resolve_origin_paths(origin_paths, config_dir)):
            where = f"model_id_with_origin_paths[{i}]"
            out.append(WeightFile(None, _expand_entry(entry, config_dir, where), where))
    return out


def read_shapes(weights: WeightFile) -> dict[str, tuple[int, ...]]:
    """Tensor names -> shapes, from the safetensors headers only (a ``.pth`` is memory-mapped).

    A truncated or corrupt file raises ValueError naming the role and path.
    """
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in weights.files:
        if path.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        shapes[key] = tuple(f.get_slice(key).get_shape())
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{weights.where}: {path} is not a readable safetensors file (truncated or "
                                 f"corrupt? re-download it): {e}") from e
        else:
            for key, value in _load_pth(path, weights.where).items():
                shapes[key] = tuple(value.shape)
    if not shapes:
        raise ValueError(f"{weights.where}: {weights.files} holds no tensors")
    return shapes


def _load_pth(path: str, where: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # zip/pickle errors of every kind
        raise ValueError(f"{where}: cannot read {path} as a weights-only torch checkpoint (truncated, corrupt "
                         f"or holding code objects): {e}") from e
    if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("state_dict", "module", "model_state"):
        state = next(iter(state.values()))
    if not isinstance(state, dict):
        raise ValueError(f"{where}: {path} does not hold a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_state_dict(weights: WeightFile, dtype: Optional[torch.dtype] = None,
                    rename: Callable[[str], Optional[str]] = lambda k: k) -> dict[str, torch.Tensor]:
    """All tensors of ``weights`` on the CPU, renamed by ``rename`` (None drops a key), cast to ``dtype``."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for path in weights.files:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                items = ((k, f.get_tensor(k)) for k in f.keys())
                for key, value in items:
                    new = rename(key)
                    if new is not None:
                        out[new] = value if dtype is None or not value.is_floating_point() else value.to(dtype)
        else:
            for key, value in _load_pth(path, weights.where).items():
                new = rename(key)
                if new is not None:
                    out[new] = value if dtype is None or not value.is_floating_point() else value.to(dtype)
    return out


def detect_role(shapes: dict[str, tuple[int, ...]]) -> Optional[str]:
    """'dit', 'text_encoder' or 'vae' from the tensor names, or None."""
    if any(k.endswith("patch_embedding.weight") or k.endswith("patch_embedding.proj.weight") for k in shapes):
        return "dit"
    if "token_embedding.weight" in shapes or "shared.weight" in shapes:
        return "text_encoder"
    if any(k.startswith(("encoder.conv1.", "model.encoder.conv1.", "decoder.conv1.")) for k in shapes):
        return "vae"
    return None
