import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from data.tiny_tokenizer import build_tokenizer
from rollout.value_head import ValueHead


def llama_config(vocab_size: int, *, pad: int, eos: int, bos: int = 1, seed_hidden: int = 32) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=seed_hidden, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=pad, eos_token_id=eos, bos_token_id=bos, tie_word_embeddings=False)


def tiny_causal_lm(seed: int = 0, vocab_size: int = 64, *, pad: int = 3, eos: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(vocab_size, pad=pad, eos=eos)).eval()


def tiny_reward_model(seed: int, vocab_size: int, *, pad: int, eos: int) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    config = llama_config(vocab_size, pad=pad, eos=eos)
    config.num_labels = 1
    return LlamaForSequenceClassification(config).eval()


def random_head(hidden_size: int = 32, seed: int = 0) -> ValueHead:
    """A value head with random weights (a fresh one is all zeros, which would make value checks vacuous)."""
    head = ValueHead(hidden_size)
    torch.nn.init.normal_(head.summary.weight, generator=torch.Generator().manual_seed(seed))
    torch.nn.init.normal_(head.summary.bias, generator=torch.Generator().manual_seed(seed + 1))
    return head


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask
