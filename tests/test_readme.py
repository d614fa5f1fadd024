"""The README's commands are what CI runs, so a green CI proves the README."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ci_commands():
    """Command lines of .ci/run between the install and test markers (not CI's own bookkeeping)."""
    lines = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    commands = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or line.startswith(("set ", "cd ", "start=", "echo ", "rc=", "if ",
                                                                   "fi", "else", "exit", "python -c", "deps=",
                                                                   "case ", "esac", "pinned|", "*)", "trap ")):
            continue
        line = re.sub(r"\s*\|\|\s*rc=\$\?$", "", line)
        commands.append(line)
    return commands


def test_every_ci_command_is_in_the_readme():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    commands = ci_commands()
    assert len(commands) >= 5, commands
    for command in commands:
        assert command in readme, f"README.md lacks the CI command: {command}"


def test_readme_quick_start_runs_the_demo_config():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "python -m rewardfl.run examples/demo.yaml" in readme
    assert os.path.isfile(os.path.join(ROOT, "examples", "demo.yaml"))
