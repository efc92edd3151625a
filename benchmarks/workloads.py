"""The fixed, seeded work every runner does: model sizes, the engine config of each objective, and the
models built once from a config (no download) into the cache, shared by the engine and the peer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.tiny import REPO_ROOT, build_tiny_model, cache_root

OBJECTIVES = ("sft", "reward", "dpo", "orpo", "ppo")
FAMILY = {"sft": "sft", "reward": "preference", "dpo": "preference", "orpo": "preference", "ppo": "prompt"}


@dataclass(frozen=True)
class Size:
    name: str
    model_json: Path
    batch: int  # rows (SFT) or pairs per optimizer step, one micro-batch
    steps: int  # timed optimizer steps (PPO: iterations) per measurement
    warmup: int
    synthetic_size: int
    rollout_batch: int  # PPO prompts per iteration
    max_new_tokens: int
    ppo_epochs: int
    minibatch: int  # PPO rollouts per optimizer step
    peak_repeats: int  # timings of the matmul peak, before and after the measurement
    ppo_steps: int  # timed PPO iterations (after one warmup iteration)


SIZES = {
    "tiny": Size("tiny", REPO_ROOT / "configs" / "tiny" / "model.json", batch=4, steps=2, warmup=1,
                 synthetic_size=100, rollout_batch=4, max_new_tokens=4, ppo_epochs=1, minibatch=4, peak_repeats=1, ppo_steps=2),
    "small": Size("small", Path(__file__).resolve().parent / "configs" / "small.json", batch=16, steps=6, warmup=2,
                  synthetic_size=400, rollout_batch=16, max_new_tokens=16, ppo_epochs=2, minibatch=8, peak_repeats=5, ppo_steps=2),
}


def model_dir(size: str, kind: str) -> Path:
    """The seeded build of `size` (kind "causal" or "reward"), made on first use."""
    out = cache_root() / "benchmarks" / f"{size}-{kind}"
    if not (out / "config.json").exists():
        try:
            build_tiny_model(out, kind=kind, seed=0, config_path=SIZES[size].model_json)
        except FileExistsError:
            if not (out / "config.json").exists():
                raise
    return out


def engine_args(objective: str, size: str, output_dir: str | Path, *, steps: int | None = None,
                overrides: tuple[str, ...] = ()) -> list[str]:
    """`engine/train.py` arguments for one measurement: the tiny config of the objective, the benchmark model,
    data and batch, a constant learning rate, no evaluation, checkpoints or progress bar."""
    spec = SIZES[size]
    kind = "reward" if objective == "reward" else "causal"
    total = spec.warmup + (steps or spec.steps)
    return ["--config", str(REPO_ROOT / "configs" / "tiny" / f"{objective}.yaml"),
            f"output_dir={output_dir}", f"model.name_or_path={model_dir(size, kind)}", f"max_steps={total}",
            f"data.synthetic_size={spec.synthetic_size}", "data.max_length=64",
            "data.max_prompt_length=32", f"batch.global_batch_size={spec.batch}",
            f"batch.micro_batch_size={spec.batch}", "eval.every_steps=0", "checkpoint.every_steps=0",
            "logging.every_steps=1", "logging.progress_bar=false", "optim.scheduler=constant",
            "optim.warmup_steps=0", "optim.weight_decay=0.0", "optim.lr=1.0e-4", *overrides]
