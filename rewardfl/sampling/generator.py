"""Generate videos: ``python -m rewardfl.generate cfg.yaml --checkpoint {base|PATH} --out DIR``.

The same model and sampler plugins as training, in the model's dtype, without gradient, over all
``num_inference_steps`` steps (the training plan with ``final = N - 1`` and no gradient step: no
truncation). One mp4 per (clip, seed) plus ``index.json``. The clips are ``--metadata CSV``, or one
``--image IMG --prompt TEXT``, or else the config's held-out clips (``data.eval_metadata_path`` /
``data.eval_fraction``).

``--checkpoint`` is ``base`` (the model as loaded, no trained weights), a training checkpoint
directory (``OUTPUT_DIR/checkpoints/checkpoint-N``, verified against its manifest), an exported
directory (``OUTPUT_DIR/final``) or one exported file (``final/trainable_low_noise.safetensors``).

Starting noise depends only on (config ``seed``, ``--seeds`` entry, clip ``sample_id``): every
checkpoint starts from the same noise, and the same checkpoint, seed and device give bit-identical
videos.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import hashlib
import os
import re
import sys
from typing import Optional, Sequence

import torch

from .cli import user_error_exit
from .registry import load_resolved, resolve_config

__all__ = ["Generator", "full_plan", "noise_seed", "trainable_weights_of", "check_weights_source", "parse_seeds", "main"]


def noise_seed(seed: int, sample_id: str) -> int:
    """The sampler's per-sample seed for clip ``sample_id`` and generation seed ``seed`` (< 2**56)."""
    digest = hashlib.sha256(f"rewardfl-generate:{int(seed)}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def full_plan(cfg, sampler, model, boundary):
    """All ``num_inference_steps`` steps, none with gradient: the training plan with mid = final = N - 1."""
    from .training.policy import plan_steps

    n = cfg.num_inference_steps
    whole = dataclasses.replace(cfg, mid_timestep=n - 1, final_timestep=n - 1)
    plan = plan_steps(whole, sampler, model.experts, model.experts, boundary)  # every expert may run the last step
    return [dataclasses.replace(p, grad=False) for p in plan]


def _read_exported(files: Sequence[str], source: str) -> dict[str, torch.Tensor]:
    """Exported trainable weights (``VideoModel.save_trainable``'s files) in ``trainable_state_dict`` keys.

    Each file's safetensors metadata names its ``expert`` (keys get that prefix); a LoRA export also
    records ``lora_alpha`` and ``lora_rank`` and folds ``alpha / rank`` into ``lora_B`` (DiffSynth's
    convention), which is undone here."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error type, or OSError
            raise ValueError(f"--checkpoint {source}: {path} is not a readable safetensors file ({e})") from e
        expert = meta.get("expert")
        if not expert:
            raise ValueError(f"--checkpoint {source}: {path} has no 'expert' in its metadata; give a file written "
                             "by rewardfl's export (OUTPUT_DIR/final/*.safetensors) or a checkpoint directory")
        scale = (float(meta["lora_alpha"]) / float(meta["lora_rank"])
                 if "lora_alpha" in meta and "lora_rank" in meta else None)
        for key, value in tensors.items():
            if scale is not None and ".lora_B." in key:
                value = value / scale
            state[f"{expert}.{key}"] = value
    return state


_VERIFIED: set = set()  # checkpoint directories that verified in this process


def _weights_source(spec: str, weights: str) -> tuple[str, list[str]]:
    """Where ``--checkpoint spec`` (not ``base``) keeps the weights ``weights`` names: ``("checkpoint",
    [directory])`` (verified against its manifest) or ``("exported", [files])``; the one-line errors of a
    wrong path. Reads no tensor."""
    from .training.checkpoints import CheckpointError, verified_checkpoint
    from .training.ema import EMA_FILE

    if weights not in ("trained", "ema"):
        raise ValueError(f"--weights: trained or ema, got {weights!r}")
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "state.json")):
        try:
            stamp = (path, os.stat(path).st_mtime_ns, os.path.getmtime(os.path.join(path, "state.json")))
            if stamp not in _VERIFIED:  # checked before the model loads, and not hashed again when it does
                verified_checkpoint(path)
                _VERIFIED.add(stamp)
        except CheckpointError as e:
            raise ValueError("--checkpoint " + str(e).removeprefix("resume_from_checkpoint: ")) from e
        if weights == "ema" and not os.path.isfile(os.path.join(path, EMA_FILE)):
            raise ValueError(f"--weights ema: {path} holds no {EMA_FILE}; it was trained without ema_decay")
        return "checkpoint", [path]
    if weights == "ema":
        if not os.path.isdir(os.path.join(path, "ema")):
            raise ValueError(f"--weights ema: {spec} has no ema/ export (give a checkpoint directory or OUTPUT_DIR/final "
                             "of a run trained with ema_decay)")
        path = os.path.join(path, "ema")
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise ValueError(f"--checkpoint {spec}: {path} holds neither a training checkpoint (state.json) nor "
                             "exported .safetensors files; point it at OUTPUT_DIR/checkpoints/checkpoint-N or "
                             "OUTPUT_DIR/final")
        return "exported", files
    if os.path.isfile(path):
        return "exported", [path]
    raise FileNotFoundError(f"--checkpoint {spec}: not found ({path}); give base, a checkpoint directory, "
                            "OUTPUT_DIR/final or an exported .safetensors file")


def check_weights_source(spec: str, weights: str = "trained") -> None:
    """The one-line error ``trainable_weights_of`` would give for a wrong path, a checkpoint that does not
    verify or a truncated or foreign exported file, without reading a tensor or building the model: what
    ``generate`` and ``evaluate`` run first."""
    if spec == "base":
        return
    kind, files = _weights_source(spec, weights)
    if kind == "exported":
        _check_headers(spec, files)


def _check_headers(spec: str, files: Sequence[str]) -> None:
    from safetensors import safe_open

    for path in files:
        try:  # the header, and that the file covers every tensor it lists (a truncated file does not)
            with safe_open(path, "pt") as f:
                f.metadata()
        except Exception as e:  # safetensors raises its own SafetensorError, or OSError
            reason = " ".join(str(e).split())
            raise ValueError(f"--checkpoint {spec}: {path} is not a readable safetensors file ({reason}); give a "
                             "complete file rewardfl exported") from e


def trainable_weights_of(spec: str, weights: str = "trained", model=None) -> Optional[dict[str, torch.Tensor]]:
    """The trainable weights ``--checkpoint spec`` names, in ``trainable_state_dict`` keys (None: base).

    ``weights="ema"``: the moving average instead (``ema_decay``): ``ema.safetensors`` of a checkpoint
    directory, or ``ema/`` of an export directory. Exported files are read by
    ``model.read_exported(files)`` when the model has one (it knows its export formats, e.g. Wan's
    comfyui/diffsynth/diffusers LoRA layouts), else as rewardfl's DiffSynth-layout export."""
    from .training.checkpoints import CheckpointError, load_checkpoint
    from .training.ema import EMA_FILE

    if spec == "base":
        return None
    kind, files = _weights_source(spec, weights)
    if kind == "checkpoint":
        path = files[0]
        try:
            if weights == "ema":  # the average alone; the trained weights are not read
                from safetensors.torch import load_file

                return load_file(os.path.join(path, EMA_FILE))
            trained, _ = load_checkpoint(path)
        except CheckpointError as e:
            raise ValueError("--checkpoint " + str(e).removeprefix("resume_from_checkpoint: ")) from e
        return trained
    _check_headers(spec, files)
    return _read_exported_by(model, files, spec)


def _read_exported_by(model, files: Sequence[str], source: str) -> dict[str, torch.Tensor]:
    reader = getattr(model, "read_exported", None)
    if reader is None:
        return _read_exported(files, source)
    try:
        return reader(files)
    except ValueError as e:
        raise ValueError(f"--checkpoint {source}: {e}") from e


def _check_matches(model, weights: dict[str, torch.Tensor], source: str) -> None:
    """ValueError naming the expert and the first mismatching key unless ``weights`` fit the model."""
    want = {k: tuple(v.shape) for k, v in model.trainable_state_dict().items()}
    for key in sorted(set(want) | set(weights)):
        if key not in weights:
            what = "missing from the checkpoint"
        elif key not in want:
            what = "not in the model"
        elif tuple(weights[key].shape) != want[key]:
            what = f"shape {tuple(weights[key].shape)} in the checkpoint, {want[key]} in the model"
        else:
            continue
        expert = key.split(".", 1)[0]
        raise ValueError(f"--checkpoint {source}: does not match the model: expert {expert}, first mismatching key "
                         f"{key} ({what}; the model has {len(want)} trainable tensors, the checkpoint "
                         f"{len(weights)}); was it trained with this config's model_name, trainable_models, "
                         "lora_base_model, lora_target_modules and lora_rank?")


class Generator:
    """The model and sampler of a config, built once; :meth:`load` swaps trained weights in and out."""

    def __init__(self, cfg, plugins: dict[str, type], *, device: Optional[torch.device] = None):
        from .training.loop import resolve_device, seed_everything

        self.cfg = cfg = resolve_config(cfg, plugins)
        self.device = device or resolve_device(cfg)
        seed_everything(cfg.seed)
        self.model = plugins["model"](cfg, cfg.model, device=self.device)
        self.model.eval()
        self.sampler = plugins["sampler"](cfg, cfg.sampler.options, device=self.device)
        from .training.policy import expert_boundary_of

        self.plan = full_plan(cfg, self.sampler, self.model, expert_boundary_of(plugins["model"], cfg))
        # the weights as built (LoRA adapters that add nothing): what "base" restores
        self._base = {k: v.detach().clone() for k, v in self.model.trainable_state_dict().items()}
        self.checkpoint = "base"

    @classmethod
    def from_model(cls, cfg, model, sampler, boundary, *, base_weights: Optional[dict] = None,
                   whole=None) -> "Generator":
        """A generator over an already built (training) model and sampler: no second copy of the model.
        ``base_weights``: what ``load("base")`` restores (None: ``base`` cannot be loaded); ``whole``: a
        context in which the trainable weights are whole and loading into them lasts (the engine's
        ``gathered(modify=True)``: under ZeRO-3 they are partitioned)."""
        gen = cls.__new__(cls)
        gen.cfg, gen.model, gen.sampler, gen.device = cfg, model, sampler, model.device
        gen.plan = full_plan(cfg, sampler, model, boundary)
        gen._base, gen.checkpoint = base_weights, "current"
        gen._whole = whole or contextlib.nullcontext
        return gen

    _whole = staticmethod(contextlib.nullcontext)  # a model built here is never partitioned

    def check_fits(self, spec: str, which: str = "trained") -> None:
        """The one-line error :meth:`load` would give when ``spec``'s weights do not fit the model, without
        loading them (``evaluate`` checks every checkpoint before it generates anything)."""
        weights = trainable_weights_of(spec, which, self.model)
        if weights is not None:
            with self._whole():
                _check_matches(self.model, weights, spec)

    def load(self, spec: str, which: str = "trained") -> None:
        """Use the weights ``--checkpoint spec`` names (``base``: none; ``which="ema"``: its moving average)."""
        weights = trainable_weights_of(spec, which, self.model)
        if weights is None:
            if self._base is None:
                raise ValueError("--checkpoint base: this generator kept no copy of the base weights")
            weights = self._base
        with self._whole():
            if weights is not self._base:
                _check_matches(self.model, weights, spec)
            self.model.load_trainable_state_dict(weights)
        self.checkpoint = spec

    @torch.no_grad()
    def generate(self, items: Sequence[dict], seeds: Sequence[int], *, batch_size: int = 1) -> list[torch.Tensor]:
        """One video per ``(items[i], seeds[i])``: ``(3, F, H, W)`` float32 in [-1, 1] on the CPU.

        ``items``: dicts with ``first_frame`` ``(3, H, W)`` in [-1, 1], ``prompt`` and ``sample_id``.
        Consecutive items of one frame size are sampled together, ``batch_size`` at a time."""
        from .training.algorithm import sample_latents

        out: list[torch.Tensor] = []
        i = 0
        while i < len(items):
            j = i + 1
            while j < len(items) and j - i < batch_size and items[j]["first_frame"].shape == items[i]["first_frame"].shape:
                j += 1
            chunk = items[i:j]
            batch = {"first_frame": torch.stack([it["first_frame"] for it in chunk]),
                     "prompt": [it["prompt"] for it in chunk]}
            latents, _ = sample_latents(self.model, self.sampler, self.plan, batch,
                                        num_frames=self.cfg.data.num_frames, step=0, kl_weight=0.0,
                                        seeds=[noise_seed(s, it["sample_id"]) for it, s in zip(chunk, seeds[i:j])])
            out.extend(v.float().cpu() for v in self.model.decode(latents))
            i = j
        return out


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; ValueError naming ``--seeds`` otherwise."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds: expected comma-separated integers >= 0 (e.g. 0,1,2), got {text!r}")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:  # the same seed gives the same video under the same name: list each seed once
        raise ValueError(f"--seeds: {', '.join(map(str, twice))} given more than once in {text!r}; list each seed once")
    return seeds


