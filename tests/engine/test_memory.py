"""The start-up memory estimate: parameter counts from a config alone, bytes per part by hand, the stop message.

Llama-3-8B (vocab 128256, h 4096, 32 layers, 32 heads of 128, 8 KV heads, I 14336, untied head), per layer:
  q, o        2 x 4096 x 4096         =  33,554,432
  k, v        2 x 4096 x 1024         =   8,388,608
  MLP         3 x 4096 x 14336        = 176,160,768
  norms       2 x 4096                =       8,192
  layer                               = 218,112,000   x 32 = 6,979,584,000
  embeddings and head 2 x 128256 x 4096 = 1,050,673,152; final norm 4096
  total 8,030,261,248 (8.03B); linear weights in the blocks: 6,979,584,000 - 32 x 8,192 = 6,979,321,856.
Mistral-7B differs only by its vocabulary (32000): 2 x 32000 x 4096 = 262,144,000 -> 7,241,732,096.
LoRA r=16 on every linear layer, per layer: r x (in + out) for q (4096+4096), k, v (4096+1024), o (4096+4096),
gate, up, down (4096+14336) = 16 x (8192 + 2 x 5120 + 8192 + 3 x 18432) = 1,310,720; x 32 = 41,943,040.
"""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from engine import memory
from engine.config import load_config
from engine.memory import GiB, MemoryCheckError, check_memory, estimate_memory, model_shape
from tests.engine.runs import SMALL, TINY

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
PARAMS_8B = 8_030_261_248
BLOCK_LINEAR_8B = 6_979_321_856
LORA_8B = 41_943_040


@pytest.fixture(scope="module")
def llama3():
    return AutoConfig.for_model("llama", **LLAMA3_8B)


@pytest.fixture(scope="module")
def llama3_shape(llama3):
    return model_shape(llama3, 16, "all-linear")


def config(*overrides):
    return load_config(TINY / "dpo.yaml", list(overrides))


def test_parameter_counts_from_the_config_alone(llama3_shape):
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert layer == 218_112_000
    assert llama3_shape.params == 32 * layer + 2 * 128256 * 4096 + 4096 == PARAMS_8B
    assert llama3_shape.block_linear_params == 32 * (layer - 2 * 4096) == BLOCK_LINEAR_8B
    assert llama3_shape.head_params == 128256 * 4096
    assert llama3_shape.lora_params == 32 * 16 * (8192 + 2 * 5120 + 8192 + 3 * 18432) == LORA_8B
    mistral = model_shape(AutoConfig.for_model("mistral", **{**LLAMA3_8B, "vocab_size": 32000}))
    assert mistral.params == 32 * layer + 2 * 32000 * 4096 + 4096 == 7_241_732_096
    assert mistral.lora_params == 0


def test_full_fine_tuning_in_bf16_by_hand(llama3_shape):
    """bf16 weights 2 bytes, bf16 gradients 2, AdamW's two bf16 moments 4: 8 bytes per parameter, 59.83 GiB;
    a frozen copy as reference 2 more. Activations, 2 x 2 rows (pairs) x 512 tokens = 2048 tokens, per layer
    2048 x (2 x (5 x 4096 + 2 x 1024 + 4 x 14336) + 4 x 2 x 4096) = 2048 x 192,512 bytes; x 32 layers, plus
    logits and their gradient 2 x 2048 x 128256 x 2 bytes."""
    cfg = config("model.dtype=bfloat16", "data.max_length=512", "batch.micro_batch_size=2")
    parts = estimate_memory(cfg, "pairwise", needs_reference=True, shape=llama3_shape).parts
    assert parts["weights"] == parts["gradients"] == parts["reference"] == 2 * PARAMS_8B
    assert parts["optimizer"] == 4 * PARAMS_8B
    assert parts["activations"] == 32 * 2048 * 192_512 + 2 * 2048 * 128256 * 2
    assert parts["runtime"] == GiB
    assert "adapters" not in parts


