"""PPO: one iteration of the loop against a plain per-row reference, the KL controller, resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from data import DataConfig, build_datasets, make_collator
from data.synthetic import judge
from data.tiny_tokenizer import build_tokenizer
from engine import lifecycle, optim
from engine.config import OptimConfig, RunConfig, from_dict
from engine.logging import RunLogger
from engine.loops.ppo import minibatch_rows, ppo_update, rollout, save_value_parts
from losses import AdaptiveKLController, bind_objective, masked_whiten
from rollout.generation import SamplingConfig
from rollout.online import global_moments
from rollout.scoring import RewardFunction, Scorer
from rollout.value_head import ActorCritic


def run_config(raw: dict) -> RunConfig:
    return from_dict(RunConfig, raw)


def small_llama(tokenizer, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # raise the EOS logit by about 1.5, so some responses end early and some do not
        ids = torch.randint(10, len(tokenizer), (16, 20), generator=torch.Generator().manual_seed(0))
        mean_hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1].mean((0, 1))
        model.lm_head.weight[tokenizer.eos_token_id] = 1.5 * mean_hidden / mean_hidden.square().sum()
    return model


def judge_scores(prompts, responses, **fields):
    return [judge(p, r) for p, r in zip(prompts, responses)]


TEMPERATURE, KL_COEF, GAMMA, LAM = 0.7, 0.1, 0.9, 0.8
CLIP, VALUE_CLIP, VF_COEF, ENTROPY_COEF, EOS_PENALTY, LR = 0.2, 0.2, 0.5, 0.01, 0.5, 0.05


def plain_row(model, head, prompt_ids, response_ids):
    """Per-token log-probs (temperature-scaled), entropies and values of one unpadded sequence."""
    seq = torch.tensor([prompt_ids + response_ids])
    out = model(input_ids=seq, output_hidden_states=True)
    start, n = len(prompt_ids) - 1, len(response_ids)
    logits = out.logits[0, start:start + n] / TEMPERATURE
    logp = logits.log_softmax(-1)
    logprobs = logp.gather(-1, torch.tensor(response_ids)[:, None])[:, 0]
    entropy = -(logp.exp() * logp).sum(-1)
    values = head(out.hidden_states[-1][0, start:start + n]) if head is not None else None
    return logprobs, entropy, values


def test_one_ppo_iteration_equals_a_plain_per_row_reference():
    """Rollout (score with missing-EOS penalty, k3 KL shaping, GAE with gamma and lambda, whitening) and one
    epoch of two minibatches, each 2 micro-batches x 2 accumulation, against a plain loop over unpadded rows."""
    tokenizer = build_tokenizer()
    data = build_datasets("prompt", DataConfig(path="synthetic", max_samples=8), tokenizer, log=None)
    batch = make_collator("prompt", tokenizer)([data.train[i] for i in range(8)])
    prompts_ids = [[t for t, m in zip(ids, mask) if m] for ids, mask in zip(batch["input_ids"].tolist(),
                                                                             batch["attention_mask"].tolist())]
    assert len({len(p) for p in prompts_ids}) > 1  # left padding is exercised

    cfg = run_config({
        "objective": {"name": "ppo", "clip_coef": CLIP},
        "optim": {"lr": LR, "max_grad_norm": None, "scheduler": "constant"},
        "batch": {"global_batch_size": 4, "micro_batch_size": 2},
        "ppo": {"rollout_batch_size": 8, "rollout_micro_batch_size": 3, "max_new_tokens": 6, "epochs": 1,
                "temperature": TEMPERATURE, "kl_coef": KL_COEF, "kl_estimator": "k3", "gamma": GAMMA, "lam": LAM,
                "value_clip": VALUE_CLIP, "vf_coef": VF_COEF, "entropy_coef": ENTROPY_COEF,
                "missing_eos_penalty": EOS_PENALTY},
    })
    actor_critic = ActorCritic(small_llama(tokenizer, 0))
    torch.nn.init.normal_(actor_critic.value_head.summary.weight, std=0.1)  # a fresh head is all zeros
    reference = small_llama(tokenizer, 1).eval()
    before = copy.deepcopy(actor_critic)
    scorer = Scorer([RewardFunction("judge", judge_scores)], missing_eos_penalty=EOS_PENALTY)
    sampling = SamplingConfig(max_new_tokens=6, temperature=TEMPERATURE)

    torch.manual_seed(0)
    exp, responses, _, _ = rollout(batch, actor_critic=actor_critic, reference=reference, scorer=scorer,
                                   tokenizer=tokenizer, sampling=sampling, cfg=cfg, kl_coef=KL_COEF)
    P = batch["input_ids"].shape[1]
    lengths = exp.action_mask.sum(-1).tolist()
    assert 0 < exp.no_eos.sum() < 8

    # Plain reference of steps 2-5, row by row in float64.
    rows = []
    with torch.no_grad():
        for i, prompt_ids in enumerate(prompts_ids):
            response_ids = exp.sequences[i, P:P + lengths[i]].tolist()
            no_eos = tokenizer.eos_token_id not in response_ids
            text = tokenizer.decode(response_ids, skip_special_tokens=True)
            assert text == responses[i]
            score = judge(batch["prompt"][i], text) - EOS_PENALTY * no_eos
            old, _, values = plain_row(before.policy, before.value_head, prompt_ids, response_ids)
            ref, _, _ = plain_row(reference, None, prompt_ids, response_ids)
            old, ref, values = old.double(), ref.double(), values.double()
            log_r = ref - old
            kl = torch.exp(log_r) - 1 - log_r  # k3
            rewards = -KL_COEF * kl
            rewards[-1] += score
            advantages = torch.zeros_like(rewards)
            next_adv, next_value = 0.0, 0.0
            for t in reversed(range(len(rewards))):
                delta = rewards[t] + GAMMA * next_value - values[t]
                next_adv = delta + GAMMA * LAM * next_adv
                advantages[t], next_value = next_adv, values[t]
            rows.append(dict(prompt=prompt_ids, response=response_ids, old=old, values=values, rewards=rewards,
                             advantages=advantages, returns=advantages + values, score=score))
    flat = torch.cat([r["advantages"] for r in rows])
    mean, var = flat.mean(), flat.var(unbiased=False)
    for i, r in enumerate(rows):
        n = lengths[i]
        r["whitened"] = (r["advantages"] - mean) / torch.sqrt(var + 1e-8)
        assert exp.scores[i].item() == pytest.approx(r["score"], abs=1e-6)
        for name, mine in (("rewards", exp.rewards), ("returns", exp.returns), ("whitened", exp.advantages),
                           ("old", exp.old_logprobs), ("values", exp.values)):
            torch.testing.assert_close(mine[i, :n].double(), r[name], rtol=0, atol=2e-5, msg=name)
            assert not mine[i, n:].any()

    # Step 6 by the loop: one epoch, two minibatches of 4 rows, each 2 micro-batches of 2 accumulated.
    _, loss_fn = bind_objective("ppo", {"clip_coef": CLIP})
    accelerator = Accelerator(cpu=True, gradient_accumulation_plugin=GradientAccumulationPlugin(
        num_steps=2, sync_with_dataloader=False), step_scheduler_with_optimizer=False)
    optimizer = torch.optim.SGD(actor_critic.parameters(), lr=LR)
    scheduler = optim.build_scheduler(optimizer, OptimConfig(scheduler="constant"), 2)
    model, optimizer = accelerator.prepare(actor_critic, optimizer)
    torch.manual_seed(123)
    metrics = ppo_update(exp, accelerator=accelerator, actor_critic=model, optimizer=optimizer,
                         scheduler=scheduler, loss_fn=loss_fn, cfg=cfg)

    # The same step by hand: token-mean losses over each whole minibatch, one SGD step each.
    torch.manual_seed(123)
    plan = minibatch_rows(8, 2)
    plain_opt = torch.optim.SGD(before.parameters(), lr=LR)
    pg_sum = tokens_sum = 0.0
    for minibatch in plan:
        tokens = sum(lengths[i] for i in minibatch.tolist())
        loss = 0.0
        for i in minibatch.tolist():
            r = rows[i]
            logprobs, entropy, values = plain_row(before.policy, before.value_head, r["prompt"], r["response"])
            ratio = torch.exp(logprobs.double() - r["old"])
            adv = r["whitened"]
            pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
            clipped = r["values"] + (values.double() - r["values"]).clamp(-VALUE_CLIP, VALUE_CLIP)
            vf = 0.5 * torch.maximum((values.double() - r["returns"]) ** 2, (clipped - r["returns"]) ** 2)
            loss = loss + (pg + VF_COEF * vf - ENTROPY_COEF * entropy.double()).sum() / tokens
            pg_sum += float(pg.detach().sum())
        tokens_sum += tokens
        loss.backward()
        plain_opt.step()
        plain_opt.zero_grad()

    assert metrics["loss/policy"] == pytest.approx(pg_sum / tokens_sum, abs=1e-5)
    assert metrics["policy/epochs"] == 1
    for (name, mine), (_, plain) in zip(actor_critic.named_parameters(), before.named_parameters()):
        torch.testing.assert_close(mine, plain, rtol=0, atol=1e-6, msg=name)
    moved = max((a - b).abs().max() for a, b in zip(actor_critic.parameters(), small_llama(tokenizer, 0).parameters()))
    assert moved > 1e-3  # the update did something


def test_minibatches_hold_the_same_global_rows_on_one_process_or_several():
    """16 rollout rows in 4 minibatches: every block of 4 consecutive rows gives one row to each minibatch, so
    2 or 4 processes (slices of 8 or 4 rows, drawing from generators seeded alike) assemble the same ones."""
    one = [rows.tolist() for rows in minibatch_rows(16, 4, 0, torch.Generator().manual_seed(7))]
    assert sorted(sum(one, [])) == list(range(16))
    assert all(sorted(row // 4 for row in rows) == [0, 1, 2, 3] for rows in one)
    assert one != [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]  # shuffled within blocks
    for processes in (2, 4):
        local = 16 // processes
        parts = [minibatch_rows(local, 4, p * local, torch.Generator().manual_seed(7)) for p in range(processes)]
        joined = [sorted(row + p * local for p in range(processes) for row in parts[p][k].tolist()) for k in range(4)]
        assert joined == one
    again = [rows.tolist() for rows in minibatch_rows(16, 4, 0, torch.Generator().manual_seed(8))]
    assert again != one


def test_advantages_split_over_processes_whiten_as_the_whole_batch():
    """The halves of a batch whitened with `global_moments` over both equal the whole batch whitened at once
    (population variance); each half's own statistics do not. The stand-in for the all-reduce adds the other
    half's sums, in the order `global_moments` asks: count, sum, squared deviations from the shared mean."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(6, 5, generator=gen) * 2 + 3
    mask = torch.arange(5)[None, :] < torch.tensor([5, 2, 4, 1, 3, 5])[:, None]
    whole = masked_whiten(values, mask, unbiased=False)
    mean = values.double()[mask].mean()
    halves = (slice(0, 3), slice(3, 6))
    for rows, other in zip(halves, reversed(halves)):
        v, m = values[other].double(), mask[other]
        sums = iter([m.sum().double(), v[m].sum(), (v[m] - mean).square().sum()])
        got_mean, got_var = global_moments(values[rows], mask[rows], lambda t, sums=sums: t + next(sums))
        assert got_mean.item() == pytest.approx(mean.item(), rel=1e-12)
        assert got_var.item() == pytest.approx(values.double()[mask].var(unbiased=False).item(), rel=1e-12)
        torch.testing.assert_close(masked_whiten(values[rows], mask[rows], mean=got_mean, var=got_var), whole[rows],
                                   rtol=0, atol=1e-6)
        assert not torch.allclose(masked_whiten(values[rows], mask[rows], unbiased=False), whole[rows], atol=1e-3)


