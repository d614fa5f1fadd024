"""What ``rewardfl.evaluate`` writes: the summary of per-video metrics, the Markdown table, contact sheets."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch

from .metrics import mean_with_ci, paired_difference

__all__ = ["summarize", "markdown_table", "contact_sheet"]

#: keys of a per-video row that identify it (everything else is a metric)
ROW_KEYS = ("checkpoint", "clip", "seed", "details")


def summarize(rows: list[dict], labels: Sequence[str], *, samples: int = 1000, seed: int = 0) -> dict:
    """``{metric: {label: {"mean", "ci", "n", "diff_to_base": {...}}}}`` over per-video ``rows``.

    Rows of each checkpoint come in the same (clip, seed) order, so the difference to ``labels[0]``
    (the base) is paired: the same clip and starting noise on both sides."""
    metrics = sorted({k for r in rows for k in r if k not in ROW_KEYS})
    by_label = {label: [r for r in rows if r["checkpoint"] == label] for label in labels}
    base = by_label[labels[0]]
    out: dict = {}
    for metric in metrics:
        out[metric] = {}
        base_values = [r.get(metric) for r in base]
        for label in labels:
            values = [r.get(metric) for r in by_label[label]]
            entry = mean_with_ci(values, samples=samples, seed=seed)
            if label != labels[0]:
                entry["diff_to_base"] = paired_difference(values, base_values, samples=samples, seed=seed)
            out[metric][label] = entry
    return out


def _cell(entry: Optional[dict], signed: bool = False) -> str:
    if not entry or entry["mean"] is None:
        return "n/a"
    fmt = "{:+.4f}" if signed else "{:.4f}"
    lo, hi = entry["ci"]
    return f"{fmt.format(entry['mean'])} [{fmt.format(lo)}, {fmt.format(hi)}]"


def markdown_table(summary: dict, labels: Sequence[str], *, reference_motion: Optional[dict] = None) -> str:
    """Metrics as rows; per checkpoint its mean [95% interval], then the paired difference to base.

    Metrics that are the same number for every video of every checkpoint are left out of the table
    (they are in ``eval.json``)."""
    header = ["metric", labels[0]]
    for label in labels[1:]:
        header += [label, f"{label} - {labels[0]}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric, per in summary.items():
        ends = {v for e in per.values() if e["mean"] is not None for v in (e["ci"][0], e["ci"][1], e["mean"])}
        if len(ends) == 1:
            continue  # constant: says nothing about the checkpoints
        cells = [metric, _cell(per[labels[0]])]
        for label in labels[1:]:
            cells += [_cell(per[label]), _cell(per[label].get("diff_to_base"), signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    sheet.save(tmp)
    os.replace(tmp, path)
