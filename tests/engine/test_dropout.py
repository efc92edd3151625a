"""No dropout in RL and preference training (model.disable_dropout, on by default for the PPO and pairwise
families): a PPO ratio starts at 1 and a DPO policy starts equal to its eval-mode reference, on models whose
config has dropout 0.1 (OPT applies it functionally from a float, GPT-2 through nn.Dropout), with LoRA too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import models, train
from engine.config import LoraConfig, ModelConfig
from tests.engine.runs import run

TINY_PPO = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "ppo.yaml"
ARCHITECTURES = {
    "opt": {"model_type": "opt", "hidden_size": 64, "word_embed_proj_dim": 64, "ffn_dim": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 256, "dropout": 0.1, "attention_dropout": 0.1},
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256, "resid_pdrop": 0.1,
             "embd_pdrop": 0.1, "attn_pdrop": 0.1},
}


@pytest.fixture(scope="module")
def model_json(tmp_path_factory):
    root = tmp_path_factory.mktemp("dropout")

    def write(name: str) -> str:
        path = root / f"{name}.json"
        path.write_text(json.dumps(ARCHITECTURES[name]))
        return str(path)

    return write


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("lora", [False, True])
def test_a_dropout_free_model_trains_with_the_logits_it_evaluates_with(model_json, name, lora):
    cfg = ModelConfig(name_or_path=model_json(name), lora=LoraConfig(enabled=lora, r=4, alpha=8, dropout=0.1))
    ids = torch.arange(3, 19).reshape(2, 8)

    def train_minus_eval(model) -> float:
        with torch.no_grad():
            trained = model.train()(input_ids=ids).logits
            evaluated = model.eval()(input_ids=ids).logits
        return (trained - evaluated).abs().max().item()

    torch.manual_seed(0)
    assert train_minus_eval(models.load_policy(cfg, disable_dropout=False)) > 1e-3
    model = models.load_policy(cfg, disable_dropout=True)
    assert train_minus_eval(model) == 0.0
    config = model.get_base_model().config if lora else model.config
    assert all(getattr(config, k) == v for k, v in ARCHITECTURES[name].items() if "drop" in k)  # saved as it came


def run_ppo(output_dir, *overrides: str):
    return train.main(["--config", str(TINY_PPO), f"output_dir={output_dir}", "logging.progress_bar=false",
                       "data.synthetic_size=100", "data.max_samples=16", "batch.global_batch_size=8",
                       "batch.micro_batch_size=8", "ppo.rollout_batch_size=8", "ppo.rollout_micro_batch_size=8",
                       "ppo.max_new_tokens=6", "ppo.epochs=1", "max_steps=1", "checkpoint.every_steps=0", *overrides])


@pytest.mark.parametrize("lora", [False, True])
def test_the_first_ppo_minibatch_has_ratio_one(tmp_path, model_json, lora):
    """approx KL 0.5 E[(log pi - log pi_old)^2] of the first minibatch, before any update: the rollout's
    log-probs are eval-mode ones, so it is ~0 only if the training forward has no dropout either."""
    settings = [f"model.name_or_path={model_json('opt')}"]
    if lora:
        settings += ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.1",
                     "reference.mode=disabled"]
    default = run_ppo(tmp_path / "default", *settings).history[0]["policy/approx_kl"]
    with_dropout = run_ppo(tmp_path / "dropout", *settings, "model.disable_dropout=false").history[0]
    assert default < 1e-8
    assert with_dropout["policy/approx_kl"] > 1e-5, with_dropout  # the fault this switch removes


def test_dpo_starts_at_its_reference(tmp_path, model_json):
    """At step 0 the policy is the reference's weights, so its train-mode log-probs must equal the reference's
    eval-mode ones: every implicit reward beta (log pi - log pi_ref) is 0."""
    settings = [f"model.name_or_path={model_json('opt')}", "max_steps=1", "batch.global_batch_size=8",
                "batch.micro_batch_size=8"]
    default = run("dpo.yaml", tmp_path / "default", *settings).history[0]
    with_dropout = run("dpo.yaml", tmp_path / "dropout", *settings, "model.disable_dropout=false").history[0]
    for key in ("rewards/chosen", "rewards/rejected"):
        assert abs(default[key]) < 1e-6, default
    assert abs(with_dropout["rewards/chosen"]) + abs(with_dropout["rewards/rejected"]) > 1e-4, with_dropout
