import pytest
import torch

from rollout.generation import (
    RolloutConfig,
    SamplingConfig,
    finished_locally,
    generate,
    position_ids_from_mask,
    resolve_backend,
    sample_from_probs,
    sample_next_token,
)
from tests.rollout.conftest import left_pad, random_head, tiny_causal_lm

PAD, EOS = 3, 2
PROMPTS = [[1, 10, 11, 12, 13, 14, 15], [1, 20], [1, 30, 31, 32], [1, 40, 41], [1, 50, 51, 52, 53]]


def test_batched_greedy_with_left_padding_equals_each_prompt_alone():
    model = tiny_causal_lm()
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0, micro_batch_size=2)
    ids, mask = left_pad(PROMPTS, PAD)
    batched = generate(model, ids, mask, cfg, eos_token_id=EOS, pad_token_id=PAD)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), cfg,
                         eos_token_id=EOS, pad_token_id=PAD)
        n = int(alone.response_length[0])
        assert batched.response_length[i] == n
        assert torch.equal(batched.responses[i, :n], alone.responses[0, :n])
        # and both equal transformers' own greedy decoding of the prompt alone
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                   eos_token_id=EOS, pad_token_id=PAD)[0, len(prompt):]
        assert torch.equal(alone.responses[0, :len(reference)], reference)


def eos_prone_model():
    """A random model whose EOS logit is raised, so sampled responses often end early."""
    model = tiny_causal_lm(seed=1)
    with torch.no_grad():
        model.lm_head.weight[EOS] = model.lm_head.weight.mean(0) * 0 + model.lm_head.weight[EOS] * 4
    return model


def test_tokens_after_first_eos_are_masked_and_padded():
    model = eos_prone_model()
    prompts = PROMPTS * 4
    ids, mask = left_pad(prompts, PAD)
    cfg = SamplingConfig(max_new_tokens=10, min_new_tokens=2, temperature=1.0, micro_batch_size=8)
    gen = generate(model, ids, mask, cfg, eos_token_id=EOS, pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    assert gen.sequences.shape == (len(prompts), ids.shape[1] + gen.responses.shape[1])
    assert torch.equal(gen.sequences[:, :ids.shape[1]], ids)
    ended = 0
    for row, act, no_eos in zip(gen.responses.tolist(), gen.action_mask.tolist(), gen.no_eos.tolist()):
        n = sum(act)
        assert act == [True] * n + [False] * (len(act) - n)
        assert EOS not in row[:min(n, 2)]  # min_new_tokens
        if EOS in row[:n]:
            ended += 1
            assert row.index(EOS) == n - 1 and not no_eos
            assert row[n:] == [PAD] * (len(row) - n)
        else:
            assert no_eos and n == 10
    assert 0 < ended < len(prompts)
    assert torch.equal(gen.attention_mask[:, ids.shape[1]:], gen.action_mask)


def test_pad_equal_to_eos_still_masks_after_the_first_eos():
    model = eos_prone_model()
    ids, mask = left_pad(PROMPTS * 2, EOS)
    gen = generate(model, ids, mask, SamplingConfig(max_new_tokens=8), eos_token_id=EOS, pad_token_id=EOS,
                   generator=torch.Generator().manual_seed(1))
    for row, act in zip(gen.responses.tolist(), gen.action_mask.tolist()):
        n = sum(act)
        assert EOS not in row[:n - 1]
        assert (row[n - 1] == EOS) or n == 8


def test_response_length_sampler_bounds_each_row():
    model = tiny_causal_lm()
    ids, mask = left_pad(PROMPTS * 4, PAD)
    cfg = SamplingConfig(max_new_tokens=12, response_length=(3, 6))
    gen = generate(model, ids, mask, cfg, eos_token_id=EOS, pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    lengths = gen.response_length
    at_budget = lengths[gen.no_eos]
    assert at_budget.min() >= 3 and lengths.max() <= 6 and len(set(at_budget.tolist())) > 1
    assert gen.responses.shape[1] == lengths.max()


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    top_k = sample_next_token(logits, SamplingConfig(top_k=2), g)
    assert set(top_k.tolist()) == {0, 1}
    top_p = sample_next_token(logits, SamplingConfig(top_p=0.75), g)  # 0.5 + 0.3 reaches 0.75
    assert set(top_p.tolist()) == {0, 1}
    assert abs(float((top_p == 0).float().mean()) - 0.5 / 0.8) < 0.05
    assert set(sample_next_token(logits, SamplingConfig(top_p=0.5), g).tolist()) == {0}
    hot = sample_next_token(logits, SamplingConfig(temperature=100.0), g)
    assert abs(float((hot == 3).float().mean()) - 0.25) < 0.05
    assert torch.equal(sample_next_token(logits[:3], SamplingConfig(temperature=0.0)), torch.zeros(3, dtype=torch.long))


def test_inverse_cdf_draws_follow_the_probabilities_and_never_take_a_zero():
    # row 0 starts and ends with zero-probability tokens; row 1 is unnormalised (sums to 2)
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_from_probs(probs, g) for _ in range(20000)])  # (N, 2)
    assert set(draws[:, 0].tolist()) == {1, 3, 4} and set(draws[:, 1].tolist()) == {2, 5}
    for token, p in [(1, 0.5), (3, 0.3), (4, 0.2)]:
        assert abs(float((draws[:, 0] == token).float().mean()) - p) < 0.015  # 4.5 standard errors at 0.5
    assert abs(float((draws[:, 1] == 5).float().mean()) - 0.5) < 0.015
    # a one-hot row always gives its token, also at the first and last index
    one_hot = torch.eye(4)
    assert sample_from_probs(one_hot, g).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5)])