def test_qlora_with_checkpointing_by_hand(llama3_shape):
    """4-bit double-quantised block weights at 4.127 bits, the rest (embeddings, head, norms) upcast to fp32 for
    training: 6,979,321,856 x 4.127 / 8 + 1,050,939,392 x 4 = 3,600,457,662 + 4,203,757,568 bytes (7.25 GiB).
    fp32 adapters, gradients and AdamW states: 4 + 4 + 8 bytes x 41,943,040. The reference copy is quantised
    alike but keeps bf16 for the rest. Checkpointing keeps each layer's input (h x 2 bytes per token) and one
    layer's activations."""
    cfg = config("model.dtype=bfloat16", "mixed_precision=bf16", "model.quant.bits=4", "model.lora.enabled=true",
                 "model.gradient_checkpointing=true", "data.max_length=512", "batch.micro_batch_size=2",
                 "optim.optimizer=paged_adamw_8bit")
    parts = estimate_memory(cfg, "pairwise", needs_reference=True, shape=llama3_shape).parts
    rest = PARAMS_8B - BLOCK_LINEAR_8B
    assert parts["weights"] == int(BLOCK_LINEAR_8B * 4.127 / 8) + rest * 4 == 3_600_457_662 + 4_203_757_568
    assert parts["reference"] == int(BLOCK_LINEAR_8B * 4.127 / 8) + rest * 2
    assert parts["adapters"] == parts["gradients"] == 4 * LORA_8B
    assert parts["optimizer"] == 2 * LORA_8B  # 8-bit states: 2 bytes per parameter
    assert parts["activations"] == 2048 * 4096 * 2 * 32 + 2048 * 192_512 + 2 * 2048 * 128256 * 2


def test_reference_modes_and_ppo_parts(llama3_shape):
    base = ["model.dtype=bfloat16", "model.lora.enabled=true"]
    for mode in ("disabled", "precomputed"):
        parts = estimate_memory(config(*base, f"reference.mode={mode}"), "pairwise", needs_reference=True,
                                shape=llama3_shape).parts
        assert "reference" not in parts
    # a reward model has no LM head
    reward = estimate_memory(config(*base), "reward", shape=llama3_shape).parts
    assert reward["weights"] == 2 * (PARAMS_8B - 128256 * 4096)
    # ORPO needs no reference at all
    assert "reference" not in estimate_memory(config(*base), "pairwise", shape=llama3_shape).parts

    ppo = load_config(TINY / "ppo.yaml", [*base, "data.max_prompt_length=256", "ppo.max_new_tokens=256",
                                          "ppo.rollout_micro_batch_size=8"])
    parts = estimate_memory(ppo, "ppo", shape=llama3_shape, reward_shapes=[llama3_shape]).parts
    # K and V: 2 x 32 layers x 1024 x 512 tokens x 8 rows x 2 bytes = 512 MiB
    assert parts["kv cache"] == 2 * 32 * 1024 * 512 * 8 * 2 == 512 * 1024**2
    assert parts["reference"] == 2 * PARAMS_8B
    assert parts["reward models"] == 2 * (PARAMS_8B - 128256 * 4096)  # a score head instead of the LM head


def test_a_run_that_does_not_fit_stops_with_the_parts_and_what_would_fit(llama3, monkeypatch):
    monkeypatch.setattr(memory, "load_model_config", lambda *args, **kwargs: llama3)
    cfg = config("model.dtype=bfloat16", "mixed_precision=bf16", "data.max_length=1024", "batch.micro_batch_size=4")
    with pytest.raises(MemoryCheckError) as stop:
        check_memory(cfg, "pairwise", needs_reference=True, device="cuda", available=24 * GiB)
    message = str(stop.value)
    print(message)
    assert "but the device has 24.0 GiB available" in message
    for part in ("weights", "gradients", "optimizer", "activations", "reference", "total"):
        assert f"\n  {part} " in message
    # the largest saving first, then each addition until it fits
    assert "  model.quant.bits=4 model.lora.enabled=true (QLoRA)" in message
    assert "+ model.gradient_checkpointing=true" in message
    assert message.count("(fits)") == 1
    assert "--skip-memory-check" in message

    small = config("model.dtype=bfloat16", "mixed_precision=bf16", "model.quant.bits=4", "model.lora.enabled=true",
                   "model.gradient_checkpointing=true", "batch.micro_batch_size=1", "reference.mode=disabled")
    estimate = check_memory(small, "pairwise", needs_reference=True, device="cuda", available=24 * GiB)
    assert estimate.total < 24 * GiB


def test_cpu_processes_share_the_machine(llama3, monkeypatch):
    monkeypatch.setattr(memory, "load_model_config", lambda *args, **kwargs: llama3)
    cfg = config("model.dtype=bfloat16", "model.quant.bits=4", "model.lora.enabled=true", "reference.mode=disabled")
    one = check_memory(cfg, "pairwise", needs_reference=True, device="cpu", available=40 * GiB).total
    with pytest.raises(MemoryCheckError, match=r"x 4 processes"):
        check_memory(cfg, "pairwise", needs_reference=True, device="cpu", processes_per_device=4,
                     available=int(3.5 * one))


