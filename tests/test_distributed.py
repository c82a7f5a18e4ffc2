"""DDP and FSDP2 through `accelerate launch` (2 CPU processes, gloo) match one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"
ACCELERATE = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "--num_processes",
    "2",
]
ENGINES = {
    "ddp": ["--multi_gpu"],  # without GPUs accelerate runs the processes on CPU with the gloo backend
    "fsdp2": [
        "--use_fsdp",
        "--fsdp_version",
        "2",
        "--fsdp_auto_wrap_policy",
        "TRANSFORMER_BASED_WRAP",
        "--fsdp_transformer_layer_cls_to_wrap",
        "LlamaDecoderLayer",
    ],
}


def _run(cmd, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run([sys.executable], tmp_path_factory.mktemp("single") / "out.json")


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_two_processes_match_single_process(engine, single, tmp_path):
    multi = _run([*ACCELERATE, *ENGINES[engine]], tmp_path / "out.json")
    assert single["processes"] == 1 and multi["processes"] == 2
    for a, b in zip(single["losses"], multi["losses"]):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a))
    assert single["losses"][-1] < single["losses"][0]
    for target, norms in single["norms"].items():
        other = multi["norms"][target]
        assert max(abs(x - y) for x, y in zip(norms, other)) <= 1e-3
        assert [x < 1e-3 for x in norms] == [y < 1e-3 for y in other]  # same sparsity pattern
    assert any(x < 1e-3 for x in single["norms"]["neurons"])  # a pattern worth comparing
