"""``benchmarks/gpu_check.sh --dry-run``: the prepared GPU check, rehearsed on the CPU.

The dry run runs every step that needs no CUDA (the environment report, collecting the CUDA tests
and GPU benchmarks it would run, the planner's side of the plan check) and prints the commands of
the others; the real run is for a machine with a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def test_dry_run_rehearses_every_step_in_order(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no-wheels")}
    proc = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    steps = ["step install", "step cuda tests", "step plan check", "step benchmarks"]
    positions = [out.index(f"[dry run] {s}") for s in steps]
    assert positions == sorted(positions), out  # cheapest and most decisive first
    assert "pip install -q --no-build-isolation --no-deps -e ." in out and "--find-links" in out
    assert "--benchmark-only" in out and "bash benchmarks/gpu_check.sh --fetch-wheels" in out
    # the CUDA tests and GPU benchmarks it would run do collect
    collected = (tmp_path / "3_cuda_tests.txt").read_text()
    assert "test_cuda_matches_cpu_forward_and_backward" in collected and "test_gpu_flow_step" in collected
    assert "test_a14b_step_memory_and_time" in collected
    # the planner's half of the plan check ran and wrote its row
    rows = json.loads((tmp_path / "plan_check.json").read_text())
    assert rows and rows[0]["predicted_gib"] > 10  # one A14B block, the text encoder and the VAE in bf16
    summary = (tmp_path / "summary.txt").read_text()
    assert "plan check (dry run): exit 0" in summary and "install: not run (dry run)" in summary
    assert len(os.listdir(tmp_path)) <= 8  # what comes back from the GPU machine


def test_unknown_argument_is_one_line(tmp_path):
    proc = subprocess.run(["bash", SCRIPT, "--dryrun"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("gpu_check.sh: error: unknown argument '--dryrun' (use --dry-run or "
                                   "--fetch-wheels)")
