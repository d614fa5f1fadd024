"""Built-in samplers (plugins of the ``rewardfl.samplers`` entry-point group).

* ``flow_match_euler``: :class:`rewardfl.samplers.flow_match_euler.FlowMatchEulerSampler`,
  the few-step flow-matching Euler sampler of Wan2.2 (the default).
"""
