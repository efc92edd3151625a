"""The CI-sized quickstart end to end: every step runs, the report is written, a re-run skips every step; and the
bar: every method beats the SFT model on the judge."""

from __future__ import annotations

import json

import pytest

from engine import pipeline


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    capture = pytest.MonkeyPatch()
    lines: list[str] = []
    capture.setattr("builtins.print", lambda *args, **kwargs: lines.append(" ".join(map(str, args))))
    try:
        summary = pipeline.main(["--out", str(out), "--ci", "--seed", "0"])
        first = "\n".join(lines)
        lines.clear()
        again = pipeline.main(["--out", str(out), "--ci", "--seed", "0"])
        second = "\n".join(lines)
    finally:
        capture.undo()
    return out, summary, first, again, second


def test_ci_quickstart_runs_every_step_writes_the_report_and_a_rerun_skips_them(quickstart):
    out, summary, first, again, second = quickstart
    with_ppo = pipeline.ppo_missing() is None
    methods = ["sft", "dpo", "orpo", "ppo"] if with_ppo else ["sft", "dpo", "orpo"]
    assert list(summary["judge_score"]) == methods
    if not with_ppo:
        assert "ppo: skipped, the PPO loop is not available" in first
    for stage in ["reward", *methods]:
        assert (out / stage / "final").is_dir() and (out / stage / "done.json").exists()
        assert f"python -m engine.train --config configs/quickstart/{stage}.yaml" in first
        assert f"{stage}: done in" in first
    # the baseline against itself: identical responses from the same seed
    assert summary["metrics"]["sft"]["objective/kl"] == 0.0
    assert summary["metrics"]["sft"]["reward_model/win_rate"] == 0.5
    assert 0.0 <= summary["reward_model_pair_accuracy"] <= 1.0

    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 1 + len(methods)  # curves of the reward model and each policy
    assert "| method | judge score |" in (out / "report.md").read_text()
    assert json.loads((out / "summary.json").read_text())["judge_score"] == summary["judge_score"]

    steps = pipeline.plan(out, 0, True, with_ppo=with_ppo)
    assert second.count("already finished, skipped") == len(steps)
    assert "-m engine.train" not in second and "-m engine.evaluate" not in second
    assert again["judge_score"] == summary["judge_score"]


def test_ci_quickstart_every_method_beats_sft_on_the_judge(quickstart):
    """Seeded and single-threaded, so the scores repeat run to run; on seed 0 they were SFT 0.710, DPO 0.764,
    ORPO 0.772, PPO 0.759 (200 held-out prompts; the whole variant ran in 111 s on an idle 2-core CPU)."""
    scores = quickstart[1]["judge_score"]
    assert set(scores) == {"sft", "dpo", "orpo", "ppo"}
    for method in ("dpo", "orpo", "ppo"):
        assert scores[method] > scores["sft"], f"{method} {scores[method]:.3f} <= sft {scores['sft']:.3f}"
