"""A reward model reads in PPO what it read in training: the PPO scorer's scores of the reward loop's own
held-out pairs are the reward loop's eval scores, for a tokenizer that adds `[CLS] ... [SEP]` itself
(DeBERTa-v2) and for one that adds only BOS (the tiny Llama)."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from data.synthetic import generate
from engine.config import load_config
from engine.loops.ppo import build_scorer
from tests.engine import archs
from tests.engine.runs import TINY, run

SIZE = 200  # data.synthetic_size; its held-out split is generate("preference", 50, seed=1_000_003)


@pytest.mark.parametrize("model", ["deberta", "tiny"])
def test_ppo_scorer_reads_the_reward_loops_held_out_pairs_as_its_eval_did(tmp_path, model):
    overrides = ["model.attn_implementation=eager"]
    if model == "deberta":
        path = archs.build("deberta", tmp_path / "deberta")
        tokenizer = archs.build_tokenizer(archs.ARCHS["deberta"])
        assert tokenizer("a b").input_ids[0] == tokenizer.cls_token_id
        assert tokenizer("a b").input_ids[-1] == tokenizer.sep_token_id
    else:
        path = "tiny"
        overrides = []
    steps = ["max_steps=3", "eval.every_steps=3", "eval.max_batches=100", f"data.synthetic_size={SIZE}",
             "data.max_samples=null"]
    result = run("reward.yaml", tmp_path / "rm", f"model.name_or_path={path}", *overrides, *steps)
    final_eval = [r for r in result.history if "eval/rewards/chosen" in r][-1]

    cfg = load_config(TINY / "ppo.yaml", [f"reward_model.name_or_path={result.final_dir}", "ppo.rewards=[]", "ppo.normalize_scores=false",
                                          "model.name_or_path=tiny",
                                          *(o.replace("model.", "reward_model.") for o in overrides)])
    scorer = build_scorer(cfg, Accelerator(cpu=True))
    pairs = generate("preference", max(50, SIZE // 10), seed=1_000_003)
    prompts = [p["prompt"] for p in pairs]
    no_eos = torch.zeros(len(pairs), dtype=torch.bool)
    chosen = scorer(prompts, [p["chosen"] for p in pairs], no_eos=no_eos).scores
    rejected = scorer(prompts, [p["rejected"] for p in pairs], no_eos=no_eos).scores
    # a second [SEP] (or any other tokenisation) moves every score by far more than this
    assert float(chosen.mean()) == pytest.approx(final_eval["eval/rewards/chosen"], abs=1e-5)
    assert float(rejected.mean()) == pytest.approx(final_eval["eval/rewards/rejected"], abs=1e-5)
    assert float(chosen.std()) > 1e-3  # the scores differ row to row: the means compare real numbers
