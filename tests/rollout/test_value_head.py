import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from rollout.value_head import VALUE_HEAD_FILE, ActorCritic, ValueHead, load_value_head, save_value_head
from tests.rollout.conftest import left_pad, random_head, tiny_causal_lm

PAD = 3


def batch():
    """Two rollout rows, prompts left-padded to 5, responses right-padded to 3: (sequences, attention_mask,
    action_mask)."""
    ids, mask = left_pad([[1, 10, 11, 12, 13], [1, 20, 21]], PAD)
    response = torch.tensor([[30, 31, 2], [32, 2, PAD]])
    action = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return torch.cat([ids, response], 1), torch.cat([mask, action], 1), action.bool()


def test_value_head_reads_the_state_before_each_response_token():
    model = tiny_causal_lm()
    actor_critic = ActorCritic(model, random_head())
    seq, mask, action = batch()
    with torch.no_grad():
        out, values = actor_critic(seq, mask, action)
        full = model(input_ids=seq[:1], output_hidden_states=True)
        hidden = full.hidden_states[-1]
    assert out.logits.shape == (2, 3, 64) and values.shape == (2, 3)
    # the logits at positions 4..6 predict response tokens 5..7: the log-probs are those of the full forward
    expected = torch.log_softmax(full.logits[0, 4:7], -1).gather(-1, seq[0, 5:8, None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs[0], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(values[0], actor_critic.value_head(hidden[0, 4:7]), rtol=0, atol=1e-6)


def test_value_head_is_saved_with_the_adapter_and_loaded_back(tmp_path):
    policy = get_peft_model(tiny_causal_lm(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    actor_critic = ActorCritic(policy, random_head())
    seq, mask, action = batch()
    policy.save_pretrained(tmp_path)  # as the PPO loop's final save: the adapter, then the head beside it
    save_value_head(actor_critic.value_head, tmp_path)
    assert (tmp_path / VALUE_HEAD_FILE).is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    reloaded = ActorCritic(PeftModel.from_pretrained(tiny_causal_lm(), tmp_path), load_value_head(tmp_path))
    with torch.no_grad():
        (out, values), (out_again, values_again) = (ac.eval()(seq, mask, action) for ac in (actor_critic, reloaded))
        for a, b in ((out.logits, out_again.logits), (out.logprobs, out_again.logprobs), (values, values_again)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_separate_critic_gives_the_values_and_trains_alone():
    policy, critic = tiny_causal_lm(seed=0), tiny_causal_lm(seed=1)
    actor_critic = ActorCritic(policy, random_head(), critic=critic)
    seq, mask, action = batch()
    _, values = actor_critic(seq, mask, action)
    with torch.no_grad():
        hidden = critic(input_ids=seq[:1], output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(values[0], actor_critic.value_head(hidden[0, 4:7]), rtol=0, atol=1e-6)
    values.sum().backward()
    assert all(p.grad is None for p in policy.parameters())
    assert critic.model.layers[0].mlp.up_proj.weight.grad is not None


def test_a_fresh_head_predicts_zero():
    assert not ActorCritic(tiny_causal_lm())(*batch())[1].any()


def test_head_hidden_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="value head expects hidden size 7, the backbone has 32"):
        ActorCritic(tiny_causal_lm(), ValueHead(7))
