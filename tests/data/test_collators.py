"""Padding sides, pair order, and packing that a Llama model cannot tell from separate sequences."""

import pickle

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from data import length_grouped_batches, make_collator, sequence_lengths
from tests.data.conftest import build, write_jsonl

SFT_ROWS = [
    {"prompt": "Sort the letters: q e b m", "completion": "b e m q"},
    {"prompt": "Sort the letters: b a", "completion": "a b"},
    {"prompt": "Sort the letters: z y x w v u", "completion": "u v w x y z"},
]
PREF_ROWS = [
    {"prompt": "Sort the letters: q e b m", "chosen": "b e m q", "rejected": "b e q m", "margin": 1.0},
    {"prompt": "Sort the letters: b a", "chosen": "a b", "rejected": "a", "margin": 0.5},
]


@pytest.fixture(scope="module")
def sft_rows(tmp_path_factory, tok_bos):
    tmp = tmp_path_factory.mktemp("sft")
    return list(build("sft", write_jsonl(tmp / "r.jsonl", SFT_ROWS), tok_bos, tmp).train)


@pytest.fixture(scope="module")
def pref_rows(tmp_path_factory, tok_bos):
    tmp = tmp_path_factory.mktemp("pref")
    return list(build("preference", write_jsonl(tmp / "r.jsonl", PREF_ROWS), tok_bos, tmp).train)


def test_sft_right_padding(sft_rows, tok_bos):
    batch = make_collator("sft", tok_bos)(sft_rows)
    lengths = [len(r["input_ids"]) for r in sft_rows]
    T = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (3, T)
    for i, n in enumerate(lengths):
        assert batch["input_ids"][i, :n].tolist() == sft_rows[i]["input_ids"]
        assert batch["input_ids"][i, n:].eq(tok_bos.pad_token_id).all()
        assert batch["labels"][i, n:].eq(-100).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        assert batch["position_ids"][i].tolist() == list(range(T))


def test_pad_to_multiple_of(sft_rows, tok_bos):
    batch = make_collator("sft", tok_bos, pad_to_multiple_of=8)(sft_rows)
    assert batch["input_ids"].shape[1] % 8 == 0
    packed = make_collator("sft", tok_bos, packing=True, pad_to_multiple_of=8)(sft_rows)
    assert packed["input_ids"].shape[1] % 8 == 0
    assert packed["seq_lens"].sum() == sum(len(r["input_ids"]) for r in sft_rows)


def test_preference_chosen_block_then_rejected_block(pref_rows, tok_bos):
    batch = make_collator("preference", tok_bos)(pref_rows)
    assert batch["input_ids"].shape[0] == 4
    order = [r["chosen_input_ids"] for r in pref_rows] + [r["rejected_input_ids"] for r in pref_rows]
    for i, ids in enumerate(order):
        assert batch["input_ids"][i, : len(ids)].tolist() == ids
    assert batch["margin"].tolist() == [1.0, 0.5]


def test_prompt_left_padding_with_text_and_extras(tmp_path, tok_bos):
    rows = [{"prompt": "Sort the letters: q e b m", "answer": "b e m q"}, {"prompt": "Sort the letters: b a",
                                                                           "answer": "a b"}]
    ds = build("prompt", write_jsonl(tmp_path / "r.jsonl", rows), tok_bos, tmp_path).train
    batch = make_collator("prompt", tok_bos)(list(ds))
    short = ds[1]["prompt_input_ids"]
    P = batch["input_ids"].shape[1]
    assert batch["input_ids"][1, P - len(short):].tolist() == short
    assert batch["input_ids"][1, : P - len(short)].eq(tok_bos.pad_token_id).all()
    assert batch["attention_mask"][1].tolist() == [0] * (P - len(short)) + [1] * len(short)
    assert batch["prompt"] == ["Sort the letters: q e b m", "Sort the letters: b a"]
    assert batch["extras"] == [{"answer": "b e m q"}, {"answer": "a b"}]


def test_collator_pickles_for_dataloader_workers(tok_bos, sft_rows):
    collate = pickle.loads(pickle.dumps(make_collator("sft", tok_bos, packing=True)))
    assert collate(sft_rows)["input_ids"].shape[0] == 1


def _tiny_llama(vocab_size, attn):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["sft", "preference"])
def test_packed_logits_and_loss_equal_unpacked(tok_bos, sft_rows, pref_rows, attn, family):
    """Packed (1, N) with restarting position ids and no 2D mask gives each sequence's own logits."""
    rows = sft_rows if family == "sft" else pref_rows
    model = _tiny_llama(len(tok_bos), attn)
    padded = make_collator(family, tok_bos)(rows)
    packed = make_collator(family, tok_bos, packing=True)(rows)
    assert packed["attention_mask"] is None
    with torch.no_grad():
        out_padded = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                           position_ids=padded["position_ids"], use_cache=False).logits
        out_packed = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                           position_ids=packed["position_ids"], use_cache=False).logits
    lengths = packed["seq_lens"].tolist()
    assert lengths == padded["attention_mask"].sum(1).tolist()
    start = 0
    nll_padded, nll_packed = 0.0, 0.0
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out_packed[0, start:start + n], out_padded[i, :n], atol=1e-5, rtol=0)
        assert packed["position_ids"][0, start:start + n].tolist() == list(range(n))
        start += n
    nll_padded = F.cross_entropy(out_padded[:, :-1].flatten(0, 1), padded["labels"][:, 1:].flatten(), reduction="sum")
    nll_packed = F.cross_entropy(out_packed[:, :-1].flatten(0, 1), packed["labels"][:, 1:].flatten(), reduction="sum")
    torch.testing.assert_close(nll_packed, nll_padded, atol=1e-4, rtol=0)
    assert (packed["labels"] != -100).sum() == (padded["labels"] != -100).sum()


def test_packing_needs_use_cache_false(tok_bos, sft_rows):
    """Documents the transformers behaviour the collator relies on: with a cache the sequences mix."""
    model = _tiny_llama(len(tok_bos), "sdpa")
    packed = make_collator("sft", tok_bos, packing=True)(sft_rows)
    with torch.no_grad():
        isolated = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        mixed = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=True).logits
    assert not torch.allclose(isolated, mixed, atol=1e-3)


def test_length_grouped_batches(tmp_path):
    lengths = [5, 50, 6, 49, 7, 48, 8, 47]
    batches = length_grouped_batches(lengths, 2, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(abs(lengths[b[0]] - lengths[b[1]]) <= 3 for b in batches)
    assert batches == length_grouped_batches(lengths, 2, seed=0)
    assert sequence_lengths("sft", {"input_ids": [[1, 2], [3]]}) == [2, 1]
