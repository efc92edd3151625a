"""The four tiny stages in a row on CPU: SFT, then a reward model, DPO and ORPO, each starting from the SFT model.

    python -m engine.quickstart [key=value ...]        # overrides apply to every stage, e.g. max_steps=5

Each stage is `engine/train.py` with a config from configs/tiny/, writing under runs/quickstart/<stage>/.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from engine import train

REPO_ROOT = Path(__file__).resolve().parents[1]
# (stage, config, the held-out metric it exists to move)
STAGES = (
    ("sft", "sft.yaml", "eval/token_accuracy"),
    ("reward", "reward.yaml", "eval/rewards/accuracies"),
    ("dpo", "dpo.yaml", "eval/rewards/margins"),
    ("orpo", "orpo.yaml", "eval/rewards/accuracies"),
)


def main(argv: list[str] | None = None, *, runs_dir: str | Path = "runs/quickstart") -> dict[str, train.RunResult]:
    overrides = list(sys.argv[1:] if argv is None else argv)
    runs_dir = Path(runs_dir)
    results: dict[str, train.RunResult] = {}
    for index, (stage, config, metric) in enumerate(STAGES, start=1):
        stage_overrides = [f"output_dir={runs_dir / stage}", "logging.progress_bar=false"]
        if stage != "sft":
            stage_overrides.append(f"model.name_or_path={results['sft'].final_dir}")
        print(f"[{index}/{len(STAGES)}] {stage}: configs/tiny/{config} ...", flush=True)
        start = time.perf_counter()
        result = train.main(["--config", str(REPO_ROOT / "configs" / "tiny" / config), *stage_overrides, *overrides])
        results[stage] = result
        print(
            f"[{index}/{len(STAGES)}] {stage}: {metric} {result.first(metric):.3f} -> {result.last(metric):.3f}, "
            f"loss {result.first('loss'):.3f} -> {result.last('loss'):.3f} in {result.steps} steps, "
            f"{time.perf_counter() - start:.0f} s; model in {result.final_dir}",
            flush=True,
        )
    print(f"quickstart done; TensorBoard: tensorboard --logdir {runs_dir}")
    return results


if __name__ == "__main__":
    main()
