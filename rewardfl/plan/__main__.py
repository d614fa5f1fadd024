"""``python -m rewardfl.plan``: see :mod:`rewardfl.plan.planner`."""

import sys

from rewardfl.plan.planner import main

sys.exit(main())
