"""The CPU demo's scaffolding: not library code (nothing in ``rewardfl`` outside this package
imports it).

``python -m rewardfl.demo`` prepares what ``examples/demo.yaml`` trains on (``__main__``): the
face models and photos it fetches, the example clips built from them, the tiny Wan2.2 twin and
its warm start.
"""

from .prepare import DEMO_FRAMES, DEMO_SAMPLER, DEMO_SIZE, demo_warm_start, main, prepare

__all__ = ["DEMO_FRAMES", "DEMO_SAMPLER", "DEMO_SIZE", "demo_warm_start", "main", "prepare"]
