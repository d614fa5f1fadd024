"""Several rewards at once: the reward plugin ``weighted_sum``, which ``reward:`` as a list means.

.. code-block:: yaml

    reward:
      - {name: face_identity, weight: 1.0, landmark_fallback: true}
      - {name: identity_consistency, weight: 0.5, normalize: running}
      - {name: motion, weight: 0.2, frames: stride, frame_stride: 2}

is ``reward: {name: weighted_sum, terms: [...]}``. Each entry is one reward plugin: ``name``, the
composition's keys below, and the plugin's own options. Per micro-batch of B videos:

* each reward scores the frames it chooses (``frames: all`` / ``stride`` (every ``frame_stride``-th,
  frame 0 first) / ``random`` (``frame_count`` frames, drawn per call from (``seed``, call count,
  entry): resumed exactly); rewards choosing the same frames get the same tensor object and share one
  :class:`~rewardfl.interfaces.StepCache`, so work keyed on it (resized frames, face detections) is
  computed once;
* a reward that cannot score a sample (no face) masks that sample for itself only (``valid``);
* its loss: ``normalize: none`` the reward's own ``loss`` (e.g. face_identity's ROLL shaping);
  ``fixed`` ``-mean((s - normalize_mean) / normalize_std)``; ``running`` the same with a running mean
  and standard deviation of the reward's scores over every process (an exponential moving average with
  ``normalize_momentum``, bias-corrected; the statistics *before* this batch; mean 0 / std 1 until
  ``normalize_warmup`` batches have been seen), so that no reward dominates by scale;
* ``loss = sum_i weight_i * loss_i`` (weights >= 0); a reward with ``weight: 0`` is scored without gradient and only
  logged, which is also the only way to list a non-differentiable reward under ``algorithm: reward_backprop``;
* ``gradient: false`` scores an entry without its gradient even when its plugin has one: under ``algorithm:
  hybrid`` the entry is trained by the policy gradient (a reward whose gradient is easy to fool, trained
  through its scores only), under ``grpo`` nothing changes (no entry gives a gradient there), and
  ``reward_backprop`` refuses a weighted entry with it.

The loop's ``reward_score`` is the weighted total ``sum_i weight_i * score_i`` over the rewards that
could score the sample (raw scores, not normalised); each reward reports ``<label>/score`` (its mean
over the samples it scored), ``<label>/valid_fraction`` and its own metrics as ``<label>/<key>``
(the loop prefixes ``reward/``). Labels default to the name (``name_2``... when a name repeats).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Optional, Sequence

import torch

from rewardfl.config import ConfigError, build_dataclass
from rewardfl.interfaces import Reward, RewardOutput, SampleContext, StepCache, require_gradient
from rewardfl.registry import PluginError, build_options, list_plugins, load_plugin, unknown_plugin

__all__ = ["WeightedSumReward", "WeightedSumOptions", "RewardTerm", "WeightedSumOutput", "select_frames"]

#: the keys of a ``reward:`` list entry that belong to the composition (the rest are the plugin's)
TERM_KEYS = ("name", "label", "weight", "gradient", "normalize", "normalize_mean", "normalize_std", "normalize_momentum",
             "normalize_warmup", "frames", "frame_stride", "frame_count")


@dataclasses.dataclass
class RewardTerm:
    """One entry of a ``reward:`` list (see the module docstring); its plugin's options sit beside these
    keys in the entry."""

    name: str
    label: Optional[str] = None
    weight: float = 1.0
    #: false: the entry's score is used without its gradient (hybrid trains it by the policy gradient)
    gradient: bool = True
    normalize: Literal["none", "fixed", "running"] = "none"
    normalize_mean: float = 0.0
    normalize_std: float = 1.0
    normalize_momentum: float = 0.99
    normalize_warmup: int = 4
    frames: Literal["all", "stride", "random"] = "all"
    frame_stride: int = 1
    frame_count: int = 4
    #: the plugin's validated ``Options`` (set when resolved)
    options: Any = dataclasses.field(default=None, metadata={"inline": True})


@dataclasses.dataclass
class WeightedSumOptions:
    #: the rewards summed: :class:`RewardTerm` entries, each with its plugin's options
    terms: list


@dataclasses.dataclass
class WeightedSumOutput(RewardOutput):
    """A :class:`RewardOutput` (scores: the weighted totals) with each reward's own output."""

    terms: list = dataclasses.field(default_factory=list)


