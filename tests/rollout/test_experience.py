import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from losses import kl_shaped_rewards
from rollout.experience import make_experience
from rollout.generation import Generation, SamplingConfig, generate
from rollout.value_head import ActorCritic
from tests.rollout.conftest import left_pad, random_head, tiny_causal_lm

PAD, EOS = 3, 2


def hand_generation(pad: int) -> Generation:
    """Three left-padded prompts of different lengths; responses ending in EOS at index 2, without EOS
    (budget 5), and EOS as the first token."""
    prompts = [[1, 10, 11, 12], [1, 20], [1, 30, 31]]
    responses = [[40, 41, EOS, pad, pad], [42, 43, 44, 45, 46], [EOS, pad, pad, pad, pad]]
    ids, mask = left_pad(prompts, PAD)
    action_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    return Generation(sequences=torch.cat([ids, torch.tensor(responses)], 1),
                      attention_mask=torch.cat([mask.bool(), action_mask], 1), action_mask=action_mask,
                      no_eos=torch.tensor([False, True, False]), prompt_length=4)


def placed_scores(scores: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Where the PPO loop's reward shaping puts each row's score: kl_shaped_rewards with no KL term."""
    zeros = torch.zeros(action_mask.shape)
    return kl_shaped_rewards(scores, zeros, zeros, action_mask, kl_coef=0.0)[0]


@pytest.mark.parametrize("pad", [PAD, EOS])
def test_score_lands_on_the_last_real_response_token(pad):
    gen = hand_generation(pad)
    placed = placed_scores(torch.tensor([1.0, 2.0, 3.0]), gen.action_mask)
    assert placed.tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 0, 2], [3, 0, 0, 0, 0]]
    # in sequence coordinates: the EOS for rows 0 and 2, the last token for row 1
    last = gen.prompt_length + placed.argmax(-1)
    assert gen.sequences[torch.arange(3), last].tolist() == [EOS, 46, EOS]


def test_score_on_sampled_responses_lands_on_the_first_eos():
    model = tiny_causal_lm(seed=1)
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 4
    ids, mask = left_pad([[1, 5, 6, 7, 8, 9], [1, 5], [1, 7, 7]] * 4, PAD)
    gen = generate(model, ids, mask, SamplingConfig(max_new_tokens=8), eos_token_id=EOS, pad_token_id=PAD,
                   generator=torch.Generator().manual_seed(0))
    index = placed_scores(torch.ones(len(ids)), gen.action_mask).argmax(-1)
    for row, i, no_eos in zip(gen.responses.tolist(), index.tolist(), gen.no_eos.tolist()):
        assert i == (7 if no_eos else row.index(EOS))


def single_row_oracle(model, head, prompt, response):
    """Log-probs and values of one unpadded sequence with a plain full forward."""
    seq = torch.tensor([prompt + response])
    out = model(input_ids=seq, output_hidden_states=True)
    logprobs = out.logits[0, :-1].log_softmax(-1).gather(-1, seq[0, 1:, None])[:, 0]
    values = head(out.hidden_states[-1][0, :-1]) if head is not None else None
    n = len(response)
    return logprobs[-n:], (values[-n:] if values is not None else None)


def run_experience(actor_critic, reference, model_for_ref):
    prompts = [[1, 10, 11, 12, 13, 14], [1, 20], [1, 30, 31, 32]]
    ids, mask = left_pad(prompts, PAD)
    gen = generate(actor_critic.policy, ids, mask, SamplingConfig(max_new_tokens=6, temperature=0.0),
                   eos_token_id=EOS, pad_token_id=PAD)
    scores = torch.tensor([0.5, -1.0, 2.0])
    exp = make_experience(gen, scores, actor_critic=actor_critic, reference=reference, micro_batch_size=2)
    assert exp.old_logprobs.shape == exp.values.shape == gen.action_mask.shape
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            n = int(gen.response_length[i])
            response = gen.responses[i, :n].tolist()
            old, values = single_row_oracle(actor_critic.policy, actor_critic.value_head, prompt, response)
            ref, _ = single_row_oracle(model_for_ref, None, prompt, response)
            torch.testing.assert_close(exp.old_logprobs[i, :n], old, rtol=0, atol=1e-5)
            torch.testing.assert_close(exp.values[i, :n], values, rtol=0, atol=1e-5)
            torch.testing.assert_close(exp.ref_logprobs[i, :n], ref, rtol=0, atol=1e-5)
            assert not exp.old_logprobs[i, n:].any() and not exp.values[i, n:].any()
    assert torch.equal(exp.scores, scores)
    return exp


def test_experience_matches_unpadded_single_rows_with_a_reference_copy():
    policy = tiny_causal_lm(seed=0)
    reference = tiny_causal_lm(seed=5)
    exp = run_experience(ActorCritic(policy, random_head()), reference, reference)
    assert (exp.old_logprobs - exp.ref_logprobs).abs().max() > 0.1


def test_reference_with_the_adapter_disabled_is_the_base_model():
    base = tiny_causal_lm(seed=0)
    frozen = copy.deepcopy(base)
    policy = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                             init_lora_weights=False))
    actor_critic = ActorCritic(policy, random_head()).train()
    exp = run_experience(actor_critic, None, frozen)
    assert (exp.old_logprobs - exp.ref_logprobs).abs().max() > 1e-3
    assert actor_critic.training and policy.training  # the rollout's eval mode is undone
    with pytest.raises(ValueError, match="needs a peft policy"):
        run_experience(ActorCritic(tiny_causal_lm()), None, frozen)


def test_skipped_rows_leave_training_but_keep_their_place():
    policy = tiny_causal_lm()
    ids, mask = left_pad([[1, 5, 6], [1, 7]], PAD)
    gen = generate(policy, ids, mask, SamplingConfig(max_new_tokens=4), eos_token_id=EOS, pad_token_id=PAD)
    exp = make_experience(gen, torch.tensor([1.0, 0.0]), actor_critic=ActorCritic(policy), reference=policy,
                          valid=torch.tensor([True, False]))
    assert exp.action_mask[1].sum() == 0 and exp.action_mask[0].sum() == gen.action_mask[0].sum()
    assert not exp.old_logprobs[1].any() and exp.sequences.shape[0] == 2
    sub = exp.select(torch.tensor([1]))
    assert sub.sequences.shape[0] == 1 and sub.rewards is None


@pytest.mark.parametrize("critic", [False, True])
def test_experience_from_the_sampling_pass_equals_the_recomputed_one(critic):
    """Log-probs (and a shared-trunk head's values) kept while sampling, in chunks of 2 rows, give the experience
    a policy forward would: old log-probs, values and reference log-probs within 1e-5, the same masks; a skipped
    row stays 0. The kept path runs the policy only for the reference log-probs, or not at all with a frozen
    reference."""
    policy = tiny_causal_lm(seed=0)
    actor_critic = ActorCritic(policy, random_head(), critic=tiny_causal_lm(seed=7) if critic else None)
    ids, mask = left_pad([[1, 10, 11, 12, 13, 14], [1, 20], [1, 30, 31, 32], [1, 5]], PAD)
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.8, micro_batch_size=2)
    kept = generate(policy, ids, mask, cfg, eos_token_id=EOS, pad_token_id=PAD, generator=torch.Generator().manual_seed(3),
                    with_logprobs=True, value_head=None if critic else actor_critic.value_head)
    plain = Generation(**{**kept.__dict__, "logprobs": None, "values": None})
    scores, valid = torch.tensor([0.5, -1.0, 2.0, 1.0]), torch.tensor([True, True, True, False])
    reference = tiny_causal_lm(seed=5)
    args = dict(actor_critic=actor_critic, reference=reference, temperature=0.8, micro_batch_size=3, valid=valid)
    calls = []
    handle = policy.register_forward_pre_hook(lambda module, args: calls.append(1))
    fast = make_experience(kept, scores, **args)
    policy_forwards, calls[:] = len(calls), []
    slow = make_experience(plain, scores, **args)
    handle.remove()
    assert policy_forwards == 0 and len(calls) == 2  # two micro-batches of the policy when nothing was kept
    assert torch.equal(fast.action_mask, slow.action_mask) and not fast.action_mask[3].any()
    for name in ("old_logprobs", "values", "ref_logprobs"):
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name), rtol=0, atol=1e-5)
    assert fast.values.abs().max() > 0.1 and not fast.old_logprobs[3].any() and not fast.values[3].any()
