"""ReST (engine/rest.py): the threshold filter on a hand-made table of rewards, the per-row weights the SFT loop
passes a reward-weighted objective, the skip-finished and resume logic of the stage runner, and one CI-sized
run (1 Grow x 2 Improve steps) on the tiny model from an SFT model trained here."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from engine import pipeline, rest
from engine.config import ConfigError, load_config
from engine.ppo_config import RewardSourceConfig
from tests.engine.runs import run, run_cli, series

JUDGE = (RewardSourceConfig(name="judge", function="data.synthetic:judge_reward"),)
IMPROVE = rest.ImproveConfig(config=str(pipeline.REPO_ROOT / "configs" / "rest" / "improve.yaml"),
                             overrides=("batch.global_batch_size=2", "batch.micro_batch_size=2"))
# three prompts x four samples; None is a sample whose reward function failed
TABLE = [[0.2, 1.0, 0.4, 0.6],
         [1.0, 1.0, 1.0, 1.0],
         [0.0, 0.5, None, 0.8]]


def test_percentile_interpolates_between_ranks_by_hand():
    """Sorted 0.2 0.4 0.6 1.0: p50 sits at rank 1.5, half-way from 0.4 to 0.6 -> 0.5; p75 at rank 2.25, a quarter
    of the way from 0.6 to 1.0 -> 0.7; p0 and p100 are the ends."""
    values = [0.2, 1.0, 0.4, 0.6]
    assert rest.percentile(values, 50) == pytest.approx(0.5, abs=1e-15)
    assert rest.percentile(values, 75) == pytest.approx(0.7, abs=1e-15)
    assert (rest.percentile(values, 0), rest.percentile(values, 100), rest.percentile([0.3], 90)) == (0.2, 1.0, 0.3)


def test_absolute_thresholds_keep_the_rewards_above_them():
    """Strictly above tau (ReST's 1[R > tau]): 0.5 keeps 1.0 and 0.6 of prompt 0, all of prompt 1, and of prompt
    2 only 0.8 (0.5 itself is not above 0.5; the failed sample never counts); 0.8 keeps 1.0 of prompt 0 and all
    of prompt 1, nothing of prompt 2 (0.8 is not above 0.8)."""
    taus = rest.prompt_thresholds(TABLE, threshold=0.5)
    assert taus == [0.5, 0.5, 0.5]
    assert rest.keep_mask(TABLE, taus) == [[False, True, False, True], [True] * 4, [False, False, False, True]]
    assert rest.keep_mask(TABLE, rest.prompt_thresholds(TABLE, threshold=0.8)) == [
        [False, True, False, False], [True] * 4, [False] * 4]


def test_percentile_thresholds_are_each_prompts_own():
    """p50: prompt 0's is 0.5 (above: 1.0, 0.6); prompt 1's samples all score 1.0, so its tau is 1.0 and none is
    above it; prompt 2's scored samples 0.0 0.5 0.8 give 0.5 (above: 0.8). p75: 0.7 (1.0 only), 1.0 (none), and
    rank 1.5 of 0.0 0.5 0.8 = 0.65 (0.8)."""
    taus = rest.prompt_thresholds(TABLE, percentile_q=50)
    assert taus == pytest.approx([0.5, 1.0, 0.5], abs=1e-15)
    assert rest.keep_mask(TABLE, taus) == [[False, True, False, True], [False] * 4, [False, False, False, True]]
    taus = rest.prompt_thresholds(TABLE, percentile_q=75)
    assert taus == pytest.approx([0.7, 1.0, 0.65], abs=1e-15)
    assert rest.keep_mask(TABLE, taus) == [[False, True, False, False], [False] * 4, [False, False, False, True]]
    assert rest.prompt_thresholds([[None, None]], percentile_q=50) == [None]


def write_samples(path, table=TABLE, responses=None):
    lines = []
    for p, own in enumerate(table):
        for s, reward in enumerate(own):
            response = responses[p][s] if responses else f"answer {p}.{s}"
            lines.append({"prompt_index": p, "sample_index": s, "prompt": f"prompt {p}", "response": response,
                          "reward": reward, "rewards": {"judge": reward}})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_filter_stage_writes_the_kept_rows_and_their_statistics(tmp_path):
    """Improve step 1 (tau 0.5) keeps 1.0, 0.6, 1.0 x 4 and 0.8: 7 of 12 samples, mean (1.0 + 0.6 + 4 + 0.8) / 7 =
    6.4 / 7; all 11 scored samples average 7.5 / 11. Step 2 (tau 0.8) keeps 1.0 and 1.0 x 4: 5, mean 1.0."""
    cfg = rest.RestConfig(rewards=JUDGE, improve_steps=2, thresholds=(0.5, 0.8), improve=IMPROVE)
    samples = write_samples(tmp_path / "samples.jsonl")
    stats = rest.filter_samples(cfg, 1, samples, tmp_path / "i1" / "kept.jsonl")
    kept = [json.loads(line) for line in (tmp_path / "i1" / "kept.jsonl").read_text().splitlines()]
    assert [row["completion"] for row in kept] == ["answer 0.1", "answer 0.3", "answer 1.0", "answer 1.1",
                                                   "answer 1.2", "answer 1.3", "answer 2.3"]
    assert kept[0] == {"prompt": "prompt 0", "completion": "answer 0.1", "weight": 1.0, "reward": 1.0}
    assert (stats["kept"], stats["samples"], stats["scored"], stats["prompts_kept"]) == (7, 12, 11, 3)
    assert stats["mean_reward_kept"] == pytest.approx(6.4 / 7, rel=1e-12)
    assert stats["mean_reward_all"] == pytest.approx(7.5 / 11, rel=1e-12)
    assert json.loads((tmp_path / "i1" / "filter.json").read_text()) == stats
    stats = rest.filter_samples(cfg, 2, samples, tmp_path / "i2" / "kept.jsonl")
    assert (stats["kept"], stats["mean_reward_kept"], stats["threshold"]) == (5, 1.0, 0.8)

    by_percentile = rest.RestConfig(rewards=JUDGE, improve_steps=2, percentiles=(50, 75), improve=IMPROVE)
    assert rest.filter_samples(by_percentile, 1, samples, tmp_path / "p1" / "kept.jsonl")["kept"] == 3
    # an empty response is never kept (an SFT row needs a completion); nothing above tau is an error
    empty = write_samples(tmp_path / "empty.jsonl", [[1.0, 0.0]], [[" ", "b"]])
    with pytest.raises(ConfigError, match="no sample of .* has a reward above its threshold 0.5"):
        rest.filter_samples(cfg, 1, empty, tmp_path / "e" / "kept.jsonl")
    # fewer kept samples than one batch of the Improve run (its config's 32): no optimizer step could run
    with pytest.raises(ConfigError, match="7 samples of .* fewer than one batch .*global_batch_size=32"):
        rest.filter_samples(replace(cfg, improve=replace(IMPROVE, overrides=())), 1, samples, tmp_path / "b.jsonl")


def test_config_checks_thresholds_before_anything_runs():
    with pytest.raises(ConfigError, match="exactly one of `thresholds`"):
        rest.RestConfig(rewards=JUDGE)
    with pytest.raises(ConfigError, match="thresholds has 1 values for improve_steps=2"):
        rest.RestConfig(rewards=JUDGE, thresholds=(0.5,))
    with pytest.raises(ConfigError, match="must not fall"):
        rest.RestConfig(rewards=JUDGE, thresholds=(0.8, 0.5))
    with pytest.raises(ConfigError, match=r"percentiles \[50, 150\] must lie in \[0, 100\]"):
        rest.RestConfig(rewards=JUDGE, percentiles=(50, 150))
    with pytest.raises(ConfigError, match="improve_from='last'"):
        rest.RestConfig(rewards=JUDGE, thresholds=(0.5, 0.8), improve_from="last")
    with pytest.raises(ConfigError, match="family 'pairwise'"):
        rest.check(rest.RestConfig(rewards=JUDGE, thresholds=(0.5, 0.8), policy="tiny",
                                   improve=replace(IMPROVE, objective="dpo")))


def test_reward_weighted_sft_reads_the_rows_weights_in_the_sft_loop(tmp_path):
    """Every row weighted 2: the first step's weighted NLL is exactly twice its NLL (the same forward), and the
    NLL equals plain SFT's first step on the same rows. Without a weight column, or packed, the run stops."""
    rows = [{"prompt": f"Sort the letters: {c} a", "completion": f"a {c}", "weight": 2.0} for c in "bcdefghi"]
    data = tmp_path / "weighted.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = ["max_steps=1", f"data.path={data}", "data.eval_fraction=0", "data.max_samples=8"]
    weighted = run("sft.yaml", tmp_path / "weighted", *common, "objective.name=reward_weighted_sft")
    plain = run("sft.yaml", tmp_path / "plain", *common)
    nll, weighted_nll = series(weighted, "loss/nll")[0], series(weighted, "loss/weighted_nll")[0]
    assert weighted_nll == pytest.approx(2 * nll, rel=1e-6) and series(weighted, "weights/mean") == [2.0]
    assert nll == pytest.approx(series(plain, "loss/nll")[0], rel=1e-6)

    unweighted = tmp_path / "unweighted.jsonl"
    unweighted.write_text("".join(json.dumps({k: row[k] for k in ("prompt", "completion")}) + "\n" for row in rows))
    code, err = run_cli("sft.yaml", tmp_path / "none", *common, f"data.path={unweighted}",
                        "objective.name=reward_weighted_sft")
    assert code == 2 and "has none; give every row a number 'weight'" in err
    code, err = run_cli("sft.yaml", tmp_path / "packed", *common, "objective.name=reward_weighted_sft",
                        "data.packing=true")
    assert code == 2 and "a packed row holds many; set data.packing=false" in err


def test_runner_skips_finished_stages_and_keeps_a_resuming_runs_checkpoints(tmp_path):
    """A training stage that resumes (every ReST Improve step) starts again on its own directory, checkpoints
    and all; one that does not (the quickstart's) starts over on an empty one; a finished one is skipped."""
    script = ("import json, pathlib, sys; d = pathlib.Path(sys.argv[1]); "
              "print('checkpoint', (d / 'checkpoints' / 'step_20').is_dir()); (d / 'final').mkdir(); "
              "(d / 'metrics.jsonl').write_text(json.dumps({'loss/nll': 0.25}) + '\\n')")
    steps = []
    for name, resumes in (("resumed", True), ("fresh", False)):
        directory = tmp_path / name
        (directory / "checkpoints" / "step_20").mkdir(parents=True)
        steps.append(pipeline.Step(name, ["-c", script, str(directory)], (), directory / "done.json",
                                   directory / "train.log", headline="loss/nll", resumes=resumes))
    lines = []
    pipeline.run(steps, jobs=1, threads=1, log=lines.append, first=1, total=3)
    assert (tmp_path / "resumed" / "train.log").read_text() == "checkpoint True\n"
    assert (tmp_path / "fresh" / "train.log").read_text() == "checkpoint False\n"
    assert any(line.startswith("[1/3] resumed: done in") and line.endswith("final loss/nll 0.250") for line in lines)
    lines.clear()
    pipeline.run(steps, jobs=1, threads=1, log=lines.append, first=1, total=3)
    assert lines == ["[1/3] resumed: already finished, skipped", "[2/3] fresh: already finished, skipped"]

    cfg = rest.RestConfig(rewards=JUDGE, grow_steps=2, improve_steps=2, thresholds=(0.5, 0.8))
    plan = {step.name: step for step in rest.plan(cfg, tmp_path, tmp_path / "config.yaml")}
    improves = [step for step in plan.values() if step.name.startswith("improve")]
    assert [step.name for step in improves] == ["improve 1.1", "improve 1.2", "improve 2.1", "improve 2.2"]
    assert all(step.resumes and "checkpoint.resume_from=latest" in step.argv for step in improves)
    # improve_from=previous: each Improve step starts from the one before it, across Grow steps too
    assert plan["improve 2.1"].needs == ("filter 2.1", "improve 1.2")
    assert f"model.name_or_path={tmp_path / 'grow_1' / 'improve_2' / 'policy' / 'final'}" in plan["improve 2.1"].argv
    assert plan["grow 2"].needs == ("improve 1.2",)
    base = {s.name: s for s in rest.plan(replace(cfg, improve_from="base"), tmp_path, tmp_path / "config.yaml")}
    assert base["improve 2.1"].needs == ("filter 2.1",) and f"model.name_or_path={cfg.policy}" in base["improve 2.1"].argv


@pytest.fixture(scope="module")
def rest_run(sft_policy, tmp_path_factory):
    out = tmp_path_factory.mktemp("rest")
    args = ["--config", str(pipeline.REPO_ROOT / "configs" / "rest" / "tiny.yaml"), "--out", str(out), "--seed", "0",
            f"policy={sft_policy}", "grow_steps=1", "improve_steps=2", "thresholds=[0.5,0.8]",
            "prompts.num_prompts=32", "sampling.micro_batch_size=128", "evaluation.num_prompts=32",
            "improve.overrides=[max_steps=3,batch.global_batch_size=8,batch.micro_batch_size=8,"
            "checkpoint.every_steps=2,logging.every_steps=1]"]
    capture = pytest.MonkeyPatch()
    lines: list[str] = []
    capture.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    logs = []
    try:
        result = rest.main(args)
        logs.append("\n".join(lines))
        # Improve step 1.2 as a kill after its step-2 checkpoint leaves it: no final/, no done.json, no evaluation.
        # Its first logged step is marked: a resumed run keeps the lines up to its checkpoint, a fresh one would not.
        policy = out / "grow_1" / "improve_2" / "policy"
        shutil.rmtree(policy / "final")
        (policy / "done.json").unlink()
        (out / "grow_1" / "improve_2" / "eval.json").unlink()
        records = [json.loads(line) for line in (policy / "metrics.jsonl").read_text().splitlines()]
        straight = [dict(r) for r in records]
        records[0]["loss/nll"] = -1.0
        (policy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        for _ in range(2):
            lines.clear()
            again = rest.main(args)
            logs.append("\n".join(lines))
    finally:
        capture.undo()
    return out, result, again, logs, straight


def test_ci_sized_rest_run_writes_every_stage_and_the_report(rest_run):
    out, result, again, (first, resumed, second), straight = rest_run
    for stage in ("grow", "filter", "train", "evaluate"):
        assert f"python -m engine.{'rest ' + stage if stage in ('grow', 'filter') else stage}" in first
    samples = [json.loads(line) for line in (out / "grow_1" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 32 * 4 and {line["sample_index"] for line in samples} == {0, 1, 2, 3}
    assert all(line["reward"] == line["rewards"]["judge"] for line in samples)
    for i in (1, 2):
        step = out / "grow_1" / f"improve_{i}"
        assert (step / "policy" / "final").is_dir() and (step / "policy" / "done.json").exists()
        assert (step / "policy" / "checkpoints").is_dir() and (step / "eval.json").exists()
        kept = [json.loads(line) for line in (step / "kept.jsonl").read_text().splitlines()]
        assert all(row["reward"] > (0.5, 0.8)[i - 1] for row in kept)
    assert (out / "eval_base.json").exists() and "| improve 1.2 | > 0.8 |" in (out / "report.md").read_text()

    grown = json.loads((out / "report.json").read_text())["grow"][0]
    assert grown["samples"] == 128 and grown["prompts"] == 32
    one, two = grown["improve"]
    assert 0 < two["kept"] < one["kept"] < 128  # the threshold rises: fewer samples clear it
    for step in (one, two):
        assert step["mean_reward_all"] == pytest.approx(grown["mean_reward"], rel=1e-12)
        assert step["mean_reward_kept"] > step["mean_reward_all"]
        assert 0 <= step["judge"] <= 1
    assert grown["judge"] == two["judge"] and result["base"]["judge"] is not None

    # the interrupted Improve step, and only it and its evaluation, ran again: from its step-2 checkpoint (the
    # marked line kept), to the same last step and judge score as the uninterrupted run
    assert "improve 1.2: python -m engine.train" in resumed and "eval 1.2: python -m engine.evaluate" in resumed
    assert resumed.count("already finished, skipped") == 6 and "grow 1: python" not in resumed
    records = [json.loads(line) for line in (out / "grow_1" / "improve_2" / "policy" / "metrics.jsonl").read_text()
               .splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[0]["loss/nll"] == -1.0
    assert records[2]["loss/nll"] == pytest.approx(straight[2]["loss/nll"], rel=1e-6)
    assert [(s["kept"], s["judge"]) for s in again["grow"][0]["improve"]] == [(one["kept"], one["judge"]),
                                                                             (two["kept"], two["judge"])]

    # the next re-run finds every stage finished and runs none
    cfg = load_config(out / "config.yaml", cls=rest.RestConfig)
    assert second.count("already finished, skipped") == len(rest.plan(cfg, out, out / "config.yaml")) == 8
    assert "python -m engine" not in second