def test_sharded_weights_are_saved_from_the_gathered_state_dict(tmp_path, monkeypatch):
    """Under FSDP or ZeRO-3 the unwrapped modules hold shards or empty placeholders, so the final save must
    write the gathered state dict: with `shards_weights` forced true and a gathered dict that differs from
    the modules (every tensor + 1), the policy, the value head and the critic on disk are the gathered ones."""
    tokenizer = build_tokenizer()
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(ActorCritic(small_llama(tokenizer, 0), critic=small_llama(tokenizer, 1)))
    gathered = {key: value.detach() + 1 for key, value in accelerator.unwrap_model(model).state_dict().items()}
    calls = []
    monkeypatch.setattr(lifecycle, "shards_weights", lambda acc: True)
    monkeypatch.setattr(accelerator, "get_state_dict", lambda m: calls.append(m) or gathered)
    cfg = run_config({"output_dir": str(tmp_path), "objective": {"name": "ppo"}})
    logger = RunLogger(tmp_path, total_steps=1, start_step=0, enabled=True, progress_bar=False, desc="ppo")

    result = lifecycle.save_final(accelerator, cfg, model, tokenizer, logger, 1, part="policy",
                                  extras=save_value_parts)

    assert calls == [model]  # gathered once, for every part
    written = {"value_head": load_file(str(result.final_dir / "value_head.safetensors")),
               "policy": load_file(str(result.final_dir / "model.safetensors")),
               "critic": load_file(str(result.final_dir / "critic" / "model.safetensors"))}
    for part, tensors in written.items():
        assert tensors, part
        for key, value in tensors.items():
            torch.testing.assert_close(value, gathered[f"{part}.{key}"], rtol=0, atol=0, msg=f"{part}.{key}")


