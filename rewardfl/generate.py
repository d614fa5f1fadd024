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
import os
import sys

from .cli import user_error_exit
from .data import load_clip
from .evaluation.split import eval_dataset
from .fileio import write_json
from .registry import load_resolved
from .sampling.generator import Generator, noise_seed, video_name
from .sampling.weights import check_weights_source
from .training.outputs import VideoWriter, check_command_output

__all__ = ["parse_seeds", "main"]


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
    dataset = eval_dataset(cfg, args.metadata, command_line=True)
    return [dataset[i] for i in range(len(dataset))]


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
    check_command_output(args.out)  # before hours of generation, not after
    cfg, plugins = load_resolved(args.config, args.overrides)
    check_weights_source(args.checkpoint, args.weights)  # the one-line error, before the model loads
    clips = _clips(cfg, args)
    gen = Generator.build(cfg, plugins)
    gen.load(args.checkpoint, args.weights)
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