def _clips(cfg, args) -> list[dict]:
    """The clips to generate from, as dataset items (``first_frame``, ``prompt``, ``sample_id``, ...)."""
    from .data import load_clip

    d = cfg.data
    if args.image is not None:
        if args.prompt is None:
            raise ValueError("--image: give the prompt too (--prompt TEXT)")
        if not os.path.isfile(args.image):
            raise FileNotFoundError(f"--image: not found: {args.image}")
        clip = load_clip(args.image, num_frames=1, max_pixels=d.max_pixels, height=d.height, width=d.width)
        return [{"first_frame": clip[0], "video": clip, "prompt": args.prompt, "path": os.path.abspath(args.image),
                 "sample_id": os.path.basename(args.image), "index": 0}]
    if args.prompt is not None:
        raise ValueError("--prompt: goes with --image IMG (with --metadata, prompts come from the CSV)")
    from .evaluation.split import eval_dataset

    dataset = eval_dataset(cfg, args.metadata, command_line=True)
    return [dataset[i] for i in range(len(dataset))]


def video_name(index: int, sample_id: str, seed: int) -> str:
    """``003_clip_name_seed1.mp4``: the row, a filename-safe form of the clip's id, the seed."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(os.path.basename(sample_id.rstrip("/")))[0]) or "clip"
    return f"{index:03d}_{stem}_seed{seed}.mp4"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rewardfl.generate", description=__doc__.splitlines()[0])
    p.add_argument("config", help="YAML config file (the training config)")
    p.add_argument("--checkpoint", required=True, help="base, a checkpoint directory, OUTPUT_DIR/final or an "
                                                       "exported .safetensors file")
    p.add_argument("--metadata", help="metadata.csv of the clips (default: the config's held-out clips)")
    p.add_argument("--image", help="one input image (first frame) instead of a CSV")
    p.add_argument("--prompt", help="the prompt for --image")
    p.add_argument("--out", required=True, help="output directory (mp4 files and index.json)")
    p.add_argument("--seeds", default="0", help="comma-separated generation seeds (default 0)")
    p.add_argument("--weights", choices=("trained", "ema"), default="trained",
                   help="the trained weights, or their moving average (runs trained with ema_decay)")
    p.add_argument("--batch-size", type=int, default=None, help="videos sampled together "
                                                                "(default per_device_train_batch_size)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key; repeatable")
    return p


@user_error_exit("rewardfl.generate")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    seeds = parse_seeds(args.seeds)
    if args.image is not None and args.metadata is not None:
        raise ValueError("--image/--metadata: give one of them")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {args.batch_size}")
    from .training.outputs import check_command_output

    check_command_output(args.out)  # before hours of generation, not after
    cfg, plugins = load_resolved(args.config, args.overrides)
    check_weights_source(args.checkpoint, args.weights)  # the one-line error, before the model loads
    clips = _clips(cfg, args)
    gen = Generator(cfg, plugins)
    gen.load(args.checkpoint, args.weights)
    from .fileio import write_json
    from .training.outputs import VideoWriter

    jobs = [(i, s) for i in range(len(clips)) for s in seeds]
    videos = gen.generate([clips[i] for i, _ in jobs], [s for _, s in jobs],
                          batch_size=args.batch_size or cfg.per_device_train_batch_size)
    os.makedirs(args.out, exist_ok=True)
    writer, entries = VideoWriter(), []
    for (i, s), video in zip(jobs, videos):
        name = video_name(i, clips[i]["sample_id"], s)
        writer.submit(os.path.join(args.out, name), video)
        entries.append({"video": name, "sample_id": clips[i]["sample_id"], "prompt": clips[i]["prompt"],
                        "input": clips[i]["path"], "seed": s, "noise_seed": noise_seed(s, clips[i]["sample_id"]),
                        "frames": int(video.shape[1]), "height": int(video.shape[2]), "width": int(video.shape[3])})
    writer.close()
    write_json(os.path.join(args.out, "index.json"), {
        "checkpoint": args.checkpoint, "weights": args.weights, "config": os.path.abspath(args.config), "model_name": cfg.model_name,
        "num_inference_steps": cfg.num_inference_steps, "dtype": str(gen.model.dtype).removeprefix("torch."),
        "device": str(gen.device), "videos": entries}, indent=1)
    print(f"wrote {len(entries)} videos and index.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