def test_adaptive_kl_controller_moves_the_coefficient_toward_the_target():
    """Ziegler et al.: value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon. With target 1,
    horizon 100, n 10: KL 1.1 gives x1.01, KL 3 is clipped to x1.02, KL 0.5 gives x0.98."""
    controller = AdaptiveKLController(0.1, target=1.0, horizon=100)
    controller.update(1.1, n_steps=10)
    assert controller.value == pytest.approx(0.1 * 1.01, rel=1e-12)
    controller.update(3.0, n_steps=10)
    assert controller.value == pytest.approx(0.1 * 1.01 * 1.02, rel=1e-12)
    controller.update(0.5, n_steps=10)
    assert controller.value == pytest.approx(0.1 * 1.01 * 1.02 * 0.98, rel=1e-12)
    # above target the coefficient only grows, below it only shrinks, and the target is a fixed point
    up, down, still = (AdaptiveKLController(0.1, 1.0, 100) for _ in range(3))
    for _ in range(20):
        up.update(2.0, 10)
        down.update(0.2, 10)
        still.update(1.0, 10)
    assert up.value == pytest.approx(0.1 * 1.02**20) and down.value == pytest.approx(0.1 * 0.98**20)
    assert still.value == 0.1
    assert math.isfinite(up.value)



def test_a_run_starting_from_a_ppo_output_keeps_its_value_head(tmp_path):
    from engine.loops.ppo import starting_value_head
    from rollout.value_head import ValueHead, save_value_head

    head = ValueHead(8)
    torch.nn.init.normal_(head.summary.weight)
    save_value_head(head, tmp_path)
    torch.testing.assert_close(starting_value_head(str(tmp_path)).summary.weight, head.summary.weight)
    (tmp_path / "sft").mkdir()
    assert starting_value_head(str(tmp_path / "sft")) is None


