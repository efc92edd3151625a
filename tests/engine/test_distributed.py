"""Two processes (DDP over gloo on CPU, started by `accelerate launch` with configs/accelerate/cpu_2proc.yaml)
train exactly like one process with the same global batch: each process takes half the micro-batches, and the
loss shares weight each micro-batch by its tokens (or pairs) over the whole global batch, so the gradient is the
same mean. Evaluation counts each held-out row once, although the prepared loader pads the last round with
repeats; a checkpoint written by two processes resumes in one; precomputed reference log-probs are computed once.

The held-out split has 32 rows; in batches of 3 on 2 processes a round takes 6, so the last round holds 2 real
rows and 4 repeats, which would move the eval loss if they were counted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.engine.runs import REPO_ROOT, SMALL, TINY, run, series

CPU_2PROC = REPO_ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"
# 8 rows (pairs) per step: 2 per micro-batch x 4 accumulated on one process, or x 2 on each of two processes.
SETTINGS = ["batch.global_batch_size=8", "batch.micro_batch_size=2", "optim.lr=1e-3", "eval.every_steps=2",
            "batch.eval_batch_size=3", "eval.max_batches=null"]


def launch(config: str, output_dir: Path, *overrides: str, env: dict | None = None,
           layout: str = "2 x 2 accumulation x 2 process(es)") -> list[dict]:
    """`accelerate launch --config_file configs/accelerate/cpu_2proc.yaml engine/train.py ...`; its metrics."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
               "engine/train.py", "--config", str(TINY / config), f"output_dir={output_dir}", *SMALL, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert layout in done.stdout
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def values(records: list[dict], key: str) -> list[float]:
    return [r[key] for r in records if key in r]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU processes find their gloo group by themselves only "
                                                      "without CUDA; ACCELERATE_USE_CPU=1 covers the other case")
