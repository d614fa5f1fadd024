"""Typed, validated configuration: YAML -> dataclasses.

The top level accepts the seed recipe's keys (examples/reward_fl_wan22.yaml) exactly as written there
(``learning_rate``, ``model_paths``, ``min_timestep_boundary``, ...), the
reference implementation's (``mid_timestep``, ``lora_rank``, ...), and sections
for what rewardfl adds: ``sampler``, ``reward``, ``model`` (plugin name and
options), ``data`` and ``deepspeed``.

The core owns only its own keys (:class:`TrainConfig`) and the sections. A plugin owns the rest: a
field of its ``Options`` with ``metadata={"top_level": True}`` may also be written at the top level
(the seed's flat keys: ``model_paths``, ``lora_rank``, ``reward_model_path``, ...). Loading keeps such
keys in ``TrainConfig.plugin_keys``; resolving the plugins (``rewardfl.registry``) routes each to every
configured plugin that declares it and refuses the ones none declares. A field with
``metadata={"path": True}`` names a file or folder that must exist (:func:`check_paths`).

Every user error is a :class:`ConfigError` (a ``ValueError``) whose message
names the key (dotted, e.g. ``sampler.shift``), what is wrong and how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from typing import Any, ClassVar, Literal, Optional, Sequence, Union

import yaml

from .fileio import atomic_write, read_utf8

__all__ = [
    "ConfigError",
    "PluginSection",
    "DataConfig",
    "EvalConfig",
    "TrainConfig",
    "load_config",
    "config_from_dict",
    "parse_overrides",
    "build_dataclass",
    "build_plugin_options",
    "declared_top_level",
    "top_level_fields",
    "top_level_option",
    "unknown_top_level",
    "check_paths",
    "dump_config",
    "training_timestep_range",
]


class ConfigError(ValueError):
    """A problem with the user's configuration; the message is one line for the CLI."""


# --------------------------------------------------------------------------- schema


@dataclasses.dataclass
class PluginSection:
    """``name`` selects a registered plugin; the other keys are its options.

    In YAML either a bare name (``sampler: flow_match_euler``) or a mapping
    (``sampler: {name: flow_match_euler, shift: 5.0}``). ``options`` is replaced
    by the plugin's validated ``Options`` instance when plugins are resolved.
    """

    name: str
    options: Any = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DataConfig:
    """The training videos (DiffSynth-Studio's ``metadata.csv`` format).

    ``metadata_path``: CSV with ``video`` (path relative to the CSV) and
    ``prompt`` columns. Frames are resized and centre-cropped so that
    ``height * width <= max_pixels`` with both divisible by 16 (or to exactly
    ``height`` x ``width`` when both are given); ``num_frames`` must be 4k+1.
    """

    #: ``metadata.csv`` with ``video`` (path relative to the CSV) and ``prompt`` columns
    metadata_path: Optional[str] = None
    #: frames per clip, 4k+1
    num_frames: int = 81
    #: frame size: fit ``max_pixels`` (sides multiples of 16), unless ``height`` and ``width`` are given
    max_pixels: int = 480 * 832
    #: exact frame height and width (both, multiples of 16), instead of ``max_pixels``
    height: Optional[int] = None
    width: Optional[int] = None
    #: processes that decode clips ahead of training (0: decode on the training thread)
    num_workers: int = 0
    #: a separate CSV of held-out clips for ``rewardfl.evaluate``/``rewardfl.generate`` (training never reads it)
    eval_metadata_path: Optional[str] = None
    #: fraction of ``metadata_path`` held out from training, chosen by a hash of (seed, sample_id)
    #: (``rewardfl.evaluation.split``): independent of row order; 0 holds out nothing
    eval_fraction: float = 0.0


