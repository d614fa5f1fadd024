"""Held-out clips and evaluation metrics (core: no plugin imports).

``split.py``: which clips training never sees (``data.eval_metadata_path`` or ``data.eval_fraction``);
``metrics.py``: per-video metrics, clip-level intervals (:func:`paired_interval`), identity
specificity, the hacking guard; ``report.py``: ``eval.json``'s summary, the Markdown table and
per-clip contact sheets. ``rewardfl.generate`` and ``rewardfl.evaluate`` are the command-line tools on top.
"""

from .metrics import paired_interval

__all__ = ["paired_interval"]
