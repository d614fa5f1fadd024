"""The docs say what the code does: docs/configuration.md is generated from the config and plugin
``Options`` dataclasses, and every link between the docs pages (and from README.md) resolves."""

import dataclasses
import importlib.util
import os
import re
from typing import Optional

from rewardfl.plugins import config_reference, fields_table
from rewardfl.registry import list_plugins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
REGENERATE = "python -m rewardfl.plugins --config-reference > docs/configuration.md"


def read(path):
    return open(path, encoding="utf-8").read()


def shipped_plugins():
    """The plugins rewardfl ships, as installed: a plugin package installed beside it (tests/plugin_pkg)
    is not part of this checkout's docs, nor is an entry point whose module this checkout lacks
    (installed metadata of another tree)."""
    return [p for p in list_plugins() if p.distribution == "rewardfl"
            and importlib.util.find_spec(p.module.split(":")[0]) is not None]


def test_configuration_reference_is_current():
    shipped = shipped_plugins()
    assert read(os.path.join(DOCS, "configuration.md")) == config_reference(shipped), (
        f"docs/configuration.md is stale: run `{REGENERATE}` and commit it")


def test_configuration_reference_reads_field_comments():
    """Names, defaults and the ``#:`` comments of fields reach the page (a field of a plugin's Options
    included), so a docs-less page cannot pass as current."""
    page = read(os.path.join(DOCS, "configuration.md"))
    assert re.search(r"\| `kl_weight` \| `float` \| `1.0` \| weight of the velocity regulariser", page)
    assert "| `data.eval_fraction` | `float` | `0.0` |" in page
    assert re.search(r"\| `shift` \| `float` \| `5.0` \| .+ \|", page), "the sampler's shift option is undocumented"


@dataclasses.dataclass
class _Options:
    #: the score's mean and spread: loss = -(score - score_mean) / score_std
    score_mean: float = 0.5
    score_std: float = 0.25
    unrelated: int = 3
    #: a file the plugin reads, also a top-level key
    path: Optional[str] = dataclasses.field(default=None, metadata={"top_level": True})
    tags: list = dataclasses.field(default_factory=lambda: ["a", "b|c"])


@dataclasses.dataclass
class _TinyOptions(_Options):
    score_std: float = 0.5


def test_fields_table_rules():
    """A field's own comment; a group's comment for a field right below that it names or shares a first
    word with; none for an unrelated neighbour; a subclass keeps the base's comment; top-level keys and
    pipes in cells are marked."""
    rows = fields_table(_TinyOptions, "reward.")
    assert rows[:2] == ["| key | type | default | meaning |", "|---|---|---|---|"]
    mean_doc = "the score's mean and spread: loss = -(score - score_mean) / score_std"
    assert rows[2:] == [
        f"| `reward.score_mean` | `float` | `0.5` | {mean_doc} |",
        f"| `reward.score_std` | `float` | `0.5` | {mean_doc} (with `score_mean`) |",
        "| `reward.unrelated` | `int` | `3` |  |",
        "| `reward.path` | `Optional[str]` | `null` | a file the plugin reads, also a top-level key "
        "(also accepted at the top level) |",
        "| `reward.tags` | `list` | `[a, b\\|c]` |  |",
    ]


def anchors(path):
    """GitHub's anchors of the headings of a markdown file (outside code blocks)."""
    out, fenced = set(), False
    for line in read(path).splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#+ ", line):
            out.add(re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-"))
    return out


def test_every_docs_link_resolves():
    """Relative links in README.md and docs/*.md point at files that exist, and at headings that exist."""
    pages = [os.path.join(ROOT, "README.md")] + [os.path.join(root, name) for root, _, names in os.walk(DOCS)
                                                   for name in names if name.endswith(".md")]
    broken = []
    for page in pages:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", read(page)):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page), target)) if target else page
            if not os.path.exists(path):
                broken.append(f"{os.path.relpath(page, ROOT)} -> {target}")
            elif anchor and path.endswith(".md") and anchor not in anchors(path):
                broken.append(f"{os.path.relpath(page, ROOT)} -> {target}#{anchor}")
    assert not broken, broken


def test_nothing_cites_a_file_outside_the_repository():
    """Facts the code relies on are stated in docs/ (docs/design.md), not in a document only some have."""
    cited = []
    for top in ("rewardfl", "tests", "benchmarks", "examples", "kernels", "csrc", "docs", "README.md", "setup.py"):
        base = os.path.join(ROOT, top)
        paths = [base] if os.path.isfile(base) else [os.path.join(r, n) for r, _, ns in os.walk(base) for n in ns]
        for path in paths:
            if not path.endswith((".py", ".md", ".yaml", ".cpp", ".cu", ".h", ".txt")) or path == __file__:
                continue
            for number, line in enumerate(read(path).splitlines(), 1):
                if re.search(r"REFERENCE\.md|user's document|(?<![/\w])shared/", line):
                    cited.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not cited, cited


def test_the_readme_grpo_snippet_is_the_example_recipe():
    """README "Rewards without gradients": every key of its YAML block has the value
    examples/grpo_wan22.yaml gives it (the recipe that passes run --check in tests/test_both_experts.py)."""
    import yaml

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = readme.split("## Rewards without gradients", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    shown = yaml.safe_load(block)
    recipe = yaml.safe_load(open(os.path.join(ROOT, "examples", "grpo_wan22.yaml"), encoding="utf-8"))

    def same(a, b, where):
        if isinstance(a, dict):
            for k, v in a.items():
                assert isinstance(b, dict) and k in b, f"{where}{k} is not in examples/grpo_wan22.yaml"
                same(v, b[k], f"{where}{k}.")
        else:
            assert a == b, f"{where}: README {a!r}, examples/grpo_wan22.yaml {b!r}"

    same(shown, recipe, "")
    assert shown["algorithm"]["name"] == "grpo" and len(shown["algorithm"]) >= 5
