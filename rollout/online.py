"""Steps 1-5 of an online iteration, for PPO and the critic-free family alike: sample, score, score the
samples under the rollout policy and the reference, reward, estimate advantages.

  1. sample G responses per prompt (`ppo.group_size`; PPO's G is 1);     rollout.generation
     with DAPO's dynamic sampling, groups whose rewards all tie are dropped and more prompts sampled;
  2. score them, minus the missing-EOS and soft overlong penalties;        rollout.scoring, losses
  3. log-probs of the rollout policy and the reference, values;          rollout.experience
  4. per-token rewards: the score on the last token, minus kl_coef x KL;  losses.kl_shaped_rewards
  5. advantages by the estimator the objective names (GAE, GRPO, RLOO, ...), whitened over every process's
     tokens where the estimator asks for it.                              losses.advantages

`ppo` is the run config's `ppo:` section (engine.ppo_config.PPOConfig), read by attribute. A group's G rows are
consecutive and on one process, so every group statistic is local; only whitening and the score normaliser
reduce over processes. With G > 1 each micro-batch of rows is sampled from its own generator, seeded by the
iteration and the global index of its first row, so one process and several sample the same responses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from losses import kl_shaped_rewards, masked_mean, masked_sum, masked_whiten, soft_overlong_penalty
from losses.advantages import Estimator
from rollout.experience import Experience, make_experience
from rollout.generation import Generation, concat_generations, finished_locally, generate
from rollout.groups import group_stats, informative_groups, overlong_filter, repeat_prompts
from rollout.scoring import Scorer
from rollout.value_head import ActorCritic


@dataclass
class Rollout:
    experience: Experience
    prompts: list[str]  # (B,) the prompt of each row (a group's G rows repeat it)
    responses: list[str]  # (B,) decoded responses
    stats: dict[str, torch.Tensor]  # means over this process's rows (weight: rows), for MeanMetrics
    times: dict[str, float]  # seconds on this process: generation, scoring, experience


def global_moments(values: torch.Tensor, mask: torch.Tensor,
                   all_reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population variance of `values` (B, R) over the `mask` of every process, in float64.

    Two passes (the mean, then squared deviations from it) rather than sums of squares, which cancel
    catastrophically when the mean is large against the spread."""
    reduce = all_reduce or (lambda t: t)
    values = values.double()
    count = reduce(mask.sum().double()).clamp_min(1)
    mean = reduce(masked_sum(values, mask)) / count
    var = reduce(masked_sum((values - mean).square(), mask)) / count
    return mean, var


def select_rows(gen: Generation, index: torch.Tensor) -> Generation:
    """The rows `index` of a Generation."""
    return replace(gen, sequences=gen.sequences[index], attention_mask=gen.attention_mask[index],
                   action_mask=gen.action_mask[index], no_eos=gen.no_eos[index],
                   logprobs=None if gen.logprobs is None else gen.logprobs[index],
                   values=None if gen.values is None else gen.values[index])


def sample(policy, batch: dict, sampling, *, tokenizer, eos_token_id, finished, with_logprobs: bool, value_head,
           rollout_cfg, seed: int | None = None, row_offset: int = 0) -> Generation:
    """Responses to the batch's left-padded prompts. With `seed`, micro-batch by micro-batch, each from a
    generator seeded by `seed` and the global index of its first row (`row_offset` + i), each prompt cut to
    the micro-batch's longest, so the tokens drawn depend on neither the process count nor the padding."""
    common = dict(eos_token_id=eos_token_id, pad_token_id=tokenizer.pad_token_id, finished=finished,
                  with_logprobs=with_logprobs, value_head=value_head, rollout=rollout_cfg)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if seed is None:
        return generate(policy, ids, mask, sampling, **common)
    parts = []
    for i in range(0, len(ids), sampling.micro_batch_size):
        rows = slice(i, i + sampling.micro_batch_size)
        width = int(mask[rows].sum(-1).max())
        generator = torch.Generator(device=ids.device).manual_seed((seed * 1_000_003 + row_offset + i) % 2**63)
        parts.append(generate(policy, ids[rows, -width:], mask[rows, -width:], sampling, generator=generator,
                              **common))
    return concat_generations(parts, tokenizer.pad_token_id)


