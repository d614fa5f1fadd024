"""A plugin whose import fails, as a broken third-party install would."""

import rewardfl_example_plugin_missing_dependency  # noqa: F401  (does not exist)


class BrokenReward:
    pass
