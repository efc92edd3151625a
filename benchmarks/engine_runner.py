"""The engine's side of a measurement: its own entry point and loops, timed at each optimizer step.

SFT, reward, DPO and ORPO run `engine.train.main` unchanged; the clock reads the time at each
`lifecycle.after_step` (the loop's own end of step, logging included), and every model the loop loads is
watched by the FLOP counter. The final save is skipped: it is not part of a step. PPO, GRPO and RLOO call the
loop's own `rollout` and `ppo_update` on the models and scorer the PPO loop would build for them.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch

from benchmarks.harness import FlopCounter, StepClock
from benchmarks.workloads import ONLINE, REWARD_FUNCTION, SIZES, engine_args, model_dir

PROTOTYPES = ("bench.drop_position_ids",)
"""Engine changes prototyped here, switched like config keys: `bench.drop_position_ids=true` calls every
model without `position_ids` when the batch has an attention mask (right padding: they are 0..T-1 anyway)."""

RETIRED = {"bench.fused_adamw": "the engine builds torch's fused AdamW by default; `optim.fused=true/false` "
                                "is its switch"}


def _check_retired(overrides: tuple[str, ...]) -> None:
    for o in overrides:
        key = o.partition("=")[0]
        if key in RETIRED:
            raise ValueError(f"{key} is retired: {RETIRED[key]}")


def _recording_optimizer(build, record: dict):
    """`optim.build_optimizer`, noting which AdamW kernel the loop got (torch's `fused` default is None)."""
    def build_and_record(*args, **kwargs):
        optimizer = build(*args, **kwargs)
        record["optimizer"] = type(optimizer).__name__
        record["adamw_fused"] = bool(optimizer.defaults.get("fused"))
        return optimizer
    return build_and_record


def _without_position_ids(model: torch.nn.Module) -> torch.nn.Module:
    def drop(module, args, kwargs):
        if kwargs.get("attention_mask") is not None and kwargs.get("past_key_values") is None:
            kwargs.pop("position_ids", None)
        return args, kwargs

    model.register_forward_pre_hook(drop, with_kwargs=True)
    return model


def run_engine(objective: str, size: str, *, steps: int | None = None, overrides: tuple[str, ...] = (),
               device: str = "cpu") -> StepClock:
    """`device` is where Accelerate puts the run ("cuda" when a GPU is visible); the clock waits for it."""
    _check_retired(overrides)
    if objective in ONLINE:
        return run_engine_ppo(size, objective=objective, steps=steps, overrides=overrides, device=device)
    from engine import lifecycle, models, optim, reference, train

    spec = SIZES[size]
    counter = FlopCounter()
    clock = StepClock(counter, warmup=spec.warmup, rows_per_step=spec.batch, device=device)
    prototypes = {o.partition("=")[0] for o in overrides if o.startswith(PROTOTYPES)}
    overrides = tuple(o for o in overrides if not o.startswith(PROTOTYPES))

    def watched(load):
        def load_and_watch(*args, **kwargs):
            model = counter.watch(load(*args, **kwargs))
            return _without_position_ids(model) if "bench.drop_position_ids" in prototypes else model
        return load_and_watch

    after_step = lifecycle.after_step

    def timed_after_step(*args, **kwargs):
        after_step(*args, **kwargs)
        clock.tick()

    def no_final_save(accelerator, cfg, model, tokenizer, logger, total):
        logger.close()
        return lifecycle.RunResult(Path(cfg.output_dir), None, total, logger.history)

    with tempfile.TemporaryDirectory(prefix="bench-") as out, ExitStack() as stack:
        stack.enter_context(mock.patch.object(models, "load_policy", watched(models.load_policy)))
        stack.enter_context(mock.patch.object(models, "load_reward_model", watched(models.load_reward_model)))
        stack.enter_context(mock.patch.object(reference, "load_policy", watched(reference.load_policy)))
        stack.enter_context(mock.patch.object(lifecycle, "after_step", timed_after_step))
        stack.enter_context(mock.patch.object(lifecycle, "save_final", no_final_save))
        stack.enter_context(mock.patch.object(optim, "build_optimizer",
                                              _recording_optimizer(optim.build_optimizer, clock.info)))
        train.main(engine_args(objective, size, out, steps=steps, overrides=overrides))
    return clock


# The loss settings of the group objectives, as TRL's trainers are given them (benchmarks.trl_runner): GRPO's
# beta 0.04 with k3 in the loss; RLOO's k1 KL summed into the reward at beta 0.05 (RLOOTrainer's default).
GROUP_SETTINGS = {
    "grpo": ({"name": "grpo", "kl_coef": 0.04, "kl_estimator": "k3"}, ()),
    "rloo": ({"name": "rloo"}, ("ppo.kl_coef=0.05", "ppo.kl_estimator=k1")),
}


def ppo_config(size: str, output_dir: str, *, objective: str = "ppo", steps: int | None = None,
               overrides: tuple[str, ...] = ()):
    """The run config of an online measurement, every response sampled to its full length (TRL samples exactly
    `response_length` tokens, and `min_new_tokens` = `max_new_tokens` on its GRPO and RLOO trainers). PPO: a
    reward model, a separate critic (as TRL's PPOTrainer) unless `ppo.critic=null`. GRPO and RLOO (`objective`):
    `Size.group_prompts` prompts x `Size.group_size` responses scored by the reward function, no value
    function, one pass over the rollouts in minibatches of `Size.group_minibatch`, and the KL of
    `GROUP_SETTINGS`."""
    from engine.config import RunConfig
    from engine.ppo_config import PPOConfig

    spec = SIZES[size]
    cls = RunConfig
    if "ppo" not in {f.name for f in dataclasses.fields(RunConfig)}:
        @dataclasses.dataclass(frozen=True)
        class RunConfigWithPPO(RunConfig):
            ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
        cls = RunConfigWithPPO
    shared = [a for a in engine_args("sft", size, output_dir, steps=steps)[2:] if not a.startswith("batch.")]
    if objective != "ppo":
        loss, kl = GROUP_SETTINGS[objective]
        ppo = [f"ppo.rollout_batch_size={spec.group_prompts}", f"ppo.group_size={spec.group_size}",
               f"ppo.rollout_micro_batch_size={spec.group_rollouts}", f"ppo.max_new_tokens={spec.max_new_tokens}",
               f"ppo.min_new_tokens={spec.max_new_tokens}", "ppo.temperature=1.0", "ppo.epochs=1", *kl,
               f"batch.global_batch_size={spec.group_minibatch}", f"batch.micro_batch_size={spec.group_minibatch}"]
        raw = {"objective": dict(loss), "ppo": {"rewards": [{"name": "judge", "function": REWARD_FUNCTION}]}}
        return _config(cls, raw, [*shared, *ppo, *overrides])
    ppo = [f"ppo.rollout_batch_size={spec.rollout_batch}", f"ppo.rollout_micro_batch_size={spec.rollout_batch}",
           f"ppo.max_new_tokens={spec.max_new_tokens}", f"ppo.min_new_tokens={spec.max_new_tokens}",
           "ppo.temperature=1.0", f"ppo.epochs={spec.ppo_epochs}", "ppo.kl_coef=0.05", "ppo.vf_coef=0.1",
           f"ppo.critic={model_dir(size, 'causal')}", f"batch.global_batch_size={spec.minibatch}",
           f"batch.micro_batch_size={spec.minibatch}"]
    raw: dict = {"objective": {"name": "ppo", "clip_coef": 0.2},
                 "ppo": {"rewards": [{"name": "rm", "model": str(model_dir(size, "reward"))}]}}
    return _config(cls, raw, [*shared, *ppo, *overrides])


def _config(cls, raw: dict, args: list[str]):
    """`raw` with the dotted `key=value` arguments set into it, as a run config."""
    import yaml

    from engine.config import from_dict

    for arg in args:
        key, _, text = arg.partition("=")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(text)
    return from_dict(cls, raw)


def run_engine_ppo(size: str, *, objective: str = "ppo", steps: int | None = None,
                   overrides: tuple[str, ...] = (), device: str = "cpu") -> StepClock:
    """One online measurement through the PPO loop's steps, timed per iteration (rollout and update). For GRPO
    and RLOO the loop's own choices decide what is built: no value function for a critic-free estimator, the
    reference only where a KL coefficient is above 0 (`ppo.kl_settings`)."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, send_to_device, set_seed
    from torch.utils.data import DataLoader

    from data import build_datasets, make_collator
    from engine import models, optim
    from engine.hostmem import keep_freed_memory
    from engine.loops import ppo
    from losses import FixedKLController, bind_objective
    from rollout.value_head import ActorCritic

    keep_freed_memory()  # as engine/train.py's main does before any model loads
    spec = SIZES[size]
    counter = FlopCounter()
    clock = StepClock(counter, warmup=1, rows_per_step=spec.rollout_batch if objective == "ppo" else spec.group_rollouts,
                      device=device)
    with tempfile.TemporaryDirectory(prefix="bench-") as out:
        cfg = ppo_config(size, out, objective=objective, steps=steps, overrides=overrides)
        _, loss_fn = bind_objective(cfg.objective.name, dict(cfg.objective.kwargs))
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.batch.accumulation_steps(1), sync_with_dataloader=False), step_scheduler_with_optimizer=False)
        set_seed(cfg.seed)
        ppo.check_sizes(cfg, 1)
        reward_kl, with_reference = ppo.kl_settings(cfg, getattr(loss_fn, "keywords", {}))
        # Step 1-2 of engine/loops/ppo.py's train(): models, scorer, prompts, optimizer.
        tokenizer = models.load_tokenizer(cfg.model)
        policy = counter.watch(models.load_policy(cfg.model, for_training=True))
        if ppo.advantage_estimator(cfg).needs_critic:
            critic = None
            if cfg.ppo.critic:
                critic = counter.watch(models.load_policy(dataclasses.replace(cfg.model, name_or_path=cfg.ppo.critic),
                                                          for_training=True))
            actor_critic = ActorCritic(policy, critic=critic)
        else:
            actor_critic = ActorCritic(policy, with_value_head=False)
        reference = None
        if with_reference and cfg.reference.mode != "disabled":
            reference = counter.watch(ppo._to_device(models.load_policy(models.reference_model_config(cfg.model),
                                                                        for_training=False), accelerator.device))
        scorer = ppo.build_scorer(cfg, accelerator)
        for source in scorer.sources:
            if hasattr(source, "model"):
                counter.watch(source.model)
        data = build_datasets("prompt", cfg.data, tokenizer)
        sampling = cfg.ppo.sampling()
        loader = DataLoader(data.train, batch_size=cfg.ppo.rollout_batch_size, shuffle=True, drop_last=True,
                            collate_fn=make_collator("prompt", tokenizer), generator=torch.Generator().manual_seed(0))
        optimizer = _recording_optimizer(optim.build_optimizer, clock.info)(actor_critic, cfg.optim)
        actor_critic, optimizer = accelerator.prepare(actor_critic, optimizer)
        scheduler = optim.build_scheduler(optimizer, cfg.optim, 10**6)
        kl_ctl = FixedKLController(reward_kl)
        eos = ppo.stop_ids(tokenizer, policy)
        clock.info["reference_loaded"] = reference is not None
        clock.info["rollout_logprobs"] = "sampling" if ppo.use_sampling_logprobs(cfg, policy) else "recompute"

        batches = iter(loader)
        for step in range(1 + (steps or spec.ppo_steps)):
            batch = send_to_device(next(batches), accelerator.device)  # the loop's loader is prepared; this one is not
            set_seed(cfg.seed + step)
            exp, _, stats, times = ppo.rollout(batch, actor_critic=accelerator.unwrap_model(actor_critic),
                                               reference=reference, scorer=scorer, tokenizer=tokenizer,
                                               sampling=sampling, cfg=cfg, kl_coef=kl_ctl.value, eos_token_id=eos,
                                               step=step, with_reference=with_reference)
            start = time.perf_counter()
            ppo.ppo_update(exp, accelerator=accelerator, actor_critic=actor_critic, optimizer=optimizer,
                           scheduler=scheduler, loss_fn=loss_fn, cfg=cfg)
            times["time/training"] = time.perf_counter() - start
            stats.compute(accelerator)
            generated = int(exp.action_mask.sum())
            times["generated_tokens"] = generated
            clock.info["response_tokens_per_step"] = generated
            clock.tick(**times)
    return clock
