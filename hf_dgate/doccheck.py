"""Rerun the figures the README states and report drift: `python -m hf_dgate.doccheck [--quick] [--only NAME]`.

Each check reads the figure from the README text (so an edited README is checked as edited), reruns what produces
it (the README's own code block, `hf-dgate demo`, the op counter) and prints claimed vs measured, with wall time
and torch threads. Timings are reported, never compared: they depend on the machine and its load. Exit code 1 on
drift. Needs a source checkout (the README is not installed with the package); the cheap checks also run in
tests/test_docs.py.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


@dataclass
class Figure:
    name: str
    claimed: str
    measured: str

    @property
    def ok(self) -> bool:
        return self.claimed == self.measured


@dataclass
class Result:
    check: str
    figures: list[Figure] = field(default_factory=list)
    wall_s: float = 0.0
    note: str = ""

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.figures)


def readme() -> str:
    if not README.is_file():
        raise SystemExit(f"{README} not found: doccheck needs a source checkout of hf_dgate (git clone).")
    return README.read_text()


def python_block(section: str, text: str | None = None) -> str:
    """The first ```python block under the heading `section`."""
    text = readme() if text is None else text
    start = text.index(section)
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    if match is None or match.start() > text.find("\n## ", start + 1) > 0:
        raise ValueError(f"no python block under {section!r} in README.md")
    return match.group(1)


def claim(pattern: str, text: str | None = None) -> tuple[str, ...]:
    """The groups of `pattern` in the README (whitespace-insensitive: prose is wrapped)."""
    flat = " ".join((readme() if text is None else text).split())
    match = re.search(pattern, flat)
    if match is None:
        raise ValueError(f"README.md no longer states a figure matching {pattern!r}; update hf_dgate/doccheck.py")
    return match.groups()


def _run(code: list[str], cwd: str | None = None) -> tuple[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(README.parent), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *code], capture_output=True, text=True, cwd=cwd, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(code)[:80]} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout, wall


def _measured(pattern: str, out: str) -> tuple[str, ...]:
    match = re.search(pattern, out)
    return match.groups() if match else ("(not in output)",)


def check_quick_start() -> Result:
    heads, kept = claim(
        r"ends with (\d+) of the 16 key/value head groups and every MLP neuron exactly zero.*?(\d+)% of"
    )
    with tempfile.TemporaryDirectory() as tmp:
        out, wall = _run(
            ["-c", python_block("## Quick start") + "\nimport torch; print('threads', torch.get_num_threads())"], tmp
        )
    (m_heads,) = _measured(r"heads: (\d+)/16 zero", out)
    (m_neurons,) = _measured(r"neurons: (\d+)/1024 zero", out)
    (m_kept,) = _measured(r"kept \((\d+)\.\d%\)", out)
    return Result(
        "readme:quick-start",
        [Figure("zero head groups", heads, m_heads), Figure("zero neurons", "1024", m_neurons),
         Figure("% parameters kept", kept, m_kept)],
        wall, "threads " + _measured(r"threads (\d+)", out)[0],
    )  # fmt: skip


def check_train_export() -> Result:
    (heads,) = claim(r"ends with (\d+) of the 16 heads exactly zero and an exact export")
    with tempfile.TemporaryDirectory() as tmp:
        out, wall = _run(["-c", python_block("## Train, export, share")], tmp)
    (m_heads,) = _measured(r"heads: (\d+)/16 zero", out)
    exact = "exact" if re.search(r"parameters, exact\b", out) else "not exact"
    return Result(
        "readme:train-export-share", [Figure("zero heads", heads, m_heads), Figure("export", "exact", exact)], wall
    )


def check_demo() -> Result:
    (heads,) = claim(r"ends with (\d+) of its 32 heads exactly zero")
    out, wall = _run(["-m", "hf_dgate.cli", "demo"])
    (m_heads,) = _measured(r"heads: (\d+)/32 zero", out)
    return Result("cli:demo", [Figure("zero heads", heads, m_heads)], wall)


def check_penalty_ops() -> Result:
    ops, small, large = claim(r"The penalty dispatches (\d+) aten ops per call for (\d+) and for (\d+) groups")
    from .flops import penalty_op_counts

    t0 = time.perf_counter()
    counts = penalty_op_counts(2)
    return Result(
        "benchmark:penalty-ops",
        [Figure("groups (narrow MLP)", small, str(counts[0][0])), Figure("groups (wide MLP)", large, str(counts[1][0])),
         Figure("aten ops, narrow", ops, str(counts[0][1])), Figure("aten ops, wide", ops, str(counts[1][1]))],
        time.perf_counter() - t0,
    )  # fmt: skip


def check_help() -> Result:
    """`hf-dgate --help` answers in under a second: reported as a figure, "<1 s" or the time taken."""
    out, wall = _run(["-m", "hf_dgate.cli", "--help"])
    return Result("cli:help", [Figure("hf-dgate --help", "<1 s", "<1 s" if wall < 1 else f"{wall:.1f} s")], wall)


CHECKS: dict[str, tuple[Callable[[], Result], bool]] = {  # name -> (check, cheap)
    "cli:help": (check_help, True),
    "benchmark:penalty-ops": (check_penalty_ops, True),
    "readme:quick-start": (check_quick_start, False),
    "readme:train-export-share": (check_train_export, False),
    "cli:demo": (check_demo, False),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hf_dgate.doccheck", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="only the checks that take seconds")
    p.add_argument("--only", nargs="+", choices=list(CHECKS), default=None, help="run these checks")
    args = p.parse_args(argv)
    names = args.only or [n for n, (_, cheap) in CHECKS.items() if cheap or not args.quick]
    from .threads import available_cores

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"doccheck on {available_cores()} cores, 1-minute load {load:.1f}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '(unset)')}")  # fmt: skip
    drift = 0
    for name in names:
        try:
            result = CHECKS[name][0]()
        except (RuntimeError, ValueError) as e:
            print(f"{name}: ERROR {e}")
            drift += 1
            continue
        note = f", {result.note}" if result.note else ""
        print(f"{name}: {'ok' if result.ok else 'DRIFT'} ({result.wall_s:.1f} s wall{note})")
        for f in result.figures:
            print(f"    {f.name}: README {f.claimed}, measured {f.measured}{'' if f.ok else '  <-- drift'}")
        drift += not result.ok
    return 1 if drift else 0


if __name__ == "__main__":
    sys.exit(main())
