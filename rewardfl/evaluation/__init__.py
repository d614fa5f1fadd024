"""Held-out clips and evaluation metrics (core: no plugin imports).

``split.py``: which clips training never sees (``data.eval_metadata_path`` or ``data.eval_fraction``);
``metrics.py``: per-video metrics, bootstrap intervals, identity specificity, the hacking guard;
``report.py``: ``eval.json``'s summary, the Markdown table and per-clip contact sheets.
``rewardfl.generate`` and ``rewardfl.evaluate`` are the command-line tools on top.
"""