def test_sizes_and_reference_mode_are_checked_before_any_model_loads():
    from engine.config import ConfigError
    from engine.loops.ppo import check_sizes

    cfg = run_config({"batch": {"global_batch_size": 8, "micro_batch_size": 2}, "ppo": {"rollout_batch_size": 32}})
    assert check_sizes(cfg, num_processes=2) == 4
    with pytest.raises(ConfigError, match="must be a multiple of batch.global_batch_size=8"):
        check_sizes(run_config({"batch": {"global_batch_size": 8}, "ppo": {"rollout_batch_size": 12}}), 1)
    with pytest.raises(ConfigError, match="precomputed cannot serve PPO"):
        check_sizes(run_config({"reference": {"mode": "precomputed"}}), 1)


def test_rollout_logprobs_come_from_sampling_only_where_they_equal_a_forward():
    from engine.config import ConfigError
    from engine.loops.ppo import use_sampling_logprobs

    tokenizer = build_tokenizer()
    policy = small_llama(tokenizer, 0)
    assert use_sampling_logprobs(run_config({}), policy)  # auto, float32
    assert not use_sampling_logprobs(run_config({"mixed_precision": "bf16"}), policy)
    assert not use_sampling_logprobs(run_config({}), small_llama(tokenizer, 0).to(torch.bfloat16))
    quantised = small_llama(tokenizer, 0)
    quantised.is_loaded_in_4bit = True  # as bitsandbytes marks a 4-bit model (its LoRA weights stay float32)
    assert not use_sampling_logprobs(run_config({}), quantised)
    assert not use_sampling_logprobs(run_config({"ppo": {"rollout_logprobs": "recompute"}}), policy)
    assert use_sampling_logprobs(run_config({"mixed_precision": "bf16", "ppo": {"rollout_logprobs": "sampling"}}), policy)
    with pytest.raises(ConfigError, match="rollout_logprobs='cached' is not one of"):
        run_config({"ppo": {"rollout_logprobs": "cached"}})


