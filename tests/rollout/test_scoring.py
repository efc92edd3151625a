import pytest
import torch

from data.tiny_tokenizer import build_tokenizer
from rollout.scoring import (
    RewardError,
    RewardFunction,
    RewardModel,
    RunningMoments,
    Scorer,
    default_format,
    load_reward_function,
)
from tests.rollout.conftest import tiny_reward_model

PROMPTS = ["Sort the letters: q e b", "Sort the letters: d a", "Write a poem about the sea and the wind"]
RESPONSES = ["b e q", "a", "The sea is wide and grey and deep, it sings"]
NO_EOS = torch.tensor([False, False, True])


def fn(name, weight=1.0):
    return RewardFunction(name, load_reward_function(f"tests.rollout.rewards_fixture:{name}"), weight)


def oracle_score(model, tokenizer, text):
    """Score of one unpadded text: the head at the last token of a plain forward."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        return float(model.score(hidden[0, -1]))


@pytest.fixture(scope="module")
def reward_tokenizer():
    """A different tokenizer from the policy's: its own vocabulary, no chat template, BOS added."""
    return build_tokenizer(vocab_size=400, chat_template=False)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_reward_model_retokenises_and_reads_the_last_real_token(reward_tokenizer, padding_side, pad_is_eos):
    tok = reward_tokenizer
    tok.padding_side = padding_side
    tok.pad_token = tok.eos_token if pad_is_eos else "<pad>"
    model = tiny_reward_model(0, len(tok), pad=tok.pad_token_id, eos=tok.eos_token_id)
    fmt = default_format(tok, "Question: {prompt}\n\nAnswer: ")
    source = RewardModel("rm", model, tok, fmt, micro_batch_size=2, append_eos=True)
    scores, ok = source(PROMPTS, RESPONSES, {})
    expected = [oracle_score(model, tok, fmt(p, r) + tok.eos_token) for p, r in zip(PROMPTS, RESPONSES)]
    assert ok.all()
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-5)
    tok.pad_token = "<pad>"


def test_reward_model_uses_its_chat_template():
    tok = build_tokenizer(vocab_size=400, chat_template=True)
    assert default_format(tok, "ignored {prompt}")("hi", "there") == "<|user|>\nhi</s>\n<|assistant|>\nthere"
    full = default_format(tok, template="chat")("hi", "there")
    assert full == "<|user|>\nhi</s>\n<|assistant|>\nthere</s>\n"
    assert default_format(tok, template="Q: {prompt} A: {response}")("hi", "there") == "Q: hi A: there"


def test_reward_model_without_pad_token_is_an_error(reward_tokenizer):
    tok = build_tokenizer(vocab_size=400, chat_template=False)
    tok.pad_token = None
    model = tiny_reward_model(0, len(tok), pad=0, eos=2)
    with pytest.raises(ValueError, match="reward model rm: its tokenizer has no pad token"):
        RewardModel("rm", model, tok, default_format(tok))


