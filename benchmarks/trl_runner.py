"""The peer's side: the same work through TRL's trainers, timed at each optimizer step by a callback.

Same model files, same tokenised rows (the engine's data layer builds them, and TRL gets them already
tokenised, so both train on identical token ids), same batch, float32, AdamW with the same betas, eps, no
weight decay, clipping at 1.0 and a constant learning rate. The AdamW is the trainer's default (`optim`:
adamw_torch_fused with transformers >= 5 and torch >= 2.8), as the engine's is torch's fused one by default;
`optim=adamw_torch` (with the engine's `optim.fused=false`) compares the non-fused kernels. Each measurement
records the optimizer the trainer built (`optimizer`, `adamw_fused`). SFT, reward, DPO, ORPO, GRPO and RLOO
use the installed TRL (the `bench` extra, trl>=1.0); PPO needs trl<=1.12 (the last release with
`trl.experimental.ppo.PPOTrainer`), run from its own virtual environment.
"""

from __future__ import annotations

import tempfile
import time
from unittest import mock

import torch

from benchmarks.harness import FlopCounter, StepClock
from benchmarks.workloads import FAMILY, GROUP_OBJECTIVES, ONLINE, SIZES, engine_args, model_dir, prompt_order


def _engine_rows(objective: str, size: str):
    """The engine's tokenised training rows and its tokenizer, from the engine's own config of the run."""
    from data import build_datasets
    from engine import models
    from engine.config import load_config

    with tempfile.TemporaryDirectory() as out:
        args = engine_args("sft" if objective in ONLINE else objective, size, out)
        cfg = load_config(args[1], args[2:])
    tokenizer = models.load_tokenizer(cfg.model)
    return build_datasets(FAMILY[objective], cfg.data, tokenizer).train, tokenizer, cfg


def _prompt_length(labels: list[int]) -> int:
    return next(i for i, label in enumerate(labels) if label != -100)


def _record_optimizer(clock: StepClock, optimizer) -> None:
    """Note which optimizer the trainer built (Accelerate wraps it: the wrapped one is `.optimizer`)."""
    if optimizer is not None and "optimizer" not in clock.info:
        inner = getattr(optimizer, "optimizer", optimizer)
        clock.info["optimizer"] = type(inner).__name__
        clock.info["adamw_fused"] = bool(getattr(inner, "defaults", {}).get("fused"))


def _common_args(size: str, out: str, steps: int | None, device: str = "cpu", precision: str = "fp32") -> dict:
    """The trainer settings both sides share; bf16 is autocast over float32 weights, as the engine's
    mixed_precision=bf16."""
    spec = SIZES[size]
    return dict(output_dir=out, per_device_train_batch_size=spec.batch, gradient_accumulation_steps=1,
                max_steps=spec.warmup + (steps or spec.steps), learning_rate=1e-4, lr_scheduler_type="constant",
                warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none",
                disable_tqdm=True, use_cpu=device == "cpu", seed=0, dataloader_num_workers=0,
                bf16=precision == "bf16", fp16=False,
                eval_strategy="no")


