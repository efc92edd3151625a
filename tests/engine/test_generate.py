"""engine/generate.py: prompts from a file or stdin, the same tokens as rollout generation, every checkpoint kind."""

from __future__ import annotations

import io
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from engine import generate as gen
from engine.config import ModelConfig
from engine.models import load_policy, load_tokenizer, save_final
from engine.tiny import resolve_model_path
from rollout.generation import SamplingConfig, generate

PROMPTS = ["Sort the letters: q e b m", "Sort the letters: z a k", "Sort the letters: h c x f d"]


@pytest.fixture(scope="module")
def tiny_dir() -> str:
    return resolve_model_path("tiny")


def test_greedy_answers_equal_rollout_generation_on_the_training_prompt_ids(tiny_dir, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n\n")  # a blank line is not a prompt
    out = tmp_path / "answers.jsonl"
    rows = gen.main(["--model", tiny_dir, "--prompts", str(prompts_file), "--temperature", "0",
                     "--max-new-tokens", "8", "--batch-size", "2", "--output", str(out)])

    model, tokenizer = gen.load_model(tiny_dir), load_tokenizer(tiny_dir)
    # the ids the data layer gives these prompts: BOS (the tokenizer's, not the template's), then the chat template
    encoder = gen.PromptEncoder(tokenizer)
    template = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    assert encoder.ids(PROMPTS[0]) == [tokenizer.bos_token_id, *template]
    input_ids, attention_mask = encoder.batch(PROMPTS)
    expected = generate(model, input_ids, attention_mask, SamplingConfig(max_new_tokens=8, temperature=0),
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    tokens = expected.responses.masked_fill(~expected.action_mask, tokenizer.pad_token_id)
    expected_texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)

    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["response"] for r in rows] == expected_texts
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows


def test_prompts_from_json_lines_and_stdin(tmp_path, monkeypatch):
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompt": PROMPTS[0], "answer": "b e m q"}) + "\n"
                     + json.dumps({"messages": [{"role": "user", "content": PROMPTS[1]}]}) + "\n")
    assert gen.read_prompts(jsonl) == [{"prompt": PROMPTS[0], "answer": "b e m q"}, {"prompt": PROMPTS[1]}]

    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPTS[2] + "\n"))
    assert gen.read_prompts("-") == [{"prompt": PROMPTS[2]}]

    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        gen.read_prompts(tmp_path / "empty.txt")


def test_sampling_is_seeded_and_beam_search_answers_every_prompt(tiny_dir):
    model, tokenizer = gen.load_model(tiny_dir), load_tokenizer(tiny_dir)
    encoder = gen.PromptEncoder(tokenizer)
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0)
    first = gen.answer(model, tokenizer, encoder, PROMPTS, sampling, seed=3)
    assert gen.answer(model, tokenizer, encoder, PROMPTS, sampling, seed=3) == first
    assert gen.answer(model, tokenizer, encoder, PROMPTS, sampling, seed=4) != first

    beams = gen.answer(model, tokenizer, encoder, PROMPTS, sampling, num_beams=3, batch_size=2)
    assert len(beams) == len(PROMPTS) and all(isinstance(text, str) for text in beams)