def test_sampling_pass_keeps_logprobs_and_values_of_a_full_forward(temperature, top_k):
    """The sampled tokens' log-probs under logits / temperature (before top-k and the EOS ban) and a value head's
    values of the final hidden states, kept while decoding in chunks of different widths, equal those of one
    forward over the finished sequences."""
    model = eos_prone_model()
    head = random_head()
    ids, mask = left_pad(PROMPTS * 4, PAD)
    cfg = SamplingConfig(max_new_tokens=10, min_new_tokens=2, temperature=temperature, top_k=top_k, micro_batch_size=3)
    gen = generate(model, ids, mask, cfg, eos_token_id=EOS, pad_token_id=PAD, generator=torch.Generator().manual_seed(0),
                   with_logprobs=True, value_head=head)
    assert (~gen.no_eos).any() and (gen.response_length < gen.responses.shape[1]).any()  # some rows end early
    full_mask = gen.attention_mask.long()
    with torch.no_grad():
        out = model(input_ids=gen.sequences, attention_mask=full_mask, position_ids=position_ids_from_mask(full_mask),
                    output_hidden_states=True)
        P, R = gen.prompt_length, gen.responses.shape[1]
        logits = out.logits[:, P - 1:P + R - 1] / temperature
        logprobs = logits.log_softmax(-1).gather(-1, gen.responses[..., None])[..., 0]
        values = head(out.hidden_states[-1][:, P - 1:P + R - 1])
    act = gen.action_mask
    torch.testing.assert_close(gen.logprobs[act], logprobs[act], rtol=0, atol=1e-5)
    torch.testing.assert_close(gen.values[act], values[act], rtol=0, atol=1e-5)
    assert not gen.logprobs[~act].any() and not gen.values[~act].any()
    assert gen.logprobs[act].max() < 0 and gen.values.shape == act.shape and gen.values[act].abs().max() > 0.1


