"""Every family on tiny random-init models of real architectures, through the real entry points: SFT, DPO
with LoRA, reward training, PPO (2 iterations, scored by a DeBERTa-v2 reward model with its own tokenizer)
and engine.generate, on GPT-2, OPT, Qwen2, Mistral, Gemma-3 text and GPT-NeoX (tests/engine/archs.py);
Gemma-2 (eager attention) in every family but generation.

Measured: about 65 s for the whole file on a 2-core machine with OMP_NUM_THREADS=1."""

from __future__ import annotations

import math

import pytest
from transformers import AutoConfig

from engine import generate
from tests.engine import archs
from tests.engine.runs import run, series

PPO = ["data.synthetic_size=200", "data.max_samples=64", "batch.global_batch_size=4", "batch.micro_batch_size=2",
       "ppo.rollout_batch_size=8", "ppo.rollout_micro_batch_size=8", "ppo.max_new_tokens=6", "ppo.epochs=1",
       "max_steps=2", "ppo.rewards=[]", "checkpoint.every_steps=0"]


# Gemma-2 has no SDPA: it trains with attn_implementation=eager, which engine.generate cannot choose yet
TRAINED = [*archs.MATRIX, "gemma2"]


def attention(arch: str) -> list[str]:
    return [f"model.attn_implementation={archs.ARCHS[arch].attn}"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """model(name, padded=False) -> its directory; `padded` adds a pad token where the family has none
    (GPT-2, Mistral), as reward training and PPO require."""
    root, cache = tmp_path_factory.mktemp("archs"), {}

    def model(name: str, padded: bool = False):
        if name not in cache:
            cache[name] = archs.build(name, root / name)
        if padded and "pad_token" not in archs.ARCHS[name].roles:
            if (name, "padded") not in cache:
                cache[name, "padded"] = archs.with_pad_token(cache[name], root / f"{name}-padded")
            return cache[name, "padded"]
        return cache[name]
    return model


@pytest.mark.parametrize("arch", TRAINED)
def test_sft_loss_falls(tmp_path, built, arch):
    result = run("sft.yaml", tmp_path, f"model.name_or_path={built(arch)}", *attention(arch), "max_steps=6")
    loss = series(result, "loss")
    assert all(math.isfinite(x) for x in loss)
    assert loss[-1] < loss[0] - 0.5, loss  # from about ln(512) = 6.2 at random init


@pytest.mark.parametrize("arch", TRAINED)
def test_dpo_with_lora_starts_at_log_2(tmp_path, built, arch):
    """A fresh adapter leaves the policy equal to its reference: the first DPO loss is ln 2 (up to the
    dropout the model's config trains with, 0.1 on GPT-2 and OPT)."""
    result = run("dpo.yaml", tmp_path, f"model.name_or_path={built(arch)}", *attention(arch), "model.lora.enabled=true",
                 "max_steps=2")
    loss = series(result, "loss")
    dropout = max(getattr(AutoConfig.from_pretrained(built(arch)), key, 0) or 0
                  for key in ("dropout", "resid_pdrop", "attention_dropout", "hidden_dropout"))
    assert loss[0] == pytest.approx(math.log(2), abs=0.05 if dropout else 1e-4)
    assert all(math.isfinite(x) for x in loss)
    assert (result.final_dir / "adapter_config.json").exists()


@pytest.mark.parametrize("arch", TRAINED)
def test_reward_training(tmp_path, built, arch):
    result = run("reward.yaml", tmp_path, f"model.name_or_path={built(arch, padded=True)}", *attention(arch),
                 "max_steps=3")
    assert all(math.isfinite(x) for x in series(result, "loss"))
    config = AutoConfig.from_pretrained(result.final_dir)
    assert config.num_labels == 1 and config.pad_token_id is not None


@pytest.fixture(scope="module")
def deberta(tmp_path_factory):
    return archs.build("deberta", tmp_path_factory.mktemp("deberta") / "model")


@pytest.mark.parametrize("arch", TRAINED)
def test_ppo_with_a_deberta_reward_model(tmp_path, built, deberta, arch):
    result = run("ppo.yaml", tmp_path, f"model.name_or_path={built(arch, padded=True)}", *attention(arch), *PPO,
                 f"reward_model.name_or_path={deberta}", "reward_model.attn_implementation=eager")
    assert len(result.history) == 2
    first = result.history[0]
    for key in ("objective/score/reward_model", "loss/policy", "policy/approx_kl", "objective/kl"):
        assert math.isfinite(first[key]), key
    assert abs(first["objective/score/reward_model"]) > 0  # the DeBERTa scores reached the rollout
    assert first["objective/kl"] == pytest.approx(0, abs=1e-5)  # the policy starts as its reference
    assert (result.final_dir / "config.json").exists()


@pytest.mark.parametrize("arch", archs.MATRIX)
def test_generate(tmp_path, built, arch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Sort the letters: q e b\nSort the letters: d a c\n")
    rows = generate.main(["--model", str(built(arch)), "--prompts", str(prompts), "--max-new-tokens", "5",
                          "--temperature", "0", "--output", str(tmp_path / "out.jsonl")])
    assert [r["prompt"] for r in rows] == ["Sort the letters: q e b", "Sort the letters: d a c"]
    assert all(isinstance(r["response"], str) for r in rows)
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2