@dataclasses.dataclass
class EvalConfig:
    """``rewardfl.evaluate``: judges besides the training reward, seeds per clip, evaluation during training.

    ``judges``: reward plugins, each ``{name: <reward plugin>, label: <optional>, <its options>}`` (or a
    bare name), built through the registry and reported separately. Intervals are Student-t over
    held-out clips (``rewardfl.evaluation.metrics.paired_interval``): nothing to configure."""

    #: keys earlier versions had, with what replaced them (named in the error a config using one gets)
    REMOVED_KEYS: ClassVar[dict] = {
        "bootstrap_samples": "intervals are Student-t over held-out clips now (no bootstrap); delete the key",
        "bootstrap_seed": "intervals are Student-t over held-out clips now (no bootstrap); delete the key",
    }

    #: reward plugins that did not give the gradients, each ``{name, label, ...options}``, reported separately
    judges: list = dataclasses.field(default_factory=list)
    #: starting noises per held-out clip (seeds 0..seeds-1), the same for every checkpoint
    seeds: int = 2
    #: frames per video on each clip's contact sheet
    contact_sheet_frames: int = 4
    # --- during training (``eval_steps``) and at its end (``eval.at_end``)
    #: held-out clips evaluated during training (the first N of the held-out set; 0: all of them); the
    #: hacking guard needs at least 5 (``MIN_CLIPS_FOR_CLAIM``)
    train_clips: int = 8
    #: starting noises per clip during training (seeds 0..N-1, the same at every evaluation)
    train_seeds: int = 1
    #: evaluations the hacking guard looks back over (training reward up while a judge falls)
    hacking_window: int = 5
    #: the smallest fall of a judge the hacking guard reports, in standard deviations of that judge's
    #: clip means at the window's start (its spread between clips); 0.2 is Cohen's "small" effect.
    #: 0: any fall beyond its interval, however small
    hacking_min_effect: float = 0.2
    #: at the end of a run: evaluate base vs the final weights on the held-out clips (``seeds`` per
    #: clip), write OUTPUT_DIR/eval and print the table
    at_end: bool = False