def select_frames(num_frames: int, term: RewardTerm, generator: torch.Generator) -> Optional[tuple[int, ...]]:
    """The frame indices ``term`` scores out of ``num_frames`` (None: all of them)."""
    if term.frames == "stride" and term.frame_stride > 1:
        return tuple(range(0, num_frames, term.frame_stride))
    if term.frames == "random" and term.frame_count < num_frames:
        return tuple(sorted(torch.randperm(num_frames, generator=generator)[:term.frame_count].tolist()))
    return None


class WeightedSumReward(Reward):
    """The weighted sum of a list of reward plugins; a :class:`Reward` itself, so the loop, ``evaluate``
    and ``run --check`` treat one reward and several alike. Its loss is differentiable when every entry
    with a weight is (:meth:`gradient_problem`, which ``reward_backprop`` checks); ``grpo`` uses only the
    scores, and ``hybrid`` splits the list (:meth:`gradient_split`)."""

    Options = WeightedSumOptions
    differentiable = True

    # ------------------------------------------------------------------ config

    @classmethod
    def resolve_options(cls, values, top_level: dict, prefix: str, also_known=(),
                        owner: str = "") -> WeightedSumOptions:
        """Validate the ``terms`` (the ``reward:`` list), each against its plugin through the registry
        with the config's top-level keys; errors name ``reward[i].key``."""
        entries = build_dataclass(WeightedSumOptions, values, prefix=prefix, also_known=also_known, owner=owner).terms
        if not entries:
            raise ConfigError("reward: an empty list; name one reward or a list of {name, weight, ...}")
        available = [p.name for p in list_plugins("reward")]
        for i, entry in enumerate(entries):  # names first (metadata only): a typo before anything imports
            name = entry if isinstance(entry, str) else entry.get("name") if isinstance(entry, dict) else None
            if isinstance(name, str) and name not in available:
                raise ConfigError(f"{prefix}[{i}].name: {unknown_plugin('reward', name, available)}")
        terms, seen = [], {}
        for i, entry in enumerate(entries):
            key = f"{prefix}[{i}]"
            if isinstance(entry, str):
                entry = {"name": entry}
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise ConfigError(f"{key}: expected a mapping with 'name' (e.g. {{name: face_identity, weight: 1.0}}), "
                                  f"got {entry!r}")
            own = {k: v for k, v in entry.items() if k in TERM_KEYS}
            term = build_dataclass(RewardTerm, own, prefix=key)
            try:
                plugin = load_plugin("reward", term.name)
            except PluginError as e:  # a bad entry point
                raise ConfigError(f"{key}.name: {e}") from e
            if issubclass(plugin, WeightedSumReward):
                raise ConfigError(f"{key}.name: {term.name} is the list itself; name a reward plugin")
            rest = {k: v for k, v in entry.items() if k not in TERM_KEYS}
            term.options = build_options("reward", term.name, plugin, rest, top_level, prefix=key,
                                         also_known=TERM_KEYS)
            if term.label is None:
                seen[term.name] = seen.get(term.name, 0) + 1
                term.label = term.name if seen[term.name] == 1 else f"{term.name}_{seen[term.name]}"
            _check_term(term, key, plugin)
            terms.append(term)
        labels = [t.label for t in terms]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"reward: labels must differ, got {labels}; give each entry a distinct label")
        if not any(t.weight != 0 for t in terms):
            raise ConfigError("reward: every weight is 0; give at least one reward a weight (the others are logged)")
        return WeightedSumOptions(terms)

    @classmethod
    def check(cls, config, options: WeightedSumOptions) -> list[str]:
        lines = []
        for term in options.terms:
            plugin = load_plugin("reward", term.name)
            lines += [f"[{term.label} x{term.weight:g}] {line}" for line in plugin.check(config, term.options)]
        return lines

    @classmethod
    def gradient_problem(cls, options: WeightedSumOptions) -> Optional[str]:
        """The first entry with a weight that gives no gradient (its plugin has none, or ``gradient: false``),
        named by its key; None if none."""
        for i, term in enumerate(options.terms):
            if term.weight != 0 and not term.gradient:
                return (f"lists {term.name} with reward[{i}].gradient: false (weight {term.weight:g}); remove that "
                        f"key to backpropagate it, or set reward[{i}].weight: 0 to log and evaluate it only")
            if term.weight != 0 and not load_plugin("reward", term.name).differentiable:
                return (f"lists {term.name} (reward[{i}].weight: {term.weight:g}), which is not differentiable; "
                        f"set reward[{i}].weight: 0 to log and evaluate it only")
        return None

    # ------------------------------------------------------------------ runtime

    def __init__(self, config, options: WeightedSumOptions, *, device=None,
                 part_of: Optional[WeightedSumReward] = None, **runtime):
        """The rewards of ``options.terms``, built; or, for a part of :meth:`gradient_split` (``part_of``
        the whole), the whole's rewards for those terms with their running statistics and call counter."""
        self.config, self.options, self.terms = config, options, options.terms
        self._whole = part_of
        if part_of is None:
            self.rewards = [load_plugin("reward", t.name)(config, t.options, device=device, **runtime)
                            for t in self.terms]
            self._calls = [0]  # in a list: the parts count on the same call counter
            # running statistics per term: [batches seen, EMA of mean, EMA of mean square] (updated in place)
            self.stats = [[0, 0.0, 0.0] for _ in self.terms]
            self._usable: list[dict[str, bool]] = [{} for _ in self.terms]
        else:
            index = [[t.label for t in part_of.terms].index(t.label) for t in self.terms]
            self.rewards = [part_of.rewards[i] for i in index]
            self._calls = part_of._calls
            self.stats = [part_of.stats[i] for i in index]
            self._usable = [part_of._usable[i] for i in index]

    @property
    def calls(self) -> int:
        return self._calls[0]

    @calls.setter
    def calls(self, value: int) -> None:
        self._calls[0] = value

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self._whole is None else self._whole.reduce_sum(tensor)

    def gradient_split(self) -> tuple[Optional[Reward], Optional[Reward]]:
        """``(the entries that give gradients, the weighted ones that do not)`` for ``algorithm: hybrid``:
        two weighted sums that share this one's rewards, running statistics and call counter (so this
        one's checkpoint state stays the whole story); the log-only entries (weight 0) go with the first
        part, or with the second when the first is empty. ``(self, None)`` / ``(None, self)`` when one
        side is empty."""
        policy = [i for i, (t, r) in enumerate(zip(self.terms, self.rewards))
                  if t.weight != 0 and not (r.differentiable and t.gradient)]
        gradient = [i for i, t in enumerate(self.terms) if t.weight != 0 and i not in policy]
        if not policy:
            return self, None
        if not gradient:
            return None, self
        return self._part([i for i in range(len(self.terms)) if i not in policy]), self._part(policy)

    def _part(self, indices: list[int]) -> WeightedSumReward:
        return type(self)(self.config, WeightedSumOptions([self.terms[i] for i in indices]), part_of=self)

    def prepare(self, contexts: Sequence[SampleContext]) -> torch.Tensor:
        """A sample is skipped only when no reward can use it; each reward's own answer masks it later."""
        keep = torch.zeros(len(contexts), dtype=torch.bool)
        for term, reward, usable in zip(self.terms, self.rewards, self._usable):
            ok = reward.prepare(contexts).cpu().bool()
            usable.update({c.sample_id: bool(v) for c, v in zip(contexts, ok)})
            if term.weight != 0:
                keep |= ok
        return keep

    def __call__(self, videos: torch.Tensor, contexts: Sequence[SampleContext]) -> WeightedSumOutput:
        cache, views = StepCache(), {}
        g = torch.Generator().manual_seed((self.config.seed * 1000003 + self.calls) % 2**63)
        self.calls += 1
        outputs, metrics = [], {}
        total = torch.zeros(videos.shape[0], dtype=torch.float32, device=videos.device)
        any_valid = torch.zeros(videos.shape[0], dtype=torch.bool, device=videos.device)
        for term, reward, usable in zip(self.terms, self.rewards, self._usable):
            frames = select_frames(videos.shape[2], term, g)
            if frames not in views:  # one tensor per selection: the cache's keys
                views[frames] = videos if frames is None else videos[:, :, list(frames)]
            ctx = contexts if frames is None else [dataclasses.replace(c, frames=frames) for c in contexts]
            reward.cache = cache
            try:
                with torch.set_grad_enabled(torch.is_grad_enabled() and term.weight != 0 and term.gradient):
                    out = reward(views[frames], ctx)
            finally:
                reward.cache = None
            valid = out.valid.to(videos.device).bool() & torch.tensor(
                [usable.get(c.sample_id, True) for c in contexts], device=videos.device)
            out = RewardOutput(out.scores, valid, dict(out.metrics))
            outputs.append(out)
            scores = out.scores.detach().float().to(videos.device)
            total += torch.where(valid, term.weight * scores, torch.zeros_like(scores))
            if term.weight != 0:
                any_valid |= valid
            metrics[f"{term.label}/score"] = float(scores[valid].mean()) if bool(valid.any()) else float("nan")
            metrics[f"{term.label}/valid_fraction"] = float(valid.float().mean())
            metrics.update({f"{term.label}/{k}": v for k, v in out.metrics.items()})
        metrics["cache/computed"] = float(sum(cache.computed.values()))  # work done once ...
        metrics["cache/hits"] = float(sum(cache.hits.values()))  # ... and reused by another reward
        self.last_cache = cache
        return WeightedSumOutput(scores=total, valid=any_valid, metrics=metrics, terms=outputs)

    def loss(self, output: WeightedSumOutput) -> torch.Tensor:
        """``sum_i weight_i * loss_i`` (see the module docstring); updates the running statistics."""
        loss = output.scores.sum() * 0.0
        for i, (term, reward, out) in enumerate(zip(self.terms, self.rewards, output.terms)):
            if term.weight == 0:
                continue
            if term.normalize == "none":
                part = reward.loss(out)
            else:
                mean, std = self._normalizer(i, out)
                valid = out.valid.to(out.scores.device)
                part = (-((out.scores[valid].float() - mean) / std).mean() if bool(valid.any())
                        else out.scores.sum() * 0.0)
            # the weighted total carries the videos' gradient when any reward kept it: this one must too
            require_gradient(part, output.scores, out.valid, f"reward[{i}] ({term.label})")
            loss = loss + term.weight * part
        return loss

    def _normalizer(self, i: int, out: RewardOutput) -> tuple[float, float]:
        """``(mean, std)`` for term ``i``: fixed, or the running statistics before this batch (then updated)."""
        term = self.terms[i]
        if term.normalize == "fixed":
            return term.normalize_mean, term.normalize_std
        n, m1, m2 = self.stats[i]
        if n >= term.normalize_warmup:
            corr = 1.0 - term.normalize_momentum ** n
            mean = m1 / corr
            std = math.sqrt(max(m2 / corr - mean * mean, 0.0))
            mean, std = mean, max(std, 1e-6)
        else:
            mean, std = 0.0, 1.0
        s = out.scores.detach().double()
        v = out.valid.to(s.device) & torch.isfinite(s)  # one NaN score must not poison the statistics for good
        sums = self.reduce_sum(torch.stack([s[v].sum(), (s[v] ** 2).sum(), v.sum().double()]).cpu())
        if float(sums[2]) > 0:  # a batch with no valid score anywhere leaves the statistics alone
            b = term.normalize_momentum
            self.stats[i][:] = [n + 1, b * m1 + (1 - b) * float(sums[0] / sums[2]),
                                b * m2 + (1 - b) * float(sums[1] / sums[2])]
        return mean, std

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """What resumes the composition exactly: the call count (random frames) and the running statistics."""
        return {"calls": self.calls, "stats": [list(s) for s in self.stats],
                "labels": [t.label for t in self.terms], "terms": [r.state_dict() for r in self.rewards]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("labels") != [t.label for t in self.terms]:
            raise ValueError(f"reward: the checkpoint's rewards {state.get('labels')} differ from the config's "
                             f"{[t.label for t in self.terms]}; resume with the same reward list")
        self.calls = int(state["calls"])
        for own, (n, a, b) in zip(self.stats, state["stats"]):
            own[:] = [int(n), float(a), float(b)]
        for reward, own in zip(self.rewards, state.get("terms") or [{}] * len(self.rewards)):
            reward.load_state_dict(own)


def _check_term(term: RewardTerm, key: str, plugin: type) -> None:
    def need(ok, message):
        if not ok:
            raise ConfigError(f"{key}.{message}")

    need(math.isfinite(term.weight), f"weight: must be a finite number, got {term.weight}")
    # a negative weight trains the model to lower that reward's score: never what a reward list is for, and
    # its loss shaping (e.g. face_identity's) would push the wrong way; refused rather than silently obeyed
    need(term.weight >= 0, f"weight: must be >= 0, got {term.weight} (the loss raises every weighted score; to "
                           "lower a score, use a reward that scores the opposite; weight: 0 logs it only)")
    need(term.normalize_std > 0, f"normalize_std: must be > 0, got {term.normalize_std}")
    need(0.0 < term.normalize_momentum < 1.0, f"normalize_momentum: must be in (0, 1), got {term.normalize_momentum}")
    need(term.normalize_warmup >= 1, f"normalize_warmup: must be >= 1, got {term.normalize_warmup}")
    need(term.frame_stride >= 1, f"frame_stride: must be >= 1, got {term.frame_stride}")
    need(term.frame_count >= 1, f"frame_count: must be >= 1, got {term.frame_count}")
