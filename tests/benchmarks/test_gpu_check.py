"""The GPU check's CPU dry run: the tiny model in place of the 1B and 8B shapes, every run through
engine.train, so the script that will run on the GPU is known to work before any GPU time is spent."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from benchmarks import gpu_check


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    payload = gpu_check.main(["--dry-run", "--in-process", "--out", str(out)])
    return payload, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_every_family_and_recipe_runs_with_a_finite_loss_that_moves_and_a_memory_ratio(dry_run):
    payload, saved, _ = dry_run
    runs = {r["name"]: r for r in saved["runs"]}
    expected = [r.name for r in gpu_check.plan() if gpu_check.skip_reason(r, cuda=False) is None]
    assert set(runs) == set(expected)
    # both modes, every family, both DPO references under QLoRA, the 8B recipes, the FSDP launch
    for name in ("1b bf16 sft", "1b bf16 reward", "1b bf16 dpo (copy reference)", "1b bf16 orpo", "1b bf16 ppo",
                 "1b qlora sft", "1b qlora reward", "1b qlora dpo (copy reference)",
                 "1b qlora dpo (disabled reference)", "1b qlora orpo", "1b qlora ppo", "1b bf16 grpo", "1b bf16 rloo",
                 "1b qlora grpo", "1b qlora rloo",
                 "8b recipe llama3_8b_qlora_dpo", "8b recipe llama3_8b_qlora_ppo", "1b bf16 ppo under fsdp.yaml"):
        assert name in runs, name
    for name, run in runs.items():
        assert "error" not in run, (name, run.get("error"), run.get("log_tail"))
        assert run["finite"] and run["moved"], (name, run["losses"])
        assert run["estimate_gib"] > 0 and math.isfinite(run["ratio"]) and run["ratio"] > 0, name
        assert run["tokens_per_s"] > 0 and 0 < run["mfu"] < 1, name
    # the loss fell by more than noise where it is a training loss; PPO's surrogate fell on every rollout
    assert runs["1b bf16 sft"]["losses"][-1] < runs["1b bf16 sft"]["losses"][0] - 0.1
    assert runs["1b qlora dpo (disabled reference)"]["losses"][-1] < 0.69
    assert all(d < 0 for d in runs["1b qlora ppo"]["losses"])
    for name in ("1b bf16 ppo", "1b qlora ppo", "8b recipe llama3_8b_qlora_ppo", "1b bf16 grpo", "1b qlora rloo"):
        assert runs[name]["generation_tokens_per_s"] > 0, name
    # launched through `accelerate launch --config_file configs/accelerate/fsdp.yaml`; on a machine without a
    # GPU Accelerate runs that as plain MULTI_CPU (the launch, the worker and its timeout are what is checked)
    assert runs["1b bf16 ppo under fsdp.yaml"]["distributed_type"] in ("FSDP", "MULTI_CPU")
    assert runs["1b bf16 ppo"]["distributed_type"] == "NO"


def test_what_cannot_run_on_a_cpu_is_skipped_with_its_reason(dry_run):
    _, saved, _ = dry_run
    skipped = {s["name"]: s["reason"] for s in saved["skipped"]}
    assert all("with" in name or "without" in name or "zero3" in name for name in skipped)
    assert sum("CUDA only" in reason for reason in skipped.values()) == 2 * len(gpu_check.TECHNIQUES)
    if saved["machine"]["versions"]["deepspeed"] is None:
        assert skipped["1b bf16 ppo under zero3_offload.yaml"] == "deepspeed is not installed"


def test_the_markdown_has_a_table_per_model_and_the_command_date_and_versions(dry_run):
    payload, saved, text = dry_run
    assert saved["command"].startswith("python -m benchmarks.gpu_check --dry-run") and saved["date"] in text
    assert "torch " + saved["machine"]["versions"]["torch"] in text
    for group in ("**1b**", "**8b**", "**sharded**"):
        assert group in text
    header = "| run | finite | loss moved | peak GiB | estimate GiB | ratio | tokens/s | MFU | decode tok/s |"
    assert text.count(header) == 3  # the sharded table adds a column after these
    for run in saved["runs"]:
        assert f"| {run['name']} | True | True |" in text


def test_a_spent_budget_skips_every_run_with_the_reason(tmp_path):
    payload = gpu_check.main(["--dry-run", "--budget", "1e-9", "--out", str(tmp_path)])
    assert payload["runs"] == []
    reasons = {s["name"]: s["reason"] for s in payload["skipped"]}
    assert reasons["1b bf16 sft"] == "the 1e-09 s budget ran out" or "budget ran out" in reasons["1b bf16 sft"]
    assert len(reasons) == len(gpu_check.plan())


def test_a_run_past_its_timeout_is_killed_and_reported(tmp_path):
    """A hang must end the run, not the check: the process group is killed at the timeout."""
    run = gpu_check.Run("1b bf16 sft", "1b", "1b", "sft")
    args = SimpleNamespace(cache=tmp_path, dry_run=True)
    result = gpu_check.spawn(run, args, timeout=0.5)
    assert result["error"] == "timeout: killed after 0 s" or result["error"].startswith("timeout: killed after")


def test_missing_packages_without_wheels_are_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "WHEEL_PACKAGES", ("no_such_package_for_the_check",))
    report = gpu_check.install_wheels(tmp_path, tmp_path / "site")
    assert report["missing"] == ["no_such_package_for_the_check"] and "make gpu-wheels" in report["note"]


def test_every_gpu_run_has_a_valid_engine_config(tmp_path):
    """The GPU-only runs (the technique pairs, the recipes' paged optimizer) never run here: their configs at
    least load, with each override a known key, and the techniques' pairs differ only by the technique."""
    from engine import train
    from engine.config import load_config

    configs = {}
    for run in gpu_check.plan():
        argv = gpu_check.engine_argv(run, gpu_check.GPU, tmp_path / "model", tmp_path, str(tmp_path / "out"))
        args = train.parse_args(argv)
        configs[run.name] = cfg = load_config(args.config, args.overrides)
        assert cfg.max_steps == gpu_check.GPU.steps and cfg.mixed_precision == "bf16", run.name
    assert configs["8b recipe llama3_8b_qlora_dpo"].optim.optimizer == "paged_adamw_8bit"
    assert configs["1b qlora dpo (disabled reference)"].model.quant.bits == 4
    assert configs["1b qlora dpo (disabled reference)"].reference.mode == "disabled"
    assert configs["1b bf16 sft with gradient checkpointing"].model.gradient_checkpointing
    assert not configs["1b bf16 sft without gradient checkpointing"].model.gradient_checkpointing
    assert configs["1b bf16 sft with fused AdamW"].optim.fused is True
    assert configs["1b bf16 sft without fused AdamW"].optim.fused is False
    assert configs["1b bf16 dpo with shared-prompt batches"].data.share_prompt
    assert not configs["1b bf16 dpo without shared-prompt batches"].data.share_prompt
