"""The CI-sized quickstart end to end: every method beats the SFT model on the judge, and a re-run skips all."""

from __future__ import annotations

import json

from engine import pipeline


def test_ci_quickstart_every_method_beats_sft_and_a_rerun_skips_finished_stages(tmp_path, capsys):
    summary = pipeline.main(["--out", str(tmp_path), "--ci", "--seed", "0"])
    first = capsys.readouterr().out

    scores = summary["judge_score"]
    methods = [m for m in ("dpo", "orpo", "ppo") if m in scores]
    assert methods[:2] == ["dpo", "orpo"]
    if pipeline.ppo_missing() is None:
        assert "ppo" in methods
    else:
        assert "ppo: skipped, the PPO loop is not available" in first
    for method in methods:
        assert scores[method] > scores["sft"], f"{method} {scores[method]:.3f} <= sft {scores['sft']:.3f}"
    assert summary["metrics"]["sft"]["objective/kl"] == 0.0
    assert summary["metrics"]["sft"]["reward_model/win_rate"] == 0.5
    assert summary["reward_model_pair_accuracy"] > 0.6

    for stage in ("sft", "reward", "dpo", "orpo"):
        assert (tmp_path / stage / "final").is_dir() and (tmp_path / stage / "done.json").exists()
        assert f"python -m engine.train --config configs/quickstart/{stage}.yaml" in first
        assert f"{stage}: done in" in first
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "<img" in html
    assert "| method | judge score |" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["judge_score"] == scores

    again = pipeline.main(["--out", str(tmp_path), "--ci", "--seed", "0"])
    second = capsys.readouterr().out
    steps = pipeline.plan(tmp_path, 0, True, with_ppo=pipeline.ppo_missing() is None)
    assert second.count("already finished, skipped") == len(steps)
    assert "-m engine.train" not in second and "-m engine.evaluate" not in second
    assert again["judge_score"] == scores