def run_trl(objective: str, size: str, *, steps: int | None = None, options: dict | None = None,
            device: str = "cpu", precision: str = "fp32") -> StepClock:
    """`options` go to the trainer's config (e.g. gradient_checkpointing=False, TRL's default being True)."""
    if objective == "ppo":
        return run_trl_ppo(size, steps=steps, options=options)
    if objective in GROUP_OBJECTIVES:
        return run_trl_group(objective, size, steps=steps, options=options, device=device, precision=precision)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    options = options or {}
    spec = SIZES[size]
    counter = FlopCounter()
    clock = StepClock(counter, warmup=spec.warmup, rows_per_step=spec.batch, device=device)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            _record_optimizer(clock, optimizer)
            clock.tick()

    rows, tokenizer, cfg = _engine_rows(objective, size)
    kind = "reward" if objective == "reward" else "causal"
    auto = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
    model = counter.watch(auto.from_pretrained(model_dir(size, kind), dtype=torch.float32))
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out:
        common = _common_args(size, out, steps, device, precision)
        # an option that is one of the shared settings (e.g. optim) replaces it
        common |= {k: v for k, v in options.items() if k in common}
        options = {k: v for k, v in options.items() if k not in common}
        if objective == "sft":
            from trl import SFTConfig, SFTTrainer

            data = rows.map(lambda r: {"completion_mask": [int(label != -100) for label in r["labels"]]},
                            remove_columns=["labels"])
            args = SFTConfig(**common, max_length=cfg.data.max_length, packing=False, completion_only_loss=True,
                             **options)
            trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                 callbacks=[Clock()])
        elif objective == "reward":
            from trl import RewardConfig, RewardTrainer

            data = rows.map(lambda r: {"chosen_ids": r["chosen_input_ids"], "rejected_ids": r["rejected_input_ids"]},
                            remove_columns=rows.column_names)
            args = RewardConfig(**common, max_length=cfg.data.max_length, **options)
            trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                    callbacks=[Clock()])
        elif objective == "dpo":
            from trl import DPOConfig, DPOTrainer

            def split(r):
                n = _prompt_length(r["chosen_labels"])
                return {"prompt_ids": r["chosen_input_ids"][:n], "chosen_ids": r["chosen_input_ids"][n:],
                        "rejected_ids": r["rejected_input_ids"][n:]}

            class TokenisedDPOTrainer(DPOTrainer):
                def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                    return dataset  # already tokenised by the engine's data layer

            data = rows.map(split, remove_columns=rows.column_names)
            ref = None
            if not options.get("precompute_ref_log_probs"):
                ref = counter.watch(AutoModelForCausalLM.from_pretrained(model_dir(size, "causal"),
                                                                        dtype=torch.float32).eval())
            args = DPOConfig(**common, beta=0.1, max_length=cfg.data.max_length, **options)
            trainer = TokenisedDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data,
                                          processing_class=tokenizer, callbacks=[Clock()])
        elif objective == "orpo":
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            class TokenisedORPOTrainer(ORPOTrainer):
                def tokenize_row(self, feature, model=None):
                    n = _prompt_length(feature["chosen_labels"])
                    out = {"prompt_input_ids": feature["chosen_input_ids"][:n],
                           "prompt_attention_mask": [1] * n}
                    for side in ("chosen", "rejected"):
                        ids = feature[f"{side}_input_ids"]
                        out |= {f"{side}_input_ids": ids, f"{side}_attention_mask": [1] * len(ids),
                                f"{side}_labels": [-100] * n + ids[n:]}
                    return out

            data = rows.map(lambda r: {"prompt": "", "chosen": "", "rejected": ""})
            args = ORPOConfig(**common, beta=0.5, max_length=cfg.data.max_length, remove_unused_columns=False,
                              **options)
            trainer = TokenisedORPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                           callbacks=[Clock()])
        else:
            raise ValueError(f"no TRL trainer for {objective!r}")
        trainer.train()
    return clock


