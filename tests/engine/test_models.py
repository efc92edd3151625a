"""Loading the policy and reward model: dtypes, attention, LoRA, 4/8-bit, freezing, checkpointing, saving."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from data import synthetic
from engine.config import ConfigError, FreezeConfig, LoraConfig, ModelConfig, QuantConfig
from engine.models import (
    frozen_parameter_names,
    layer_index,
    load_policy,
    load_reward_model,
    load_tokenizer,
    parameter_group,
    save_final,
)
from engine.tiny import resolve_model_path

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TINY = ModelConfig(name_or_path="tiny")
LORA = replace(TINY, lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
QLORA = replace(LORA, quant=QuantConfig(bits=4, compute_dtype="float32"))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


@pytest.fixture(scope="module")
def batch(tokenizer):
    rows = synthetic.generate("sft", 4, seed=0)
    enc = tokenizer([f"{r['prompt']}\n{r['completion']}</s>" for r in rows], return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}


def _train(model, batch, steps: int, lr: float = 1e-2) -> list[float]:
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _randomise_lora(model, seed: int = 0) -> None:
    """LoRA starts with B = 0 (a no-op); give it weights so that saving and merging have something to show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


# -- parameter groups and freezing --------------------------------------------------------------------------


def test_parameter_groups_of_the_tiny_llama():
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny"))
    layers = model.config.num_hidden_layers
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        groups.setdefault(parameter_group(name), []).append(name)
    assert groups["embeddings"] == ["model.embed_tokens.weight"]
    assert groups["other"] == ["lm_head.weight"]
    assert len(groups["attention"]) == 4 * layers  # q, k, v, o
    assert len(groups["feed_forward"]) == 3 * layers  # gate, up, down
    assert len(groups["layer_norms"]) == 2 * layers + 1  # input, post-attention, final norm
    assert "model.layers.0.post_attention_layernorm.weight" in groups["layer_norms"]
    assert [layer_index(n) for n in groups["attention"]] == [i for i in range(layers) for _ in range(4)]


@pytest.mark.parametrize(
    "name, group, index",
    [
        ("transformer.wte.weight", "embeddings", None),
        ("transformer.h.3.ln_1.weight", "layer_norms", 3),
        ("transformer.h.3.attn.c_attn.weight", "attention", 3),
        ("transformer.h.11.mlp.c_fc.bias", "feed_forward", 11),
        ("transformer.ln_f.weight", "layer_norms", None),
        ("gpt_neox.layers.2.attention.query_key_value.weight", "attention", 2),
        ("gpt_neox.embed_in.weight", "embeddings", None),
        ("model.layers.5.self_attn.q_norm.weight", "layer_norms", 5),
        ("model.layers.1.block_sparse_moe.experts.0.w1.weight", "feed_forward", 1),
        ("bert.embeddings.position_embeddings.weight", "embeddings", None),
        ("score.weight", "other", None),
        ("embed_out.weight", "other", None),
    ],
)
def test_parameter_groups_of_other_architectures(name, group, index):
    assert (parameter_group(name), layer_index(name)) == (group, index)


def test_keep_layers_are_never_frozen():
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(4)] + [
        f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)
    ] + ["model.embed_tokens.weight", "lm_head.weight"]
    frozen = frozen_parameter_names(names, FreezeConfig(attention=True, embeddings=True, keep_layers=(0, -1)))
    assert frozen == {"model.layers.1.self_attn.q_proj.weight", "model.layers.2.self_attn.q_proj.weight",
                      "model.embed_tokens.weight"}
    assert frozen_parameter_names(names, FreezeConfig()) == set()


def test_frozen_groups_do_not_move_in_training(batch):
    freeze = FreezeConfig(embeddings=True, attention=True, layer_norms=True, keep_layers=(-1,))
    model = load_policy(replace(TINY, freeze=freeze))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, batch, steps=1)
    for name, p in model.named_parameters():
        frozen = parameter_group(name) in ("embeddings", "attention", "layer_norms") and layer_index(name) != 3
        assert p.requires_grad is not frozen, name
        assert torch.equal(p, before[name]) is frozen, name


def test_freezing_everything_or_freezing_under_lora_is_an_error():
    everything = FreezeConfig(embeddings=True, layer_norms=True, attention=True, feed_forward=True, other=True)
    with pytest.raises(ValueError, match="every parameter"):
        load_policy(replace(TINY, freeze=everything))
    with pytest.raises(ValueError, match="model.lora.enabled"):
        load_policy(replace(LORA, freeze=FreezeConfig(attention=True)))


