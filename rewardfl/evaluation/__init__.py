"""Held-out clips and evaluation metrics (core: no plugin imports).

``evaluation.py``: the evaluation itself (held-out clips generated from fixed noise with each
checkpoint, scored by the training reward and the judges of ``eval.judges``, base vs trained with
clip-level intervals, the hacking guard, ``eval.json``); ``split.py``: which clips training never sees (``data.eval_metadata_path`` or ``data.eval_fraction``);
``metrics.py``: per-video metrics, clip-level intervals (:func:`paired_interval`), identity
specificity, the hacking guard; ``report.py``: ``eval.json``'s summary, the Markdown table and
per-clip contact sheets. ``rewardfl.generate`` and ``rewardfl.evaluate`` are the command-line tools on top.
"""

from .metrics import paired_interval

__all__ = ["paired_interval"]
