"""Model plugins: ``wan2_2`` (Wan2.2 I2V/TI2V on diffsynth) and ``wan2_2_tiny`` (its CPU-sized twin).

Modules: ``wan`` (the plugin classes), ``checkpoints`` (model_paths JSON, headers, safetensors
I/O), ``architectures`` (what a checkpoint is, from its shapes), ``dit_forward`` (the DiT pass
with checkpointing / offload), ``vae_decode`` (differentiable decode), ``lora`` (peft LoRA in
DiffSynth's file format), ``offload`` (checkpointing with CPU-parked inputs), ``make_tiny``
(writes the tiny twin's files). Nothing heavy is imported here: diffsynth loads when a model is
built.
"""