def test_the_entry_point_stops_before_loading_and_the_switch_skips(tmp_path, monkeypatch):
    from engine import train

    monkeypatch.setattr(memory, "available_memory", lambda device: (1024**2, "a 1 MiB test device"))
    args = ["--config", str(TINY / "sft.yaml"), f"output_dir={tmp_path}", *SMALL, "max_steps=1"]
    with pytest.raises(MemoryCheckError, match="a 1 MiB test device"):
        train.main(args)
    assert not (tmp_path / "config.yaml").exists()
    assert train.main(["--skip-memory-check", *args]).steps == 1


def test_memory_check_false_in_the_config_skips_the_check(tmp_path, monkeypatch):
    from engine import train

    monkeypatch.setattr(memory, "available_memory", lambda device: (1024**2, "a 1 MiB test device"))
    args = ["--config", str(TINY / "sft.yaml"), f"output_dir={tmp_path}", *SMALL, "max_steps=1"]
    with pytest.raises(MemoryCheckError, match="a 1 MiB test device"):
        train.main([*args, "memory_check=true"])
    assert train.main([*args, "memory_check=false"]).steps == 1


def test_a_config_that_cannot_be_read_skips_the_check_with_a_warning(monkeypatch):
    def offline(name, **kwargs):
        raise OSError(f"{name} is not cached and there is no network")

    monkeypatch.setattr(memory, "load_model_config", offline)
    with pytest.warns(UserWarning, match="memory check skipped.*not cached"):
        assert check_memory(config(), "pairwise", needs_reference=True, device="cpu", available=1) is None


@pytest.mark.parametrize("arch", ["gpt2", "neox", "tiny"])
def test_lora_estimate_counts_what_peft_adapts(tmp_path, arch):
    """GPT-2's Conv1D and GPT-NeoX's fused query_key_value are adapted by peft's all-linear; a count of
    nn.Linear alone saw 0 adapter parameters on GPT-2 (2 layers, hidden 64, r=16: 32,768 in truth)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.tiny import resolve_model_path
    from tests.engine import archs

    path = resolve_model_path("tiny") if arch == "tiny" else archs.build(arch, tmp_path / arch)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                           LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    actual = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert actual > 0
    assert model_shape(AutoConfig.from_pretrained(path), 16, "all-linear").lora_params == actual
    if arch == "gpt2":
        assert actual == 32_768
        # the 4-bit estimate quantises the Conv1D blocks: 2 layers x (64 x 192 + 64 x 64 + 2 x 64 x 256)
        assert model_shape(AutoConfig.from_pretrained(path)).block_linear_params == 2 * 49_152


def test_an_encoder_reward_model_is_estimated_from_its_own_config(tmp_path):
    """DeBERTa has no causal-LM class: it is built as the sequence classifier it is loaded as."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from tests.engine import archs

    path = archs.build("deberta", tmp_path / "deberta")
    shape = model_shape(AutoConfig.from_pretrained(path))
    assert shape.params == sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(path).parameters())
    assert shape.head_params == 0 and shape.vocab == 1
    # what the start-up checks build on, which skipped with a warning before: the disk and the PPO memory checks
    from engine import validate

    need, trainable = validate.checkpoint_bytes(load_config(TINY / "reward.yaml", [f"model.name_or_path={path}"]),
                                                AutoConfig.from_pretrained(path))
    assert trainable == shape.params and need == 12 * shape.params
    ppo = estimate_memory(load_config(TINY / "ppo.yaml", ["model.name_or_path=tiny", "ppo.rewards=[]",
                                                         f"reward_model.name_or_path={path}"]), "ppo")
    assert ppo.parts["reward models"] == 4 * shape.params
    reward = estimate_memory(load_config(TINY / "reward.yaml", [f"model.name_or_path={path}"]), "reward")
    assert reward.parts["weights"] == 4 * shape.params


def test_start_up_checks_run_on_an_encoder_reward_model(tmp_path, monkeypatch, recwarn):
    """Reward training of a DeBERTa: the memory, position and disk checks run (they skipped with a warning)."""
    from engine import models
    from tests.engine import archs
    from tests.engine.runs import run

    def loaded(*args, **kwargs):
        raise RuntimeError("start-up checks passed")

    monkeypatch.setattr(models, "load_reward_model", loaded)
    path = archs.build("deberta", tmp_path / "deberta")
    with pytest.raises(RuntimeError, match="start-up checks passed"):
        run("reward.yaml", tmp_path / "run", f"model.name_or_path={path}", "model.attn_implementation=eager")
    assert not [w for w in recwarn if "skipped" in str(w.message)], [str(w.message) for w in recwarn]