@dataclasses.dataclass
class TrainConfig:
    # --- the seed recipe's keys (reward FL + wan2_2, examples/reward_fl_wan22.yaml), names as written there
    #: AdamW learning rate (> 0)
    learning_rate: float = 2.5e-6
    #: ``constant``, ``linear`` or ``cosine`` decay after warm-up
    lr_scheduler_type: str = "constant"
    #: videos sampled together in one micro-batch, per process
    per_device_train_batch_size: int = 1
    #: micro-batches per optimizer step
    gradient_accumulation_steps: int = 1
    #: linear warm-up, in optimizer steps
    warmup_steps: int = 10
    #: passes over the dataset (when ``max_steps`` is null)
    num_train_epochs: int = 1
    #: AdamW weight decay
    weight_decay: float = 0.0
    #: the model plugin; its keys (``model_paths``, ``lora_rank``, ...) are its ``Options``'
    model_name: str = "wan2_2"
    max_timestep_boundary: float = 1.0
    #: with ``max_timestep_boundary``: DiffSynth-Studio's training-schedule keys (fractions of its 1000-step shift-5 schedule), validated (0 <= min <= max <= 1) and kept, but they do not change reward-FL sampling or the gradient window (docs/design.md); ``--check`` prints the timesteps they denote
    min_timestep_boundary: float = 0.0
    #: sampling steps N
    num_inference_steps: int = 8

    # --- the reference implementation's keys
    #: gradient window: steps before ``mid_timestep`` run without gradient, ``mid_timestep..final_timestep`` with it
    mid_timestep: int = 4
    #: the last sampling step: it jumps to sigma 0 and ends sampling (< ``num_inference_steps``)
    final_timestep: int = 7
    #: global batch per optimizer step = per_device_train_batch_size * world size *
    #: gradient_accumulation_steps; when set, must agree (checked at launch).
    train_batch_size: Optional[int] = None
    #: gradient-norm clip
    max_grad_norm: float = 1.0
    #: seeds data order and per-sample, per-step noise
    seed: int = 42
    #: optimizer steps to run; overrides epochs
    max_steps: Optional[int] = None
    #: a checkpoint every N optimizer steps
    save_steps: int = 100
    #: keep the newest K checkpoints
    save_total_limit: Optional[int] = 3
    #: one ``metrics.jsonl`` row (and TensorBoard point) every N optimizer steps, the mean over those N (``updated``: how many of them updated the weights)
    logging_steps: int = 1
    #: metrics, checkpoints, samples, ``reward_curve.png``, ``final/``
    output_dir: str = "./output"
    #: ``true``: the latest checkpoint in ``output_dir``; or a checkpoint path
    resume_from_checkpoint: Union[bool, str] = False
    #: a fresh run into an output_dir holding another run's checkpoints replaces them (HF Trainer's key);
    #: without it such a run is refused
    overwrite_output_dir: bool = False

    # --- rewardfl's additions
    #: AdamW betas and epsilon (> 0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    #: weight of the velocity regulariser (kl) in the loss; 0 disables it
    kl_weight: float = 1.0
    #: fixed starting noise for every step (the reference implementation's behaviour)
    fixed_noise: bool = False
    #: fetch model files named by hub id (the model's model_id_with_origin_paths, an empty tokenizer_path) that
    #: are in no local folder or cache, with the Hugging Face / ModelScope client into its standard cache
    allow_download: bool = False
    #: device for training: "auto" picks cuda when available
    device: str = "auto"
    #: the weights' dtype for training: ``bf16``, ``fp16``, ``fp32``/``no``; ``auto``: the model plugin chooses (Wan: bf16 on CUDA, fp32 on the CPU)
    mixed_precision: str = "auto"
    #: write a sample mp4 every N steps (next to its reference with ``sample_side_by_side``)
    sample_video_steps: Optional[int] = None
    sample_side_by_side: bool = True
    #: evaluate on the held-out clips every N optimizer steps (``eval.train_clips`` x ``eval.train_seeds``
    #: videos, fixed noise): ``eval/*`` rows in metrics.jsonl and TensorBoard, and the hacking guard
    eval_steps: Optional[int] = None
    #: stop the run (after saving a checkpoint) when the hacking guard fires
    stop_on_hacking: bool = False
    #: keep the weights of the best evaluation by this key (an ``eval/...`` metric, e.g.
    #: ``eval/judge/sface/specificity``) in OUTPUT_DIR/best; needs ``eval_steps``
    save_best_by: Optional[str] = None
    #: whether a higher or a lower ``save_best_by`` is better
    save_best_mode: Literal["max", "min"] = "max"
    #: exponential moving average of the trainable weights (0: off): ``ema = decay * ema + (1 - decay) * w``
    #: after every update; saved in checkpoints and exported to final/ema, used by generate/evaluate with
    #: ``--weights ema``
    ema_decay: float = 0.0
    #: where the EMA lives: ``device`` (beside the weights) or ``cpu`` (host memory; slower, frees GPU memory)
    ema_device: Literal["device", "cpu"] = "device"
    #: where metrics, sample videos and evaluation strips go besides metrics.jsonl:
    #: ``tensorboard`` (OUTPUT_DIR/tensorboard) and/or ``wandb`` (pip install rewardfl[wandb])
    report_to: list = dataclasses.field(default_factory=lambda: ["tensorboard"])
    #: the sampler plugin: a name, or ``{name: ..., option: value}``
    sampler: PluginSection = dataclasses.field(default_factory=lambda: PluginSection("flow_match_euler"))
    #: the reward plugin: a name, ``{name: ..., option: value}``, or a list of them trained as a weighted sum
    reward: PluginSection = dataclasses.field(default_factory=lambda: PluginSection("face_identity"))
    #: the training algorithm (a plugin): ``reward_backprop`` (reward feedback learning, needs a reward with
    #: gradients) or ``grpo`` (policy gradient: any reward), with its options
    algorithm: PluginSection = dataclasses.field(default_factory=lambda: PluginSection("reward_backprop"))
    #: options of the model plugin named by ``model_name``
    model: dict = dataclasses.field(default_factory=dict)
    #: the training videos and the held-out clips (the ``data:`` section)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    #: ``rewardfl.evaluate``'s judges and seeds, and evaluation during training
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    #: a DeepSpeed config: a mapping, or a path to a DeepSpeed JSON
    deepspeed: Optional[Union[dict, str]] = None

    #: set when loading: the directory relative paths are resolved against (the
    #: working directory at load time, as in ROLL and DiffSynth-Studio)
    base_dir: str = dataclasses.field(default=".", metadata={"internal": True})
    #: set when loading: the top-level keys the core does not own, for the plugins that declare them
    #: (routed by ``rewardfl.registry.resolve_config``, which empties this); written back at the top level
    plugin_keys: dict = dataclasses.field(default_factory=dict, metadata={"internal": True, "inline": True})

    def resolve_path(self, value: Optional[str]) -> Optional[str]:
        """An absolute path for a path from the config (relative ones: to ``base_dir``)."""
        if value is None:
            return None
        value = os.path.expanduser(str(value))
        return value if os.path.isabs(value) else os.path.normpath(os.path.join(self.base_dir, value))


