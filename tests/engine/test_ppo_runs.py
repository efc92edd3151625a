"""PPO runs on the tiny model, on CPU: resume equals an uninterrupted run, and the score PPO optimises goes up
with a trained tiny reward model (with the synthetic judge as a reward function it is the CI quickstart's test,
tests/engine/test_pipeline.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from data import DataConfig, build_datasets, make_collator
from data.synthetic import judge_reward
from engine import train
from engine.tiny import resolve_model_path
from rollout.generation import SamplingConfig, generate
from tests.engine.conftest import train_plainly

TINY_PPO = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "ppo.yaml"


def run_ppo(output_dir, *overrides: str):
    """`engine/train.py --config configs/tiny/ppo.yaml output_dir=... <overrides>` in this process."""
    return train.main(["--config", str(TINY_PPO), f"output_dir={output_dir}", "logging.progress_bar=false", *overrides])


SMALL = ["data.synthetic_size=200", "data.max_samples=64", "batch.global_batch_size=4", "batch.micro_batch_size=2",
         "ppo.rollout_batch_size=8", "ppo.rollout_micro_batch_size=8", "ppo.max_new_tokens=6", "ppo.epochs=2",
         "model.name_or_path=tiny", "optim.scheduler=linear"]


def test_resume_equals_an_uninterrupted_run(tmp_path):
    """Three iterations straight, against one iteration, a checkpoint, and a resumed run of the other two:
    same weights and value head, same metrics, including the adaptive KL coefficient and score normaliser."""
    settings = [*SMALL, "ppo.kl_target=0.01", "ppo.kl_horizon=50", "ppo.normalize_scores=true",
                "checkpoint.every_steps=1", "checkpoint.keep_last=5", "max_steps=3"]
    straight = run_ppo(tmp_path / "straight", *settings)
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step_1", resumed_dir / "checkpoints" / "step_1")
    resumed = run_ppo(resumed_dir, *settings, "checkpoint.resume_from=latest")

    state = json.loads((resumed_dir / "checkpoints" / "step_1" / "trainer_state.json").read_text())
    assert state["scorer"]["moments"]["count"] == 8 and state["kl_controller"]["value"] != 0.05
    kl_coefs = [r["objective/kl_coef"] for r in straight.history]
    assert kl_coefs[0] == 0.05 and kl_coefs[1] != kl_coefs[0]
    assert [r["step"] for r in resumed.history] == [2, 3]
    for a, b in zip(straight.history[1:], resumed.history):
        for key in a:
            if not key.startswith("time/"):
                assert a[key] == pytest.approx(b[key], abs=1e-6), key
    for name in ("model.safetensors", "value_head.safetensors"):
        a, b = load_file(straight.final_dir / name), load_file(resumed.final_dir / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> Path:
    """The tiny reward model after plain Bradley-Terry training on the synthetic pairs (sorted beats corrupted)."""
    out = tmp_path_factory.mktemp("reward")
    path = resolve_model_path("tiny-reward")
    model, tokenizer = AutoModelForSequenceClassification.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    rows = build_datasets("preference", DataConfig(path="synthetic"), tokenizer, log=None).train
    collate = make_collator("preference", tokenizer)

    def bradley_terry(batch):
        chosen, rejected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].chunk(2)
        return -torch.nn.functional.logsigmoid(chosen - rejected).mean()

    train_plainly(model, rows, collate, steps=120, lr=1e-3, loss=bradley_terry)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def sampled_judge_score(model_dir: Path, n: int = 200) -> float:
    """Mean judge score of responses sampled at temperature 1 (what PPO optimises) to held-out prompts."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = build_datasets("prompt", DataConfig(path="synthetic"), tokenizer, log=None).eval
    batch = make_collator("prompt", tokenizer)([rows[i] for i in range(n)])
    gen = generate(model, batch["input_ids"], batch["attention_mask"], SamplingConfig(max_new_tokens=16, micro_batch_size=100),
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   generator=torch.Generator().manual_seed(0))
    responses = tokenizer.batch_decode(gen.responses.masked_fill(~gen.action_mask, tokenizer.pad_token_id),
                                       skip_special_tokens=True)
    return sum(judge_reward(batch["prompt"], responses)) / n


def test_ppo_on_a_trained_reward_model_raises_its_score(tmp_path, sft_policy, reward_model):
    """The reward model's score is what PPO optimises, and it goes up. The judge is printed, not asserted: a
    reward model this small and this briefly trained is easy to over-optimise (the judge may fall)."""
    before = sampled_judge_score(sft_policy)
    result = run_ppo(tmp_path / "ppo", f"model.name_or_path={sft_policy}", "max_steps=8",
                     f"reward_model.name_or_path={reward_model}", "ppo.rewards=[]")
    scores = [r["objective/score/reward_model"] for r in result.history]
    print(f"reward-model score (first 2, last 2 iterations): {sum(scores[:2]) / 2:.3f} -> {sum(scores[-2:]) / 2:.3f}; "
          f"judge, sampled on 200 held-out prompts: {before:.3f} -> {sampled_judge_score(result.final_dir):.3f}")
    assert sum(scores[-2:]) / 2 > sum(scores[:2]) / 2 + 0.15
