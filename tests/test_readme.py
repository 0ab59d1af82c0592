"""The README cannot drift from the command line: every verb and every flag of `tlkit VERB --help` appears in
it, and its generated reference block is exactly what `python -m tlkit.docs` renders now."""
from __future__ import annotations

import os
import re

import pytest

from tlkit import docs
from tlkit.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
FIX = "run `python -m tlkit.docs --write README.md` (and document new flags in your README section)"


@pytest.fixture(scope="module")
def readme() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def _verbs():
    return docs.subparsers(build_parser())


def test_parser_walk_finds_the_verbs_and_their_flags():
    verbs = {name: sub for name, _, sub in _verbs()}
    assert {"finetune", "evaluate", "info"} <= set(verbs)
    finetune_flags = {f for a in docs.options(verbs["finetune"]) for f in docs.long_flags(a)}
    # Generated config flags (one per dataclass field), a boolean pair, and the CLI's own flags.
    assert {"--dataset", "--base", "--head-steps", "--tensorboard", "--no-tensorboard", "--config",
            "--output-dir", "--debug"} <= finetune_flags
    assert "--help" not in finetune_flags


@pytest.mark.parametrize("verb", [name for name, _, _ in _verbs()])
def test_every_flag_of_every_verb_is_in_the_readme(readme, verb):
    sub = dict((name, sub) for name, _, sub in _verbs())[verb]
    assert f"tlkit {verb}" in readme, f"`tlkit {verb}` is not mentioned in README.md; {FIX}"
    missing = []
    for action in docs.options(sub):
        for flag in docs.long_flags(action):
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", readme):
                missing.append(flag)
    assert not missing, f"flags of `tlkit {verb}` missing from README.md: {missing}; {FIX}"


def test_generated_reference_is_current(readme):
    block = docs.current_block(readme)
    assert block is not None, f"README.md lacks the generated reference markers; {FIX}"
    assert block == docs.render(), f"README.md's verb and flag reference is stale; {FIX}"


def test_docs_check_and_write_round_trip(tmp_path, readme, capsys):
    stale = tmp_path / "README.md"
    stale.write_text(docs.replace_block(readme, "| old | table |\n"), encoding="utf-8")
    assert docs.main(["--check", str(stale)]) == 1
    assert "stale" in capsys.readouterr().err
    assert docs.main(["--write", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == readme
    assert docs.main(["--check", str(stale)]) == 0
    with pytest.raises(ValueError, match="markers"):
        docs.replace_block("no markers here", "x")


def test_render_lists_each_verb_with_a_table():
    text = docs.render()
    for name, _, sub in _verbs():
        assert f"### `tlkit {name}`" in text
    rows = [line for line in text.splitlines() if line.startswith("| `--")]
    assert rows and all(line.count(" | ") >= 2 for line in rows)


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_internal_links_point_to_headings(readme):
    text = re.sub(r"```.*?```", "", readme, flags=re.S)  # headings, not comments inside code blocks
    anchors: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        slug = _slug(heading)
        n = anchors.get(slug, 0)
        anchors[slug] = n + 1
        if n:
            anchors[f"{slug}-{n}"] = 1
    links = set(re.findall(r"\]\(#([^)]+)\)", readme))
    assert links, "README.md has no internal links"
    broken = sorted(link for link in links if link not in anchors)
    assert not broken, f"README.md links to missing headings: {broken}"


def test_linked_files_exist(readme):
    paths = {p.split("#")[0] for p in re.findall(r"\]\(((?:notebooks|examples|docs|benchmarks)/[^)\s]+)\)", readme)}
    missing = sorted(p for p in paths if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f"README.md links to missing files: {missing}"
