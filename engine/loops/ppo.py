"""PPO from prompts: rollouts scored by reward models or functions, KL-shaped rewards, GAE, clipped updates.

One iteration, in the order of lm-human-preferences (Ziegler et al. 2019) and cleanrl's ppo.py:
  1. generate a response to each prompt;             rollout.generation
  2. score it (minus the missing-EOS penalty);        rollout.scoring
  3. reference log-probs and values;                  rollout.experience
  4. KL-shaped per-token rewards;                     losses.kl_shaped_rewards
  5. GAE and advantage whitening;                     losses.gae, losses.masked_whiten
  6. epochs x shuffled minibatches of the PPO loss;   the objective + losses.ppo_value_loss
  7. KL controller update; 8. log and checkpoint.
`max_steps` counts iterations; an optimizer step is one minibatch of `batch.global_batch_size` rollouts.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader

from data import DataConfig, build_datasets, make_collator
from data.tokenize import reward_pair_encoder
from engine import lifecycle, loaders, models, optim
from engine.config import ConfigError, ModelConfig, RunConfig
from engine.distributed import finished_everywhere
from engine.logging import RunLogger
from engine.metrics import MeanMetrics
from engine.ppo_config import advantage_estimator, kl_settings
from engine.tiny import resolve_model_path
from losses import (
    AdaptiveKLController,
    FixedKLController,
    Objective,
    aggregation_count,
    entropy_from_logits,
    masked_mean,
    ppo_value_loss,
)
from rollout.experience import Experience
from rollout.generation import SamplingConfig, eos_ids, finished_locally
from rollout.judge import JudgeReward
from rollout.online import collect
from rollout.scoring import RewardFunction, RewardModel, Scorer, default_format, load_reward_function
from rollout.value_head import (
    CRITIC_DIR,
    VALUE_HEAD_FILE,
    ActorCritic,
    ValueHead,
    load_value_head,
    save_value_head,
)


def train(cfg: RunConfig, accelerator: Accelerator, objective: Objective, loss_fn) -> lifecycle.RunResult:
    ppo = cfg.ppo
    minibatches = check_sizes(cfg, accelerator.num_processes)
    estimator = advantage_estimator(cfg)
    reward_kl, with_reference = kl_settings(cfg, getattr(loss_fn, "keywords", {}))

    # 1. Tokenizer, policy with its value head (or a separate critic) when the estimator needs a value function,
    # the frozen reference when a KL is used, rewards, prompts.
    tokenizer = models.load_tokenizer(cfg.model)
    no_dropout = models.disables_dropout(cfg.model, "ppo")
    policy = models.load_policy(cfg.model, for_training=True, disable_dropout=no_dropout)
    eos = stop_ids(tokenizer, policy)
    if estimator.needs_critic:
        critic = (models.load_policy(replace(cfg.model, name_or_path=ppo.critic), for_training=True,
                                     disable_dropout=no_dropout) if ppo.critic else None)
        actor_critic = ActorCritic(policy, starting_value_head(ppo.critic or cfg.model.name_or_path), critic=critic)
    else:
        actor_critic = ActorCritic(policy, with_value_head=False)
    reference = None
    if with_reference and cfg.reference.mode != "disabled":
        ref_cfg = models.reference_model_config(cfg.model, cfg.reference.name_or_path)
        reference = _to_device(models.load_policy(ref_cfg, for_training=False), accelerator.device)
    scorer = build_scorer(cfg, accelerator)
    data = build_datasets("prompt", cfg.data, tokenizer, log=accelerator.print,
                          report_dir=cfg.output_dir if accelerator.is_main_process else None)
    sampling = ppo.sampling()

    # 2. Prompt loader (one rollout batch per iteration), optimizer and schedule, placed by Accelerate.
    loader = DataLoader(data.train, batch_size=ppo.rollout_batch_size // accelerator.num_processes,
                        sampler=loaders.EpochSampler(len(data.train), cfg.seed), collate_fn=make_collator("prompt", tokenizer),
                        drop_last=True, generator=torch.Generator().manual_seed(cfg.seed))
    optimizer = optim.build_optimizer(actor_critic, cfg.optim)
    actor_critic, optimizer, loader = accelerator.prepare(actor_critic, optimizer, loader)
    if len(loader) == 0:
        raise ConfigError(f"the prompt split has {len(data.train)} rows, fewer than ppo.rollout_batch_size="
                          f"{ppo.rollout_batch_size}; lower it or add prompts")
    iterations = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(loader)))
    scheduler = accelerator.prepare(optim.build_scheduler(optimizer, cfg.optim, iterations * ppo.epochs * minibatches))
    kl_ctl = (AdaptiveKLController(reward_kl, ppo.kl_target, ppo.kl_horizon) if ppo.kl_target is not None
              else FixedKLController(reward_kl))

    # 3. Resume: adapter or weights with the value head, optimizer, schedule, RNG states, data position,
    # the KL coefficient and the score normaliser.
    position = lifecycle.Position()
    loaded = lifecycle.load_resume(accelerator, cfg, [actor_critic])
    if loaded is not None:
        state = loaded[1]
        position = lifecycle.Position(**state["position"])
        kl_ctl.load_state_dict(state["kl_controller"])
        scorer.load_state_dict(state["scorer"])
    logger = RunLogger.for_run(cfg, accelerator, total_steps=iterations, start_step=position.step, desc=cfg.objective.name)

    # Sharded weights are gathered in every forward, so every process decodes until all are done.
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    finished = finished_everywhere if sharded else finished_locally
    batches = loaders.step_batches(accelerator, loader, position, iterations, per_step=1)
    for (batch,) in batches:
        # The iteration's randomness (sampling, minibatch shuffles, dropout) depends on (seed, step, process)
        # alone, so a resumed run replays it exactly, whatever else drew from the RNG since the checkpoint
        # (a DataLoader draws a seed each time a pass starts).
        set_seed(cfg.seed + 100_003 * position.step + accelerator.process_index)
        # 4. Steps 1-5: generate, score, reference log-probs and values, KL-shaped rewards, advantages.
        exp, responses, stats, times = rollout(batch, actor_critic=accelerator.unwrap_model(actor_critic),
                                        reference=reference, scorer=scorer, tokenizer=tokenizer, sampling=sampling,
                                        cfg=cfg, kl_coef=kl_ctl.value, eos_token_id=eos, finished=finished,
                                        all_reduce=lambda t: accelerator.reduce(t.to(accelerator.device), "sum"),
                                        next_batch=lambda: next(batches)[0], step=position.step,
                                        row_offset=accelerator.process_index * len(batch["prompt"]) * ppo.group_size,
                                        with_reference=with_reference)
        # 5. Step 6: epochs x shuffled minibatches of the clipped policy (and value) losses; the shuffles are
        # drawn alike on every process (seeded by the step alone), so the minibatches are the global batch's.
        start = time.perf_counter()
        shuffle = torch.Generator().manual_seed(cfg.seed + 100_003 * position.step)
        update = ppo_update(exp, accelerator=accelerator, actor_critic=actor_critic, optimizer=optimizer,
                            scheduler=scheduler, loss_fn=loss_fn, cfg=cfg, generator=shuffle)
        times["time/training"] = time.perf_counter() - start

        # 6. Step 7: move the KL coefficient toward its target with this batch's KL per response.
        metrics = stats.compute(accelerator) | update | times
        if reward_kl > 0 or ppo.kl_target is not None:
            metrics["objective/kl_coef"] = kl_ctl.value
            kl_ctl.update(metrics["objective/kl"], n_steps=ppo.rollout_batch_size * ppo.group_size)

        # 7. Log (sample generations as a table) and checkpoint on their schedules; stop on a signal, or after
        # optim.max_bad_steps iterations in a row whose last update had a non-finite gradient.
        position.step += 1
        if position.step % cfg.logging.every_steps == 0 or position.step == iterations:
            rows = [[p, r, float(s)] for p, r, s in list(zip(exp_prompts(exp, batch, ppo.group_size), responses,
                                                             exp.scores))[:ppo.log_samples]]
            logger.table("samples", ["prompt", "response", "score"], rows, position.step)
        lifecycle.after_step(accelerator, cfg, logger, position, iterations, metrics, None,
                             extra_state={"kl_controller": kl_ctl.state_dict(), "scorer": scorer.state_dict()})

    # 8. The policy (or adapter) and tokenizer in <output_dir>/final/, the value head beside them.
    return lifecycle.save_final(accelerator, cfg, actor_critic, tokenizer, logger, iterations, part="policy",
                                extras=save_value_parts if estimator.needs_critic else None)


def exp_prompts(exp: Experience, batch: dict, group_size: int) -> list[str]:
    """The prompt of each rollout row: each of the batch's prompts repeated for its group."""
    return [p for p in batch["prompt"] for _ in range(group_size)][:len(exp.sequences)]


