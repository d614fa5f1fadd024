"""The evaluation of checkpoints on held-out clips (``python -m rewardfl.evaluate`` and training's).

The base model is always evaluated too. Every checkpoint generates from the same starting noise
(``--seeds K``: seeds 0..K-1 per clip; :mod:`rewardfl.generate`), and each video gets:

* ``reward_score``: the training reward's score (the ``reward:`` section, as trained);
* ``judge/<label>/<key>``: each judge of ``eval.judges`` (a reward plugin built through the registry
  with its own options): the numbers of its ``evaluate(video, context)`` when it has one, else its
  ``score``; and ``judge/<label>/specificity``: the judge's score of the video against its own clip's
  reference minus the mean of its scores against the other clips' references (judges whose score
  depends on the reference's content: ``Reward.reference_specific``; not ``motion``);
* ``motion``: mean absolute difference of consecutive frames ([0, 1] pixel range);
* ``first_frame_psnr``: PSNR (dB) of generated frame 0 against the input image.

Per checkpoint and metric: the mean with its 95% interval, and the paired difference to base (the
same clip and seed) with its interval; the held-out clip is the unit of evidence: seeds are averaged
within a clip, the interval is Student-t over the clip means, and the number of clips stands beside
each interval (:func:`rewardfl.evaluation.metrics.paired_interval`). The hacking guard
(:func:`rewardfl.evaluation.metrics.hacking_warnings`) warns when a checkpoint's training reward rose
beyond its interval while a judge's higher-is-better metric (``Reward.higher_is_better``) fell beyond its,
and when a judge lost its view (a value on fewer than half of the clips it scored at base). Writes ``eval.json``, ``eval.md`` (the table, printed too) and ``contact_sheets/*.png`` (per clip:
reference | base | each checkpoint, a few frames each) to ``--out`` (default ``OUTPUT_DIR/eval``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from typing import Optional, Sequence

import numpy as np
import torch

from rewardfl.config import ConfigError, build_dataclass
from rewardfl.fileio import atomic_write, write_json
from rewardfl.interfaces import SampleContext, StepCache
from rewardfl.registry import PluginError, load_plugin, resolve_config
from rewardfl.runtime import resolve_device
from rewardfl.sampling.generator import Generator, video_name
from rewardfl.sampling.weights import check_weights_source

from .metrics import MIN_CLIPS_FOR_CLAIM, hacking_warnings, identity_specificity, motion, paired_interval, psnr
from .report import contact_sheet, markdown_table, summarize
from .split import eval_dataset

log = logging.getLogger("rewardfl")

__all__ = ["build_judges", "judge_specs", "check_judges", "check_evaluation", "judge_scores", "Evaluation", "evaluate", "checkpoint_labels"]


def judge_specs(cfg) -> list[tuple[str, type, object]]:
    """``[(label, plugin class, options)]`` of ``eval.judges``, validated without building any (``run
    --check`` and the checks before a model loads): each entry ``{name, label?, <options>}``; the label
    defaults to the name (``name_2``, ... when a name repeats). Errors name ``eval.judges[i]``."""
    specs, seen = [], {}
    for i, spec in enumerate(cfg.eval.judges):
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        name = spec.pop("name")
        label = spec.pop("label", None)
        if label is None:
            seen[name] = seen.get(name, 0) + 1
            label = name if seen[name] == 1 else f"{name}_{seen[name]}"
        try:
            cls = load_plugin("reward", name)
        except PluginError as e:
            raise ConfigError(f"eval.judges[{i}].name: {e}") from e
        options = build_dataclass(cls.Options, spec, prefix=f"eval.judges[{i}]")  # errors name eval.judges[i].key
        specs.append((str(label), cls, options))
    labels = [label for label, _, _ in specs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"eval.judges: labels must differ, got {labels}; give each judge a distinct label")
    return specs


def check_judges(cfg) -> list[str]:
    """What ``run --check`` prints for ``eval.judges``: each judge's own ``check`` lines (its model files),
    with errors naming ``eval.judges[i]``; builds nothing."""
    lines = []
    for i, (label, cls, options) in enumerate(judge_specs(cfg)):
        with _named_as_judge(i):
            lines += [f"{label}: {line}" for line in cls.check(cfg, options)]
    return lines


def check_evaluation(cfg) -> list[str]:
    """When a training run evaluates (``eval_steps``, ``eval.at_end``): ``eval.judges`` (see
    :func:`check_judges`) and that it has held-out clips; otherwise the judges' names and options only.
    What the trainer checks before the model loads (``run --check`` lists every judge's files itself);
    returns the lines ``--check`` prints."""
    if not (cfg.eval_steps or cfg.eval.at_end):  # a run that does not evaluate: names and options only
        judge_specs(cfg)
        return []
    check_judges(cfg)
    return [f"{len(eval_dataset(cfg))} held-out clips"]


def build_judges(cfg, device) -> list[tuple[str, object]]:
    """``[(label, reward)]`` for ``eval.judges`` (see :func:`judge_specs`), each built through the registry."""
    judges = []
    for i, (label, cls, options) in enumerate(judge_specs(cfg)):
        with _named_as_judge(i):
            judges.append((label, cls(cfg, options, device=device)))
    return judges


@contextlib.contextmanager
def _named_as_judge(i: int):
    """A reward plugin names its options ``reward.<key>``; as judge ``i`` they are ``eval.judges[i].<key>``."""
    try:
        yield
    except (ConfigError, ValueError, FileNotFoundError) as e:
        text = re.sub(r"\breward\.(?=[a-z_])", f"eval.judges[{i}].", str(e))
        if text == str(e):
            raise
        raise type(e)(text) from e


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@torch.no_grad()
def judge_scores(judge, video: torch.Tensor, contexts: Sequence[SampleContext]) -> tuple[list, list[dict]]:
    """A judge's score of ``video`` ``(3, F, H, W)`` in [-1, 1] against each context, and its
    ``evaluate`` dicts (empty dicts for a judge without ``evaluate``); None where it cannot score."""
    evaluate = getattr(judge, "evaluate", None)
    if callable(evaluate):
        # one cache for the video's scoring against every clip: a judge that keys its work on the video
        # (face identity: detections and embeddings) does it once, not once per clip
        judge.cache = StepCache()
        try:
            details = [evaluate(video, c) for c in contexts]
        finally:
            judge.cache = None
        return [_number(d.get("score")) for d in details], details
    out = judge(video[None].expand(len(contexts), *video.shape), list(contexts))
    scores = [float(s) if bool(v) and math.isfinite(float(s)) else None for s, v in zip(out.scores, out.valid)]
    return scores, [{} for _ in contexts]


def checkpoint_labels(specs: Sequence[str]) -> list[str]:
    """``base`` then a short, distinct label per ``--checkpoint`` (its directory or file name)."""
    labels = ["base"]
    for spec in specs:
        stem = os.path.splitext(os.path.basename(os.path.normpath(spec)))[0] or "checkpoint"
        label, k = stem, 2
        while label in labels:
            label, k = f"{stem}_{k}", k + 1
        labels.append(label)
    return labels


class Evaluation:
    """Held-out clips, the training reward and the judges, prepared once; :meth:`score` turns one
    checkpoint's videos into per-video rows. Used by :func:`evaluate` and by training (``eval_steps``).

    ``items``: dataset items (``video``, ``first_frame``, ``prompt``, ``sample_id``, ``path``);
    ``seeds``: generation seeds per clip; ``jobs``: the (clip, seed) pairs in generation order."""

    def __init__(self, items: Sequence[dict], reward, judges: Sequence[tuple[str, object]], seeds: Sequence[int]):
        self.items, self.reward, self.judges, self.seeds = list(items), reward, list(judges), list(seeds)
        self.contexts = [SampleContext.of_clip(it["sample_id"], it["video"], it["path"], it["prompt"])
                         for it in self.items]
        for scorer in [reward] + [j for _, j in self.judges]:
            scorer.prepare(self.contexts)
        self.jobs = [(c, s) for c in range(len(self.items)) for s in self.seeds]

    @property
    def guarded_keys(self) -> list[str]:
        """The judge metrics the hacking guard watches: each judge's ``higher_is_better`` keys, and its
        ``specificity`` (computed from its score) when its score is one of them."""
        keys = []
        for name, judge in self.judges:
            better = tuple(judge.higher_is_better)
            specific = "score" in better and getattr(judge, "reference_specific", True)
            keys += [f"judge/{name}/{k}" for k in better] + ([f"judge/{name}/specificity"] if specific else [])
        return keys

    def generate(self, gen, batch_size: int) -> list[torch.Tensor]:
        """The videos of every job with ``gen``'s current weights (the same noise every time)."""
        return gen.generate([self.items[c] for c, _ in self.jobs], [s for _, s in self.jobs], batch_size=batch_size)

    @torch.no_grad()
    def score(self, label: str, videos: Sequence[torch.Tensor]) -> list[dict]:
        """One row per job: ``reward_score``, ``judge/<name>/<key>`` (with ``specificity``), ``motion``,
        ``first_frame_psnr``; ``details`` holds each judge's own numbers."""
        rows = []
        sims = {name: np.full((len(self.jobs), len(self.items)), np.nan) for name, _ in self.judges}
        for v, ((c, s), video) in enumerate(zip(self.jobs, videos)):
            out = self.reward(video[None], [self.contexts[c]])
            row = {"checkpoint": label, "clip": self.items[c]["sample_id"], "seed": s,
                   "reward_score": float(out.scores[0]) if bool(out.valid[0]) else None,
                   "motion": motion(video.transpose(0, 1)),
                   "first_frame_psnr": psnr(video[:, 0], self.items[c]["first_frame"]), "details": {}}
            for name, judge in self.judges:
                if getattr(judge, "reference_specific", True):  # against every clip, for specificity
                    scores, details = judge_scores(judge, video, self.contexts)
                    sims[name][v] = [np.nan if x is None else x for x in scores]
                    score, own = scores[c], details[c]
                else:
                    (score,), (own,) = judge_scores(judge, video, [self.contexts[c]])
                if own:
                    row.update({f"judge/{name}/{k}": _number(x) for k, x in own.items()
                                if _number(x) is not None or x is None})
                    row["details"][name] = own
                else:
                    row[f"judge/{name}/score"] = score
            rows.append(row)
        for name, judge in self.judges:
            if not getattr(judge, "reference_specific", True):
                continue
            spec_values = identity_specificity(sims[name], [c for c, _ in self.jobs])
            for row, x in zip(rows, spec_values):
                row[f"judge/{name}/specificity"] = float(x) if math.isfinite(x) else None
        return rows

    def sheet(self, c: int, videos_by_label: Sequence[tuple[str, Sequence[torch.Tensor]]]) -> list[tuple]:
        """Clip ``c``'s contact-sheet rows: the reference, then each label's video of the first seed."""
        first = self.jobs.index((c, self.seeds[0]))
        return [("reference", self.items[c]["video"])] + [(label, videos[first].transpose(0, 1))
                                                           for label, videos in videos_by_label]


def evaluate(cfg, plugins: dict[str, type], checkpoints: Sequence[str], out_dir: str, *, seeds: Sequence[int],
             metadata: Optional[str] = None, batch_size: int = 1, generator=None, reward=None,
             weights: str = "trained", write: bool = True) -> dict:
    """Generate and score (see the module docstring); returns what ``eval.json`` holds.

    ``generator``/``reward``: already built ones to use (the end of a training run passes its own);
    ``write``: whether this process writes the files (rank 0 of a training run)."""
    cfg = resolve_config(cfg, plugins)
    e = cfg.eval
    dataset = eval_dataset(cfg, metadata, command_line=True)
    items = [dataset[i] for i in range(len(dataset))]
    for spec in checkpoints:  # a wrong path, a damaged or truncated file: before the model loads
        check_weights_source(spec, weights)
    device = generator.device if generator is not None else resolve_device(cfg)
    judges = build_judges(cfg, device)  # option errors before the model loads
    if reward is None:
        reward = plugins["reward"](cfg, cfg.reward.options, device=device)
    gen = generator or Generator.build(cfg, plugins, device=device)
    for spec in checkpoints:  # every checkpoint fits the model before the base is generated and scored
        gen.check_fits(spec, weights)
    ev = Evaluation(items, reward, judges, seeds)
    labels = checkpoint_labels(checkpoints)
    rows, generated = [], []
    for label, spec in zip(labels, ["base", *checkpoints]):
        gen.load(spec, weights)
        videos = ev.generate(gen, batch_size)
        rows += ev.score(label, videos)
        generated.append((label, videos))
    summary = summarize(rows, labels)
    ref_motion = {it["sample_id"]: motion(it["video"]) for it in items}
    reference = {"motion": paired_interval(list(ref_motion.values()), list(ref_motion)), "motion_per_clip": ref_motion}
    table = markdown_table(summary, labels, reference_motion=reference["motion"])
    warnings = [f"{label} vs base: {line}" for label in labels[1:]
                for line in hacking_warnings([r for r in rows if r["checkpoint"] == label],
                                             [r for r in rows if r["checkpoint"] == labels[0]], ev.guarded_keys,
                                             min_effect=cfg.eval.hacking_min_effect)]
    for line in warnings:
        log.warning("%s", line)
    result = {
        "weights": weights,
        "checkpoints": [{"label": label, "checkpoint": spec} for label, spec in zip(labels, ["base", *checkpoints])],
        "clips": [it["sample_id"] for it in items], "seeds": list(seeds),
        "num_inference_steps": cfg.num_inference_steps, "device": str(gen.device),
        "interval": {"level": 0.95, "method": "Student-t over clip means (seeds averaged within a clip)",
                     "min_clips_for_claim": MIN_CLIPS_FOR_CLAIM},
        "summary": summary, "reference": reference, "warnings": warnings, "videos": rows,
    }
    if write:
        os.makedirs(out_dir, exist_ok=True)
        for c in range(len(items)):
            contact_sheet(os.path.join(out_dir, "contact_sheets", video_name(c, items[c]["sample_id"], seeds[0])
                                       .replace(".mp4", ".png")), ev.sheet(c, generated), frames=e.contact_sheet_frames)
        write_json(os.path.join(out_dir, "eval.json"), result, indent=1)
        with atomic_write(os.path.join(out_dir, "eval.md")) as f:
            f.write(table)
    result["table"] = table
    return result
