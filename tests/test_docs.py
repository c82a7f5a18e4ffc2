"""The README's self-contained code blocks run as written (a user's first contact must not be a broken snippet)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
SELF_CONTAINED = ["## Quick start", "## Vision, tabular and any PyTorch model"]  # the rest are fragments


def _first_python_block(section: str) -> str:
    text = README.read_text()
    start = text.index(section)
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert match is not None and match.start() < text.find("\n## ", start + 1), f"no python block in {section}"
    return match.group(1)


@pytest.mark.parametrize("section", SELF_CONTAINED)
def test_readme_block_runs(section, tmp_path):
    code = _first_python_block(section)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if section == "## Quick start":  # what the README says it shows: exact zeros, none left grey
        assert re.search(r"heads: [1-9]\d*/16 zero", proc.stdout), proc.stdout
        assert re.search(r"neurons: [1-9]\d*/1024 zero", proc.stdout), proc.stdout
        assert "grey" not in proc.stdout, proc.stdout


def test_doccheck_cheap_figures_match_the_readme():
    """The cheap figure of `python -m hf_dgate.doccheck` (the README's penalty op count); its help-time check is a
    timing, so it runs only there, never in a test."""
    from hf_dgate import doccheck

    result = doccheck.check_penalty_ops()
    assert result.figures and result.ok, [(f.name, f.claimed, f.measured) for f in result.figures]
    # every expensive check still finds its figure in the README (a reworded sentence would silently skip it)
    assert doccheck.claim(r"ends with (\d+) of its 32 heads exactly zero") == ("30",)
    assert doccheck.claim(r"ends with (\d+) of the 16 heads exactly zero and an exact export")
    assert doccheck.python_block("## Train, export, share").count("export_pruned") == 1


def test_generated_nanogpt_tables_match_their_results_files():
    """The NanoGPT tables in README.md and docs/trainer.md are written from results/*/sweep.json by
    `examples/nanogpt_sweep.py --update-docs`, never retyped: a stale block fails here."""
    sys.path.insert(0, str(README.parent / "examples"))
    try:
        from nanogpt_sweep import MARK, update_docs
    finally:
        sys.path.pop(0)
    assert MARK in README.read_text() and MARK in (README.parent / "docs" / "trainer.md").read_text()
    assert update_docs(str(README.parent), check=True) == []


def test_generated_serving_tables_match_their_results_file():
    """The llama.cpp timings in README.md ("Serve it") and docs/serving.md are written from
    results/serving/serving.json by `benchmarks/serving.py --update-docs`, never retyped: a stale block fails here."""
    sys.path.insert(0, str(README.parent / "benchmarks"))
    try:
        from serving import MARK, update_docs
    finally:
        sys.path.pop(0)
    assert MARK in README.read_text() and MARK in (README.parent / "docs" / "serving.md").read_text()
    assert update_docs(str(README.parent), check=True) == []
