"""``python -m rewardfl.data prepare VIDEO_DIR --out DIR/metadata.csv``: check a folder of videos
and write the ``metadata.csv`` the trainer reads (``rewardfl.data.prepare``).

    python -m rewardfl.data prepare VIDEO_DIR --out DIR/metadata.csv [--prompt TEXT | --prompts FILE]
        [--reward-model-path PACK] [--reward NAME] [--set KEY=VALUE] [--num-frames N]
        [--height H --width W | --max-pixels N]

Use the training config's values for the reward and the ``data`` keys: the first frame is
checked at the size training reads it. Prints each skipped video with its reason, then a
summary line; exit 0 when the CSV was written, 2 on a user error.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..cli import user_error_exit
from ..config import config_from_dict, parse_overrides
from ..registry import create
from .prepare import prepare_videos, read_prompts, summary_lines

PROG = "python -m rewardfl.data"


@user_error_exit("rewardfl.data")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Prepare a folder of videos for training.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="check a folder of videos and write metadata.csv")
    p.add_argument("video_dir", metavar="VIDEO_DIR", help="folder of videos (searched recursively)")
    p.add_argument("--out", required=True, help="the metadata.csv to write (paths in it are relative to its folder)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="one prompt for every video")
    prompt.add_argument("--prompts", help="CSV with header video,prompt (paths relative to VIDEO_DIR, or file names); "
                                          "default: NAME.txt beside each video, else an empty prompt")
    p.add_argument("--reward", default="face_identity",
                   help="reward plugin whose reference check the first frames must pass (default face_identity; "
                        "'none': no check)")
    p.add_argument("--reward-model-path", help="the reward's model files (as the config's reward_model_path)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a reward option, e.g. --set det_threshold=0.6 (repeatable)")
    p.add_argument("--num-frames", type=int, default=None, help="frames a clip needs (data.num_frames; default 81)")
    p.add_argument("--height", type=int, default=None, help="data.height")
    p.add_argument("--width", type=int, default=None, help="data.width")
    p.add_argument("--max-pixels", type=int, default=None, help="data.max_pixels")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    data = {k: v for k, v in (("num_frames", args.num_frames), ("height", args.height), ("width", args.width),
                              ("max_pixels", args.max_pixels)) if v is not None}
    raw = {"data": data}
    if args.reward_model_path:
        if not os.path.isdir(args.reward_model_path):
            raise FileNotFoundError(f"--reward-model-path: not a folder: {args.reward_model_path}")
        raw["reward_model_path"] = os.path.abspath(args.reward_model_path)
    cfg = config_from_dict(raw)  # checks the data keys (num_frames 4k+1, ...) as training does
    if args.reward == "none":
        def reference_problem(frame):
            return None
    else:
        reward = create("reward", args.reward, cfg, parse_overrides(args.set))
        reference_problem = reward.reference_problem
    prompts = read_prompts(args.prompts) if args.prompts else None
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        def progress(videos):
            return tqdm(videos, desc="prepare", unit="video", disable=None)
    d = cfg.data
    summary = prepare_videos(args.video_dir, args.out, num_frames=d.num_frames, max_pixels=d.max_pixels,
                             height=d.height, width=d.width, reference_problem=reference_problem,
                             checker=f"{args.reward} {raw.get('reward_model_path')} {sorted(args.set)}",
                             prompt=args.prompt, prompts=prompts, progress=progress)
    for line in summary_lines(summary):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