def collect(batch: dict, *, ppo, rollout_cfg, actor_critic: ActorCritic, reference, scorer: Scorer, tokenizer,
            estimator: Estimator, kl_coef: float, sampling=None, with_reference: bool = True, keep_logprobs: bool = False,
            eos_token_id=None, finished: Callable[[torch.Tensor], bool] = finished_locally,
            all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
            next_batch: Callable[[], dict] | None = None, seed: int | None = None, row_offset: int = 0) -> Rollout:
    """Steps 1-5 on one process's prompts (see the module docstring).

    Args:
        batch: a prompt collator's batch (input_ids, attention_mask, prompt, extras) of P prompts.
        sampling: the SamplingConfig; None: `ppo.sampling()`.
        actor_critic: the unwrapped policy, with its value head when the estimator needs one.
        reference: the frozen reference model, or None for the policy with its adapter off.
        with_reference: False when no KL is used anywhere: no reference forward, KL 0.
        keep_logprobs: keep the sampling pass's log-probs (`ppo.rollout_logprobs` resolved).
        all_reduce: sums a tensor over the processes; whitening, and how many dynamic-sampling rounds to run,
            then use every process's rows.
        next_batch: more prompts for dynamic sampling (`ppo.dynamic_sampling`).
        seed, row_offset: see `sample`; used when `ppo.group_size` > 1.
    """
    G = ppo.group_size
    sampling = sampling or ppo.sampling()
    timer = time.perf_counter()
    value_head = actor_critic.value_head if keep_logprobs and actor_critic.critic is None else None
    if not estimator.needs_critic:
        value_head = None

    def draw(prompts: dict, round_: int):
        rows = repeat_prompts(prompts, G) if G > 1 else prompts
        gen = sample(actor_critic.policy, rows, sampling, tokenizer=tokenizer, eos_token_id=eos_token_id,
                     finished=finished, with_logprobs=keep_logprobs, value_head=value_head, rollout_cfg=rollout_cfg,
                     seed=None if G == 1 else seed * 31 + round_, row_offset=row_offset)
        texts = tokenizer.batch_decode(gen.responses.masked_fill(~gen.action_mask, tokenizer.pad_token_id),
                                       skip_special_tokens=True)
        return rows, gen, texts

    def score(rows: dict, gen: Generation, texts: list[str]):
        extras = rows.get("extras") or [{} for _ in texts]
        fields = {key: [row.get(key) for row in extras] for key in dict.fromkeys(k for row in extras for k in row)}
        scored = scorer(rows["prompt"], texts, no_eos=gen.no_eos, fields=fields)
        scores = scored.scores.to(gen.sequences.device)
        if ppo.overlong_buffer:  # DAPO's soft overlong punishment, on the length in tokens
            scores = scores + soft_overlong_penalty(gen.response_length, max_length=ppo.max_new_tokens,
                                                    buffer=ppo.overlong_buffer, factor=ppo.overlong_penalty)
        return scores, scored

    # 1-2. Sample and score; with dynamic sampling, keep the groups whose rewards differ and draw more prompts
    # until this process has P of them, for as many rounds as the process that needs the most.
    rows, gen, texts = draw(batch, 0)
    scoring_time = time.perf_counter()
    scores, scored = score(rows, gen, texts)
    scoring_time = time.perf_counter() - scoring_time
    stats: dict[str, torch.Tensor] = {}
    if ppo.dynamic_sampling:
        groups = len(batch["prompt"])
        pool = [(rows, gen, texts, scores, scored)]
        keep = [informative_groups(scores, G, valid=scored.valid)]
        rounds = 1
        while rounds < ppo.max_sampling_rounds and next_batch is not None:
            short = torch.tensor(float(sum(int(k.sum()) for k in keep) < groups))
            if float((all_reduce or (lambda t: t))(short)) == 0:
                break
            more = draw(next_batch(), rounds)
            scored_more = score(*more)
            pool.append((*more, *scored_more))
            keep.append(informative_groups(scored_more[0], G, valid=scored_more[1].valid))
            rounds += 1
        rows, gen, texts, scores, scored, sampled, dropped = _fill(pool, keep, groups, G, tokenizer.pad_token_id)
        stats["groups/filtered"] = torch.tensor(dropped / max(sampled, 1))
        stats["rollout/sampling_rounds"] = torch.tensor(float(rounds))
    generation_time = time.perf_counter() - timer - scoring_time
    timer = time.perf_counter()

    # 3. Log-probs of the rollout policy and the reference, and values when there is a value function.
    exp = make_experience(gen, scores, actor_critic=actor_critic, reference=reference, temperature=ppo.temperature,
                          micro_batch_size=ppo.rollout_micro_batch_size, valid=scored.valid,
                          with_values=estimator.needs_critic, with_reference=with_reference)
    # 4. r_t = -kl_coef KL_t, plus the score on the last response token.
    rewards, kl = kl_shaped_rewards(exp.scores, exp.old_logprobs, exp.ref_logprobs, exp.action_mask,
                                    kl_coef=kl_coef, estimator=ppo.kl_estimator)
    # 5. Advantages; whitened over the tokens of every process, population variance as lm-human-preferences.
    advantages, returns, adv_metrics = estimator.fn(rewards, exp.action_mask, group_size=G, values=exp.values,
                                                    gamma=ppo.gamma, lam=ppo.lam)
    if estimator.whiten and ppo.whiten_advantages:
        mean, var = global_moments(advantages, exp.action_mask, all_reduce)
        advantages = masked_whiten(advantages, exp.action_mask, mean=mean, var=var)
    # DAPO's overlong filtering: a truncated response counts in its group's baseline but not in the loss.
    action_mask = overlong_filter(exp.action_mask, exp.no_eos) if ppo.overlong_filter else exp.action_mask
    exp = replace(exp, action_mask=action_mask, rewards=rewards, advantages=advantages * action_mask,
                  returns=returns)

    valid = exp.action_mask.any(-1)
    stats.update({
        **{k: torch.tensor(v) for k, v in scored.metrics.items() if k.startswith("objective/")},
        "objective/rlhf_reward": masked_mean(rewards.sum(-1), valid),
        "rollout/response_length": gen.response_length.float().mean(),
        "rollout/no_eos": gen.no_eos.float().mean(),
        "rollout/skipped": (~scored.valid).float().mean(),
    })
    if with_reference:
        stats["objective/kl"] = masked_mean(kl.sum(-1), valid)
    if estimator.needs_critic:
        stats["val/explained_var"] = 1 - (global_moments(returns - exp.values, exp.action_mask, all_reduce)[1]
                                          / global_moments(returns, exp.action_mask, all_reduce)[1].clamp_min(1e-8))
        stats["val/mean"] = masked_mean(exp.values, exp.action_mask)
    if G > 1:
        stats.update(group_stats(scores, G, solved_threshold=ppo.solved_threshold, valid=scored.valid))
        stats.update({k: v for k, v in adv_metrics.items()})
    if ppo.overlong_filter:
        stats["rollout/overlong_filtered"] = (gen.action_mask.any(-1) & ~valid).float().mean()
    times = {"time/generation": generation_time, "time/scoring": scoring_time,
             "time/experience": time.perf_counter() - timer}
    return Rollout(exp, list(rows["prompt"]), texts, stats, times)


