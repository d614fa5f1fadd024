"""The ``wan2_2``, ``wan2_2_tiny`` and ``wan2_2_diffusers`` model plugins: Wan2.2 I2V/TI2V on diffsynth,
its CPU-sized twin, and Wan2.2 A14B from a diffusers folder.

Modules: ``model`` (the plugin classes, found through the ``rewardfl.models`` entry points),
``weights`` (the model_paths JSON, weight-file headers, loading), ``architectures`` (what a
weights file holds, from its shapes), ``dit_forward`` (the DiT pass with gradient checkpointing /
offload), ``vae_decode`` (differentiable decode), ``lora`` (peft LoRA), ``lora_formats`` (the comfyui / diffsynth /
diffusers LoRA key layouts), ``offload`` (activation checkpointing with CPU-parked inputs),
``export`` (``python -m rewardfl.export``: convert a LoRA file, or merge it into its expert),
``diffusers_model`` and ``diffusers_keys`` (diffusers' Wan classes and key names). Nothing heavy is
imported here: diffsynth loads when a model is built.
"""