def test_an_adapter_loads_on_its_base_and_a_merged_copy_gives_the_same_logits(tiny_dir, tmp_path):
    base = load_policy(ModelConfig(name_or_path=tiny_dir), for_training=False)
    torch.manual_seed(0)
    # init_lora_weights=False: a random (non-zero) update, so the adapter visibly changes the logits
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
    tokenizer = load_tokenizer(tiny_dir)
    save_final(peft_model, tokenizer, tmp_path / "adapter")
    ids = torch.tensor([gen.PromptEncoder(tokenizer).ids(PROMPTS[0])])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        plain = load_policy(ModelConfig(name_or_path=tiny_dir), for_training=False)(input_ids=ids).logits
    assert not torch.allclose(expected, plain, atol=1e-3)

    adapter = gen.load_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not any(p.requires_grad for p in adapter.parameters())
    with torch.no_grad():
        torch.testing.assert_close(adapter(input_ids=ids).logits, expected, rtol=0, atol=1e-5)

    save_final(peft_model, tokenizer, tmp_path / "merged", merge=True)
    merged = gen.load_model(str(tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def length_score(prompts, responses, **fields):
    """A reward function for the tests: the longer the response, the better; `answer` must reach it."""
    assert len(fields["answer"]) == len(prompts)
    return [float(len(r)) for r in responses]


def test_preference_pairs_take_the_best_against_the_worst_and_drop_ties():
    rows = [{"prompt": "p1", "answer": "x"}, {"prompt": "p2", "answer": "y"}, {"prompt": "p3", "answer": "z"}]
    samples = [["bb", "a", "ccc", "a"], ["dd", "ee", "dd", "ff"], ["g", "hh", "ii", "j"]]
    pairs = gen.preference_pairs(rows, samples, length_score)
    # p2's four samples all have length 2: no pair; ties go to the earliest sample ("hh" over "ii", "g" under "j")
    assert pairs == [
        {"prompt": "p1", "chosen": "ccc", "rejected": "a", "chosen_score": 3.0, "rejected_score": 1.0},
        {"prompt": "p3", "chosen": "hh", "rejected": "g", "chosen_score": 2.0, "rejected_score": 1.0},
    ]
    # rejection sampling: p3's best (2.0) is below 3, so only p1 is kept
    assert gen.preference_pairs(rows, samples, length_score, min_chosen_score=3) == pairs[:1]


def test_on_policy_pairs_from_the_command_line_train_as_preference_data(tiny_dir, tmp_path):
    out = tmp_path / "pairs.jsonl"
    pairs = gen.main(["--model", tiny_dir, "--prompts", "synthetic", "--num-prompts", "6", "--num-samples", "3",
                      "--max-new-tokens", "6", "--pairs-by", "tests.engine.test_generate:length_score",
                      "--output", str(out)])
    assert 0 < len(pairs) <= 6  # an untrained model's samples: lengths differ for most prompts
    assert [json.loads(line) for line in out.read_text().splitlines()] == pairs
    prompts = [r["prompt"] for r in gen.synthetic_prompts(6)]
    for pair in pairs:
        assert pair["prompt"] in prompts and len(pair["chosen"]) == pair["chosen_score"] > pair["rejected_score"]
    # the file is ordinary preference data
    from data import DataConfig, build_datasets

    data = build_datasets("preference", DataConfig(path=str(out), eval_fraction=0.0), load_tokenizer(ModelConfig()))
    assert len(data.train) == len(pairs)

    samples = gen.main(["--model", tiny_dir, "--prompts", "synthetic", "--num-prompts", "2", "--num-samples", "3",
                        "--max-new-tokens", "4", "--output", str(tmp_path / "samples.jsonl")])
    assert [len(r["responses"]) for r in samples] == [3, 3]
    with pytest.raises(SystemExit, match="needs sampling"):
        gen.main(["--model", tiny_dir, "--prompts", "synthetic", "--num-samples", "2", "--temperature", "0"])
    with pytest.raises(SystemExit, match="needs --pairs-by"):
        gen.main(["--model", tiny_dir, "--prompts", "synthetic", "--num-samples", "2", "--min-chosen-score", "1"])
    with pytest.raises(SystemExit, match="no preference pairs"):  # nothing an untrained model says is correct
        gen.main(["--model", tiny_dir, "--prompts", "synthetic", "--num-prompts", "2", "--num-samples", "2",
                  "--max-new-tokens", "4", "--pairs-by", "data.synthetic:judge_reward", "--min-chosen-score", "1",
                  "--output", str(tmp_path / "none.jsonl")])
    assert not (tmp_path / "none.jsonl").exists()
    with pytest.raises(ValueError, match="cannot import module"):
        gen.main(["--model", tiny_dir, "--prompts", "synthetic", "--num-samples", "2", "--pairs-by", "nowhere:fn"])


def test_backend_flags_give_the_same_greedy_answers_and_a_bad_value_exits_2(tiny_dir, tmp_path, capsys, monkeypatch):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    common = ["--model", tiny_dir, "--prompts", str(prompts_file), "--temperature", "0", "--max-new-tokens", "8",
              "--output", str(tmp_path / "out.jsonl")]
    plain = gen.main(common)
    assert gen.main(common + ["--backend", "continuous"]) == plain
    assert gen.main(common + ["--static-cache"]) == plain
    monkeypatch.setattr(gen, "load_model", lambda *a, **k: pytest.fail("the weights loaded before the check"))
    with pytest.raises(SystemExit) as exit_info:
        gen.main(common + ["--backend", "continuous", "--memory-fraction", "1.5"])
    assert exit_info.value.code == 2
    assert "rollout.memory_fraction must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_synthetic_test_prompts_are_the_held_out_ones_evaluation_uses(tiny_dir, tmp_path):
    """`--prompts synthetic-test` reads the split engine.evaluate samples, none of them a training prompt."""
    from engine.evaluate import synthetic_rows

    held_out = gen.synthetic_prompts(50, 0, held_out=True)
    assert held_out == synthetic_rows("prompt", 50, 0)
    assert not {r["prompt"] for r in held_out} & {r["prompt"] for r in gen.synthetic_prompts(1000, 0)}
    out = tmp_path / "held_out.jsonl"
    gen.main(["--model", tiny_dir, "--prompts", "synthetic-test", "--num-prompts", "3", "--max-new-tokens", "4",
              "--output", str(out)])
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == [r["prompt"] for r in held_out[:3]]