# -- dtype and attention ------------------------------------------------------------------------------------


def test_dtype_and_attention_implementation():
    model = load_policy(replace(TINY, dtype="bf16", attn_implementation="eager"), for_training=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert load_policy(TINY).config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="model.dtype='float8'"):
        load_policy(replace(TINY, dtype="float8"))


def test_flash_attention_without_the_package_names_the_fix(monkeypatch):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    with pytest.raises(ConfigError, match="flash-attn .* set model.attn_implementation=auto"):
        load_policy(replace(TINY, attn_implementation="flash_attention_2"))


def test_missing_local_model_path_is_named():
    with pytest.raises(FileNotFoundError, match="model.name_or_path"):
        load_policy(replace(TINY, name_or_path="./no/such/model"))


# -- LoRA and gradient checkpointing ------------------------------------------------------------------------


def test_lora_all_linear_trains_only_the_adapter(batch):
    model = load_policy(LORA)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".")[-4] for n in trainable}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # no lm_head
    losses = _train(model, batch, steps=3)
    assert losses[-1] < losses[0]


def test_lora_named_target_modules():
    model = load_policy(replace(LORA, lora=replace(LORA.lora, target_modules=("q_proj", "v_proj"))))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    assert len(trainable) == 2 * 2 * model.config.num_hidden_layers  # A and B per module per layer


def test_lora_learns_with_gradient_checkpointing(batch):
    """Every adapter matrix B gets a non-zero gradient with checkpointing on, the same one as without it
    (at initialisation B = 0, so it is B that carries the gradient; A's gradient is B^T times something)."""
    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same random LoRA A both times
        model = load_policy(replace(LORA, gradient_checkpointing=checkpointing))
        assert model.base_model.model.model.layers[0].gradient_checkpointing is checkpointing
        model(**batch).loss.backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert len(grads[True]) == 7 * model.config.num_hidden_layers  # q k v o gate up down in every layer
    for name, grad in grads[True].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads[False][name], rtol=1e-4, atol=1e-6)


# -- quantisation ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("bits, compute_dtype", [(4, "bfloat16"), (8, "float32")])
def test_quantised_base_with_lora_trains_on_cpu(batch, bits, compute_dtype):
    """QLoRA on CPU through bitsandbytes' CPU backend: the linear layers are stored quantised (4-bit: nf4 with
    double quantisation, bf16 compute, the QLoRA recipe), only the adapter trains, the quantised weights stay
    put, and the loss on a fixed batch goes down."""
    import bitsandbytes as bnb

    quant = QuantConfig(bits=bits, compute_dtype=compute_dtype)
    cfg = replace(QLORA, quant=quant, gradient_checkpointing=True)
    model = load_policy(cfg)
    linear_cls, storage = (bnb.nn.Linear4bit, torch.uint8) if bits == 4 else (bnb.nn.Linear8bitLt, torch.int8)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, linear_cls) and q_proj.base_layer.weight.dtype == storage
    if bits == 4:
        assert q_proj.base_layer.weight.quant_type == "nf4" and q_proj.base_layer.weight.quant_state.nested
        assert q_proj.base_layer.compute_dtype == torch.bfloat16
    base_before = q_proj.base_layer.weight.detach().clone()
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora_before and all("lora_" in n for n in lora_before)

    losses = _train(model, batch, steps=6, lr=3e-3)
    assert losses[-1] < losses[0] - 0.1, losses
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], before) for n, before in lora_before.items() if "lora_B" in n)
    assert torch.equal(q_proj.base_layer.weight, base_before)


def test_quantised_weights_without_an_adapter_cannot_train():
    with pytest.raises(ValueError, match="model.lora.enabled=true"):
        load_policy(replace(TINY, quant=QuantConfig(bits=4)))
    with pytest.raises(ValueError, match="model.quant.bits=3"):
        load_policy(replace(QLORA, quant=QuantConfig(bits=3)))


# -- reward models -------------------------------------------------------------------------------------------


def test_reward_model_has_one_output_read_at_the_last_real_token(tokenizer):
    model = load_reward_model(replace(TINY, name_or_path="tiny-reward"), for_training=False)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    texts = ["Sort the letters: c a b\na b c</s>", "Sort the letters: q e b m\nb e m q</s>"]
    padded = tokenizer(texts, return_tensors="pt", padding=True)
    scores = model(**padded).logits
    assert scores.shape == (2, 1)
    for i, text in enumerate(texts):  # right padding does not change a sequence's score
        alone = tokenizer(text, return_tensors="pt")
        torch.testing.assert_close(model(**alone).logits[0], scores[i], rtol=1e-5, atol=1e-5)


