"""``python -m rewardfl.plan``: will a training step fit in GPU memory? (a tool, not the core).

``planner``: the generic half (a storage-tracking dispatch mode, fake devices, the step driver,
the optimizer engines' bytes, the levers, the CLI); ``plugins``: what it knows of the concrete
plugins it plans (the ``wan2_2`` family's presets and fake-weight skeletons, the face reward).
Like the demo, it may import plugins; nothing in the library imports it.
"""

from .planner import MemoryTracker, Plan, dtype_name, fake_device, main, parse_size, plan_memory, run_step

__all__ = ["MemoryTracker", "fake_device", "Plan", "plan_memory", "run_step", "parse_size", "dtype_name", "main"]
