"""Two processes (DDP over gloo on CPU, started by torchrun) train exactly like one process with the same
global batch: each process takes half the micro-batches, and the loss shares make the gradient the same mean."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.engine.runs import REPO_ROOT, SMALL, TINY, run, series

# 8 pairs per step: 2 per micro-batch x 4 accumulated on one process, or x 2 on each of two processes.
SETTINGS = ["max_steps=3", "batch.global_batch_size=8", "batch.micro_batch_size=2", "optim.lr=1e-3",
            "checkpoint.every_steps=3"]


def test_two_processes_give_the_losses_of_one(tmp_path):
    single = run("dpo.yaml", tmp_path / "one", *SETTINGS)

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "engine/train.py", "--config", str(TINY / "dpo.yaml"), f"output_dir={tmp_path / 'two'}",
               *SMALL, *SETTINGS]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 x 2 accumulation x 2 process(es)" in done.stdout

    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    two = [r["loss"] for r in records if "loss" in r]
    assert two == pytest.approx(series(single, "loss"), rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step_3").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
