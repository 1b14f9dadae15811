"""Without Lightning, or without transformers, the rest imports and the missing adapter names its extra."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Every import finder stops seeing the blocked packages, as if they were not installed.
BLOCK = """
import sys

class Hide:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            return None
        return self.finder.find_spec(name, path, target)

    def find_distributions(self, context=None, **kwargs):  # what importlib.metadata asks
        context = context or __import__("importlib.metadata").metadata.DistributionFinder.Context(**kwargs)
        if (context.name or "").lower().replace("-", "_") in {blocked!r}:
            return iter(())
        return getattr(self.finder, "find_distributions", lambda context: iter(()))(context)

    def __getattr__(self, name):
        return getattr(self.finder, name)

sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
"""


def python(blocked: set[str], code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK.format(blocked=blocked) + code], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("blocked", "adapter", "other", "extra"),
    [
        ({"lightning", "pytorch_lightning"}, "clipintegrations.lightning", "clipintegrations.hf", "lightning"),
        ({"transformers", "accelerate"}, "clipintegrations.hf", "clipintegrations.lightning", "hf"),
    ],
)
def test_a_missing_framework_names_the_extra_to_install(blocked, adapter, other, extra):
    works = python(blocked, f"import clipintegrations, {other}; clipintegrations.AutoClip(); print('ok')")
    assert works.returncode == 0 and works.stdout.strip() == "ok", works.stderr[-2000:]
    fails = python(blocked, f"import {adapter}")
    assert fails.returncode != 0
    assert f"{adapter} needs" in fails.stderr and f"pip install 'clipintegrations[{extra}]'" in fails.stderr


def test_the_core_imports_with_neither_framework():
    result = python({"lightning", "pytorch_lightning", "transformers", "accelerate"}, "import clipintegrations.runs")
    assert result.returncode == 0, result.stderr[-2000:]