def test_weighted_sources_and_missing_eos_penalty(reward_tokenizer):
    scorer = Scorer([fn("length_reward", 0.5), fn("fails_on_x", 2.0)], missing_eos_penalty=1.0)
    out = scorer(PROMPTS, RESPONSES, no_eos=NO_EOS)
    lengths = torch.tensor([len(r) for r in RESPONSES], dtype=torch.float64)
    expected = 0.5 * lengths + 2.0 - NO_EOS.double()
    torch.testing.assert_close(out.scores, expected.float())
    assert out.metrics["objective/score/length_reward"] == pytest.approx(float(lengths.mean()))
    assert out.metrics["objective/score/fails_on_x"] == 1.0
    assert out.metrics["rollout/skipped"] == 0
    # each source's own score per row, and their weighted sum before the EOS penalty, in float64
    torch.testing.assert_close(out.by_source["length_reward"], lengths, rtol=0, atol=0)  # 5, 1 and 43 characters
    torch.testing.assert_close(out.by_source["fails_on_x"], torch.ones(3, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(out.raw, torch.tensor([4.5, 2.5, 23.5], dtype=torch.float64), rtol=0, atol=0)


def test_reward_function_gets_the_rows_other_fields():
    scorer = Scorer([fn("answer_reward")])
    out = scorer(PROMPTS[:2], ["b e q", "b"], no_eos=NO_EOS[:2], fields={"answer": ["b e q", "a d"]})
    assert out.scores.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="field 'answer' has 1 values for 2 prompts"):
        scorer(PROMPTS[:2], ["b e q", "b"], no_eos=NO_EOS[:2], fields={"answer": ["b e q"]})


def test_synthetic_judge_is_a_reward_function():
    scorer = Scorer([RewardFunction("judge", load_reward_function("data.synthetic:judge_reward"))])
    out = scorer(PROMPTS[:2], ["b e q", "x y"], no_eos=NO_EOS[:2])
    assert out.scores.tolist() == [1.0, pytest.approx(0.2)]


def test_rows_where_a_reward_function_raises_are_skipped_and_counted(caplog):
    scorer = Scorer([fn("fails_on_x")])
    out = scorer(PROMPTS, ["a x", "b", "x"], no_eos=NO_EOS)
    assert out.valid.tolist() == [False, True, False]
    assert out.scores.tolist() == [0.0, 1.0, 0.0]
    assert out.metrics["rollout/skipped"] == 2 and out.metrics["objective/score"] == 1.0
    assert "fails_on_x skipped row 0" in caplog.text


@pytest.mark.parametrize("name, message", [
    ("wrong_length", "'wrong_length' returned 4 values for 3 responses (rows 0-2 of the batch)"),
    ("gives_nan", "'gives_nan' returned 1 bad value(s) of 3: row 0 ('b e q'): nan"),
    ("gives_inf", "'gives_inf' returned 1 bad value(s) of 3: row 2 ('The sea is wide and grey and deep, i...): -inf"),
    ("gives_none", "'gives_none' returned 3 bad value(s) of 3: row 0 ('b e q'): None; row 1 ('a'): None"),
    ("gives_strings", "'gives_strings' returned 3 bad value(s) of 3: row 0 ('b e q'): '0.5'; row 1 ('a'): '0.5'"),
    ("gives_dict", "'gives_dict' returned a dict (keys ['score']) for 3 responses"),
])
def test_bad_values_of_a_reward_function_are_errors_naming_it_the_rows_and_the_values(name, message):
    with pytest.raises(RewardError) as error:
        Scorer([fn(name)])(PROMPTS, RESPONSES, no_eos=NO_EOS)
    assert message in str(error.value) and "one finite number (int or float) per response" in str(error.value)


def test_a_reward_that_fails_on_more_rows_than_the_budget_stops_the_run_naming_it():
    """fails_on_x skips 2 of 3 rows: within a budget of 0.7, past one of 0.5; the count is over the run."""
    scorer = Scorer([fn("fails_on_x"), fn("length_reward")], max_skipped_fraction=0.7)
    assert scorer(PROMPTS, ["a x", "b", "x"], no_eos=NO_EOS).valid.tolist() == [False, True, False]
    with pytest.raises(RewardError, match=r"'fails_on_x' failed \(raised or timed out\) on 5 of the 6 rows .*83%"):
        scorer(PROMPTS, ["x", "x", "x"], no_eos=NO_EOS)
    restored = Scorer([fn("fails_on_x"), fn("length_reward")], max_skipped_fraction=0.5)
    restored.load_state_dict({"moments": None, "rows_scored": 3, "rows_skipped": {"fails_on_x": 2}})
    with pytest.raises(RewardError, match="on 4 of the 6 rows"):  # the counts of a checkpoint carry on
        restored(PROMPTS, ["a x", "b", "x"], no_eos=NO_EOS)


def test_a_reward_call_past_its_timeout_skips_the_rows_of_the_call():
    import time

    slow = RewardFunction("hangs", load_reward_function("tests.rollout.rewards_fixture:hangs"), timeout_s=0.2)
    start = time.perf_counter()
    out = Scorer([slow, fn("length_reward")])(PROMPTS, RESPONSES, no_eos=NO_EOS)
    assert time.perf_counter() - start < 5  # not row by row, not the 600 s the call sleeps
    assert out.valid.tolist() == [False, False, False] and out.metrics["rollout/skipped"] == 3
    with pytest.raises(RewardError, match="'hangs' failed .* on 3 of the 3 rows"):
        Scorer([slow], max_skipped_fraction=0.5)(PROMPTS, RESPONSES, no_eos=NO_EOS)


def test_scores_that_overflow_the_normaliser_are_refused():
    """1e300 is finite, but its square is not: the running variance overflows, which would scale every score
    to 0 (or NaN) silently."""
    with pytest.raises(RewardError, match=r"normalised scores .* overflow .* rescale the reward function"):
        Scorer([fn("gives_huge")], normalize=True)(PROMPTS, RESPONSES, no_eos=NO_EOS)
    with pytest.raises(RewardError, match=r"weighted sum of the scores overflow"):
        Scorer([fn("gives_huge", weight=1e10)])(PROMPTS, RESPONSES, no_eos=NO_EOS)


def test_bad_reward_function_names():
    with pytest.raises(ValueError, match="must be written 'package.module:function'"):
        load_reward_function("data.synthetic.judge_reward")
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod'"):
        load_reward_function("no_such_pkg.mod:f")
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        load_reward_function("data.synthetic:nope")


def test_running_moments_match_the_whole_stream_and_restore():
    torch.manual_seed(0)
    chunks = [torch.randn(n) * 3 + 1 for n in (5, 1, 17)]
    moments = RunningMoments()
    for chunk in chunks:
        moments.update(chunk)
    everything = torch.cat(chunks).double()
    assert moments.count == 23
    assert moments.mean == pytest.approx(float(everything.mean()), rel=1e-12)
    assert moments.std == pytest.approx(float(everything.std(unbiased=False)), rel=1e-12)
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored.state_dict() == moments.state_dict()


def test_normalised_and_clipped_scores():
    scorer = Scorer([fn("length_reward")], normalize=True, clip=1.0)
    out = scorer(PROMPTS, RESPONSES, no_eos=torch.zeros(3, dtype=torch.bool))
    lengths = torch.tensor([len(r) for r in RESPONSES], dtype=torch.float64)
    z = (lengths - lengths.mean()) / lengths.std(unbiased=False)
    torch.testing.assert_close(out.scores, z.clamp(-1, 1).float())
    state = scorer.state_dict()
    resumed = Scorer([fn("length_reward")], normalize=True, clip=1.0)
    resumed.load_state_dict(state)
    a = scorer(PROMPTS[:2], RESPONSES[:2], no_eos=NO_EOS[:2])
    b = resumed(PROMPTS[:2], RESPONSES[:2], no_eos=NO_EOS[:2])
    assert torch.equal(a.scores, b.scores)


def test_reward_model_text_is_tokenised_exactly_as_its_training_pairs(tmp_path):
    """The default format plus EOS, re-tokenised, gives the very ids of the data layer's preference rows
    (chat template up to the assistant turn, the response, EOS), which the reward loop trains on."""
    import json

    from data import DataConfig, build_datasets
    from data.synthetic import generate

    tok = build_tokenizer()
    pairs = generate("preference", 3)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    cfg = DataConfig(path=str(path), eval_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    rows = build_datasets("preference", cfg, tok, log=None).train
    fmt = default_format(tok, cfg.prompt_format)
    assert len(rows) == 3
    for row, pair in zip(rows, pairs):
        assert tok(fmt(pair["prompt"], pair["chosen"]) + tok.eos_token)["input_ids"] == row["chosen_input_ids"]