@torch.no_grad()
def rollout(batch: dict, *, actor_critic: ActorCritic, reference, scorer: Scorer, tokenizer, sampling: SamplingConfig,
            cfg: RunConfig, kl_coef: float, eos_token_id: int | list[int] | None = None,
            finished: Callable[[torch.Tensor], bool] = finished_locally,
            all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
            next_batch: Callable[[], dict] | None = None, step: int = 0, row_offset: int = 0,
            with_reference: bool = True) -> tuple[Experience, list[str], MeanMetrics, dict[str, float]]:
    """Steps 1-5 of an iteration on one process's prompts (`rollout.online.collect`): the Experience with
    rewards, advantages and returns, the response texts, per-row statistics, and this process's timings.
    `all_reduce` sums a tensor over the processes (e.g. `accelerator.reduce(t, "sum")`); whitening then uses
    the statistics of the whole rollout batch. `step` and `row_offset` (the global index of this process's
    first rollout row) seed group sampling."""
    result = collect(batch, ppo=cfg.ppo, rollout_cfg=cfg.rollout, actor_critic=actor_critic, reference=reference,
                     scorer=scorer, tokenizer=tokenizer, estimator=advantage_estimator(cfg), kl_coef=kl_coef,
                     sampling=sampling, with_reference=with_reference,
                     keep_logprobs=use_sampling_logprobs(cfg, actor_critic.policy),
                     eos_token_id=eos_token_id if eos_token_id is not None else tokenizer.eos_token_id,
                     finished=finished, all_reduce=all_reduce, next_batch=next_batch,
                     seed=cfg.seed + 100_003 * step, row_offset=row_offset)
    stats = MeanMetrics()
    stats.add(result.stats, len(result.experience.sequences))
    return result.experience, result.responses, stats, result.times


