"""The `>>>` examples in tlkit's docstrings run (doctest); examples that need a run folder, a download or a trained
model are plain text (no prompt), so that every prompt on the page is a promise this test keeps."""
from __future__ import annotations

import doctest
import importlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules_with_examples() -> list[str]:
    out = []
    for folder, _, files in os.walk(os.path.join(ROOT, "tlkit")):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                if ">>>" in open(path, encoding="utf-8").read():
                    out.append(os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__"))
    return sorted(out)


MODULES = _modules_with_examples()


def test_there_are_examples_to_run():
    tests = [t for m in MODULES for t in doctest.DocTestFinder().find(importlib.import_module(m)) if t.examples]
    assert len(tests) >= 20, [t.name for t in tests]  # the suite cannot pass by finding nothing


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {module} failed (see the output)"