def _fill(pool, keep, groups: int, G: int, pad_token_id: int):
    """The first `groups` informative groups of the rounds in `pool`, topped up with tied groups (which carry
    no advantage) when the rounds ran out; also how many groups were sampled, and how many of them tied."""
    chosen, fallback = [], []
    for r, informative in enumerate(keep):
        for g, ok in enumerate(informative.tolist()):
            (chosen if ok else fallback).append((r, g))
    sampled = sum(len(k) for k in keep)
    picked = (chosen + fallback)[:groups]
    by_round: dict[int, list[int]] = {}
    for r, g in sorted(picked):
        by_round.setdefault(r, []).extend(range(g * G, (g + 1) * G))
    gens, texts, scores, valid, prompts, extras = [], [], [], [], [], []
    for r, index in by_round.items():
        rows, gen, round_texts, round_scores, scored = pool[r]
        index_t = torch.tensor(index)
        gens.append(select_rows(gen, index_t.to(gen.sequences.device)))
        texts += [round_texts[i] for i in index]
        scores.append(round_scores[index_t.to(round_scores.device)])
        valid.append(scored.valid[index_t])
        prompts += [rows["prompt"][i] for i in index]
        extras += [(rows.get("extras") or [{}] * len(rows["prompt"]))[i] for i in index]
    merged = pool[0][4]
    scored = replace(merged, valid=torch.cat(valid))
    rows = {"prompt": prompts, "extras": extras}
    return rows, concat_generations(gens, pad_token_id), texts, torch.cat(scores), scored, sampled, len(fallback)