def ppo_update(exp: Experience, *, accelerator: Accelerator, actor_critic, optimizer, scheduler, loss_fn,
               cfg: RunConfig, generator: torch.Generator | None = None) -> dict[str, float]:
    """Step 6: `ppo.epochs` passes over shuffled minibatches, each one optimizer step of accumulated
    micro-batches weighted by their share of the minibatch's tokens, or of its sequences for a loss that
    averages per sequence (`losses.aggregation_unit`); stops early past `ppo.max_approx_kl`. The value loss
    is added only where there is a value function. `generator` draws the shuffles; seeded alike on every
    process, it makes each minibatch the same rows of the global rollout batch however many processes hold it
    (see `minibatch_rows`)."""
    ppo = cfg.ppo
    minibatches = rollout_rows(cfg) // cfg.batch.global_batch_size
    offset = accelerator.process_index * len(exp.sequences)  # the prepared loader gives each process a slice
    prompt_length = exp.sequences.shape[1] - exp.action_mask.shape[1]
    with_values = accelerator.unwrap_model(actor_critic).value_head is not None
    extra = loss_arguments(loss_fn, cfg)
    aggregation = getattr(loss_fn, "keywords", {}).get("aggregation", "token-mean")
    metrics, losses, step_info, epochs_done = MeanMetrics(), MeanMetrics(), {}, 0
    actor_critic.train()
    for _ in range(ppo.epochs):
        stop = False
        for rows in minibatch_rows(len(exp.sequences), minibatches, offset, generator):
            micro_batches = [trim(exp.select(i), prompt_length) for i in rows.split(cfg.batch.micro_batch_size)]
            shares = optim.loss_shares(accelerator, [aggregation_count(part.action_mask, aggregation)
                                                     for part in micro_batches])
            minibatch_kl = MeanMetrics()
            for part, share in zip(micro_batches, shares):
                with accelerator.accumulate(actor_critic):
                    # logits / temperature: the distribution the tokens were sampled from, for the ratio and the
                    # entropy alike
                    out, values = actor_critic(part.sequences, part.attention_mask, part.action_mask,
                                               temperature=ppo.temperature, with_values=with_values)
                    kwargs = {"ref_logprobs": part.ref_logprobs} if "ref_logprobs" in extra else {}
                    kwargs |= {k: v for k, v in extra.items() if k != "ref_logprobs"}
                    pg_loss, pg_metrics = loss_fn(out.logprobs, part.old_logprobs, part.advantages, part.action_mask,
                                                  **kwargs)
                    loss, vf_metrics = pg_loss, {}
                    if with_values:
                        vf_loss, vf_metrics = ppo_value_loss(values, part.values, part.returns, part.action_mask,
                                                             clip_coef=ppo.value_clip)
                        loss = loss + ppo.vf_coef * vf_loss
                    with torch.set_grad_enabled(ppo.entropy_coef != 0):
                        entropy = masked_mean(entropy_from_logits(out.logits), part.action_mask)
                    loss = loss - ppo.entropy_coef * entropy
                    accelerator.backward(loss * share)
                    if accelerator.sync_gradients:
                        step_info = optim.optimizer_step(accelerator, actor_critic, optimizer, scheduler,
                                                         cfg.optim.max_grad_norm)
                # the losses weighted as they are averaged (tokens, or sequences), the per-token statistics by tokens
                tokens = part.action_mask.sum()
                logged = {"loss/total": loss, **pg_metrics, **vf_metrics, "policy/entropy": entropy}
                losses.add({k: v for k, v in logged.items() if k.startswith("loss/")},
                           aggregation_count(part.action_mask, aggregation))
                metrics.add({k: v for k, v in logged.items() if not k.startswith("loss/")}, tokens)
                minibatch_kl.add({"kl": pg_metrics["policy/approx_kl"]}, tokens)
            if ppo.max_approx_kl is not None and minibatch_kl.compute(accelerator)["kl"] > ppo.max_approx_kl:
                stop = True
                break
        epochs_done += 1
        if stop:
            break
    return (losses.compute(accelerator) | metrics.compute(accelerator) | {k: float(v) for k, v in step_info.items()}
            | {"policy/epochs": epochs_done})