def test_rollout_logprobs_source_does_not_change_the_iteration():
    """The experience of one rollout is the same (within float32 rounding) whichever source the old log-probs
    and the shared-trunk values come from; the sampled tokens are the same draws, and "sampling" runs no policy
    forward beyond the decoding steps (the reference is a separate model)."""
    tokenizer = build_tokenizer()
    data = build_datasets("prompt", DataConfig(path="synthetic", max_samples=6), tokenizer, log=None)
    batch = make_collator("prompt", tokenizer)([data.train[i] for i in range(6)])
    results, full_forwards = {}, {}
    for choice in ("sampling", "recompute"):
        cfg = run_config({"ppo": {"rollout_batch_size": 6, "rollout_micro_batch_size": 4, "max_new_tokens": 5,
                                  "rollout_logprobs": choice}})
        actor_critic = ActorCritic(small_llama(tokenizer, 0))
        torch.nn.init.normal_(actor_critic.value_head.summary.weight, generator=torch.Generator().manual_seed(0))
        calls = []  # policy forwards over whole sequences (decoding steps pass use_cache=True)

        def count(module, args, kwargs, calls=calls):
            if kwargs.get("use_cache") is False:
                calls.append(1)

        actor_critic.policy.register_forward_pre_hook(count, with_kwargs=True)
        torch.manual_seed(0)
        results[choice] = rollout(batch, actor_critic=actor_critic, reference=small_llama(tokenizer, 1).eval(),
                                  scorer=Scorer([RewardFunction("judge", judge_scores)]), tokenizer=tokenizer,
                                  sampling=SamplingConfig(max_new_tokens=5, micro_batch_size=4), cfg=cfg,
                                  kl_coef=0.05)[0]
        full_forwards[choice] = len(calls)
    assert full_forwards == {"sampling": 0, "recompute": 2}  # 6 rows in micro-batches of 4
    fast, slow = results["sampling"], results["recompute"]
    assert torch.equal(fast.sequences, slow.sequences)
    for name in ("old_logprobs", "values", "rewards", "advantages", "returns"):
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name), rtol=0, atol=2e-5, msg=name)
    assert fast.values.abs().max() > 1e-3