def run_trl_ppo(size: str, *, steps: int | None = None, options: dict | None = None) -> StepClock:
    """TRL's PPOTrainer on the engine's PPO settings: separate value model, reward model, frozen reference,
    `response_length` new tokens, the same minibatches and epochs. Generation and reward-model time are read
    by wrapping the trainer module's own `batch_generation` and `get_reward`. `options` go to PPOConfig
    (e.g. optim=adamw_torch) and replace the settings above."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    spec = SIZES[size]
    counter = FlopCounter()
    clock = StepClock(counter, warmup=1, rows_per_step=spec.rollout_batch)
    phases = {"time/generation": 0.0, "time/scoring": 0.0}
    causal, reward = model_dir(size, "causal"), model_dir(size, "reward")

    def load(auto, path, **kw):
        return counter.watch(auto.from_pretrained(path, dtype=torch.float32, **kw))

    policy = load(AutoModelForCausalLM, causal)
    ref = load(AutoModelForCausalLM, causal).eval()
    reward_model = load(AutoModelForSequenceClassification, reward, num_labels=1).eval()
    value_model = load(AutoModelForSequenceClassification, causal, num_labels=1)

    generate, get_reward = trl_ppo.batch_generation, trl_ppo.get_reward

    def timed_generation(*args, **kwargs):
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        phases["time/generation"] += time.perf_counter() - start
        return out

    def timed_reward(model, *args, **kwargs):
        start = time.perf_counter()
        out = get_reward(model, *args, **kwargs)
        if model is reward_model:
            phases["time/scoring"] += time.perf_counter() - start
        return out

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            _record_optimizer(clock, optimizer)
            generated = spec.rollout_batch * spec.max_new_tokens
            clock.tick(**phases, generated_tokens=generated)
            phases.update({k: 0.0 for k in phases})

    rows, tokenizer, _ = _engine_rows("ppo", size)
    tokenizer.padding_side = "left"
    data = Dataset.from_dict({"input_ids": rows["prompt_input_ids"]})
    iterations = 1 + (steps or spec.ppo_steps)
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out:
        # TRL's rollout batch is per_device_train_batch_size x gradient_accumulation_steps, split into
        # num_mini_batches; micro-batches of per_device_train_batch_size. Its Accelerator steps the optimizer
        # every gradient_accumulation_steps micro-batches, so with these sizes it takes half the engine's
        # optimizer steps over the same forward and backward work.
        minibatches = spec.rollout_batch // spec.minibatch
        settings = dict(output_dir=out, per_device_train_batch_size=spec.minibatch,
                      gradient_accumulation_steps=minibatches, num_mini_batches=minibatches,
                      num_ppo_epochs=spec.ppo_epochs,
                      local_rollout_forward_batch_size=spec.rollout_batch, response_length=spec.max_new_tokens,
                      total_episodes=spec.rollout_batch * iterations, temperature=1.0, kl_coef=0.05,
                      vf_coef=0.1, cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95,
                      learning_rate=1e-4, lr_scheduler_type="constant", max_grad_norm=1.0,
                      num_sample_generations=0, save_strategy="no", report_to="none", disable_tqdm=True,
                      use_cpu=True, seed=0, logging_steps=1, stop_token="eos")
        args = PPOConfig(**(settings | (options or {})))
        with mock.patch.object(trl_ppo, "batch_generation", timed_generation), \
                mock.patch.object(trl_ppo, "get_reward", timed_reward):
            trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref,
                                 reward_model=reward_model, train_dataset=data, value_model=value_model,
                                 callbacks=[Clock()])
            trainer.train()
    return clock


def judge(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """The engine's reward function (`workloads.REWARD_FUNCTION`) in TRL's `reward_funcs` signature."""
    from data.synthetic import judge_reward

    return judge_reward(prompts, completions)


def run_trl_group(objective: str, size: str, *, steps: int | None = None, options: dict | None = None,
                  device: str = "cpu", precision: str = "fp32") -> StepClock:
    """TRL's GRPOTrainer or RLOOTrainer on the engine's settings (`engine_runner.ppo_config`): the same prompts
    in the same order (`workloads.prompt_order`) with the same token ids (the trainer's `_tokenize_prompts`
    returns the engine's), `group_size` responses of exactly
    `max_new_tokens` tokens (`min_new_tokens` in `generation_kwargs`), the judge as the reward function, one
    pass (num_iterations 1) in optimizer steps of `group_minibatch` rollouts, fused AdamW at lr 1e-4, clipping
    1.0. GRPO: beta 0.04, k3 in the loss, loss_type "grpo" (the engine's seq-mean-token-mean). RLOO: beta 0.05,
    TRL's default, a k1 KL summed into the reward. Timed per rollout batch (`steps_per_generation` optimizer
    steps); generation and scoring by wrapping the trainer's own `_generate` and `_calculate_rewards`.
    `options` go to the trainer's config and replace the settings above."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback

    spec = SIZES[size]
    counter = FlopCounter()
    per_iteration = spec.group_rollouts // spec.group_minibatch  # optimizer steps per rollout batch
    clock = StepClock(counter, warmup=1, rows_per_step=spec.group_rollouts, device=device)
    # seconds of this iteration: generation and scoring, and the whole rollout around them (with the trainer's
    # log-prob forwards of the policy and the reference); the training phase is the rest of the iteration
    phases = {"time/generation": 0.0, "time/scoring": 0.0, "rollout": 0.0}
    last_tick = [time.perf_counter()]
    generated = [0]  # response tokens of this iteration
    rows, tokenizer, _ = _engine_rows(objective, size)
    prompt_ids = dict(zip(rows["prompt"], rows["prompt_input_ids"]))
    # the engine's prompts in the engine's order; with shuffle_dataset=False each generation batch takes the next
    # group_prompts of them, as the engine's loader does
    data = Dataset.from_dict({"prompt": [rows["prompt"][i] for i in prompt_order(len(rows))]})
    if objective == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer

        loss = dict(beta=0.04, loss_type="grpo", scale_rewards="group")
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

        loss = dict(beta=0.05, normalize_advantages=False)

    class TokenisedTrainer(Trainer):
        def _tokenize_prompts(self, prompts):
            return [list(prompt_ids[p]) for p in prompts], None, {}  # the engine's ids: template, BOS, ...

    def timed(fn, key):
        def run(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            phases[key] += time.perf_counter() - start
            if key == "time/generation":  # (prompt_ids, completion_ids, ...): lists of token ids per row
                generated[0] += sum(len(ids) for ids in out[1])
            return out
        return run

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            _record_optimizer(clock, optimizer)
            if state.global_step % per_iteration:
                return
            clock.info["response_tokens_per_step"] = generated[0]
            gen, scoring, rollout = phases["time/generation"], phases["time/scoring"], phases["rollout"]
            clock.tick(**{"time/generation": gen, "time/scoring": scoring, "time/experience": rollout - gen - scoring,
                          "time/training": time.perf_counter() - last_tick[0] - rollout},
                       generated_tokens=generated[0])
            phases.update({k: 0.0 for k in phases})
            generated[0] = 0
            last_tick[0] = time.perf_counter()

    policy = counter.watch(AutoModelForCausalLM.from_pretrained(model_dir(size, "causal"), dtype=torch.float32))
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out:
        common = _common_args(size, out, steps, device, precision)
        common |= dict(per_device_train_batch_size=spec.group_minibatch, gradient_accumulation_steps=1,
                       steps_per_generation=per_iteration, max_steps=per_iteration * (1 + (steps or spec.ppo_steps)),
                       num_generations=spec.group_size, max_completion_length=spec.max_new_tokens,
                       generation_kwargs={"min_new_tokens": spec.max_new_tokens}, temperature=1.0,
                       num_iterations=1, epsilon=0.2, disable_dropout=True, shuffle_dataset=False, **loss)
        args = Config(**(common | (options or {})))
        trainer = TokenisedTrainer(model=policy, reward_funcs=[judge], args=args, train_dataset=data,
                                   processing_class=tokenizer, callbacks=[Clock()])
        if trainer.ref_model is not None:
            counter.watch(trainer.ref_model)
        clock.info["reference_loaded"] = trainer.ref_model is not None
        trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions, "rollout")
        trainer._generate = timed(trainer._generate, "time/generation")
        trainer._calculate_rewards = timed(trainer._calculate_rewards, "time/scoring")
        trainer.train()
    return clock
