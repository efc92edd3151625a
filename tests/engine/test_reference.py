"""The three reference modes give the same reference log-probs, equal to a plain loop over the base model."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from data import make_collator, synthetic
from data.build import rows_fingerprint
from engine.config import LoraConfig, ModelConfig, ReferenceConfig
from engine.logprobs import label_logprobs
from engine.loops.pairwise import with_row_index
from engine.models import load_policy, load_tokenizer
from engine.reference import (
    ModelReference,
    PrecomputedReference,
    add_row_index,
    make_reference,
)
from engine.tiny import resolve_model_path
from losses import reduce_logprobs

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TINY = ModelConfig(name_or_path="tiny")
LORA = replace(TINY, lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.1))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


@pytest.fixture(scope="module")
def dataset(tokenizer):
    rows = []
    for r in synthetic.generate("preference", 6, seed=0):
        prompt = tokenizer(r["prompt"] + "\n").input_ids
        row = {}
        for side in ("chosen", "rejected"):
            response = tokenizer(r[side] + tokenizer.eos_token, add_special_tokens=False).input_ids
            row[f"{side}_input_ids"] = prompt + response
            row[f"{side}_labels"] = [-100] * len(prompt) + response
        rows.append(row)
    return add_row_index(Dataset.from_list(rows))


@pytest.fixture(scope="module")
def collate(tokenizer):
    """The preference collator's layout: right-padded [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]."""
    return with_row_index(make_collator("preference", tokenizer))


@pytest.fixture(scope="module")
def packed_collate(tokenizer):
    """The same 2B sequences packed into one (1, N) row with `seq_lens`."""
    return with_row_index(make_collator("preference", tokenizer, packing=True))


@pytest.fixture(scope="module")
def policy():
    """A LoRA policy whose adapter is not a no-op (B != 0), in train mode with adapter dropout."""
    torch.manual_seed(0)
    model = load_policy(LORA)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def oracle_logps(dataset):
    """Per-pair summed response log-probs from the plain base model, one unpadded sequence at a time."""
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny")).eval()
    out = {"chosen": [], "rejected": []}
    with torch.no_grad():
        for row in dataset:
            for side in out:
                ids = torch.tensor([row[f"{side}_input_ids"]])
                logp = torch.log_softmax(base(ids).logits[0].double(), -1).tolist()
                labels = row[f"{side}_labels"]
                out[side].append(sum(logp[t - 1][labels[t]] for t in range(1, len(labels)) if labels[t] != -100))
    return torch.tensor(out["chosen"], dtype=torch.float64), torch.tensor(out["rejected"], dtype=torch.float64)