def test_reward_model_from_a_causal_checkpoint_trains_its_head_under_lora():
    model = load_reward_model(LORA)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and all("lora_" in n or "score" in n for n in trainable)


def test_reward_model_without_a_pad_token_names_the_fix(tmp_path):
    path = tmp_path / "no-pad"
    shutil.copytree(resolve_model_path("tiny"), path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = None
    tok.save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path).pad_token is None
    with pytest.raises(ValueError, match=r"add_special_tokens\(\{'pad_token'"):
        load_reward_model(replace(TINY, name_or_path=str(path)))
    assert load_tokenizer(replace(TINY, name_or_path=str(path))).pad_token == "</s>"  # policies pad with EOS


# -- saving --------------------------------------------------------------------------------------------------


def test_saved_adapter_reloads_in_plain_peft_with_the_same_logits(tmp_path, tokenizer, batch):
    model = load_policy(LORA).eval()
    _randomise_lora(model)
    with torch.no_grad():
        expected = model(**batch).logits
    out = save_final(model, tokenizer, tmp_path / "final")
    assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not (out / "model.safetensors").exists()

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny"))
    reloaded = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=0)


def test_merged_model_reloads_in_plain_transformers_with_the_same_logits(tmp_path, tokenizer, batch):
    model = load_policy(replace(LORA, gradient_checkpointing=True)).eval()
    _randomise_lora(model)
    with torch.no_grad():
        expected = model(**batch).logits
    out = save_final(model, tokenizer, tmp_path / "final", merge=True)
    assert not (out / "adapter_config.json").exists()
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.config.use_cache
    assert AutoTokenizer.from_pretrained(out).pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_qlora_merges_into_a_full_precision_base(tmp_path, tokenizer, batch):
    """Merging a 4-bit model's adapter gives the full-precision base plus the adapter, not 4-bit weights."""
    model = load_policy(QLORA).eval()
    _randomise_lora(model)
    adapter = save_final(model, tokenizer, tmp_path / "adapter")
    out = save_final(model, tokenizer, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny"))
    unmerged = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, unmerged(**batch).logits, rtol=1e-4, atol=1e-4)


def test_reward_adapter_with_its_head_reloads_in_plain_peft(tmp_path, tokenizer, batch):
    model = load_reward_model(LORA).eval()
    _randomise_lora(model)
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = save_final(model, tokenizer, tmp_path / "rm")
    base = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path("tiny"), num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    reloaded = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_state_dict_passed_in_is_what_gets_written(tmp_path, tokenizer):
    """Under FSDP or ZeRO-3 the gathered state dict is written, not the process's own (sharded) weights."""
    model = load_policy(TINY)
    own = {key: value.clone() for key, value in model.state_dict().items()}
    gathered = {key: value + 1 for key, value in own.items()}
    out = save_final(model, tokenizer, tmp_path / "gathered", state_dict=gathered)
    written = load_file(out / "model.safetensors")
    assert written and all(torch.equal(written[key], gathered[key]) for key in written)
    assert all(torch.equal(value, own[key]) for key, value in model.state_dict().items())  # model untouched
    plain = load_file(save_final(model, tokenizer, tmp_path / "own") / "model.safetensors")
    assert plain.keys() == written.keys() and all(torch.equal(plain[key], own[key]) for key in plain)


def test_an_adapter_keeps_only_its_weights_from_a_state_dict_passed_in(tmp_path, tokenizer):
    model = load_policy(LORA)
    gathered = {key: value + 1 for key, value in model.state_dict().items()}
    out = save_final(model, tokenizer, tmp_path / "adapter", state_dict=gathered)
    written = load_file(out / "adapter_model.safetensors")
    assert written and all("lora_" in key for key in written)
    own = {key: value for key, value in model.state_dict().items() if "lora_" in key}
    for key, value in written.items():
        match = [k for k in own if k.replace(".default", "") == key]
        assert len(match) == 1 and torch.equal(value, gathered[match[0]])
    with pytest.raises(ValueError, match="export.merge"):
        save_final(model, tokenizer, tmp_path / "merged", merge=True, state_dict=gathered)


def test_one_process_does_not_shard_weights():
    from accelerate import Accelerator

    from engine.lifecycle import shards_weights

    assert not shards_weights(Accelerator(cpu=True))