def test_nan_logits_are_an_error_not_a_token():
    logits = torch.tensor([[0.0, 1.0, float("nan")], [0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="NaN, infinite or all zero"):
        sample_next_token(logits, SamplingConfig())
    with pytest.raises(ValueError, match="NaN, infinite or all zero"):
        sample_from_probs(torch.zeros(1, 4))


def test_bad_inputs_are_clear_errors():
    model = tiny_causal_lm()
    ids, mask = left_pad(PROMPTS, PAD)
    with pytest.raises(ValueError, match="no EOS token"):
        generate(model, ids, mask, SamplingConfig(), eos_token_id=None, pad_token_id=PAD)
    with pytest.raises(ValueError, match="exceeds the policy's 128 positions"):
        generate(model, ids, mask, SamplingConfig(max_new_tokens=125), eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="left padded"):
        generate(model, ids.flip(1), mask.flip(1), SamplingConfig(), eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="response_length"):
        SamplingConfig(max_new_tokens=10, response_length=(4, 20))


def test_rows_keep_padding_while_another_process_is_still_decoding():
    """A `finished` that says stop only at the last step stands for a process whose rows are all done while
    another's are not: it decodes all max_new_tokens steps, one forward each, and what it returns differs from
    stopping early only by pad columns outside the action mask."""
    model = eos_prone_model()
    ids, mask = left_pad(PROMPTS * 2, PAD)
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0, response_length=(2, 6), micro_batch_size=16)
    early = generate(model, ids, mask, cfg, eos_token_id=EOS, pad_token_id=PAD,
                     generator=torch.Generator().manual_seed(0))
    forwards, calls = [], []

    def finished(done):
        calls.append(bool(done.all()))
        return len(calls) == cfg.max_new_tokens

    handle = model.register_forward_hook(lambda *_: forwards.append(1))
    late = generate(model, ids, mask, cfg, eos_token_id=EOS, pad_token_id=PAD,
                    generator=torch.Generator().manual_seed(0), finished=finished)
    handle.remove()
    width = early.responses.shape[1]
    assert width <= 6 and late.responses.shape[1] == 10 and len(forwards) == 10
    assert calls[width - 1:] == [True] * (11 - width)  # every row was done from the early stop on
    assert torch.equal(late.responses[:, :width], early.responses)
    assert torch.equal(late.action_mask[:, :width], early.action_mask) and not late.action_mask[:, width:].any()
    assert late.responses[:, width:].eq(PAD).all()
    assert torch.equal(late.no_eos, early.no_eos)


# ---- decoding backends ----------------------------------------------------------------------------

CONTINUOUS = RolloutConfig(backend="continuous")


@pytest.mark.parametrize("min_new_tokens", [0, 2])
def test_continuous_and_static_cache_greedy_tokens_equal_generate(min_new_tokens):
    """Greedy decoding gives the same tokens, masks and EOS flags whichever backend computes them: the plain
    loop, the loop over a static KV cache, and continuous batching (which goes on after the first
    min_new_tokens tokens, EOS banned, with each row's own remaining budget)."""
    model = eos_prone_model()
    ids, mask = left_pad(PROMPTS * 2, PAD)
    cfg = SamplingConfig(max_new_tokens=12, min_new_tokens=min_new_tokens, temperature=0.0, micro_batch_size=3,
                         response_length=(max(min_new_tokens, 1), 12))
    runs = {name: generate(model, ids, mask, cfg, eos_token_id=EOS, pad_token_id=PAD, rollout=rollout,
                           generator=torch.Generator().manual_seed(0))
            for name, rollout in [("plain", RolloutConfig()), ("static", RolloutConfig(static_cache=True)),
                                  ("continuous", CONTINUOUS)]}
    plain = runs["plain"]
    assert (~plain.no_eos).any() and plain.no_eos.any()  # rows end both ways
    assert (plain.response_length < plain.responses.shape[1]).any()
    for name in ("static", "continuous"):
        assert torch.equal(runs[name].sequences, plain.sequences), name
        assert torch.equal(runs[name].action_mask, plain.action_mask), name
        assert torch.equal(runs[name].no_eos, plain.no_eos), name


@pytest.mark.parametrize("min_new_tokens,top_k,with_head", [(0, 0, False), (2, 5, True)])
def test_continuous_sampled_logprobs_equal_a_fresh_forward(min_new_tokens, top_k, with_head):
    """Sampled by continuous batching, each token's log-prob under logits / temperature (its own, without
    top-k; otherwise, and for a value head, one forward after decoding) equals a fresh forward's."""
    model = eos_prone_model()
    head = random_head() if with_head else None
    ids, mask = left_pad(PROMPTS * 2, PAD)
    cfg = SamplingConfig(max_new_tokens=10, min_new_tokens=min_new_tokens, temperature=0.7, top_k=top_k,
                         micro_batch_size=4)
    state = torch.get_rng_state()
    gen = generate(model, ids, mask, cfg, eos_token_id=EOS, pad_token_id=PAD, generator=torch.Generator().manual_seed(0),
                   with_logprobs=True, value_head=head, rollout=CONTINUOUS)
    assert torch.equal(torch.get_rng_state(), state)  # continuous batching's seeding leaves the global RNG as it was
    assert (~gen.no_eos).any() and (gen.response_length < gen.responses.shape[1]).any()
    assert (gen.response_length >= min_new_tokens).all()
    full_mask = gen.attention_mask.long()
    with torch.no_grad():
        out = model(input_ids=gen.sequences, attention_mask=full_mask, position_ids=position_ids_from_mask(full_mask),
                    output_hidden_states=True)
    P, R = gen.prompt_length, gen.responses.shape[1]
    logprobs = (out.logits[:, P - 1:P + R - 1] / 0.7).log_softmax(-1).gather(-1, gen.responses[..., None])[..., 0]
    act = gen.action_mask
    torch.testing.assert_close(gen.logprobs[act], logprobs[act], rtol=0, atol=1e-5)
    assert not gen.logprobs[~act].any() and gen.logprobs[act].max() < 0
    if with_head:
        values = head(out.hidden_states[-1][:, P - 1:P + R - 1])
        torch.testing.assert_close(gen.values[act], values[act], rtol=0, atol=1e-5)
        assert gen.values[act].abs().max() > 0.1


def test_continuous_falls_back_to_generate_with_one_log_line(caplog):
    """Where continuous batching cannot apply (here: processes that must decode in step, and a quantised
    policy), generate decodes instead, with one log line per cause however many rollouts follow."""
    model = eos_prone_model()
    ids, mask = left_pad(PROMPTS, PAD)
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.0)
    plain = generate(model, ids, mask, cfg, eos_token_id=EOS, pad_token_id=PAD)
    with caplog.at_level("WARNING", logger="rollout.generation"):
        for _ in range(2):
            gen = generate(model, ids, mask, cfg, eos_token_id=EOS, pad_token_id=PAD, rollout=CONTINUOUS,
                           finished=lambda done: bool(done.all()))
            assert torch.equal(gen.sequences, plain.sequences)
    lines = [r.message for r in caplog.records if "cannot apply" in r.message]
    assert len(lines) == 1 and "same number of forwards" in lines[0]
    assert resolve_backend(CONTINUOUS, model, finished_locally) == "continuous"
    model.is_loaded_in_4bit = True
    assert resolve_backend(CONTINUOUS, model, finished_locally) == "generate"
    assert resolve_backend(RolloutConfig(backend="auto"), eos_prone_model(), finished_locally) == "generate"  # CPU


