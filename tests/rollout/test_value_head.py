import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from rollout.value_head import VALUE_HEAD_FILE, ActorCritic, ValueHead, load_value_head, save_value_head
from tests.rollout.conftest import left_pad, random_head, tiny_causal_lm

PAD = 3


def batch():
    ids, mask = left_pad([[1, 10, 11, 12, 13], [1, 20, 21]], PAD)
    response = torch.tensor([[30, 31, 2], [32, 2, PAD]])
    return torch.cat([ids, response], 1), torch.cat([mask, torch.tensor([[1, 1, 1], [1, 1, 0]])], 1)


def test_value_head_reads_the_state_before_each_response_token():
    model = tiny_causal_lm()
    actor_critic = ActorCritic(model, random_head())
    seq, mask = batch()
    with torch.no_grad():
        logits, values = actor_critic(seq, mask, 3)
        hidden = model(input_ids=seq[:1], output_hidden_states=True).hidden_states[-1]
    assert logits.shape == (2, 3, 64) and values.shape == (2, 3)
    torch.testing.assert_close(values[0], actor_critic.value_head(hidden[0, 4:7]), rtol=0, atol=1e-6)


def test_value_head_is_saved_with_the_adapter_and_loaded_back(tmp_path):
    policy = get_peft_model(tiny_causal_lm(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    actor_critic = ActorCritic(policy, random_head())
    seq, mask = batch()
    policy.save_pretrained(tmp_path)  # as the PPO loop's final save: the adapter, then the head beside it
    save_value_head(actor_critic.value_head, tmp_path)
    assert (tmp_path / VALUE_HEAD_FILE).is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    reloaded = ActorCritic(PeftModel.from_pretrained(tiny_causal_lm(), tmp_path), load_value_head(tmp_path))
    with torch.no_grad():
        for a, b in zip(actor_critic.eval()(seq, mask, 3), reloaded.eval()(seq, mask, 3)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_separate_critic_gives_the_values_and_trains_alone():
    policy, critic = tiny_causal_lm(seed=0), tiny_causal_lm(seed=1)
    actor_critic = ActorCritic(policy, random_head(), critic=critic)
    seq, mask = batch()
    logits, values = actor_critic(seq, mask, 3)
    with torch.no_grad():
        hidden = critic(input_ids=seq[:1], output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(values[0], actor_critic.value_head(hidden[0, 4:7]), rtol=0, atol=1e-6)
    values.sum().backward()
    assert all(p.grad is None for p in policy.parameters())
    assert critic.model.layers[0].mlp.up_proj.weight.grad is not None


def test_a_fresh_head_predicts_zero():
    assert not ActorCritic(tiny_causal_lm())(*batch(), 3)[1].any()


def test_head_hidden_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="value head expects hidden size 7, the backbone has 32"):
        ActorCritic(tiny_causal_lm(), ValueHead(7))
