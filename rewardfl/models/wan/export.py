"""Export trained LoRA: convert between formats, or merge into an expert (``python -m rewardfl.export``).

``--to comfyui|diffsynth|diffusers`` rewrites one LoRA file (any of the three layouts of
``lora_formats``) in another; each layer adds the same update, ``scale * B @ A``, in every
format. Its safetensors metadata (expert, rank, alpha) is kept and ``format`` updated.

``--merge`` writes one Wan DiT expert with a LoRA (as written by the ``wan2_2`` model's
``save_trainable``, in any of the three layouts) added into its weights: ``W + alpha * scale * B @ A``
computed in fp32 and stored in the base weights' dtype, same tensor names, one safetensors file.
The result loads wherever the original expert did (a ``model_paths`` JSON, diffsynth's
``ModelConfig(path=...)``) and needs no peft. Tensors stream one at a time, so merging a 14B
expert needs about one tensor of extra memory, not a second copy of the expert. The output is
written atomically (``rewardfl.fileio``: a temporary name beside ``--out``, renamed when
complete; the temporary file of a merge killed before is removed by the next write of that
``--out``); an ``--out`` that is one of the inputs (the LoRA, the JSON, any file it lists, the
config) is refused, and an existing ``--out`` is replaced only with ``--force``.

Examples::

    python -m rewardfl.export --to diffusers --lora output/final/trainable_low_noise.safetensors \\
        --out lora_low_noise_diffusers.safetensors
    python -m rewardfl.export --merge --model-paths wan22_paths.json \\
        --lora output/final/trainable_low_noise.safetensors --expert dit2 --out dit2_merged.safetensors

(``python -m rewardfl.models.wan.export`` and ``rewardfl-export`` are the same tool.)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open

from rewardfl.cli import finite_float, user_error_exit
from rewardfl.config import load_config
from rewardfl.fileio import write_safetensors
from rewardfl.registry import resolve_config, resolve_plugins

from .architectures import dit_architecture, dit_key
from .lora import merge_lora_into
from .lora_formats import FORMATS, read_lora, write_lora
from .merge_loras import apply_merges, expert_merges
from .weights import WeightFile, assign_roles, load_state_dict, read_shapes, resolve_model_paths

__all__ = ["merge_expert", "convert_file", "run_export", "main"]


def _dit_weights(model_paths: str, expert: str):
    roles = assign_roles(resolve_model_paths(os.path.abspath(model_paths)))
    if expert not in roles:
        have = [r for r in ("dit", "dit2") if r in roles]
        raise ValueError(f"--expert: '{expert}' is not in {model_paths} (it has {', '.join(have)}; dit = "
                         "high_noise_model, dit2 = low_noise_model)")
    return roles[expert]


def _check_out_path(out_path: str) -> None:
    """``--out`` names a file we may create: not a directory, its parent not a file."""
    if os.path.isdir(out_path):
        raise ValueError(f"--out: {out_path} is a directory; give a file path, e.g. "
                         f"{os.path.join(out_path, 'dit2_merged.safetensors')}")
    parent = os.path.dirname(os.path.abspath(out_path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--out: {parent} is a file, so {out_path} cannot be created; choose another path")


def _refuse_overwriting_inputs(out_path: str, inputs: list[tuple[str, str]]) -> None:
    """Raise when ``out_path`` is one of ``inputs`` (label, path): the rename would replace the input.

    Compared by file identity (device and inode), so symlinks, hard links, ``..`` and relative
    spellings of the same file are all caught. A path that does not exist yet is no input.
    """
    if not os.path.exists(out_path):
        return
    for label, path in inputs:
        if os.path.exists(path) and os.path.samefile(out_path, path):
            raise ValueError(f"--out: {out_path} is {label} ({os.path.realpath(path)}); writing there would "
                             "replace an input, choose another output path")


def _read_lora(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--lora: file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ValueError(f"--lora: {path} is not a readable safetensors file: {e}") from e


def _refuse_replacing(out_path: str, replace: bool) -> None:
    """An existing ``--out`` (not an input: checked before) is replaced only when asked (``--force``)."""
    if os.path.exists(out_path) and not replace:
        raise ValueError(f"--out: {out_path} exists; give --force to replace it, or choose another path")


def convert_file(lora_path: str, out_path: str, to: str, *, replace: bool = False) -> tuple[str, int]:
    """Write ``lora_path`` in the ``to`` layout to ``out_path``; returns (the input's format, #layers).
    An existing ``out_path`` is replaced only with ``replace`` (``--force``)."""
    _check_out_path(out_path)
    _refuse_overwriting_inputs(out_path, [("the --lora file", lora_path)])
    _refuse_replacing(out_path, replace)
    state, meta = _read_lora(lora_path)
    fmt, layers = read_lora(state, f"--lora {lora_path}")
    out = write_lora(layers, to)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    write_safetensors(out_path, out, {**meta, "format": f"{to}-lora", "converted_from": fmt})
    return fmt, len(layers)


def merge_expert(model_paths: str, lora_path: str, out_path: str, *, expert: Optional[str] = None,
                 alpha: float = 1.0, dtype: Optional[torch.dtype] = None, replace: bool = False, config=None) -> int:
    """Write ``expert`` of ``model_paths`` with ``lora_path`` merged to ``out_path``; returns #layers merged.

    ``expert`` defaults to the one recorded in the LoRA file's metadata, else ``dit2``. ``dtype``
    (default: each tensor's own) casts the written floating-point tensors. An existing ``out_path``
    is replaced only with ``replace`` (``--force``). What a killed earlier merge to ``out_path`` left
    (its temporary file) is removed when this one starts. ``config``: a training config whose
    ``model.merge_loras`` files are merged first, as training loaded the expert.
    """
    if not math.isfinite(alpha):
        raise ValueError(f"--alpha: must be a finite number, got {alpha}")
    _check_out_path(out_path)
    lora, meta = _read_lora(lora_path)
    expert = expert or meta.get("expert") or "dit2"
    base = _dit_weights(model_paths, expert)
    # every file the JSON lists is an input too (the other expert, the VAE, ...), not only this expert's
    inputs = [("the --lora file", lora_path), ("the --model-paths file", model_paths)]
    for listed in resolve_model_paths(os.path.abspath(model_paths)):
        inputs += [(f"listed in {model_paths} as {listed.where}", f) for f in listed.files]
    _refuse_overwriting_inputs(out_path, inputs)
    _refuse_replacing(out_path, replace)
    shapes = read_shapes(base)
    dit_architecture({k2: v for k, v in shapes.items() if (k2 := dit_key(k)) is not None}, base.where)
    _, pairs = read_lora(lora, f"--lora {lora_path}")
    if not pairs:
        raise ValueError(f"--lora: {lora_path} holds no LoRA layers (<module>.lora_A.weight / lora_B.weight)")
    by_native = {dit_key(k): k for k in shapes if dit_key(k) is not None}
    entries = (config.model or {}).get("merge_loras") if config is not None and isinstance(config.model, dict) else None
    base_merges = expert_merges(config, entries, expert, {w: shapes[k] for w, k in by_native.items()}) if entries else []
    missing = [m for m in pairs if f"{m}.weight" not in by_native]
    if missing:
        raise ValueError(f"--lora: {len(missing)} LoRA layer(s) name modules the {expert} DiT lacks, e.g. "
                         f"{missing[0]}; was the LoRA trained on another architecture?")
    for m, layer in pairs.items():
        shape = shapes[by_native[f"{m}.weight"]]
        if tuple(shape) != (layer.up.shape[0], layer.down.shape[1]):
            raise ValueError(f"--lora: {m}: LoRA maps {layer.down.shape[1]} -> {layer.up.shape[0]}, the DiT weight "
                             f"is {tuple(shape)}")

    # tensors in file order, each read, merged and written when its turn comes
    items = []
    for path in base.files:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                keys = list(f.keys())
                src_dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
            for key in keys:
                src = _torch_dtype(src_dtypes[key])
                out = dtype if dtype is not None and src.is_floating_point else src

                def make(path=path, key=key, out=out):
                    with safe_open(path, framework="pt") as f:
                        t = f.get_tensor(key)
                    t = apply_merges(dit_key(key) or key, t, base_merges)
                    return merge_lora_into(dit_key(key) or key, t, pairs, alpha).to(out)

                items.append((key, shapes[key], out, make))
        else:
            state = load_state_dict(WeightFile(base.role, [path], base.where))
            for key, t in state.items():
                out = dtype if dtype is not None and t.is_floating_point() else t.dtype
                items.append((key, tuple(t.shape), out,
                              lambda key=key, t=t, out=out: merge_lora_into(
                                  dit_key(key) or key, apply_merges(dit_key(key) or key, t, base_merges), pairs,
                                  alpha).to(out)))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    # written under a temporary name beside out_path and renamed (removed on failure), so a failure
    # never leaves a truncated output nor a half-replaced old one
    try:
        write_safetensors(out_path, items, {"format": "wan-dit", "merged_lora": os.path.basename(lora_path),
                                            "expert": expert, "lora_strength": str(alpha),
                                            **({"merged_base_loras": ", ".join(m.path for m, _, _ in base_merges)}
                                               if base_merges else {})})
    except OSError as e:
        if e.filename is None or _is_temporary_of(e.filename, out_path):
            # a failed write() names no file, a failed open() the temporary one: name what the user gave
            e.filename = out_path
        raise
    return len(pairs)


def _is_temporary_of(path, out_path: str) -> bool:
    """``path`` is ``fileio.atomic_write``'s temporary file for ``out_path`` (``.<name>.<pid>.tmp`` beside it)."""
    path = os.path.abspath(os.fsdecode(path))
    out_path = os.path.abspath(out_path)
    name = os.path.basename(path)
    return (os.path.dirname(path) == os.path.dirname(out_path) and name.endswith(".tmp")
            and name.startswith(f".{os.path.basename(out_path)}."))


def _torch_dtype(name: str) -> torch.dtype:
    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool}[name]


def run_export(argv=None, prog: str = "python -m rewardfl.models.wan.export") -> int:
    """The command line (see the module docstring); raises user errors, the caller prints them."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--merge", action="store_true", help="merge a LoRA into its expert's full weights")
    mode.add_argument("--to", choices=FORMATS, help="convert a LoRA file to this key layout")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model-paths", help="--merge: the model_paths JSON that lists the base experts")
    src.add_argument("--config", help="--merge: a training YAML; its model_paths is used")
    parser.add_argument("--lora", required=True, help="LoRA safetensors (comfyui, diffsynth or diffusers layout, "
                        "e.g. from save_trainable)")
    parser.add_argument("--expert", default=None, help="--merge: dit (high noise) or dit2 (low noise); default: the "
                        "LoRA file's recorded expert, else dit2")
    parser.add_argument("--alpha", type=finite_float, default=1.0, help="--merge: LoRA strength (1 = as trained)")
    parser.add_argument("--dtype", choices=("keep", "bf16", "fp32"), default="keep", help="--merge: dtype of the output")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    parser.add_argument("--force", action="store_true", help="replace an existing --out (never an input)")
    args = parser.parse_args(argv)
    if args.to:
        fmt, n = convert_file(args.lora, args.out, args.to, replace=args.force)
        print(f"{args.out}: {n} LoRA layers, {fmt} -> {args.to}")
        return 0
    if not (args.model_paths or args.config):
        raise ValueError("--merge needs the base weights: give --model-paths JSON or --config YAML")
    model_paths = args.model_paths
    if args.config:
        cfg = load_config(args.config, paths=False)
        model = resolve_config(cfg, resolve_plugins(cfg)).model  # the top-level model_paths is the model's option
        if model.model_paths is None:
            raise ValueError(f"--config: {args.config} sets no model_paths")
        model_paths = cfg.resolve_path(model.model_paths)
        _refuse_overwriting_inputs(args.out, [("the --config file", args.config)])
    dtype = {"keep": None, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    n = merge_expert(model_paths, args.lora, args.out, expert=args.expert, alpha=args.alpha, dtype=dtype,
                     replace=args.force, config=cfg if args.config else None)
    print(f"{args.out}: {n} LoRA layers merged")
    return 0


@user_error_exit("rewardfl.models.wan.export")
def main(argv=None) -> int:
    return run_export(argv)


if __name__ == "__main__":
    sys.exit(main())
