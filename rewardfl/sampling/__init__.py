"""Sampling from a model: the library under training, evaluation and the commands.

* ``policy``: which sampling steps run, carry gradient and use which expert;
* ``rollout``: one video sampled under a step plan (and decoded);
* ``generator``: :class:`~rewardfl.sampling.generator.Generator`, the model and sampler of a config built
  once, trained weights swapped in and out, videos from fixed starting noise;
* ``weights``: the trained weights a ``--checkpoint`` names (a checkpoint directory or exported files).
"""