def test_rollout_config_rejects_bad_values():
    with pytest.raises(ValueError, match="rollout.backend='vllm' is not one of"):
        RolloutConfig(backend="vllm")
    with pytest.raises(ValueError, match="rollout.memory_fraction must be in"):
        RolloutConfig(memory_fraction=0)


def test_compiled_static_cache_step_gives_the_plain_tokens(monkeypatch):
    """The compiled decoding step (CUDA only in use) traced by dynamo here on the CPU, with the eager backend
    so no kernels are generated: the same greedy tokens as the plain loop, and the compiled callable is used."""
    import rollout.generation as generation

    compiled, compile = [], torch.compile

    def eager_compile(model, **kwargs):
        compiled.append(kwargs)
        return compile(model, backend="eager", **kwargs)

    monkeypatch.setattr(generation, "_compiles", lambda rollout, device: rollout.compile)
    monkeypatch.setattr(torch, "compile", eager_compile)
    model = eos_prone_model()
    ids, mask = left_pad(PROMPTS, PAD)
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.0, micro_batch_size=5)
    plain = generate(model, ids, mask, cfg, eos_token_id=EOS, pad_token_id=PAD)
    fast = generate(model, ids, mask, cfg, eos_token_id=EOS, pad_token_id=PAD, rollout=RolloutConfig(compile=True))
    assert compiled == [{"dynamic": False}]
    assert torch.equal(fast.sequences, plain.sequences) and torch.equal(fast.action_mask, plain.action_mask)


def test_continuous_decodes_a_lora_policy_with_its_adapter():
    """A peft policy (the LoRA recipes): continuous batching runs the adapted model, not its base."""
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(eos_prone_model(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids, mask = left_pad(PROMPTS, PAD)
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.0)
    plain = generate(policy, ids, mask, cfg, eos_token_id=EOS, pad_token_id=PAD)
    continuous = generate(policy, ids, mask, cfg, eos_token_id=EOS, pad_token_id=PAD, rollout=CONTINUOUS)
    with policy.disable_adapter():
        base = generate(policy, ids, mask, cfg, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(continuous.sequences, plain.sequences)
    assert not torch.equal(base.sequences, plain.sequences)  # the adapter changes the answers
