"""Config loading and validation: every user error is one line naming the key, exit code 2."""

import os
import re
import subprocess
import sys
from dataclasses import fields

import pytest
import yaml

from rewardfl import run
from rewardfl.config import (ConfigError, config_from_dict, dump_config, load_config,
                             parse_overrides, read_yaml, to_dict)
from rewardfl.registry import load_resolved, resolve_config, resolve_plugins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_COPY = os.path.join(ROOT, "tests", "data", "seed_config.yaml")


def seed_yaml_block():
    """The seed recipe's YAML (ROLL's reward-FL example config), as shipped in tests/data: nothing outside the checkout."""
    with open(SEED_COPY, encoding="utf-8") as f:
        return f.read()


def test_the_seed_recipe_loads_as_it_stands():
    raw = yaml.safe_load(seed_yaml_block())
    cfg = config_from_dict(raw)
    cfg = resolve_config(cfg, resolve_plugins(cfg))
    # every key of the recipe arrives with its value and type: at the core or at the plugin declaring it
    assert cfg.learning_rate == pytest.approx(2.5e-6)
    assert cfg.model_name == "wan2_2"
    assert cfg.model.trainable_models == "dit2"
    assert cfg.model.use_gradient_checkpointing_offload is True
    assert cfg.model.extra_inputs == "input_image"
    assert (cfg.min_timestep_boundary, cfg.max_timestep_boundary) == (0.9, 1.0)
    assert cfg.num_inference_steps == 8
    assert cfg.model.model_id_with_origin_paths is None
    assert cfg.reward.options.reward_model_path == raw["reward_model_path"]
    for key, value in raw.items():
        owner = next(o for o in (cfg, cfg.model, cfg.reward.options) if key in {f.name for f in fields(o)})
        assert getattr(owner, key) == value, key


def test_example_config_loads_without_paths_and_names_the_missing_path():
    path = os.path.join(ROOT, "examples", "reward_fl_wan22.yaml")
    cfg = load_config(path, paths=False)
    cfg = resolve_config(cfg, resolve_plugins(cfg))
    assert cfg.mid_timestep == 4 and cfg.final_timestep == 7 and cfg.model.lora_rank == 32
    with pytest.raises(ConfigError, match=r"^model_paths: path does not exist: .*wan22_paths\.json"):
        load_resolved(path)


def test_yaml_scientific_notation_without_dot_is_a_number():
    # YAML 1.1 reads `1e-5` as a string; a learning rate written like that must still work
    cfg = config_from_dict(yaml.safe_load("learning_rate: 1e-5"))
    assert cfg.learning_rate == 1e-5


def test_overrides_parse_dotted_keys_as_yaml_scalars():
    assert parse_overrides(["sampler.shift=3", "seed=7", "output_dir=/tmp/x", "max_steps=null"]) == {
        "sampler": {"shift": 3}, "seed": 7, "output_dir": "/tmp/x", "max_steps": None}


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


BAD_CONFIGS = [
    # (yaml text, --set overrides, expected one-line message regex)
    ("lerning_rate: 1.0e-5\n", [], r"unknown key 'lerning_rate' \(did you mean 'learning_rate'\?\)"),
    ("data:\n  num_frame: 5\n", [], r"unknown key 'data\.num_frame' \(did you mean 'num_frames'\?\)"),
    ("learning_rate: fast\n", [], r"learning_rate: expected a number, got str 'fast'"),
    ("use_gradient_checkpointing_offload: 1\n", [], r"use_gradient_checkpointing_offload: expected true or false"),
    ("num_inference_steps: 4.5\n", [], r"num_inference_steps: expected an integer, got float 4\.5"),
    ("min_timestep_boundary: 0.95\nmax_timestep_boundary: 0.9\n", [], r"need 0 <= min <= max <= 1"),
    ("max_timestep_boundary: 1.5\n", [], r"need 0 <= min <= max <= 1 .*max=1\.5"),
    ("mid_timestep: 6\nfinal_timestep: 5\n", [], r"need 0 <= mid_timestep <= final_timestep < num_inference_steps \(8\)"),
    ("num_inference_steps: 4\n", [], r"final_timestep < num_inference_steps \(4\), got mid_timestep=4, final_timestep=7"),
    ("learning_rate: 0\n", [], r"learning_rate: must be > 0, got 0\.0"),
    ("gradient_accumulation_steps: 0\n", [], r"gradient_accumulation_steps: must be > 0, got 0"),
    ("lr_scheduler_type: cosin\n", [], r"lr_scheduler_type: must be one of \['constant', 'linear', 'cosine'\].*did you mean 'cosine'"),
    ("data:\n  num_frames: 8\n", [], r"data\.num_frames: must be of the form 4k\+1"),
    ("data:\n  height: 100\n  width: 64\n", [], r"data\.height: must be a positive multiple of 16, got 100"),
    ("reward_model_path: /nonexistent/antelopev2\n", [], r"reward_model_path: path does not exist: /nonexistent/antelopev2"),
    ("seed: 1\n", ["model_paths=missing/paths.json"], r"model_paths: path does not exist: .*missing/paths\.json"),
    ("sampler:\n  name: flow_match_eulr\n", [], r"sampler\.name: unknown sampler plugin 'flow_match_eulr'; did you mean 'flow_match_euler'"),
    ("model_name: wan22\n", [], r"model_name: unknown model plugin 'wan22'; did you mean 'wan2_2'"),
    ("sampler:\n  shift: 3\n", [], r"sampler: missing 'name'"),
    ("learning_rate: [1\n", [], r"invalid YAML"),
    ("- a\n- b\n", [], r"the top level must be a mapping"),
    ("seed: 1\n", ["seed"], r"--set seed: expected key=value"),
    ("resume_from_checkpoint: /nonexistent/ckpt\n", [], r"resume_from_checkpoint: checkpoint does not exist"),
    # the plugins' keys: at the top level (the seed's) or in their section, not both
    ("lora_rank: 4\nmodel:\n  lora_rank: 8\n", [], r"lora_rank: set both at the top level and as model\.lora_rank; keep one"),
    ("lora_rnak: 4\n", [], r"unknown key 'lora_rnak' \(did you mean 'lora_rank'\?\); see docs/configuration\.md"),
    ("model:\n  lora_rnak: 4\n", [], r"unknown key 'model\.lora_rnak' \(did you mean 'lora_rank'\?\) \(the model plugin 'wan2_2'\)"),
    ("reward: motion\nreward_model_path: /tmp\n", [], r"unknown key 'reward_model_path' .*; see docs/configuration\.md"),
    ("trainable_models: ' '\n", [], r"trainable_models: must name at least one model \(e\.g\. dit2\)"),
    ("lora_rank: 0\n", [], r"lora_rank: must be > 0, got 0"),
    ("lora_target_modules: ''\n", [], r"lora_target_modules: empty; list module names"),
]


