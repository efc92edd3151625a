"""The fixed, seeded work every runner does: model sizes, the engine config of each objective, and the
models built once from a config (no download) into the cache, shared by the engine and the peer."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from engine.families import FAMILIES
from engine.tiny import REPO_ROOT, build_tiny_model, cache_root
from losses import get_objective

CONFIGS = Path(__file__).resolve().parent / "configs"

OBJECTIVES = ("sft", "reward", "dpo", "orpo", "ppo", "grpo", "rloo")
DEFAULT_OBJECTIVES = ("sft", "reward", "dpo", "orpo", "ppo")  # what `benchmarks.run` measures unless told
GROUP_OBJECTIVES = ("grpo", "rloo")  # critic-free: `Size.group_size` responses per prompt, a reward function
ONLINE = ("ppo", *GROUP_OBJECTIVES)  # an iteration is a rollout and its update
FAMILY = {name: FAMILIES[get_objective(name).family].data for name in OBJECTIVES}  # the data family each reads
REWARD_FUNCTION = "data.synthetic:judge_reward"  # the group objectives' programmatic reward, on both sides


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
    letters: tuple[int, int] | None = None  # the sorting task at this many letters (about a token each)
    #                                         instead of the data layer's own synthetic rows (4-10 letters)
    max_length: int = 64  # data.max_length
    max_prompt_length: int = 32  # data.max_prompt_length
    group_size: int = 4  # GRPO / RLOO responses per prompt (TRL's num_generations)
    group_prompts: int = 8  # GRPO / RLOO prompts per iteration: group_prompts x group_size rollouts
    group_minibatch: int = 16  # GRPO / RLOO rollouts per optimizer step, one micro-batch

    @property
    def group_rollouts(self) -> int:
        """Rollouts per GRPO / RLOO iteration."""
        return self.group_prompts * self.group_size


SIZES = {
    "tiny": Size("tiny", REPO_ROOT / "configs" / "tiny" / "model.json", batch=4, steps=2, warmup=1,
                 synthetic_size=100, rollout_batch=4, max_new_tokens=4, ppo_epochs=1, minibatch=4, peak_repeats=1, ppo_steps=2,
                 group_prompts=2, group_minibatch=4),
    # vocabulary 32000 (a real LM's head), 43.7M parameters; the headline size since 2026-11-21
    "small": Size("small", CONFIGS / "small.json", batch=16, steps=6, warmup=2,
                  synthetic_size=400, rollout_batch=16, max_new_tokens=16, ppo_epochs=2, minibatch=8, peak_repeats=5, ppo_steps=2),
    # the earlier `small`: the tiny tokenizer's vocabulary of 652, so the LM head is 1% of the FLOPs
    "small-v652": Size("small-v652", CONFIGS / "small-v652.json", batch=16, steps=6, warmup=2,
                       synthetic_size=400, rollout_batch=16, max_new_tokens=16, ppo_epochs=2, minibatch=8, peak_repeats=5, ppo_steps=2),
    # the `small` model on rows of realistic length: 200-240 letters, prompts of about 220 tokens and
    # responses of about 215 (SFT rows ~435 tokens, shared-prompt preference rows ~650); where the per-step
    # fixed costs (optimizer, clipping, the embedding's gradient) no longer dominate
    "small-long": Size("small-long", CONFIGS / "small.json", batch=8, steps=3, warmup=1,
                       synthetic_size=64, rollout_batch=16, max_new_tokens=16, ppo_epochs=2, minibatch=8,
                       peak_repeats=5, ppo_steps=2, letters=(200, 240), max_length=512, max_prompt_length=256),
    # Llama-3.2-1B's shape for one GPU (--device cuda): 8 pairs of ~435-token rows per DPO step; the decoding
    # benchmark samples 64 rollouts of up to 256 tokens
    "llama-1b": Size("llama-1b", CONFIGS / "llama-3.2-1b.json", batch=8, steps=8, warmup=3, synthetic_size=128,
                     rollout_batch=64, max_new_tokens=256, ppo_epochs=1, minibatch=8, peak_repeats=3, ppo_steps=2,
                     letters=(200, 240), max_length=512, max_prompt_length=256),
}
# the same model for GRPO / RLOO against TRL on one GPU: 8 prompts of ~220 tokens x 4 responses of up to 128 new
# tokens per iteration, two optimizer steps of 16 rollouts
SIZES["llama-1b-group"] = replace(SIZES["llama-1b"], name="llama-1b-group", max_new_tokens=128)


def prompt_order(rows: int, seed: int = 0) -> list[int]:
    """The order in which the engine runner's online loader draws prompts, `DataLoader(shuffle=True,
    generator=torch.Generator().manual_seed(seed))`, read from such a loader over the row indices (its iterator
    draws a base seed from the generator before the sampler's permutation, so a bare randperm would differ).
    TRL's GRPO and RLOO trainers are given the rows in this order, unshuffled, so both sides sample the same
    prompts in every iteration."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(range(rows), batch_size=rows, shuffle=True, generator=torch.Generator().manual_seed(seed))
    return [int(i) for batch in loader for i in batch]


def model_dir(size: str, kind: str) -> Path:
    """The seeded build of `size`'s model config (kind "causal" or "reward"), made on first use and shared by the
    sizes of one config; the directory name carries a hash of the config, so an edited config is a new build."""
    config_path = SIZES[size].model_json
    key = hashlib.sha256(config_path.read_bytes()).hexdigest()[:10]
    out = cache_root() / "benchmarks" / f"{config_path.stem}-{kind}-{key}"
    if not (out / "config.json").exists():
        try:
            build_model(out, kind=kind, config_path=config_path)
        except FileExistsError:
            if not (out / "config.json").exists():
                raise
    return out


def build_model(out_dir: Path, *, kind: str, config_path: Path, seed: int = 0) -> Path:
    """The seeded build of a benchmark config (`engine.tiny.build_tiny_model`). A `vocab_size` in the config
    sets the model's vocabulary: the tiny tokenizer's ids (< 652) are then the first ids of a larger one, as a
    real model's tokenizer may be smaller than its embedding (Llama-3, Qwen2 pad theirs), and the head
    projects onto every one of the `vocab_size` rows, which is the cost being measured."""
    return build_tiny_model(out_dir, kind=kind, seed=seed, config_path=config_path)


def engine_args(objective: str, size: str, output_dir: str | Path, *, steps: int | None = None,
                overrides: tuple[str, ...] = ()) -> list[str]:
    """`engine/train.py` arguments for one measurement: the tiny config of the objective, the benchmark model,
    data and batch, a constant learning rate, no evaluation, checkpoints or progress bar."""
    spec = SIZES[size]
    kind = "reward" if objective == "reward" else "causal"
    total = spec.warmup + (steps or spec.steps)
    data = [f"data.synthetic_size={spec.synthetic_size}"] if spec.letters is None else \
        [f"data.path={long_rows(spec, FAMILY[objective])}"]
    return ["--config", str(REPO_ROOT / "configs" / "tiny" / f"{objective}.yaml"),
            f"output_dir={output_dir}", f"model.name_or_path={model_dir(size, kind)}", f"max_steps={total}",
            *data, f"data.max_length={spec.max_length}",
            f"data.max_prompt_length={spec.max_prompt_length}", f"batch.global_batch_size={spec.batch}",
            f"batch.micro_batch_size={spec.batch}", "eval.every_steps=0", "checkpoint.every_steps=0",
            "logging.every_steps=1", "logging.progress_bar=false", "optim.scheduler=constant",
            "optim.warmup_steps=0", "optim.weight_decay=0.0", "optim.lr=1.0e-4", *overrides]


def long_rows(spec: Size, family: str) -> Path:
    """The JSONL training rows of `family` for a size with `letters`: the sorting task at that length, seeded,
    written once into the cache."""
    from data.synthetic import write_synthetic

    low, high = spec.letters
    out = cache_root() / "benchmarks" / f"data-{low}-{high}-{spec.synthetic_size}"
    path = out / f"{family}_train.jsonl"
    if not path.exists():
        write_synthetic(out, n_train=spec.synthetic_size, n_test=8, min_letters=low, max_letters=high)
    return path