@pytest.mark.parametrize("mode", ["copy", "disabled", "precomputed"])
def test_reference_modes_agree_with_the_base_model(mode, policy, dataset, collate, oracle_logps, tmp_path):
    ref = make_reference(ReferenceConfig(mode=mode, cache_dir=str(tmp_path)), LORA, policy)
    if mode == "precomputed":
        ref.precompute(dataset, collate, batch_size=4)
        fresh = make_reference(ReferenceConfig(mode=mode, cache_dir=str(tmp_path)), LORA, policy)
        fresh.make_source = None  # must read the file, not compute again
        fresh.precompute(dataset, collate, batch_size=4)
        ref = fresh
    chosen, rejected = [], []
    for start in (0, 3):  # batches of 3, unlike the precompute batches of 4
        c, r = ref.logps(collate([dataset[i] for i in range(start, start + 3)]))
        chosen.append(c)
        rejected.append(r)
    torch.testing.assert_close(torch.cat(chosen).double(), oracle_logps[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.cat(rejected).double(), oracle_logps[1], rtol=1e-5, atol=1e-4)
    assert policy.training  # the reference pass left the policy as it found it


def test_the_policy_itself_differs_from_its_reference(policy, dataset, collate, oracle_logps):
    batch = collate([dataset[i] for i in range(6)])
    policy.eval()
    with torch.no_grad():
        chosen = reduce_logprobs(*label_logprobs(policy, batch))[:6]
    policy.train()
    assert (chosen.double() - oracle_logps[0]).abs().min() > 1e-2


def test_mean_reduction(policy, dataset, collate, oracle_logps, tmp_path):
    """The mean is the base model's summed log-prob over the response divided by its token count, both
    computed one unpadded row at a time (oracle_logps; the labels as the dataset holds them)."""
    batch = collate([dataset[i] for i in range(4)])
    live = ModelReference(policy, disable_adapter=True)
    cached = make_reference(ReferenceConfig(mode="precomputed", cache_dir=str(tmp_path)), LORA, policy)
    cached.precompute(dataset, collate)
    for side, oracle in zip(("chosen", "rejected"), oracle_logps):
        counts = torch.tensor([sum(label != -100 for label in dataset[i][f"{side}_labels"][1:]) for i in range(4)])
        assert counts.min() >= 2  # a mean that differs from the sum
        want = oracle[:4] / counts
        index = 0 if side == "chosen" else 1
        for ref in (live, cached):
            torch.testing.assert_close(ref.logps(batch, reduction="mean")[index].double(), want, rtol=1e-5, atol=1e-5)


def test_disabled_needs_an_adapter():
    with pytest.raises(ValueError, match="model.lora.enabled=true or reference.mode=copy"):
        make_reference(ReferenceConfig(mode="disabled"), TINY, load_policy(TINY))
    with pytest.raises(ValueError, match="reference.mode='frozen'"):
        make_reference(ReferenceConfig(mode="frozen"), TINY, None)


def test_copy_is_frozen_and_separate(policy):
    ref = make_reference(ReferenceConfig(mode="copy"), LORA, policy)
    params = list(ref.model.parameters())
    assert not ref.model.training and not any(p.requires_grad for p in params)
    assert not any("lora" in n for n, _ in ref.model.named_parameters())
    assert {p.data_ptr() for p in params}.isdisjoint(p.data_ptr() for p in policy.parameters())


def test_precomputed_cache_key_follows_model_and_data(policy, dataset, collate, tmp_path):
    ref = make_reference(ReferenceConfig(mode="precomputed", cache_dir=str(tmp_path)), LORA, policy)
    path = ref.precompute(dataset, collate)
    assert ref.cache_path(dataset) == path
    assert ref.cache_path(dataset.select(range(5))) != path
    assert ref.cache_path(dataset, {"max_length": 256}) != path
    other_model = make_reference(
        ReferenceConfig(mode="precomputed", cache_dir=str(tmp_path)), replace(LORA, dtype="bfloat16"), policy
    )
    assert other_model.cache_path(dataset) != path
    with pytest.raises(RuntimeError, match="split 'eval'"):
        ref.logps(collate([dataset[0]]), split="eval")


def test_concurrent_precompute_computes_once(policy, dataset, collate, tmp_path):
    """Two runs sharing a cache directory: the file lock lets one compute, the other reads its file."""
    calls = []

    def make_source():
        calls.append(1)
        return ModelReference(policy, disable_adapter=True)

    refs = [PrecomputedReference({"model": "tiny"}, make_source, tmp_path) for _ in range(2)]
    threads = [threading.Thread(target=r.precompute, args=(dataset, collate)) for r in refs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    torch.testing.assert_close(refs[0].tables["train"], refs[1].tables["train"])
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        refs[0].cache_path(dataset).name
    ]


@pytest.mark.parametrize("mode", ["disabled", "precomputed"])
def test_packed_batches_give_the_padded_values(mode, policy, dataset, collate, packed_collate, tmp_path):
    """Packed into one row, each sequence still gets its own sum (precomputed: the cache built from packed
    batches matches the live reference on padded ones)."""
    ref = make_reference(ReferenceConfig(mode=mode, cache_dir=str(tmp_path)), LORA, policy)
    ref.precompute(dataset, packed_collate, batch_size=4)
    rows = [dataset[i] for i in range(4)]
    live = ModelReference(policy, disable_adapter=True)
    for reduction in ("sum", "mean"):
        want = live.logps(collate(rows), reduction=reduction)
        got = ref.logps(packed_collate(rows), reduction=reduction)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)


def test_rows_fingerprint_follows_the_token_columns(dataset):
    rebuilt = Dataset.from_list([dict(r) for r in dataset])
    assert rows_fingerprint(rebuilt) == rows_fingerprint(dataset)
    assert rows_fingerprint(dataset.select([1, 0, 2, 3, 4, 5])) != rows_fingerprint(dataset)
    assert rows_fingerprint(dataset.select(range(5))) != rows_fingerprint(dataset)
    changed = dataset.map(lambda r: {"rejected_labels": r["rejected_labels"][:-1] + [-100]})
    assert rows_fingerprint(changed) != rows_fingerprint(dataset)
    assert rows_fingerprint(dataset.remove_columns("row_index")) == rows_fingerprint(dataset)
    assert rows_fingerprint(list(dataset)) == rows_fingerprint(list(rebuilt))
