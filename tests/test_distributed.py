"""DDP through `accelerate launch` (2 CPU processes, gloo) matches one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


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
]


def _run(cmd, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([*cmd, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_process_ddp_matches_single_process(tmp_path):
    single = _run([sys.executable], tmp_path / "single.json")
    ddp = _run([*ACCELERATE, "--multi_gpu", "--num_processes", "2"], tmp_path / "ddp.json")
    assert single["processes"] == 1 and ddp["processes"] == 2
    for a, b in zip(single["losses"], ddp["losses"]):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a))
    assert single["losses"][-1] < single["losses"][0]
    for target, norms in single["norms"].items():
        other = ddp["norms"][target]
        assert max(abs(x - y) for x, y in zip(norms, other)) <= 1e-3
        assert [x < 1e-3 for x in norms] == [y < 1e-3 for y in other]  # same sparsity pattern
    assert any(x < 1e-3 for x in single["norms"]["neurons"])  # a pattern worth comparing
