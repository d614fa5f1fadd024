"""The ``wan2_2`` and ``wan2_2_tiny`` model plugins: Wan2.2 I2V/TI2V on diffsynth, and its CPU-sized twin.

Modules: ``model`` (the plugin classes, found through the ``rewardfl.models`` entry points),
``weights`` (the model_paths JSON, weight-file headers, loading), ``architectures`` (what a
weights file holds, from its shapes), ``dit_forward`` (the DiT pass with gradient checkpointing /
offload), ``vae_decode`` (differentiable decode), ``lora`` (peft LoRA in DiffSynth's file
format), ``offload`` (activation checkpointing with CPU-parked inputs), ``export`` (``python -m
rewardfl.models.wan.export --merge``: a LoRA merged into its expert). Nothing heavy is imported
here: diffsynth loads when a model is built.
"""