def test_sft_two_processes_match_one_and_resume_in_one(tmp_path):
    steps = ["max_steps=4", "checkpoint.every_steps=2"]
    single = run("sft.yaml", tmp_path / "one", *SETTINGS, *steps)
    two = launch("sft.yaml", tmp_path / "two", *SETTINGS, *steps)  # no ACCELERATE_USE_CPU: train.py finds CPU

    assert values(two, "loss") == pytest.approx(series(single, "loss"), rel=1e-5)
    assert values(two, "tokens") == series(single, "tokens")  # the global token count of each step
    # steps 0, 2, 4 each evaluate all 32 held-out rows once
    assert len(values(two, "eval/loss")) == 3
    assert values(two, "eval/loss") == pytest.approx(series(single, "eval/loss"), rel=1e-5)
    assert values(two, "eval/token_accuracy") == pytest.approx(series(single, "eval/token_accuracy"), rel=1e-6)
    saved = tmp_path / "two" / "checkpoints"
    assert sorted(p.name for p in saved.iterdir()) == ["step_2", "step_4"]
    assert sorted(p.name for p in (saved / "step_4").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert len(list((saved / "step_4").glob("model*.safetensors"))) == 1  # the weights once, not per process

    # The step-2 checkpoint of the two processes, resumed by one: steps 3 and 4 take the same samples.
    shutil.copytree(saved / "step_2", tmp_path / "from_two" / "step_2")
    resumed = run("sft.yaml", tmp_path / "resumed", *SETTINGS, *steps,
                  f"checkpoint.resume_from={tmp_path / 'from_two' / 'step_2'}")
    assert series(resumed, "loss") == pytest.approx(values(two, "loss")[2:], rel=1e-5)


def test_dpo_two_processes_match_one_with_a_reference_computed_once(tmp_path):
    steps = ["max_steps=3", "checkpoint.every_steps=3"]
    single = run("dpo.yaml", tmp_path / "one", *SETTINGS, *steps)
    cache = tmp_path / "reference_cache"
    two = launch("dpo.yaml", tmp_path / "two", *SETTINGS, *steps, "reference.mode=precomputed",
                 f"reference.cache_dir={cache}", env={"ACCELERATE_USE_CPU": "1"})

    # the precomputed reference is the same starting model, read from one cache file per split
    assert values(two, "loss") == pytest.approx(series(single, "loss"), rel=1e-4)
    assert values(two, "eval/loss") == pytest.approx(series(single, "eval/loss"), rel=1e-4)
    # At step 0 the policy is the reference, so every reward is 0 up to the rounding of two forwards of
    # different batch shapes, and accuracy (strict wins) counts that noise: compare it from the first update.
    assert values(two, "eval/rewards/margins")[0] == pytest.approx(0.0, abs=1e-5)
    accuracies = values(two, "eval/rewards/accuracies")
    assert accuracies[1:] == pytest.approx(series(single, "eval/rewards/accuracies")[1:], abs=1e-6)
    assert len(list(cache.glob("ref-logps-*.safetensors"))) == 2  # train and eval, written by one process
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step_3").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]


def test_reward_model_two_processes_match_one(tmp_path):
    """With eval.max_batches=5 one process scores the split's batches 0-4; two processes score batches 0-5 in
    three rounds and weigh batch 5 (process 1's in the last round) at nothing, so both score the same 15 pairs."""
    steps = ["max_steps=2", "eval.max_batches=5"]
    single = run("reward.yaml", tmp_path / "one", *SETTINGS, *steps)
    two = launch("reward.yaml", tmp_path / "two", *SETTINGS, *steps, env={"ACCELERATE_USE_CPU": "1"})
    assert values(two, "loss") == pytest.approx(series(single, "loss"), rel=1e-5)
    for key in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"):
        assert len(values(two, key)) == 2  # steps 0 and 2
        # margins of about 2e-3 are differences of scores of order 1: their float noise is absolute
        assert values(two, key) == pytest.approx(series(single, key), rel=1e-5, abs=1e-6), key


def test_sft_eval_max_batches_counts_batches_of_the_split(tmp_path):
    """eval.max_batches=3 on two processes: rounds of batches (0, 1) and (2, 3), batch 3 weighing nothing; the
    eval loss and accuracy equal one process's over batches 0-2, and differ from those of the whole split."""
    steps = ["max_steps=1", "eval.every_steps=1"]
    single = run("sft.yaml", tmp_path / "one", *SETTINGS, *steps, "eval.max_batches=3")
    whole = run("sft.yaml", tmp_path / "whole", *SETTINGS, *steps)
    two = launch("sft.yaml", tmp_path / "two", *SETTINGS, *steps, "eval.max_batches=3")
    for key in ("eval/loss", "eval/token_accuracy"):
        assert len(values(two, key)) == 2  # steps 0 and 1
        assert values(two, key) == pytest.approx(series(single, key), rel=1e-5, abs=1e-7), key
    assert series(whole, "eval/loss") != pytest.approx(series(single, "eval/loss"), rel=1e-3)


def test_ppo_two_processes_match_one(tmp_path):
    """Two minibatches per iteration, with whitened advantages: each minibatch holds the same global rows on one
    process or two (`minibatch_rows`, drawn alike everywhere), and whitening uses the mean and variance of the
    whole rollout batch (all-reduced). A near-greedy temperature, so both layouts sample the same responses.
    What remains to compare is all the reduction: scores, KL, values and GAE per row, the whitening, the policy
    and value losses weighted by response tokens over both processes, and the synced gradient (its norm
    included). Measured: grad_norm within 1e-7 (relative), losses and values within 1e-6, policy/approx_kl
    within 2e-5 (a log-ratio at temperature 0.001 multiplies float noise by 1000). Whitening each process's
    rows alone, or shuffling each process's rows on its own, fails this test."""
    settings = ["model.name_or_path=tiny", "data.max_samples=64", "max_steps=2", "checkpoint.every_steps=2",
                "batch.global_batch_size=4", "batch.micro_batch_size=1", "ppo.rollout_batch_size=8",
                "ppo.rollout_micro_batch_size=4", "ppo.max_new_tokens=6", "ppo.epochs=1", "ppo.temperature=0.001",
                "ppo.whiten_advantages=true", "ppo.normalize_scores=false", "optim.lr=1e-4",
                "optim.scheduler=constant"]
    single = run("ppo.yaml", tmp_path / "one", *settings)
    two = launch("ppo.yaml", tmp_path / "two", *settings, env={"ACCELERATE_USE_CPU": "1"},
                 layout="1 x 2 accumulation x 2 process(es)")
    keys = ["objective/score", "objective/kl", "val/mean", "val/explained_var", "loss/total", "loss/policy",
            "policy/approx_kl", "grad_norm"]
    for key in keys:
        # approx_kl squares a log-ratio at temperature 0.001, float noise times 1000: 1.6e-5 seen on one machine
        rel = 1e-4 if key == "policy/approx_kl" else 1e-5
        assert values(two, key) == pytest.approx(series(single, key), rel=rel, abs=1e-7), key
    assert values(two, "grad_norm")[1] != values(two, "grad_norm")[0]  # the second iteration saw a new policy
    assert len(list((tmp_path / "two" / "checkpoints" / "step_2").glob("model*.safetensors"))) == 1
    # the value head written by the main process of two is the one trained by one process
    one_head, two_head = (load_file(str(tmp_path / name / "final" / "value_head.safetensors")) for name in ("one", "two"))
    assert one_head["summary.weight"].abs().max() > 0  # moved from its zero init
    for key in one_head:
        torch.testing.assert_close(two_head[key], one_head[key], rtol=1e-5, atol=1e-7, msg=key)


def test_grpo_two_processes_match_one(tmp_path):
    """GRPO with groups of 4 on two processes: each process samples whole groups of its own prompts, every
    micro-batch of rows from a generator seeded by its global row index, so both layouts draw the same
    responses at temperature 1; group advantages are local, the seq-mean-token-mean loss is weighted by each
    micro-batch's share of the minibatch's sequences over both processes, and the KL to the reference is in
    the loss. Scores, group statistics, losses, the KL and the synced gradient's norm agree."""
    settings = ["model.name_or_path=tiny", "data.max_samples=64", "max_steps=2", "checkpoint.every_steps=2",
                "batch.global_batch_size=16", "batch.micro_batch_size=4", "ppo.rollout_batch_size=8",
                "ppo.group_size=4", "ppo.rollout_micro_batch_size=4", "ppo.max_new_tokens=6", "optim.lr=1e-3",
                "optim.warmup_steps=0",
                # the random tiny model earns no judge credit; shorter text scores more, so groups differ
                "ppo.rewards=[{name: short, function: 'rollout.verifiable:length_penalty', "
                "kwargs: {target: 0, coef: 0.01}}]"]
    single = run("grpo.yaml", tmp_path / "one", *settings)
    two = launch("grpo.yaml", tmp_path / "two", *settings, env={"ACCELERATE_USE_CPU": "1"},
                 layout="4 x 2 accumulation x 2 process(es)")
    assert min(series(single, "grad_norm")) > 0  # groups whose rewards differ: a real update each iteration
    keys = ["objective/score", "objective/score/short", "groups/reward_mean", "groups/reward_std", "groups/tied", "rollout/response_length",
            "loss/policy", "policy/kl_ref", "policy/approx_kl", "grad_norm"]
    for key in keys:
        rel = 1e-4 if key in ("policy/approx_kl", "policy/kl_ref") else 1e-5
        assert values(two, key) == pytest.approx(series(single, key), rel=rel, abs=1e-7), key
