"""The plugin registry: samplers, rewards, models and algorithms found through entry points.

Plugins (the project's built-ins included) are declared in a distribution's
entry points::

    [project.entry-points."rewardfl.rewards"]
    my_reward = "my_pkg.reward:MyReward"

Listing reads only package metadata: no plugin module is imported until a
plugin is loaded by name. A plugin that fails to import is reported with its
distribution and the error, and does not affect the others.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata as md
import traceback
from typing import Any, Optional

from .config import (ConfigError, PluginSection, TrainConfig, build_plugin_options, check_paths, declared_top_level,
                     load_config, top_level_fields, unknown_top_level)
from .deps import explain_import_error
from .interfaces import Algorithm, Reward, Sampler, VideoModel

__all__ = ["KINDS", "PluginInfo", "PluginError", "list_plugins", "load_plugin", "create", "resolve_plugins",
           "resolve_config", "load_resolved", "build_options", "unknown_plugin"]

#: kind -> (entry-point group, interface class)
KINDS = {
    "sampler": ("rewardfl.samplers", Sampler),
    "reward": ("rewardfl.rewards", Reward),
    "model": ("rewardfl.models", VideoModel),
    "algorithm": ("rewardfl.algorithms", Algorithm),
}


class PluginError(ValueError):
    """Unknown plugin name, or a plugin that cannot be loaded; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    distribution: str
    version: str
    module: str  # "package.module:Object" as declared
    entry_point: Any = dataclasses.field(compare=False, repr=False, default=None)


def _group(kind: str) -> str:
    if kind not in KINDS:
        raise PluginError(f"unknown plugin kind '{kind}'; kinds are {sorted(KINDS)}")
    return KINDS[kind][0]


def list_plugins(kind: Optional[str] = None) -> list[PluginInfo]:
    """All declared plugins (of ``kind``, or every kind), sorted; imports nothing."""
    kinds = [kind] if kind else list(KINDS)
    out = []
    for k in kinds:
        seen = set()
        for ep in md.entry_points(group=_group(k)):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "?"
            version = dist.version if dist is not None else "?"
            key = (ep.name, ep.value)
            if key in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(key)
            out.append(PluginInfo(k, ep.name, dist_name, version, ep.value, ep))
    return sorted(out, key=lambda p: (p.kind, p.name))