#: a plugin section written as a list is shorthand for this plugin with the list as its ``terms``:
#: ``reward: [{name: a, weight: 1}, ...]`` is the reward plugin ``weighted_sum`` (rewardfl.rewards.weighted_sum)
LIST_SECTIONS = {"reward": "weighted_sum"}

#: the trackers ``report_to`` may name (``rewardfl.training.trackers``)
REPORT_TO = ("tensorboard", "wandb")

# the core's keys whose values are filesystem paths that must exist (when set), for check_paths (the
# plugins' are their Options fields marked ``metadata={"path": True}``)
PATH_KEYS = ("data.metadata_path", "data.eval_metadata_path")

LR_SCHEDULERS = ("constant", "linear", "cosine")
MIXED_PRECISION = ("auto", "no", "fp32", "bf16", "fp16")


# --------------------------------------------------------------------------- generic dataclass builder


def _did_you_mean(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str):
    """Check ``value`` against type ``tp``; returns the (possibly converted) value."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        # bool before others so that 'true' is not a path string by accident
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: a is not bool):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                if "must be a finite number" in str(e) or typing.get_origin(arg) is typing.Literal:
                    # the right type, a wrong value: say so
                    raise
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {type(value).__name__} {value!r}")
        return build_dataclass(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads 2.5e-6 as a float but 1e-5 as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(number):  # .inf / .nan would reach the weights on the first update
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    if tp in (dict, list):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{key}: expected a {tp.__name__}, got {type(value).__name__} {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return origin(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: must be one of {list(typing.get_args(tp))}, got {value!r}")
    return value


def build_dataclass(cls, values: dict, prefix: str = "", also_known: Sequence[str] = (), top_level=None,
                    owner: str = ""):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types.

    Used for the config and for every plugin's ``Options``; ``prefix`` is the
    dotted key of the section, used in messages. ``also_known``: keys the same mapping takes for
    something else (a reward-list entry's ``weight``, ``label``, ...), listed and suggested too. A
    dataclass may name keys it no longer takes in a ``REMOVED_KEYS`` class attribute (key -> what
    replaced it) for a clearer error. ``top_level``: more values, written at the top level of the YAML
    (messages name them without ``prefix``). ``owner``: whose keys these are (a plugin), named when
    one is unknown.
    """
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(values).__name__} {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {key: _coerce(value, hints[key], key) for key, value in (top_level or {}).items()}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            removed = getattr(cls, "REMOVED_KEYS", {}).get(key)
            if removed:
                raise ConfigError(f"{dotted}: removed; {removed}")
            names = sorted(set(fields) | set(also_known))
            known = ("known keys: " + ", ".join(names) if len(names) <= 12
                     else (f"known keys: {', '.join(also_known)} and the plugin's own ({', '.join(sorted(fields))})"
                           if also_known else "see docs/configuration.md"))
            whose = f" ({owner})" if owner else ""
            raise ConfigError(f"unknown key '{dotted}'{_did_you_mean(str(key), names)}{whose}; {known}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        raise ConfigError(f"{prefix or 'config'}: missing required key(s) {missing}") from e


def top_level_option(default, *, path: bool = False):
    """A plugin ``Options`` field that may also be written at the top level of the YAML (``path``: a
    file or folder that must exist, checked by :func:`check_paths`)."""
    return dataclasses.field(default=default, metadata={"top_level": True, "path": path})


def top_level_fields(cls) -> list[str]:
    """The keys a plugin's ``Options`` (dataclass ``cls``) also takes at the top level of the YAML."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("top_level")]


def build_plugin_options(cls, values, top_level: dict, prefix: str, also_known: Sequence[str] = (),
                         owner: str = ""):
    """A plugin's ``Options`` (dataclass ``cls``) from its config section ``values`` and the top-level
    keys (``top_level``: ``TrainConfig.plugin_keys``) it declares with ``metadata={"top_level": True}``;
    a key set both at the top level and in the section is an error naming both. ``owner`` names the
    plugin in an unknown key's error."""
    routed = {key: top_level[key] for key in top_level_fields(cls) if key in top_level}
    for key in routed:
        if isinstance(values, dict) and key in values:
            raise ConfigError(f"{key}: set both at the top level and as {prefix}.{key}; keep one")
    return build_dataclass(cls, values, prefix=prefix, also_known=also_known, top_level=routed, owner=owner)


def declared_top_level(options) -> set[str]:
    """The top-level keys resolved plugin options declare: ``options`` a dataclass instance, or lists and
    dataclasses of them (a reward made of rewards keeps its terms' options inside its own)."""
    if isinstance(options, (list, tuple)):
        return set().union(*(declared_top_level(o) for o in options))
    if not dataclasses.is_dataclass(options) or isinstance(options, type):
        return set()
    return set(top_level_fields(options)).union(
        *(declared_top_level(getattr(options, f.name)) for f in dataclasses.fields(options)))


def unknown_top_level(cfg, declared) -> None:
    """Refuse the first of ``cfg.plugin_keys`` that no configured plugin declares (``declared``): the
    same one-line "unknown key" as any other, suggesting the core's and the plugins' top-level keys."""
    for key in cfg.plugin_keys:
        if key not in declared:
            names = {f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")} | set(declared)
            raise ConfigError(f"unknown key '{key}'{_did_you_mean(str(key), names)}; "
                              "see docs/configuration.md")


# --------------------------------------------------------------------------- loading


def _normalize_plugin_section(raw, key: str) -> dict:
    if isinstance(raw, str):
        return {"name": raw, "options": {}}
    if isinstance(raw, dict):
        raw = dict(raw)
        if "name" not in raw:
            raise ConfigError(f"{key}: missing 'name' (the {key} plugin to use; `python -m rewardfl.plugins` lists them)")
        name = raw.pop("name")
        if not isinstance(name, str):
            raise ConfigError(f"{key}.name: expected a plugin name string, got {name!r}")
        return {"name": name, "options": raw}
    raise ConfigError(f"{key}: expected a plugin name or a mapping with 'name', got {raw!r}")


def config_from_dict(raw: dict, *, base_dir: Optional[str] = None) -> TrainConfig:
    """Validate a mapping (as read from YAML) into a :class:`TrainConfig`.

    Checks types, unknown keys and value ranges; not paths or plugins
    (see :func:`check_paths` and ``rewardfl.registry.resolve_plugins``).
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: the top level must be a mapping of keys, got {type(raw).__name__}")
    raw = dict(raw)
    for key in ("sampler", "reward", "algorithm"):
        if key in LIST_SECTIONS and isinstance(raw.get(key), list):
            raw[key] = PluginSection(LIST_SECTIONS[key], {"terms": list(raw[key])})
        elif key in raw:
            sec = _normalize_plugin_section(raw[key], key)
            raw[key] = PluginSection(sec["name"], sec["options"])
    if isinstance(raw.get("report_to"), str):
        raw["report_to"] = [raw["report_to"]]
    if "model" in raw and raw["model"] is None:
        raw["model"] = {}
    core = {f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")}
    cfg = build_dataclass(TrainConfig, {k: v for k, v in raw.items() if k in core})
    cfg.plugin_keys = {k: v for k, v in raw.items() if k not in core}
    cfg.base_dir = os.path.abspath(base_dir or os.getcwd())
    validate(cfg)
    return cfg


def _need(cond: bool, msg: str):
    if not cond:
        raise ConfigError(msg)


def validate(cfg: TrainConfig) -> None:
    """Range and consistency checks, one message per problem (the first one found)."""
    # a seed outside [0, 2**63) overflows numpy's and torch's generators, which are seeded late
    # (after the model loaded): say so before anything heavy runs
    _need(0 <= cfg.seed < 2**63, f"seed: must be an integer in [0, 2**63) (numpy/torch generators), got {cfg.seed}")
    _need(cfg.learning_rate > 0, f"learning_rate: must be > 0, got {cfg.learning_rate}")
    _need(cfg.weight_decay >= 0, f"weight_decay: must be >= 0, got {cfg.weight_decay}")
    _need(cfg.lr_scheduler_type in LR_SCHEDULERS,
          f"lr_scheduler_type: must be one of {list(LR_SCHEDULERS)}, got {cfg.lr_scheduler_type!r}"
          f"{_did_you_mean(cfg.lr_scheduler_type, LR_SCHEDULERS)}")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                "num_inference_steps", "save_steps", "logging_steps"):
        value = getattr(cfg, key)
        _need(value > 0, f"{key}: must be > 0, got {value}")
    _need(cfg.warmup_steps >= 0, f"warmup_steps: must be >= 0, got {cfg.warmup_steps}")
    for key in ("max_steps", "train_batch_size", "sample_video_steps", "save_total_limit"):
        value = getattr(cfg, key)
        _need(value is None or value > 0, f"{key}: must be > 0 (or null), got {value}")
    _need(cfg.max_grad_norm > 0, f"max_grad_norm: must be > 0, got {cfg.max_grad_norm}")
    _need(cfg.kl_weight >= 0, f"kl_weight: must be >= 0, got {cfg.kl_weight}")
    _need(0.0 <= cfg.min_timestep_boundary <= cfg.max_timestep_boundary <= 1.0,
          "min_timestep_boundary/max_timestep_boundary: need 0 <= min <= max <= 1 (fractions of DiffSynth-Studio's "
          f"1000-step training schedule), got min={cfg.min_timestep_boundary}, max={cfg.max_timestep_boundary}")
    n = cfg.num_inference_steps
    _need(0 <= cfg.mid_timestep <= cfg.final_timestep < n,
          f"mid_timestep/final_timestep: need 0 <= mid_timestep <= final_timestep < num_inference_steps ({n}), "
          f"got mid_timestep={cfg.mid_timestep}, final_timestep={cfg.final_timestep}")
    _need(cfg.adam_epsilon > 0, f"adam_epsilon: must be > 0 (AdamW divides by sqrt(v) + eps), got {cfg.adam_epsilon}")
    _need(0.0 <= cfg.adam_beta1 < 1 and 0.0 <= cfg.adam_beta2 < 1,
          f"adam_beta1/adam_beta2: must be in [0, 1), got {cfg.adam_beta1}, {cfg.adam_beta2}")
    _need(cfg.mixed_precision in MIXED_PRECISION,
          f"mixed_precision: must be one of {list(MIXED_PRECISION)}, got {cfg.mixed_precision!r}")
    _need(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"),
          f"device: must be 'auto', 'cpu' or 'cuda[:N]', got {cfg.device!r}")
    d = cfg.data
    _need(d.num_frames > 0 and (d.num_frames - 1) % 4 == 0,
          f"data.num_frames: must be of the form 4k+1 (1, 5, 9, ..., 81), got {d.num_frames}")
    _need(d.max_pixels >= 256, f"data.max_pixels: must be >= 256 (16x16), got {d.max_pixels}")
    for key in ("height", "width"):
        value = getattr(d, key)
        _need(value is None or (value > 0 and value % 16 == 0),
              f"data.{key}: must be a positive multiple of 16, got {value}")
    _need((d.height is None) == (d.width is None), "data.height/data.width: give both or neither")
    _need(d.num_workers >= 0, f"data.num_workers: must be >= 0, got {d.num_workers}")
    _need(0.0 <= d.eval_fraction < 1.0, f"data.eval_fraction: must be in [0, 1), got {d.eval_fraction}")
    _need(d.eval_fraction == 0.0 or d.eval_metadata_path is None,
          "data.eval_fraction/data.eval_metadata_path: give one source of held-out clips, not both")
    e = cfg.eval
    for i, judge in enumerate(e.judges):
        _need(isinstance(judge, str) or (isinstance(judge, dict) and isinstance(judge.get("name"), str)),
              f"eval.judges[{i}]: expected a reward plugin name or a mapping with 'name' (e.g. "
              f"{{name: face_identity, det_size: 320}}), got {judge!r}")
    for key in ("seeds", "contact_sheet_frames"):
        _need(getattr(e, key) > 0, f"eval.{key}: must be > 0, got {getattr(e, key)}")
    _need(e.train_clips >= 0, f"eval.train_clips: must be >= 0 (0: every held-out clip), got {e.train_clips}")
    for key in ("train_seeds", "hacking_window"):
        _need(getattr(e, key) > 0, f"eval.{key}: must be > 0, got {getattr(e, key)}")
    _need(e.hacking_window >= 2, f"eval.hacking_window: must be >= 2 evaluations, got {e.hacking_window}")
    _need(math.isfinite(e.hacking_min_effect) and e.hacking_min_effect >= 0,
          f"eval.hacking_min_effect: must be a number >= 0 (0: any fall beyond its interval), got {e.hacking_min_effect}")
    _need(cfg.eval_steps is None or cfg.eval_steps > 0, f"eval_steps: must be > 0 (or unset), got {cfg.eval_steps}")
    _need(cfg.save_best_by is None or (cfg.eval_steps is not None and cfg.save_best_by.startswith("eval/")),
          f"save_best_by: {cfg.save_best_by!r} needs eval_steps and an eval/ metric (e.g. eval/reward_score, "
          "eval/judge/<label>/specificity)")
    _need(not cfg.stop_on_hacking or cfg.eval_steps is not None,
          "stop_on_hacking: the hacking guard runs at evaluations; set eval_steps too")
    _need(0.0 <= cfg.ema_decay < 1.0, f"ema_decay: must be in [0, 1) (0 turns the EMA off), got {cfg.ema_decay}")
    for i, name in enumerate(cfg.report_to):
        _need(name in REPORT_TO, f"report_to[{i}]: unknown {name!r}; known: {', '.join(REPORT_TO)}")
    _need(isinstance(cfg.resume_from_checkpoint, (bool, str)),
          f"resume_from_checkpoint: expected true, false or a checkpoint path, got {cfg.resume_from_checkpoint!r}")


def training_timestep_range(min_boundary: float, max_boundary: float, shift: float = 5.0,
                            num_train_timesteps: int = 1000) -> tuple[float, float]:
    """``(t_low, t_high)``: the timesteps DiffSynth-Studio's trainer draws for these boundaries.

    Its Wan training schedule has ``num_train_timesteps`` entries ``1000 * shift(s_j)``,
    ``s_j = 1 - j / num_train_timesteps`` (j = 0 is pure noise), and it draws
    ``j`` from ``[int(min * T), int(max * T))``. With shift 5, ``[0.9, 1.0]`` is
    about t 5..357 (none of Wan2.2's 8 sampling timesteps, the lowest being 417), which is why
    these keys do not select reward-FL gradient steps.
    """
    n = num_train_timesteps
    lo = int(min_boundary * n + 1e-9)
    hi = max(lo + 1, int(max_boundary * n + 1e-9))  # an empty draw range still denotes index lo

    def t_of(j: int) -> float:
        s = 1.0 - j / n
        return 1000.0 * shift * s / (1.0 + (shift - 1.0) * s)

    return t_of(min(hi - 1, n - 1)), t_of(lo)


def _plugin_paths(options, prefix: str):
    """``(key, value)`` of the fields marked ``metadata={"path": True}`` in resolved plugin options (and
    in the options they hold); a top-level key is named as written there."""
    if isinstance(options, (list, tuple)):
        for i, item in enumerate(options):
            yield from _plugin_paths(item, f"{prefix}[{i}]")
    elif dataclasses.is_dataclass(options) and not isinstance(options, type):
        for f in dataclasses.fields(options):
            value = getattr(options, f.name)
            if f.metadata.get("path"):
                yield (f.name if f.metadata.get("top_level") else f"{prefix}.{f.name}"), value
            else:
                yield from _plugin_paths(value, prefix if f.metadata.get("inline") else f"{prefix}.{f.name}")


def check_paths(cfg: TrainConfig) -> None:
    """Every configured path exists (the core's, and the resolved plugins' path fields); raises
    ConfigError naming the key and the resolved path."""
    keys = []
    for section in ("model", "sampler", "reward", "algorithm"):
        value = getattr(cfg, section)
        keys += _plugin_paths(value.options if isinstance(value, PluginSection) else value, section)
    keys += [(key, getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])) for key in PATH_KEYS]
    for key, value in keys:
        if value is None:
            continue
        path = cfg.resolve_path(value)
        if not os.path.exists(path):
            raise ConfigError(f"{key}: path does not exist: {path} (fix the path in the config or with --set {key}=...)")
    if isinstance(cfg.resume_from_checkpoint, str):
        path = cfg.resolve_path(cfg.resume_from_checkpoint)
        if not os.path.exists(path):
            raise ConfigError(f"resume_from_checkpoint: checkpoint does not exist: {path} "
                              "(use true to resume from the latest in output_dir)")
    if isinstance(cfg.deepspeed, str):
        path = cfg.resolve_path(cfg.deepspeed)
        if not os.path.isfile(path):
            raise ConfigError(f"deepspeed: DeepSpeed JSON not found: {path}")


def parse_overrides(items) -> dict:
    """``["a.b=1", "c=x"]`` -> nested dict, values parsed as YAML scalars (``1`` is an int)."""
    out: dict = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value (dotted keys for sections, e.g. sampler.shift=3)")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item}: empty key")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item}: cannot parse value: {e}") from e
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: '{part}' is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), str) and key in ("sampler", "reward", "algorithm"):
            out[key] = _merge({"name": out[key]}, value)
        else:
            out[key] = value
    return out


def read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    text = read_utf8(path, "save the config as UTF-8", ConfigError)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(e, 'problem', e)}") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


def load_config(path: str, overrides=(), *, paths: bool = True) -> TrainConfig:
    """Read YAML ``path``, apply ``--set`` overrides, validate (and check the core's paths unless
    ``paths=False``; the plugins' once they are resolved: ``rewardfl.registry.load_resolved``)."""
    raw = _merge(read_yaml(path), parse_overrides(overrides))
    cfg = config_from_dict(raw)
    if paths:
        check_paths(cfg)
    return cfg


def to_dict(cfg) -> dict:
    """Plain data (for YAML/JSON) of a config, plugin options included."""
    def conv(obj):
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            if isinstance(obj, PluginSection):
                return {"name": obj.name, **conv(obj.options)}
            out = {}
            for f in dataclasses.fields(obj):  # an "inline" field's keys sit beside the others (as written)
                if f.metadata.get("inline"):
                    out.update(conv(getattr(obj, f.name)) or {})
                elif not f.metadata.get("internal"):
                    out[f.name] = conv(getattr(obj, f.name))
            return out
        if isinstance(obj, dict):
            return {k: conv(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [conv(v) for v in obj]
        return obj

    return conv(cfg)


def dump_config(cfg: TrainConfig, path: str) -> None:
    """Write the resolved config (defaults filled in) as YAML, atomically."""
    with atomic_write(path) as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False, allow_unicode=True)

