"""The README a newcomer follows (issue 15 item 9): its Quickstart runs as written, its
commands use options that exist, its links resolve inside the repository (no ../shared), and
the names docs/API.md promises exist."""
import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

import rtmdet
from rtmdet import cli, ops

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
API = (ROOT / "docs" / "API.md").read_text()


def section(text, title):
    """The body of the `## title` section of a markdown text."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def code_blocks(text, lang):
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def test_two_commands_come_first():
    first = code_blocks(README, "bash")[0]
    assert README.index("```bash") < README.index("\n## ")
    commands = [line.split("#")[0].strip() for line in first.strip().splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert (ROOT / script).is_file()


def test_quickstart_runs_as_written():
    blocks = code_blocks(section(README, "Quickstart"), "python")
    assert len(blocks) >= 2
    namespace = {"__name__": "readme_quickstart"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:  # one namespace: later blocks continue the first
            exec(compile(block, "README.md:Quickstart", "exec"), namespace)
    assert "positive priors of" in out.getvalue()
    a, B, N = namespace["a"], namespace["B"], namespace["N"]
    assert a.gt_index.shape == (B, N) and bool((a.gt_index >= 0).any())
    assert namespace["cls_logits"].grad is not None and namespace["distances"].grad is not None
    assert len(namespace["dets"]) == B
    assert set(namespace["losses"]) == {"loss_cls", "loss_bbox"}


def test_links_stay_inside_the_repository():
    for name, text in (("README.md", README), ("docs/API.md", API),
                       ("docs/SPEC.md", (ROOT / "docs" / "SPEC.md").read_text())):
        assert "../shared" not in text, f"{name} points outside the repository"
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to missing {target}"
    for anchor in re.findall(r"\]\(#([^)]+)\)", README):
        titles = [t.lower().replace(" ", "-") for t in re.findall(r"^## (.+)$", README, re.M)]
        assert anchor in titles, f"README links to missing section #{anchor}"


def test_sections_for_every_topic():
    titles = re.findall(r"^## (.+)$", README, re.M)
    for wanted in ("Quickstart", "Command line", "mmdetection", "DETR matching", "Performance",
                   "Guarantees", "Install notes"):
        assert any(wanted in t for t in titles), f"README lacks a section about {wanted}"


def _subcommand_options():
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {name: set(p._option_string_actions) for name, p in subs.choices.items()}


def test_readme_commands_use_existing_options():
    options = _subcommand_options()
    text = " ".join(b.replace("\\\n", " ") for b in code_blocks(README, "bash"))
    text += " ".join(re.findall(r"`([^`]*-m rtmdet [^`]*)`", README.replace("\n", " ")))
    used = 0
    for line in re.split(r"\n|(?=python -m rtmdet )|(?=torchrun )", text):
        words = shlex.split(line.split("#")[0]) if "-m rtmdet" in line else []
        if "rtmdet" not in words:
            continue
        cmd = words[words.index("rtmdet") + 1]
        assert cmd in options, f"README uses `rtmdet {cmd}`, not a subcommand"
        for w in words:
            if w.startswith("--") and words.index("rtmdet") < words.index(w):
                assert w in options[cmd], f"README: `rtmdet {cmd}` has no option {w}"
                used += 1
    assert used >= 10


def test_api_names_exist():
    code = "\n".join(code_blocks(API, "python"))
    for name in set(re.findall(r"\bops\.([a-z_]+)\(", code)):
        assert hasattr(ops, name), f"docs/API.md promises ops.{name}"
    for name in set(re.findall(r"\brtmdet\.([a-z_]+)\(", code)):
        assert hasattr(rtmdet, name), f"docs/API.md promises rtmdet.{name}"
    for module in set(re.findall(r"\b(rtmdet\.integrations\.[a-z_]+)", code)):
        assert importlib.util.find_spec(module) is not None, f"docs/API.md promises {module}"
    for name in set(re.findall(r"\b(?:rtmdet|ops)\.([A-Za-z_]+)\b", README)):
        if name not in ("integrations", "kernels", "ops", "_C"):
            assert hasattr(ops, name) or hasattr(rtmdet, name), f"README mentions {name}"


@pytest.mark.parametrize("doc", ["SPEC.md", "API.md"])
def test_docs_keep_the_contract_sections(doc):
    text = (ROOT / "docs" / doc).read_text()
    wanted = {"SPEC.md": ["## 1. Boxes and priors", "## 2. Dynamic Soft Label Assigner",
                          "## 3. Losses", "## 4. Hungarian assigner", "## 5. Model"],
              "API.md": ["ops.dsl_assign(", "ops.quality_focal_loss(", "ops.giou_loss(",
                         "rtmdet.head_loss(", "ops.hungarian_match("]}[doc]
    for w in wanted:
        assert w in text, f"docs/{doc} lost {w!r}"