@pytest.mark.parametrize("text,overrides,pattern", BAD_CONFIGS, ids=[b[2][:40] for b in BAD_CONFIGS])
def test_bad_config_gives_one_line_error_and_exit_2(tmp_path, capsys, text, overrides, pattern):
    path = write(tmp_path, text)
    args = [path, "--check"] + [a for o in overrides for a in ("--set", o)]
    code = run.main(args)
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("rewardfl.run: error: ")
    assert re.search(pattern, lines[0]), lines[0]


def test_missing_config_file(capsys):
    assert run.main(["/nonexistent/cfg.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "rewardfl.run: error: config file not found: /nonexistent/cfg.yaml"


def test_cli_error_is_one_line_without_traceback_in_a_real_process(tmp_path):
    path = write(tmp_path, "lerning_rate: 1.0\n")
    out = subprocess.run([sys.executable, "-m", "rewardfl.run", path], capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "rewardfl.run: error: unknown key 'lerning_rate' (did you mean 'learning_rate'?); "
        "see docs/configuration.md"]


def test_resolved_config_roundtrips_through_yaml(tmp_path):
    cfg = config_from_dict({"learning_rate": 1e-4, "sampler": {"name": "flow_match_euler", "shift": 3.0},
                            "data": {"num_frames": 5}, "model": {"foo": 1}})
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, str(out))
    back = config_from_dict(read_yaml(str(out)))
    assert back == cfg or (back.learning_rate, back.sampler, back.data, back.model) == (
        cfg.learning_rate, cfg.sampler, cfg.data, cfg.model)
    assert back.sampler.options == {"shift": 3.0}


def test_top_level_keys_reach_every_plugin_that_declares_them():
    """The seed's flat reward_model_path reaches the face reward and a face judge alike; the dump writes
    each where it arrived, and loads back to the same options."""
    cfg = config_from_dict({"reward_model_path": "/faces", "lora_rank": 4,
                            "eval": {"judges": [{"name": "face_identity", "label": "f"}, "motion"]}})
    resolved = resolve_config(cfg, resolve_plugins(cfg))
    assert resolved.plugin_keys == {} and resolved.model.lora_rank == 4
    assert resolved.reward.options.reward_model_path == "/faces"
    assert resolved.eval.judges == [{"name": "face_identity", "label": "f", "reward_model_path": "/faces"},
                                    "motion"]
    with pytest.raises(ConfigError, match=r"^reward_model_path: set both at the top level and as eval\.judges\[0\]"):
        resolve_config(config_from_dict({"reward_model_path": "/faces", "eval": {"judges": [
            {"name": "face_identity", "reward_model_path": "/other"}]}}), resolve_plugins(cfg))
    back = config_from_dict(yaml.safe_load(yaml.safe_dump(to_dict(resolved))))
    again = resolve_config(back, resolve_plugins(back))
    assert (again.model, again.reward, again.eval) == (resolved.model, resolved.reward, resolved.eval)
    # unresolved, the top-level keys are written back where they were
    assert to_dict(cfg)["reward_model_path"] == "/faces" and "plugin_keys" not in to_dict(cfg)
