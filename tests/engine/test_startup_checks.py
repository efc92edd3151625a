"""Each start-up check fails before any weights load, with a message that names the fix; and stays quiet on
the settings that do work. Batch sizes that do not divide and an unwritable output directory are checked by
the config and train.check_inputs, and tested in test_bad_input.py."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType
from transformers import AutoTokenizer

from data import DataError
from data.tokenize import CHATML
from engine import models, optim, validate
from engine.config import ConfigError, LoraConfig, ModelConfig, RunConfig, load_config
from engine.families import FAMILIES
from engine.memory import load_model_config
from engine.tiny import resolve_model_path
from tests.engine.runs import TINY, run


def _tiny_copy(tmp_path, change_tokenizer):
    model_dir = tmp_path / "model"
    shutil.copytree(resolve_model_path("tiny"), model_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    change_tokenizer(tokenizer)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def _pad_is_eos(tokenizer):
    tokenizer.pad_token = tokenizer.eos_token


@pytest.mark.parametrize("config", ["reward.yaml", "ppo.yaml"])
def test_pad_equal_to_eos_is_refused_where_a_reward_is_read(tmp_path, no_model_load, config):
    model_dir = _tiny_copy(tmp_path, _pad_is_eos)
    with pytest.raises(DataError, match="same token for pad and EOS.*add_special_tokens"):
        run(config, tmp_path / "run", f"model.name_or_path={model_dir}")


def test_pad_equal_to_eos_is_allowed_where_no_reward_is_read():
    from data.tokenize import check_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("tiny"))
    _pad_is_eos(tokenizer)
    for family in ("sft", "pairwise"):
        facts = FAMILIES[family]
        check_tokenizer(tokenizer, facts.data, allow_pad_as_eos=facts.pad_may_be_eos)


def _chatml_with_special_turns(tokenizer):
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML


def test_a_chat_template_that_ends_turns_without_eos_is_refused_for_ppo(tmp_path, no_model_load):
    model_dir = _tiny_copy(tmp_path, _chatml_with_special_turns)
    with pytest.raises(ConfigError, match=r"ends an assistant turn with '<\|im_end\|>\\n', which holds no EOS.*"
                                          r"generation_config.json"):
        run("ppo.yaml", tmp_path / "run", f"model.name_or_path={model_dir}")

    # Declared as a stop token in the generation config, the same template passes.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = json.loads((model_dir / "generation_config.json").read_text())
    config["eos_token_id"] = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    stops = validate.stop_tokens(tokenizer, str(model_dir))
    assert stops == [tokenizer.eos_token, "<|im_end|>"]
    validate.check_turns_end_with_a_stop_token(RunConfig(), tokenizer, stops)
    # The tiny tokenizer's own (Zephyr-style) template writes EOS after each turn.
    tiny = AutoTokenizer.from_pretrained(resolve_model_path("tiny"))
    validate.check_turns_end_with_a_stop_token(RunConfig(), tiny, [tiny.eos_token])


def test_a_template_that_writes_bos_twice_is_refused_before_a_model_loads(tmp_path, no_model_load):
    template = "{{ bos_token }}{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match="writes BOS .* twice"):
        run("sft.yaml", tmp_path, f"data.template={json.dumps(template)}")


def test_lora_with_checkpointing_needs_input_gradients():
    cfg = ModelConfig(gradient_checkpointing=True, lora=LoraConfig(enabled=True, r=2))
    model = models.load_policy(cfg)
    optim.build_optimizer(model, RunConfig().optim)  # the loader enables input gradients

    model.get_base_model().disable_input_require_grads()
    with pytest.raises(ConfigError, match="no input gradients.*enable_input_require_grads"):
        optim.build_optimizer(model, RunConfig().optim)


def _accelerator(kind, zero_stage=None):
    plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage else None
    return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=plugin))


@pytest.mark.parametrize("kind, stage, refused", [
    (DistributedType.FSDP, None, "FSDP"),
    (DistributedType.DEEPSPEED, 3, "DeepSpeed ZeRO-3"),
    (DistributedType.DEEPSPEED, 2, None),
    (DistributedType.MULTI_GPU, None, None),
    (DistributedType.NO, None, None),
])
@pytest.mark.parametrize("check, overrides, message, fine", [
    ("check_quantised_distribution", ["model.quant.bits=4", "model.lora.enabled=true"],
     "bits=4 cannot train under {}.*DDP", []),
    # models.save_final cannot merge from a gathered state dict, so the run would fail after training; a full
    # fine-tune has nothing to merge
    ("check_export_merge", ["export.merge=true", "model.lora.enabled=true"],
     "export.merge=true cannot merge a LoRA adapter under {}", ["export.merge=true"]),
])
def test_sharding_modes_refuse_4bit_weights_and_merging_an_adapter(kind, stage, refused, check, overrides, message,
                                                                  fine):
    accelerator = _accelerator(kind, stage)
    if refused is None:
        getattr(validate, check)(load_config(TINY / "dpo.yaml", overrides), accelerator)
        return
    with pytest.raises(ConfigError, match=message.format(refused)):
        getattr(validate, check)(load_config(TINY / "dpo.yaml", overrides), accelerator)
    getattr(validate, check)(load_config(TINY / "dpo.yaml", fine), accelerator)


@pytest.mark.parametrize("config, overrides, message", [
    ("sft.yaml", ["data.max_length=2048"], "data.max_length=2048 exceeds the 1024 positions"),
    ("ppo.yaml", ["model.name_or_path=tiny", "data.max_length=1200", "data.max_prompt_length=1000", "ppo.max_new_tokens=64"],
     "plus ppo.max_new_tokens=64 exceed the 1024 positions"),
])
def test_sequences_longer_than_the_model_positions_are_refused(tmp_path, no_model_load, config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run(config, tmp_path, *overrides)


def test_too_little_disk_for_a_checkpoint_is_refused_and_the_estimate_matches_a_real_one(tmp_path, monkeypatch):
    # The estimate: every parameter (full fine-tuning, float32) x (4 bytes of weight + 8 of AdamW moments).
    result = run("sft.yaml", tmp_path / "real", "max_steps=1", "checkpoint.every_steps=1")
    saved = sum(f.stat().st_size for f in (result.output_dir / "checkpoints" / "step_1").iterdir())
    cfg = load_config(TINY / "sft.yaml")
    need, params = validate.checkpoint_bytes(cfg, load_model_config("tiny"))
    assert need == 12 * params
    assert need == pytest.approx(saved, rel=0.02)

    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=need - 1))
    with pytest.raises(ConfigError, match=r"has 0.0\d GiB free, less than the run will write.*adamw_8bit"):
        run("sft.yaml", tmp_path / "full")


def test_the_disk_check_budgets_the_kept_checkpoints_plus_the_one_being_saved_and_final(tmp_path, monkeypatch):
    """keep_last=2 with checkpoints every 2 steps: during a save 2 kept + 1 being written exist; at the end
    2 kept + final/ (weights alone, smaller). Room for two checkpoints is not enough; for three it is, and a
    resumed run whose 2 checkpoints are already on disk needs room for one."""
    settings = ["checkpoint.every_steps=2", "checkpoint.keep_last=2"]
    cfg = load_config(TINY / "sft.yaml", [f"output_dir={tmp_path}", *settings])
    model_config = load_model_config("tiny")
    one, _ = validate.checkpoint_bytes(cfg, model_config)
    assert validate.final_bytes(cfg, model_config) < one
    free = {"bytes": 3 * one - 1}
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=free["bytes"]))
    with pytest.raises(ConfigError, match=r"2 kept checkpoint\(s\) \(checkpoint.keep_last=2\) of which 0 exist"):
        validate.check_disk(cfg, model_config)
    free["bytes"] = 3 * one
    validate.check_disk(cfg, model_config)

    for step in (2, 4):
        (tmp_path / "checkpoints" / f"step_{step}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step_{step}" / "trainer_state.json").write_text("{}")
    free["bytes"] = one
    validate.check_disk(cfg, model_config)


def test_the_engines_own_leftovers_are_deleted_before_the_disk_check(tmp_path, monkeypatch, no_model_load):
    """A save that died of a full disk (or a kill) leaves `.tmp_step_N`; its space must count as free, or
    the same command is refused for ever."""
    leftover = tmp_path / "checkpoints" / ".tmp_step_4"
    leftover.mkdir(parents=True)
    (leftover / "optimizer.bin").write_bytes(b"x" * 1000)
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(
        free=1000 if leftover.exists() else 1 << 40))
    with pytest.raises(AssertionError, match="a model was loaded"):  # past every start-up check
        run("sft.yaml", tmp_path, "checkpoint.resume_from=latest")
    assert not leftover.exists()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny GPT-2 with its tokenizer as the hub ships it: <|endoftext|> is BOS, EOS and UNK, and no pad."""
    from tests.engine import archs

    return archs.build("gpt2", tmp_path_factory.mktemp("gpt2") / "model")


