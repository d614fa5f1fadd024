"""Score videos' face identity against a reference: ``rewardfl-score`` /
``python -m rewardfl.rewards.face_identity.score``.

    rewardfl-score --reward-model-path DIR --reference REF.(mp4|jpg|png|dir) VIDEO...

Prints one JSON object per video (one line each): ``video``, ``score`` (the training reward's
pooled identity score, null without a face), ``facesim_arc``, ``frames``, ``frames_with_face``,
``reference_frames_with_face``, ``degenerate_faces`` (detected faces whose landmarks cannot be
aligned, counted as no face), ``frame_similarity`` (per frame, null where no face or excluded).
Videos are video files, folders of frames or single images, read at their own size. Bad input:
one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from rewardfl.cli import user_error_exit
from rewardfl.config import config_from_dict, parse_overrides
from rewardfl.data import decoder_reason, frames_of
from rewardfl.interfaces import SampleContext
from rewardfl.registry import create

__all__ = ["main", "read_frames"]


def read_frames(path: str, max_frames: int):
    """Up to ``max_frames`` frames of a video file, frame folder or image: ``(F, 3, H, W)`` in [-1, 1]."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"not found: {path}")
    try:
        _, frames = frames_of(path, max_frames)
        arrays = [np.asarray(f) for f in frames]
    except FileNotFoundError:
        raise
    except Exception as e:  # decoders raise many types
        raise ValueError(f"cannot read {path}: {decoder_reason(e)}") from e
    if not arrays:
        raise ValueError(f"no frames in {path}")
    if any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError(f"frames of {path} differ in size")
    video = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return video / 127.5 - 1.0


def parse_device(text: str):
    """``--device`` as a ``torch.device`` that exists here; ValueError naming the flag otherwise."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {text!r}; use cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: {text!r} is not supported; use cpu or cuda[:N]")
    if device.type == "cuda":
        count = torch.cuda.device_count()  # counts without initialising CUDA
        if count == 0:
            raise ValueError(f"--device {text}: no CUDA GPU is visible to torch here; use --device cpu")
        if (device.index or 0) >= count:
            raise ValueError(f"--device {text}: only {count} CUDA device(s) visible (cuda:0 to cuda:{count - 1})")
    return device


@user_error_exit("rewardfl.rewards.face_identity.score")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rewardfl-score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward-model-path", required=True, help="face model pack directory")
    parser.add_argument("--reference", required=True, help="reference video file, frame folder or image")
    parser.add_argument("videos", nargs="+", help="videos to score (files, frame folders or images)")
    parser.add_argument("--max-frames", type=int, default=81, help="frames read per video (default 81)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="face_identity option, e.g. --set face_select=most_similar (repeatable)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = parser.parse_args(argv)
    if args.max_frames <= 0:
        raise ValueError(f"--max-frames: must be > 0, got {args.max_frames}")
    device = parse_device(args.device)
    if not os.path.isdir(args.reward_model_path):
        raise FileNotFoundError(f"--reward-model-path: not a directory: {args.reward_model_path}")
    cfg = config_from_dict({"reward_model_path": os.path.abspath(args.reward_model_path)})
    reward = create("reward", "face_identity", cfg, parse_overrides(args.set), device=device)
    reference = read_frames(args.reference, args.max_frames)
    context = SampleContext(sample_id=os.path.abspath(args.reference), reference=reference,
                            reference_path=args.reference if os.path.isfile(args.reference) else None)
    if reward.reference(context).mean_embedding(reward.options.exclude_reference_frame0) is None:
        raise ValueError(f"--reference: no face found in {args.reference}")
    videos = [(p, read_frames(p, args.max_frames)) for p in args.videos]  # all read before any output
    for path, video in videos:
        result = reward.evaluate(video.transpose(0, 1).to(reward.device), context)
        print(json.dumps({"video": path, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
