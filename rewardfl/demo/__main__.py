"""``python -m rewardfl.demo``: see :mod:`rewardfl.demo.prepare`."""

import sys

from rewardfl.demo.prepare import main

sys.exit(main())
