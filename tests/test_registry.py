"""The plugin registry against real entry points, the project's own and a third party's.

The example plugin under tests/plugin_pkg is pip-installed into a temporary
target directory and found through its entry points in a subprocess whose
PYTHONPATH includes that directory: real discovery, nothing patched.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from rewardfl import registry
from rewardfl.config import ConfigError, config_from_dict
from rewardfl.registry import PluginError

HERE = os.path.dirname(os.path.abspath(__file__))
BUILTINS = {
    ("sampler", "flow_match_euler"),
    ("reward", "face_identity"),
    ("reward", "identity_consistency"),
    ("reward", "motion"),
    ("reward", "clip_score"),
    ("reward", "pickscore"),
    ("reward", "hps"),
    ("reward", "aesthetic"),
    ("reward", "face_dlib"),
    ("reward", "command"),
    ("model", "wan2_2"),
    ("model", "wan2_2_tiny"),
    ("model", "wan2_2_diffusers"),
    ("algorithm", "reward_backprop"),
    ("algorithm", "grpo"),
}


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """A directory with the example plugin distribution pip-installed into it."""
    target = tmp_path_factory.mktemp("plugin_site")
    build = tmp_path_factory.mktemp("plugin_build")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), os.path.join(HERE, "plugin_pkg")],
        check=True, cwd=build, env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    return str(target)


def run_py(code, plugin_site=None, **kw):
    env = dict(os.environ)
    if plugin_site:
        env["PYTHONPATH"] = plugin_site + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, **kw)


def run_module(args, plugin_site=None, **kw):
    env = dict(os.environ)
    if plugin_site:
        env["PYTHONPATH"] = plugin_site + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, **kw)


def test_builtins_are_listed_from_the_projects_own_entry_points():
    infos = registry.list_plugins()
    found = {(p.kind, p.name) for p in infos}
    assert BUILTINS <= found
    for p in infos:
        if (p.kind, p.name) in BUILTINS:
            assert p.distribution == "rewardfl"
            assert p.module.startswith("rewardfl.")


def test_listing_imports_no_plugin_module():
    heavy = ["diffsynth", "onnxruntime", "onnx2torch", "rewardfl.models.wan", "rewardfl.rewards.face_identity",
             "rewardfl.samplers.flow_match_euler"]
    out = run_py(f"""
        import sys, json
        from rewardfl import registry
        assert len(registry.list_plugins()) >= 4
        print(json.dumps([m for m in {heavy!r} if m in sys.modules]))
    """)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_plugins_cli_prints_kind_name_distribution_version_module():
    out = run_module(["rewardfl.plugins"])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["kind", "name", "distribution", "version", "module"]
    rows = {tuple(line.split()[:2]): line.split() for line in lines[1:]}
    import rewardfl

    for key in BUILTINS:
        assert rows[key][2:4] == ["rewardfl", rewardfl.__version__]


def test_unknown_name_lists_available_and_closest_match():
    with pytest.raises(PluginError) as e:
        registry.load_plugin("sampler", "flow_match_eular")
    msg = str(e.value)
    assert "did you mean 'flow_match_euler'" in msg
    assert "available: flow_match_euler" in msg


def test_unknown_plugin_in_config_names_the_key():
    cfg = config_from_dict({"reward": {"name": "face_identiti"}})
    with pytest.raises(ConfigError, match=r"^reward\.name: unknown reward plugin 'face_identiti'; did you mean 'face_identity'"):
        registry.resolve_plugins(cfg)


def test_unknown_kind():
    with pytest.raises(PluginError, match="unknown plugin kind 'scheduler'"):
        registry.list_plugins("scheduler")


def test_third_party_plugin_is_discovered_listed_and_loaded(plugin_site):
    out = run_module(["rewardfl.plugins", "--kind", "reward"], plugin_site)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    mine = [r for r in rows if r[1] == "mean_brightness"]
    assert mine == [["reward", "mean_brightness", "rewardfl-example-plugin", "0.3.1",
                     "rewardfl_example_plugin:MeanBrightnessReward"]]


def test_broken_third_party_plugin_is_reported_and_isolated(plugin_site):
    out = run_module(["rewardfl.plugins", "--kind", "reward", "--load"], plugin_site)
    assert out.returncode == 1  # a failure is reported, the listing still completes
    status = {line.split()[1]: line.split()[-1] for line in out.stdout.splitlines()[1:]}
    assert status["mean_brightness"] == "ok"
    assert status["broken_reward"] == "FAILED"
    assert status["not_a_reward"] == "FAILED"
    err = out.stderr
    assert "reward plugin 'broken_reward' from distribution rewardfl-example-plugin 0.3.1 failed to import" in err
    assert "No module named 'rewardfl_example_plugin_missing_dependency'" in err
    assert "mean_brightness" not in err


def test_third_party_reward_runs_through_the_builtin_code_path(plugin_site):
    # the same registry.create + options validation + Reward interface the trainer uses
    out = run_py("""
        import json, torch
        from rewardfl import registry
        from rewardfl.config import config_from_dict
        from rewardfl.interfaces import SampleContext
        cfg = config_from_dict({"reward": {"name": "mean_brightness", "target": 0.25}})
        reward = registry.create("reward", cfg.reward.name, cfg, cfg.reward.options)
        videos = torch.full((2, 3, 5, 8, 8), -0.5, requires_grad=True)   # brightness 0.25
        with torch.no_grad():
            videos[1].fill_(0.5)                                           # brightness 0.75
        ctx = [SampleContext("a"), SampleContext("b")]
        out = reward(videos, ctx)
        loss = reward.loss(out)
        loss.backward()
        print(json.dumps({"scores": out.scores.tolist(), "loss": loss.item(),
                          "grad": videos.grad.abs().sum().item(), "valid": out.valid.tolist()}))
    """, plugin_site)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    # hand calculation: scores 1 - |0.25-0.25| = 1 and 1 - |0.75-0.25| = 0.5; loss = -mean = -0.75
    assert got["scores"] == pytest.approx([1.0, 0.5], abs=1e-6)
    assert got["loss"] == pytest.approx(-0.75, abs=1e-6)
    assert got["valid"] == [True, True]
    assert got["grad"] > 0


def test_third_party_options_are_validated_like_builtin_ones(plugin_site):
    out = run_py("""
        from rewardfl import registry
        from rewardfl.config import ConfigError, config_from_dict
        cfg = config_from_dict({"reward": {"name": "mean_brightness", "targett": 0.2}})
        try:
            registry.create("reward", cfg.reward.name, cfg, cfg.reward.options)
        except ConfigError as e:
            print(e)
    """, plugin_site)
    assert out.returncode == 0, out.stderr
    assert "unknown key 'reward.targett' (did you mean 'target'?)" in out.stdout


def test_an_entry_point_that_is_not_a_plugin_class_is_refused(plugin_site):
    out = run_py("""
        from rewardfl import registry
        from rewardfl.registry import PluginError
        try:
            registry.load_plugin("reward", "not_a_reward")
        except PluginError as e:
            print("ERR", e)
    """, plugin_site)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        "ERR reward plugin 'not_a_reward' from distribution rewardfl-example-plugin "
        "(rewardfl_example_plugin:brightness) is not a subclass of rewardfl.interfaces.Reward")