def loss_arguments(loss_fn, cfg: RunConfig) -> dict:
    """What the update passes the policy loss beyond its four tensors: the reference's log-probs to a loss
    with a KL term (`ref_logprobs`; a placeholder here), and the generation budget as the constant length of
    a loss summed per sequence (`max_length`) when the config leaves it unset."""
    fn = getattr(loss_fn, "func", loss_fn)
    params = inspect.signature(fn).parameters
    bound = getattr(loss_fn, "keywords", {})
    extra = {}
    if "ref_logprobs" in params and float(bound.get("kl_coef", 0.0) or 0.0) > 0:
        extra["ref_logprobs"] = None
    if "max_length" in params and bound.get("max_length") is None:
        extra["max_length"] = cfg.ppo.max_new_tokens
    return extra


def save_value_parts(actor_critic: ActorCritic, directory: Path, state_dict_of: lifecycle.StateDictOf) -> None:
    """Step 8's files beside the policy, written into final/ before it is renamed into place: the value head,
    and a separate critic in final/critic/. Under sharded weights (FSDP, ZeRO-3) each is written from its
    slice of the actor-critic's gathered state dict (see `lifecycle.save_final`), not from the modules."""
    save_value_head(actor_critic.value_head, directory, state_dict=state_dict_of("value_head"))
    if actor_critic.critic is not None:
        actor_critic.critic.save_pretrained(directory / CRITIC_DIR, state_dict=state_dict_of("critic"))


