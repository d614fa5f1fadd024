"""Model plugins, one package each, found through the ``rewardfl.models`` entry points.

``wan`` holds ``wan2_2`` (Wan2.2 I2V/TI2V on diffsynth) and ``wan2_2_tiny`` (its CPU-sized
twin, whose files ``python -m rewardfl.demo.make_tiny OUT_DIR`` writes). Nothing heavy is
imported here: diffsynth loads when a model is built.
"""
