"""What ``rewardfl.evaluate`` writes: the summary of per-video metrics, the Markdown table, contact sheets."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..fileio import atomic_path
from .metrics import MIN_CLIPS_FOR_CLAIM, beyond_interval, paired_change, paired_interval

__all__ = ["summarize", "markdown_table", "contact_sheet"]

#: keys of a per-video row that identify it (everything else is a metric)
ROW_KEYS = ("checkpoint", "clip", "seed", "details")


def summarize(rows: list[dict], labels: Sequence[str], *, level: float = 0.95) -> dict:
    """``{metric: {label: {"mean", "ci", "n_clips", "n", "diff_to_base": {...}}}}`` over per-video ``rows``.

    Every entry is :func:`~rewardfl.evaluation.metrics.paired_interval`'s: seeds averaged within a
    clip, a Student-t interval over the clip means. The difference to ``labels[0]`` (the base) pairs
    the videos of the same (clip, seed): the same clip and starting noise on both sides."""
    metrics = sorted({k for r in rows for k in r if k not in ROW_KEYS})
    by_label = {label: [r for r in rows if r["checkpoint"] == label] for label in labels}
    out: dict = {}
    for metric in metrics:
        out[metric] = {}
        for label in labels:
            mine = by_label[label]
            entry = paired_interval([r.get(metric) for r in mine], [r["clip"] for r in mine], level)
            if label != labels[0]:
                entry["diff_to_base"] = paired_change(mine, by_label[labels[0]], metric, level)
            out[metric][label] = entry
    return out


def _cell(entry: Optional[dict], signed: bool = False) -> str:
    """``mean [lo, hi] (k clips)``; ``*`` after a difference beyond its interval; ``mean (1 clip)``
    without an interval."""
    if not entry or entry["mean"] is None:
        return "n/a"
    fmt = "{:+.4f}" if signed else "{:.4f}"
    k = entry["n_clips"]
    if entry["ci"] is None:
        return f"{fmt.format(entry['mean'])} ({k} clip{'s' if k != 1 else ''}, no interval)"
    lo, hi = entry["ci"]
    mark = " *" if signed and beyond_interval(entry) else ""
    return f"{fmt.format(entry['mean'])} [{fmt.format(lo)}, {fmt.format(hi)}] ({k} clips){mark}"


def markdown_table(summary: dict, labels: Sequence[str], *, reference_motion: Optional[dict] = None,
                   level: float = 0.95) -> str:
    """Metrics as rows; per checkpoint its mean [interval] (clips), then the paired difference to base.

    A note under the table says how the intervals are made, marks (``*``) the differences beyond
    their interval, and says why none is marked when fewer than
    :data:`~rewardfl.evaluation.metrics.MIN_CLIPS_FOR_CLAIM` clips back them. Metrics that are the
    same number for every clip of every checkpoint are left out of the table (they are in ``eval.json``)."""
    header = ["metric", labels[0]]
    for label in labels[1:]:
        header += [label, f"{label} - {labels[0]}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    counts = []  # clips behind each difference shown
    for metric, per in summary.items():
        ends = {v for e in per.values() if e["mean"] is not None for v in (*(e["ci"] or ()), e["mean"])}
        if len(ends) == 1:
            continue  # constant: says nothing about the checkpoints
        cells = [metric, _cell(per[labels[0]])]
        for label in labels[1:]:
            diff = per[label].get("diff_to_base")
            cells += [_cell(per[label]), _cell(diff, signed=True)]
            if diff and diff["mean"] is not None:
                counts.append(diff["n_clips"])
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    text += (f"\nmean [{level:.0%} interval] (held-out clips): seeds averaged within each clip, a Student-t "
             "interval over the clip means; the differences are paired by clip and seed.")
    if counts and max(counts) < MIN_CLIPS_FOR_CLAIM:
        text += (f" No difference is called beyond its interval: they rest on {max(counts)} clip"
                 f"{'s' if max(counts) != 1 else ''}, fewer than {MIN_CLIPS_FOR_CLAIM}, too few to judge the "
                 "spread between clips.")
    elif counts:
        text += " *: beyond its interval (0 lies outside it)."
        if min(counts) < MIN_CLIPS_FOR_CLAIM:
            text += f" Differences on fewer than {MIN_CLIPS_FOR_CLAIM} clips are not marked (too few clips)."
    text += "\n"
    if reference_motion is not None and reference_motion["mean"] is not None:
        text += f"\nreference clips: motion {_cell(reference_motion)}\n"
    return text


def _uint8(frame: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` in [-1, 1] -> ``(H, W, 3)`` uint8."""
    return ((frame.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def contact_sheet(path: str, rows: list[tuple[str, torch.Tensor]], frames: int = 4) -> None:
    """A PNG grid: one row per ``(label, video (F, 3, H, W) in [-1, 1])``, ``frames`` frames evenly
    spaced over the video (first and last included), the label on the left."""
    from PIL import Image, ImageDraw

    label_w, pad = 96, 2
    h, w = rows[0][1].shape[-2:]
    cols = max(1, frames)
    sheet = Image.new("RGB", (label_w + cols * (w + pad), len(rows) * (h + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (label, video) in enumerate(rows):
        y = r * (h + pad)
        draw.text((4, y + h // 2 - 5), label[:14], fill=(0, 0, 0))
        picks = np.unique(np.linspace(0, video.shape[0] - 1, cols).round().astype(int))
        for c, f in enumerate(picks):
            tile = _uint8(video[f])
            if tile.shape[:2] != (h, w):  # a one-frame reference of another size: fit it
                tile = np.asarray(Image.fromarray(tile).resize((w, h)))
            sheet.paste(Image.fromarray(tile), (label_w + c * (w + pad), y))
    with atomic_path(path, ".png") as tmp:
        sheet.save(tmp)