def use_sampling_logprobs(cfg: RunConfig, policy) -> bool:
    """`ppo.rollout_logprobs` resolved: "auto" keeps the sampling pass's log-probs when the policy computes in
    float32: no mixed precision, no 4/8-bit weights, every floating parameter float32 (which also catches a
    DeepSpeed config that casts the model to bf16)."""
    choice = cfg.ppo.rollout_logprobs
    if choice != "auto":
        return choice == "sampling"
    return (cfg.mixed_precision == "no" and not models.is_quantised(policy)
            and all(p.dtype == torch.float32 for p in policy.parameters() if p.is_floating_point()))


def minibatch_rows(rows: int, minibatches: int, offset: int = 0,
                   generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """This process's `rows` rollout rows, global rows [offset, offset + rows), split into `minibatches`.

    Each block of `minibatches` consecutive global rows gives one row to each minibatch, by a permutation
    drawn per block. A process's slice is a whole number of blocks, so minibatch k holds the same global
    rows, and as many from every process, with 1 process or N. The rollout order is already shuffled by
    the prompt sampler; a minibatch is still a random sample of the batch, one row from each block."""
    blocks = (offset + rows) // minibatches
    slots = torch.stack([torch.randperm(minibatches, generator=generator) for _ in range(blocks)]).flatten()
    slots = slots[offset:offset + rows]
    return [torch.nonzero(slots == k).flatten() for k in range(minibatches)]


def trim(exp: Experience, prompt_length: int) -> Experience:
    """Cut the response columns to the longest response of these rows (at least one)."""
    width = max(1, int(exp.response_length.max()))
    cut = {"sequences": exp.sequences[:, :prompt_length + width],
           "attention_mask": exp.attention_mask[:, :prompt_length + width]}
    for name in ("action_mask", "old_logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns"):
        if getattr(exp, name) is not None:
            cut[name] = getattr(exp, name)[:, :width]
    return replace(exp, **cut)


def starting_value_head(name_or_path: str) -> ValueHead | None:
    """The value head saved beside the starting weights by an earlier PPO run; None starts a fresh one."""
    path = Path(resolve_model_path(name_or_path))
    return load_value_head(path) if (path / VALUE_HEAD_FILE).is_file() else None


def stop_ids(tokenizer, policy) -> list[int]:
    """The tokenizer's EOS and those of the generation config (chat models end a turn with their own
    token, e.g. Llama 3's <|eot_id|>); none at all is an error, since no response could end."""
    configured = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    ids = [i for i in [tokenizer.eos_token_id, *configured] if i is not None]
    return eos_ids(list(dict.fromkeys(ids)) or None)


def rollout_rows(cfg: RunConfig) -> int:
    """Rollouts per iteration over all processes: prompts x responses per prompt."""
    return cfg.ppo.rollout_batch_size * cfg.ppo.group_size


def check_sizes(cfg: RunConfig, num_processes: int) -> int:
    """Minibatches per rollout batch; every division exact, so each optimizer step sees as many rows."""
    ppo, batch = cfg.ppo, cfg.batch
    if cfg.reference.mode == "precomputed":
        raise ConfigError("reference.mode=precomputed cannot serve PPO: the responses are new every iteration; "
                          "use reference.mode=copy, or disabled with LoRA")
    estimator = advantage_estimator(cfg)
    if ppo.group_size < estimator.min_group_size:
        raise ConfigError(f"the {estimator.name} advantage compares each response with the others of its group: "
                          f"set ppo.group_size to {estimator.min_group_size} or more (got {ppo.group_size})")
    if ppo.critic and not estimator.needs_critic:
        raise ConfigError(f"ppo.critic={ppo.critic!r} is a value function, which the {estimator.name} advantage "
                          "does not use; unset it, or set ppo.advantage=gae")
    if rollout_rows(cfg) % batch.global_batch_size:
        rows = (f"ppo.rollout_batch_size={ppo.rollout_batch_size}" if ppo.group_size == 1 else
                f"ppo.rollout_batch_size x ppo.group_size = {rollout_rows(cfg)}")
        raise ConfigError(f"{rows} must be a multiple of batch.global_batch_size={batch.global_batch_size} "
                          "(the PPO minibatch, in rollouts)")
    if ppo.rollout_batch_size % num_processes:
        raise ConfigError(f"ppo.rollout_batch_size={ppo.rollout_batch_size} must divide among the "
                          f"{num_processes} processes (each samples whole groups of its own prompts)")
    batch.accumulation_steps(num_processes)
    return rollout_rows(cfg) // batch.global_batch_size


def build_scorer(cfg: RunConfig, accelerator: Accelerator) -> Scorer:
    """Reward functions and reward models (frozen, each with its own tokenizer) from `ppo.rewards`, or
    `reward_model:` alone when that list is empty."""
    from engine.ppo_config import RewardSourceConfig

    ppo = cfg.ppo
    specs = ppo.rewards
    if not specs:
        if cfg.reward_model is None:
            raise ConfigError("PPO needs a reward: set ppo.rewards (reward functions or models) or reward_model")
        specs = (RewardSourceConfig(name="reward_model", model=cfg.reward_model.name_or_path),)
    base = cfg.reward_model or replace(cfg.model, lora=replace(cfg.model.lora, enabled=False))
    sources = reward_sources(specs, base, cfg.data.prompt_format, ppo.rollout_micro_batch_size, accelerator.device)
    return Scorer(sources, normalize=ppo.normalize_scores, clip=ppo.score_clip,
                  missing_eos_penalty=ppo.missing_eos_penalty, max_skipped_fraction=ppo.max_skipped_fraction,
                  all_gather=lambda t: accelerator.gather(t.to(accelerator.device)).cpu())


def reward_sources(specs, base: ModelConfig, prompt_format: str, micro_batch_size: int,
                   device) -> list[RewardFunction | RewardModel]:
    """The reward functions and frozen reward models (each with its own tokenizer) of `specs`, a sequence of
    RewardSourceConfig; a model loads as `base` (dtype, quantisation) with its path. engine.rest scores its
    Grow samples with these too."""
    sources = []
    for spec in specs:
        if spec.function is not None:
            sources.append(RewardFunction(spec.name, load_reward_function(spec.function), spec.weight, spec.kwargs,
                                          spec.timeout_s))
            continue
        if spec.judge is not None:
            sources.append(judge_source(spec, device=device, micro_batch_size=micro_batch_size))
            continue
        model_cfg = replace(base, name_or_path=spec.model)
        model = _to_device(models.load_reward_model(model_cfg, for_training=False), device)
        tokenizer = models.load_tokenizer(model_cfg)
        fmt = default_format(tokenizer, prompt_format, spec.template)
        # a chat template that writes BOS itself must not get a second one from the tokenizer
        bos_in_text = bool(tokenizer.bos_token) and fmt("", "").startswith(tokenizer.bos_token)
        encode = None if spec.template is not None else reward_pair_encoder(
            DataConfig(prompt_format=prompt_format, max_length=spec.max_length, max_prompt_length=None), tokenizer)
        sources.append(RewardModel(spec.name, model, tokenizer, fmt, spec.weight, spec.max_length,
                                   micro_batch_size, add_special_tokens=not bos_in_text, encode=encode))
    return sources


def judge_source(spec, *, device, micro_batch_size: int) -> JudgeReward:
    """An AI judge of `ppo.rewards` (engine.ppo_config.RewardSourceConfig.judge), loaded once onto `device`."""
    from engine.label import SCORE_TEMPLATE, load_judge, read_template

    judge = load_judge(spec.judge, labels=spec.labels, judge_format=spec.judge_format, device=device,
                       micro_batch_size=micro_batch_size)
    return JudgeReward(spec.name, judge, read_template(spec.judge_template or SCORE_TEMPLATE),
                       Path(spec.constitution).read_text().strip(), spec.values(), spec.weight)


def _to_device(model, device):
    """Frozen models that bitsandbytes quantised are already placed; others move to this process's device."""
    return model if models.is_quantised(model) else model.to(device)