@pytest.mark.parametrize("config, key", [("reward.yaml", "model.name_or_path"),
                                         ("ppo.yaml", "model.name_or_path"),
                                         ("ppo.yaml", "reward_model.name_or_path")])
def test_no_pad_token_where_a_reward_is_read_is_a_start_up_error(tmp_path, no_model_load, gpt2, config, key):
    overrides = [f"{key}={gpt2}"]
    if key == "reward_model.name_or_path":
        overrides += ["model.name_or_path=tiny", "ppo.rewards=[]"]
    role = "policy" if config == "ppo.yaml" and key == "model.name_or_path" else "reward model"
    with pytest.raises(ConfigError, match=rf"the {role} {key}=.* has no pad token.*add_special_tokens.*set {key}="):
        run(config, tmp_path / "run", *overrides)


def test_a_pad_token_borrowed_from_eos_is_not_saved(tmp_path, gpt2):
    """SFT pads GPT-2 with its EOS; final/ keeps the tokenizer as it was, so the reward stage after it says
    how to add a pad token (not that pad == EOS, which the user never set), and DPO after it pads with EOS."""
    sft = run("sft.yaml", tmp_path / "sft", f"model.name_or_path={gpt2}", "max_steps=1")
    assert AutoTokenizer.from_pretrained(sft.final_dir).pad_token is None
    assert "pad_token" not in json.loads((sft.final_dir / "tokenizer_config.json").read_text())
    with pytest.raises(ConfigError, match="has no pad token in its tokenizer"):
        run("reward.yaml", tmp_path / "reward", f"model.name_or_path={sft.final_dir}")
    dpo = run("dpo.yaml", tmp_path / "dpo", f"model.name_or_path={sft.final_dir}", "max_steps=1")
    assert AutoTokenizer.from_pretrained(dpo.final_dir).pad_token is None