def unknown_plugin(kind: str, name: str, available: list[str]) -> PluginError:
    close = difflib.get_close_matches(name, available, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    listed = ", ".join(available) if available else "none installed"
    return PluginError(f"unknown {kind} plugin '{name}'{hint} (available: {listed})")


def load_plugin(kind: str, name: str):
    """The plugin class registered as ``name`` for ``kind``.

    Raises PluginError listing the available names (with the closest match)
    for an unknown name, or naming the distribution and the error for a plugin
    that fails to import or does not implement the kind's interface.
    """
    infos = [p for p in list_plugins(kind) if p.name == name]
    if not infos:
        raise unknown_plugin(kind, name, [p.name for p in list_plugins(kind)])
    if len({(p.distribution, p.module) for p in infos}) > 1:
        where = ", ".join(f"{p.module} from {p.distribution} {p.version}" for p in infos)
        raise PluginError(f"{kind} plugin '{name}' is registered more than once: {where}; uninstall one")
    info = infos[0]
    try:
        obj = info.entry_point.load()
    except Exception as e:  # any failure in third-party import code
        last = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        where = f" at {last.filename}:{last.lineno}" if last else ""
        why = explain_import_error(e) or f"{type(e).__name__}: {e}{where}"
        raise PluginError(
            f"{kind} plugin '{name}' from distribution {info.distribution} {info.version} failed to import "
            f"({info.module}): {why}"
        ) from e
    interface = KINDS[kind][1]
    if not (isinstance(obj, type) and issubclass(obj, interface)):
        raise PluginError(
            f"{kind} plugin '{name}' from distribution {info.distribution} ({info.module}) is not a subclass "
            f"of rewardfl.interfaces.{interface.__name__}"
        )
    return obj


def build_options(kind: str, name: str, cls, options, top_level=None, prefix: Optional[str] = None,
                  also_known=()) -> Any:
    """Validate a plugin's config section against its ``Options`` dataclass, with the top-level keys
    (``top_level``, the config's ``plugin_keys``) it declares routed in. A reward builds its own
    (``Reward.resolve_options``: one made of rewards builds theirs through this function)."""
    opts_cls = getattr(cls, "Options", None)
    if opts_cls is None or not dataclasses.is_dataclass(opts_cls):
        raise PluginError(f"{kind} plugin '{name}' ({cls.__module__}.{cls.__name__}) has no Options dataclass")
    if dataclasses.is_dataclass(options) and isinstance(options, opts_cls):
        return options
    prefix, top_level, owner = prefix or kind, top_level or {}, f"the {kind} plugin '{name}'"
    if kind == "reward":
        return cls.resolve_options(options, top_level, prefix, also_known, owner)
    return build_plugin_options(opts_cls, options, top_level, prefix, also_known, owner)


def resolve_plugins(cfg: TrainConfig) -> dict[str, type]:
    """Load the plugins a config names and validate their options (the config is not changed).

    Returns ``{"model": cls, "sampler": cls, "reward": cls, "algorithm": cls}``. Errors name the
    config key (``model_name``, ``sampler.name``, ``reward.name``, ``algorithm.name`` or an option).
    """
    wanted = [("model", "model_name", cfg.model_name), ("sampler", "sampler.name", cfg.sampler.name),
              ("algorithm", "algorithm.name", cfg.algorithm.name), ("reward", "reward.name", cfg.reward.name)]
    # names first (metadata only), so a typo is reported before anything heavy imports
    for kind, key, name in wanted:
        available = [p.name for p in list_plugins(kind)]
        if name not in available:
            raise ConfigError(f"{key}: {unknown_plugin(kind, name, available)}")
    classes = {}
    for kind, key, name in wanted:
        try:
            classes[kind] = load_plugin(kind, name)
        except PluginError as e:
            raise ConfigError(f"{key}: {e}") from e
    resolve_config(cfg, classes)  # every plugin's options validated here, before anything loads
    return classes


def resolve_config(cfg: TrainConfig, plugins: dict[str, type]) -> TrainConfig:
    """A copy of ``cfg`` whose plugin sections hold each plugin's validated ``Options`` instance, the
    top-level keys (``cfg.plugin_keys``) routed to every configured plugin that declares them (the eval
    judges' included); a key none declares is an unknown key."""
    top = cfg.plugin_keys
    resolved = dataclasses.replace(
        cfg,
        model=build_options("model", cfg.model_name, plugins["model"], cfg.model, top),
        sampler=PluginSection(cfg.sampler.name, build_options("sampler", cfg.sampler.name, plugins["sampler"],
                                                              cfg.sampler.options, top)),
        reward=PluginSection(cfg.reward.name, build_options("reward", cfg.reward.name, plugins["reward"],
                                                            cfg.reward.options, top)),
        algorithm=PluginSection(cfg.algorithm.name, build_options(
            "algorithm", cfg.algorithm.name, plugins.get("algorithm") or load_plugin("algorithm", cfg.algorithm.name),
            cfg.algorithm.options, top)),
        plugin_keys={},
    )
    if not top:
        return resolved
    judges, judged = _route_to_judges(cfg.eval.judges, top)
    unknown_top_level(cfg, judged | declared_top_level(
        [resolved.model, resolved.sampler.options, resolved.reward.options, resolved.algorithm.options]))
    return dataclasses.replace(resolved, eval=dataclasses.replace(cfg.eval, judges=judges))


def _route_to_judges(judges: list, top: dict) -> tuple[list, set]:
    """``eval.judges`` with the top-level keys each judge's ``Options`` declares written into its entry
    (judges are built later, by the evaluation, from these entries), and the keys so routed."""
    out, routed = [], set()
    for i, judge in enumerate(judges):
        spec = {"name": judge} if isinstance(judge, str) else dict(judge)
        try:
            cls = load_plugin("reward", spec["name"])
        except PluginError as e:
            raise ConfigError(f"eval.judges[{i}].name: {e}") from e
        keys = [key for key in top_level_fields(cls.Options) if key in top]
        for key in keys:
            if key in spec:
                raise ConfigError(f"{key}: set both at the top level and as eval.judges[{i}].{key}; keep one")
            spec[key] = top[key]
        routed.update(keys)
        out.append(spec if keys else judge)
    return out, routed


def load_resolved(path: str, overrides=()) -> tuple[TrainConfig, dict[str, type]]:
    """What every command starts with: the YAML at ``path`` with ``--set`` overrides, validated, its
    plugins loaded and their options resolved (the top-level keys routed, the plugins' paths checked)."""
    cfg = load_config(path, overrides, paths=False)
    plugins = resolve_plugins(cfg)
    cfg = resolve_config(cfg, plugins)
    check_paths(cfg)
    return cfg, plugins


def create(kind: str, name: str, config: TrainConfig, options=None, **runtime):
    """Instantiate plugin ``name``: ``cls(config, validated_options, **runtime)`` (the config's top-level
    keys the plugin declares routed into its options)."""
    cls = load_plugin(kind, name)
    top = getattr(config, "plugin_keys", None)
    return cls(config, build_options(kind, name, cls, options, top), **runtime)
