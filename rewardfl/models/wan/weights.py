"""Weight files of the Wan models: where they are, what they hold, how to read them.

These are the pretrained DiTs, text encoder and VAE a model is built from, not training
checkpoints (``rewardfl.checkpoints``); files are written with ``rewardfl.fileio.write_safetensors``.

A ``model_paths`` JSON (the user's key) lists the weight files of each role:

* dict form: ``{"high_noise_model": ..., "low_noise_model": ..., "text_encoder": ..., "vae": ...}``
  (``dit``/``dit2`` are accepted for the two DiTs);
* list form (the reference implementation's): the same files in any order; each entry's role is
  read from its tensor names, and the first DiT listed is the high-noise expert.

An entry is one file (``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with
``weights_only=True``), a sharded safetensors index (``*.safetensors.index.json``), a list of
shards, or a directory holding one of those. Relative paths are relative to the JSON file.

``model_id_with_origin_paths`` (DiffSynth-Studio's form, comma-separated
``org/name:file_pattern``, e.g. ``Wan-AI/Wan2.2-I2V-A14B:high_noise_model/diffusion_pytorch_model*.safetensors``)
names files of hub repositories. Each is looked for, in this order (:func:`find_hub_files`):

1. DiffSynth-Studio's download folder ``$DIFFSYNTH_MODEL_BASE_PATH/<org/name>/`` (default
   ``./models`` in the config's base directory, the working directory);
2. the Hugging Face cache (``$HF_HUB_CACHE``), then the ModelScope cache (``$MODELSCOPE_CACHE``),
   through the clients' own offline look-ups (``snapshot_download(..., local_files_only=True)``);
3. only with ``allow_download: true``: downloaded by the client of ``$DIFFSYNTH_DOWNLOAD_SOURCE``
   (``modelscope``, the default, or ``huggingface``, as in DiffSynth-Studio) into its standard cache.

Only file *headers* are read before the models are built (keys and shapes), so a missing,
truncated or unknown file fails in seconds whatever its size.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import json
import os
from typing import Callable, Optional

import torch
from safetensors import SafetensorError, safe_open

__all__ = [
    "ROLES",
    "WeightFile",
    "HubFiles",
    "ModelSourceNotFound",
    "parse_origin_paths",
    "find_hub_files",
    "resolve_model_paths",
    "read_shapes",
    "load_state_dict",
    "detect_role",
    "assign_roles",
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
#: files that make a folder a tokenizer (transformers' AutoTokenizer reads one of them)
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "spiece.model")

#: DiffSynth-Studio's ``WanVideoPipeline.from_pretrained`` (``redirect_common_files=True``) takes these
#: files of any Wan repository from one converted repository: a cache DiffSynth filled holds them there
DIFFSYNTH_REDIRECTS = {
    "models_t5_umt5-xxl-enc-bf16.pth": ("DiffSynth-Studio/Wan-Series-Converted-Safetensors",
                                        "models_t5_umt5-xxl-enc-bf16.safetensors"),
    "Wan2.1_VAE.pth": ("DiffSynth-Studio/Wan-Series-Converted-Safetensors", "Wan2.1_VAE.safetensors"),
    "Wan2.2_VAE.pth": ("DiffSynth-Studio/Wan-Series-Converted-Safetensors", "Wan2.2_VAE.safetensors"),
}
#: $DIFFSYNTH_DOWNLOAD_SOURCE value -> the hub's name
HUBS = {"modelscope": "ModelScope", "huggingface": "Hugging Face"}


@dataclasses.dataclass
class WeightFile:
    """One role's weights: ``files`` (shards, in order), ``where`` (how the config named it),
    ``source`` (how a hub id was found: "Hugging Face cache", ...; empty for a path the config gave).

    ``files`` is empty only in a dry run (``resolve_model_paths(..., dry_run=True)``) for files that
    would be downloaded; ``source`` then says how many.
    """

    role: Optional[str]
    files: list[str]
    where: str
    source: str = ""

    @property
    def label(self) -> str:
        return f"{self.where} ({', '.join(self.files) if len(self.files) < 4 else self.files[0] + ', ...'})"

    def describe(self) -> str:
        """One line for ``run --check``: the config entry, how it was found, its files."""
        files = ", ".join(self.files) if len(self.files) < 3 else f"{self.files[0]}, ... ({len(self.files)} files)"
        return f"{self.where}: " + "; ".join(s for s in (self.source, files) if s)


class ModelSourceNotFound(FileNotFoundError, ValueError):
    """No file matches a hub id and pattern, and downloads are off or failed: both a missing file and
    a config value that resolves to nothing (``except`` either catches it)."""


@dataclasses.dataclass
class HubFiles:
    """The files of one ``model_id:pattern`` and how they were found.

    ``files``: the matching paths, sorted (a folder for a pattern ending in ``/``); empty in a dry
    run that would download. ``source``: "local folder <base>", "Hugging Face cache",
    "ModelScope cache", "downloaded from ModelScope" or "would download N files (S GB) from
    ModelScope". ``model_id``/``pattern``: what matched (DiffSynth's redirect of a common file
    may differ from what was asked).
    """

    model_id: str
    pattern: str
    files: list[str]
    source: str

    @property
    def label(self) -> str:
        return f"{self.model_id}:{self.pattern} in the {self.source}" if self.source.endswith("cache") else \
            f"{self.model_id}:{self.pattern} ({self.source})"


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


def parse_origin_paths(spec: Optional[str], key: str = "model_id_with_origin_paths") -> list[tuple[str, str]]:
    """``"org/a:pattern, org/b:pattern"`` -> ``[("org/a", "pattern"), ("org/b", "pattern")]``."""
    out = []
    for item in (s.strip() for s in (spec or "").split(",") if s.strip()):
        model_id, _, pattern = item.partition(":")
        if not pattern or model_id.count("/") != 1 or not all(model_id.split("/")):
            raise ValueError(f"{key}: '{item}' is not 'org/name:file_pattern' "
                             "(e.g. Wan-AI/Wan2.2-I2V-A14B:high_noise_model/diffusion_pytorch_model*.safetensors)")
        out.append((model_id, pattern))
    return out


def _matching(root: Optional[str], pattern: str) -> list[str]:
    """Paths under ``root`` matching ``pattern`` (glob, as DiffSynth-Studio matches its local folder)."""
    if not root or not os.path.isdir(root):
        return []
    return sorted(os.path.normpath(p) for p in glob.glob(os.path.join(glob.escape(root), pattern)))


def _hub_pattern(pattern: str) -> str:
    """The pattern the hub clients filter with (DiffSynth's ``ModelConfig.parse_original_file_pattern``)."""
    return "*" if pattern in ("", "./") else pattern + "*" if pattern.endswith("/") else pattern


def _hf_snapshot(model_id: str, pattern: str) -> Optional[str]:
    """The Hugging Face cache's snapshot folder of ``model_id`` (``refs/main``), or None; no network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(model_id, allow_patterns=_hub_pattern(pattern), local_files_only=True)
    except (LocalEntryNotFoundError, ValueError):  # not cached, cached incompletely, or an id HF rejects
        return None


def _ms_snapshot(model_id: str, pattern: str) -> Optional[str]:
    """The ModelScope cache's snapshot folder of ``model_id``, or None; no network."""
    from modelscope.hub.snapshot_download import snapshot_download
    from modelscope_hub.errors import HubError

    try:
        return snapshot_download(model_id, allow_patterns=_hub_pattern(pattern), local_files_only=True)
    except (HubError, OSError, ValueError):  # CacheNotFound: not cached
        return None


def _cache_dirs() -> str:
    from huggingface_hub import constants
    from modelscope_hub.config import get_default_config

    return f"the Hugging Face cache {constants.HF_HUB_CACHE} and the ModelScope cache {get_default_config().cache_dir}"


def _download_source(where: str) -> str:
    source = os.environ.get("DIFFSYNTH_DOWNLOAD_SOURCE", "modelscope").strip().lower()
    if source not in HUBS:
        raise ValueError(f"{where}: DIFFSYNTH_DOWNLOAD_SOURCE={source!r} is not a hub rewardfl downloads from; "
                         f"use {' or '.join(HUBS)}")
    return source


def _remote_files(hub: str, model_id: str, pattern: str) -> list[tuple[str, int]]:
    """(path, bytes) of the files of ``model_id`` on ``hub`` matching ``pattern``: a listing, no download."""
    if hub == "huggingface":
        from huggingface_hub import snapshot_download

        infos = snapshot_download(model_id, allow_patterns=_hub_pattern(pattern), dry_run=True)
        return [(i.filename, i.file_size or 0) for i in infos if i.will_download]
    from modelscope.hub.api import HubApi

    listing = HubApi().get_model_files(model_id, recursive=True)
    return [(f["Path"], int(f.get("Size") or 0)) for f in listing
            if fnmatch.fnmatch(f["Path"], _hub_pattern(pattern))]


def _download(hub: str, model_id: str, pattern: str) -> str:
    """Download the files of ``model_id`` matching ``pattern`` into the hub's standard cache, with the
    client's progress bars; returns the snapshot folder."""
    if hub == "huggingface":
        from huggingface_hub import snapshot_download

        return snapshot_download(model_id, allow_patterns=_hub_pattern(pattern))
    from modelscope.hub.callback import TqdmCallback
    from modelscope.hub.snapshot_download import snapshot_download

    return snapshot_download(model_id, allow_patterns=_hub_pattern(pattern), progress_callbacks=[TqdmCallback])


def find_hub_files(model_id: str, pattern: str, *, where: str, config_dir: str = ".", allow_download: bool = False,
                   dry_run: bool = False) -> HubFiles:
    """The local files of ``model_id:pattern`` (the order in the module docstring); downloads them when
    ``allow_download`` and none is found; with ``dry_run`` only lists what a download would fetch.

    ``pattern`` is a glob relative to the repository (``*`` stays within a folder); one ending in
    ``/`` names a folder. A common Wan file DiffSynth-Studio redirects (``DIFFSYNTH_REDIRECTS``) is
    also looked for under its redirect, and downloaded from there (as DiffSynth does). Raises
    ModelSourceNotFound (one line naming ``where``, the id and the pattern) when nothing matches and
    downloads are off or fail.
    """
    candidates = [(model_id, pattern)]
    if pattern in DIFFSYNTH_REDIRECTS and DIFFSYNTH_REDIRECTS[pattern][0] != model_id:
        candidates.append(DIFFSYNTH_REDIRECTS[pattern])
    base = os.environ.get("DIFFSYNTH_MODEL_BASE_PATH") or os.path.join(config_dir, "models")
    for mid, pat in candidates:
        files = _matching(os.path.join(base, mid), pat)
        if files:
            return HubFiles(mid, pat, files, f"local folder {base}")
        for hub, snapshot in (("Hugging Face", _hf_snapshot), ("ModelScope", _ms_snapshot)):
            files = _matching(snapshot(mid, pat), pat)
            if files:
                return HubFiles(mid, pat, files, f"{hub} cache")
    asked = " or ".join(f"{mid}:{pat}" for mid, pat in candidates)
    if not allow_download:
        raise ModelSourceNotFound(
            f"{where}: no local file matches {asked} (looked in {base} and {_cache_dirs()}); rewardfl never "
            "downloads unless allow_download: true; or fetch it on a machine with network and copy the cache "
            "over (docs/models.md)")
    hub = _download_source(where)
    mid, pat = candidates[-1]
    try:
        if dry_run:
            remote = _remote_files(hub, mid, pat)
        else:
            root = _download(hub, mid, pat)
    except Exception as e:  # the clients raise their own HTTP, offline and not-found errors
        message = " ".join(str(e).split())
        action = "listing" if dry_run else "downloading"
        raise ModelSourceNotFound(f"{where}: {mid}:{pat} is in no local cache and {action} it on {HUBS[hub]} failed "
                                  f"({type(e).__name__}: {message})") from e
    if dry_run:
        if not remote:
            raise ModelSourceNotFound(f"{where}: no file of {mid} on {HUBS[hub]} matches {pat}")
        size = sum(s for _, s in remote)
        return HubFiles(mid, pat, [], f"would download {len(remote)} file{'s' * (len(remote) != 1)} "
                                      f"({size / 1e9:.1f} GB) from {HUBS[hub]}")
    files = _matching(root, pat)
    if not files:
        raise ModelSourceNotFound(f"{where}: downloaded {mid} from {HUBS[hub]} into {root}, but no file there "
                                  f"matches {pat}")
    return HubFiles(mid, pat, files, f"downloaded from {HUBS[hub]}")


def _is_tokenizer_dir(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES) \
        and not glob.glob(os.path.join(glob.escape(path), "*.safetensors*"))


def resolve_model_paths(model_paths: Optional[str], origin_paths: Optional[str] = None,
                        config_dir: str = ".", *, allow_download: bool = False,
                        dry_run: bool = False) -> list[WeightFile]:
    """The weight files the config names, roles known for the dict form (``role=None`` else).

    ``origin_paths`` entries are found by :func:`find_hub_files` (downloaded only with
    ``allow_download``); a matched tokenizer folder gets the role ``tokenizer``. ``dry_run``
    (``run --check``) downloads nothing: an entry that would download has no files.
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
    for i, (model_id, pattern) in enumerate(parse_origin_paths(origin_paths)):
        where = f"model_id_with_origin_paths[{i}]"
        hub = find_hub_files(model_id, pattern, where="model_id_with_origin_paths", config_dir=config_dir,
                             allow_download=allow_download, dry_run=dry_run)
        if not hub.files:
            out.append(WeightFile(None, [], where, hub.label))
        elif len(hub.files) == 1 and _is_tokenizer_dir(hub.files[0]):
            out.append(WeightFile("tokenizer", hub.files, where, hub.label))
        else:  # a sharded model's index, when the pattern also matched it, stands for its shards
            entry = [f for f in hub.files if f.endswith(".index.json")] or hub.files
            entry = entry if len(entry) > 1 else entry[0]
            out.append(WeightFile(None, _expand_entry(entry, config_dir, where), where, hub.label))
    return out


def read_shapes(weights: WeightFile) -> dict[str, tuple[int, ...]]:
    """Tensor names -> shapes, from the safetensors headers only (a ``.pth`` is memory-mapped).

    A truncated or corrupt file raises ValueError naming the role and path.
    """
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


def assign_roles(files: list[WeightFile]) -> dict[str, WeightFile]:
    """Role (``dit``, ``dit2``, ``text_encoder``, ``vae``, ``tokenizer``) -> its weights.

    ``files`` as :func:`resolve_model_paths` returns them; a file without a role (the
    list form) gets one from its tensor names, the first DiT being the high-noise expert.
    Raises ValueError for an unrecognised file, a role given twice or a missing one.
    """
    roles: dict[str, WeightFile] = {}
    for wf in files:
        role = wf.role
        if role is None:
            detected = detect_role(read_shapes(wf))
            if detected is None:
                raise ValueError(f"{wf.where}: {wf.files[0]} is neither a Wan DiT, a umT5 text encoder nor a "
                                 "Wan VAE (by its tensor names)")
            role = detected if detected != "dit" else ("dit" if "dit" not in roles else "dit2")
        if role in roles:
            raise ValueError(f"model_paths: two weight files for the role '{role}': {roles[role].where} and "
                             f"{wf.where}")
        roles[role] = wf
    for role, name in (("dit", "high_noise_model"), ("text_encoder", "text_encoder"), ("vae", "vae")):
        if role not in roles:
            raise ValueError(f"model_paths: no {name} weights listed (needs high_noise_model, "
                             "low_noise_model (A14B), text_encoder and vae)")
    return roles
