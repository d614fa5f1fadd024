"""``python -m rewardfl.export`` (``rewardfl-export``): convert an exported LoRA between key layouts, or merge it.

The core knows no concrete model: ``--model NAME`` (default ``wan2_2``) picks the model plugin
and the rest of the command line goes to its ``export_main(argv, prog)`` classmethod. For Wan2.2
(``rewardfl.models.wan.export``)::

    python -m rewardfl.export --to comfyui|diffsynth|diffusers --lora IN.safetensors --out OUT.safetensors
    python -m rewardfl.export --merge --model-paths paths.json --lora LORA.safetensors [--expert dit2] --out merged.safetensors
"""

from __future__ import annotations

import argparse
import sys

from .cli import user_error_exit
from .registry import load_plugin

__all__ = ["main"]

PROG = "python -m rewardfl.export"


@user_error_exit("rewardfl.export")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, add_help=False)
    parser.add_argument("--model", default="wan2_2", help="model plugin whose LoRA files these are (default wan2_2)")
    args, rest = parser.parse_known_args(argv)
    return load_plugin("model", args.model).export_main(rest, prog=PROG)  # VideoModel.export_main


if __name__ == "__main__":
    sys.exit(main())
