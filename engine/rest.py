"""ReST, Reinforced Self-Training (Gulcehre et al. 2023, "Reinforced Self-Training (ReST) for Language
Modeling"): the policy Grows a dataset of its own samples, scored by reward sources, then Improves on the
samples whose reward clears a threshold that rises with each Improve step.

    python -m engine.rest --config configs/rest/tiny.yaml [--out DIR] [--seed N] [--jobs 2] [key=value ...]

For each of `grow_steps` Grow steps g (1-based):

1. grow g: `num_samples` (K) samples per prompt from the current policy, each scored by `rewards` (the same
   schema as `ppo.rewards`: reward functions and reward models, weighted), written with the weighted sum and
   every source's own value to <out>/grow_<g>/samples.jsonl (`python -m engine.rest grow`);
2. for each of `improve_steps` Improve steps i:
   filter g.i: the samples whose reward is above tau_i (`thresholds[i]`, or the `percentiles[i]`-th percentile
   of each prompt's K rewards), into <out>/grow_<g>/improve_<i>/kept.jsonl (`python -m engine.rest filter`);
   improve g.i: fine-tuning on them, `python -m engine.train` with `improve.config` and `improve.objective`
   (sft, or reward_weighted_sft: each kept sample weighted by its reward), starting from the previous Improve
   step's policy or from the starting policy (`improve_from`), into <out>/grow_<g>/improve_<i>/policy/;
   eval g.i: the held-out judge score of that policy (`python -m engine.evaluate`), into .../eval.json.

The next Grow step samples from the last Improve step's policy. Every stage is an ordinary command, printed as it
starts, writing to its own directory; a re-run skips finished stages (engine.pipeline's runner), and an Improve
step stopped half-way resumes from its latest checkpoint (`checkpoint.resume_from=latest`). At the end
<out>/report.json and <out>/report.md give, per Grow and Improve step, the samples kept, the mean reward of the
kept and of all samples, and the judge score after the step. The resolved config is <out>/config.yaml, which the
grow and filter stages read.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine import pipeline
from engine.config import ConfigError, load_config, save_config
from engine.ppo_config import RewardSourceConfig
from rollout.generation import SamplingConfig

IMPROVE_FROM = ("previous", "base")


@dataclass(frozen=True)
class PromptSource:
    """The prompts every Grow step samples (the same ones each time, as in ReST)."""

    path: str = "synthetic"
    """"synthetic": the sorting task's training prompts, drawn with `data_seed` (never its held-out split); or
    a .jsonl (a `prompt` and any other fields, passed to reward functions) or .txt file, one prompt a line."""
    num_prompts: int | None = 1000
    """The first N prompts; None: all of a file."""
    data_seed: int = 0


@dataclass(frozen=True)
class ImproveConfig:
    """How each Improve step trains: an SFT run config of engine.train, with the objective named here."""

    config: str = "configs/rest/improve.yaml"
    """An SFT run config (steps, optimizer, batch, checkpoints); ReST sets its output_dir, model.name_or_path,
    data.path (the kept samples), seed and checkpoint.resume_from=latest."""
    overrides: tuple[str, ...] = ()
    """Dotted overrides of that config, e.g. [max_steps=50, optim.lr=1e-4]."""
    objective: str = "sft"
    """An sft-family objective: sft (the NLL of the kept samples, ReST's loss), reward_weighted_sft (each kept
    sample's NLL weighted by its reward; rewards must then be >= 0), or a registered package.module:function."""


@dataclass(frozen=True)
class RestEvaluation:
    """engine.evaluate of the policy after every Improve step (and of the starting policy) on held-out prompts."""

    prompts: str = "synthetic"
    """"synthetic": the sorting task's held-out split; or a .jsonl / .txt file."""
    num_prompts: int = 500
    data_seed: int = 0
    seed: int = 0
    """The sampling seed, the same for every policy, so scores differ by the policy only."""
    judge: str = "auto"
    """A reward function package.module:fn; "auto": the sorting task's judge on sorting prompts."""
    max_new_tokens: int = 16
    temperature: float = 1.0
    batch_size: int = 64
    base: bool = True
    """Also evaluate the starting policy (the report's first row)."""


@dataclass(frozen=True)
class RestConfig:
    """A ReST run: G Grow steps of K samples per prompt, I Improve steps on each with rising thresholds."""

    output_dir: str = "runs/rest"
    seed: int = 0
    """Seed of every Improve run; Grow step g samples with seed 1000 * seed + g."""
    policy: str = "runs/quickstart/sft/final"
    """The starting policy: a final/ directory (full, adapter or merged) or a hub id."""
    prompts: PromptSource = field(default_factory=PromptSource)
    grow_steps: int = 2
    improve_steps: int = 2
    num_samples: int = 4
    """K, the samples per prompt in each Grow step."""
    rewards: tuple[RewardSourceConfig, ...] = ()
    """Reward functions and reward models, as `ppo.rewards`; a sample's reward is their weighted sum."""
    thresholds: tuple[float, ...] | None = None
    """tau_i of each Improve step, absolute: keep the samples whose reward is above it. Non-decreasing."""
    percentiles: tuple[float, ...] | None = None
    """Instead of `thresholds`: tau_i is this percentile (0-100) of each prompt's K rewards. Non-decreasing."""
    improve: ImproveConfig = field(default_factory=ImproveConfig)
    improve_from: str = "previous"
    """Each Improve step starts from the previous Improve step's policy ("previous"), or from the starting
    policy ("base", as ReST-EM, Singh et al. 2023), on the data of the latest Grow step."""
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=16, micro_batch_size=64)
    """The Grow step's decoding (max_new_tokens, temperature, top_k, top_p) and rows per batch."""
    evaluation: RestEvaluation = field(default_factory=RestEvaluation)

    def __post_init__(self):
        for key in ("grow_steps", "improve_steps", "num_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be 1 or more, got {getattr(self, key)}")
        if (self.thresholds is None) == (self.percentiles is None):
            raise ConfigError("set exactly one of `thresholds` (absolute rewards) and `percentiles` (of each "
                              "prompt's samples), one per Improve step")
        key, taus = ("thresholds", self.thresholds) if self.thresholds is not None else ("percentiles", self.percentiles)
        if len(taus) != self.improve_steps:
            raise ConfigError(f"{key} has {len(taus)} values for improve_steps={self.improve_steps}; give one per "
                              "Improve step")
        if any(later < earlier for earlier, later in zip(taus, taus[1:])):
            raise ConfigError(f"{key} {list(taus)} must not fall from one Improve step to the next (ReST raises "
                              "its threshold)")
        if self.percentiles is not None and not all(0 <= q <= 100 for q in self.percentiles):
            raise ConfigError(f"percentiles {list(self.percentiles)} must lie in [0, 100]")
        if self.percentiles is not None and self.num_samples < 2:
            raise ConfigError("percentiles rank each prompt's samples: they need num_samples >= 2")
        if not self.rewards:
            raise ConfigError("rewards is empty; name at least one reward function or reward model, e.g. "
                              "rewards: [{name: judge, function: 'data.synthetic:judge_reward'}]")
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ConfigError(f"rewards need distinct names, got {names}")
        if self.improve_from not in IMPROVE_FROM:
            raise ConfigError(f"improve_from={self.improve_from!r} is not one of {list(IMPROVE_FROM)}")
        if self.num_samples > 1 and self.sampling.temperature == 0:
            raise ConfigError("num_samples > 1 needs sampling: set sampling.temperature above 0")

    def tau(self, improve: int) -> tuple[str, float]:
        """("threshold", tau) or ("percentile", q) of Improve step `improve` (1-based)."""
        if self.thresholds is not None:
            return "threshold", self.thresholds[improve - 1]
        return "percentile", self.percentiles[improve - 1]


# ---- the filter: pure functions of the rewards ------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of `values`, interpolated linearly between ranks (numpy's default, Hyndman &
    Fan's type 7): with v sorted and h = (n - 1) q / 100, it is v[floor h] + (h - floor h)(v[ceil h] - v[floor h])."""
    v = sorted(values)
    h = (len(v) - 1) * q / 100
    low, high = math.floor(h), math.ceil(h)
    return v[low] + (h - low) * (v[high] - v[low])


def prompt_thresholds(rewards: Sequence[Sequence[float | None]], *, threshold: float | None = None,
                      percentile_q: float | None = None) -> list[float | None]:
    """tau of each prompt: `threshold` for all, or the `percentile_q`-th percentile of the prompt's own rewards
    (None rewards, where a reward function failed, are left out; a prompt with none gets None)."""
    if (threshold is None) == (percentile_q is None):
        raise ValueError("give exactly one of threshold and percentile_q")
    if threshold is not None:
        return [threshold] * len(rewards)
    out = []
    for own in rewards:
        scored = [r for r in own if r is not None]
        out.append(percentile(scored, percentile_q) if scored else None)
    return out


def keep_mask(rewards: Sequence[Sequence[float | None]], taus: Sequence[float | None]) -> list[list[bool]]:
    """ReST's filter F(x, y; tau) = 1[R(x, y) > tau] (Gulcehre et al. 2023, the Improve step), per prompt and
    sample; a sample without a reward is never kept. Strictly above: under a percentile, a prompt whose
    samples all score the same keeps none of them, since nothing there tells a better sample from a worse."""
    return [[r is not None and tau is not None and r > tau for r in own] for own, tau in zip(rewards, taus)]


# ---- the stages -------------------------------------------------------------------------------------


def grow_seed(seed: int, grow: int) -> int:
    return 1000 * seed + grow


def prompt_rows(source: PromptSource) -> list[dict]:
    from engine.generate import read_prompts, synthetic_prompts

    if source.path == "synthetic":
        return synthetic_prompts(source.num_prompts or 1000, source.data_seed)
    return read_prompts(source.path)[: source.num_prompts]


def grow(cfg: RestConfig, step: int, model_path: str, output: Path) -> dict:
    """Grow step `step`: K samples per prompt from the policy at `model_path`, scored, written to `output`, one
    JSON line per sample: prompt_index, sample_index, prompt, response, reward (the weighted sum; null where a
    reward function failed) and rewards (each source's own value). Returns the summary it prints."""
    import torch

    from data.config import DataConfig
    from engine.config import ModelConfig
    from engine.generate import PromptEncoder, answer, load_model
    from engine.hostmem import keep_freed_memory
    from engine.loops.ppo import reward_sources
    from engine.models import load_tokenizer
    from rollout.scoring import Scorer

    keep_freed_memory()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, k = prompt_rows(cfg.prompts), cfg.num_samples
    model = load_model(model_path).to(device)
    tokenizer = load_tokenizer(model_path)
    flat = [row for row in rows for _ in range(k)]  # each prompt K times in a row: its samples side by side
    prompts = [row["prompt"] for row in flat]
    responses = answer(model, tokenizer, PromptEncoder(tokenizer), prompts, cfg.sampling,
                       seed=grow_seed(cfg.seed, step), batch_size=cfg.sampling.micro_batch_size)
    del model
    scorer = Scorer(reward_sources(cfg.rewards, ModelConfig(), DataConfig.prompt_format,
                                   cfg.sampling.micro_batch_size, device))
    fields = {key: [row.get(key) for row in flat] for key in rows[0] if key != "prompt"}
    scored = scorer(prompts, responses, no_eos=torch.zeros(len(flat), dtype=torch.bool), fields=fields)
    lines = []
    for n, (prompt, response) in enumerate(zip(prompts, responses)):
        ok = bool(scored.valid[n])
        lines.append({"prompt_index": n // k, "sample_index": n % k, "prompt": prompt, "response": response,
                      "reward": float(scored.raw[n]) if ok else None,
                      "rewards": {name: float(values[n]) if ok else None for name, values in scored.by_source.items()}})
    _write_jsonl(output, lines)
    valid = [line["reward"] for line in lines if line["reward"] is not None]
    summary = {"prompts": len(rows), "samples": len(lines), "scored": len(valid),
               "mean_reward": sum(valid) / max(len(valid), 1)}
    print(f"grow {step}: {len(lines)} samples of {len(rows)} prompts, mean reward {summary['mean_reward']:.4f}",
          file=sys.stderr)
    return summary


def filter_samples(cfg: RestConfig, improve: int, samples: Path, output: Path) -> dict:
    """Improve step `improve`'s data: the samples in `samples` whose reward is above tau_i, written to `output`
    as SFT rows {prompt, completion, weight (= the reward), reward}; the statistics go to filter.json beside it
    (the stage's done marker, written last) and are returned."""
    from losses import get_objective

    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    by_prompt: dict[int, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt_index"], []).append(row)
    groups = list(by_prompt.values())
    rewards = [[row["reward"] for row in group] for group in groups]
    kind, tau = cfg.tau(improve)
    taus = prompt_thresholds(rewards, **({"threshold": tau} if kind == "threshold" else {"percentile_q": tau}))
    mask = keep_mask(rewards, taus)
    kept, empty = [], 0
    for group, keep in zip(groups, mask):
        for row, chosen in zip(group, keep):
            if chosen and not row["response"].strip():
                empty += 1  # an SFT row needs a completion to train on
            elif chosen:
                kept.append({"prompt": row["prompt"], "completion": row["response"], "weight": row["reward"],
                             "reward": row["reward"]})
    scored = [r for own in rewards for r in own if r is not None]
    where = f"{kind} {tau:g}"
    if not kept:
        raise ConfigError(f"no sample of {samples} has a reward above its {where}; lower `{kind}s`, or sample "
                          "more (num_samples, prompts.num_prompts, sampling.temperature)")
    batch = load_config(cfg.improve.config, [f"objective.name={cfg.improve.objective}", *cfg.improve.overrides]
                        ).batch.global_batch_size
    if len(kept) < batch:  # the Improve run drops a last partial batch, so it would have no step to take
        raise ConfigError(f"{len(kept)} samples of {samples} are above the {where}, fewer than one batch of the "
                          f"Improve run (batch.global_batch_size={batch}); lower `{kind}s`, sample more "
                          "(num_samples, prompts.num_prompts), or set a smaller batch in improve.overrides")
    if get_objective(cfg.improve.objective).row_weights and min(row["weight"] for row in kept) < 0:
        raise ConfigError(f"improve.objective={cfg.improve.objective} weights each kept sample by its reward, and "
                          f"some kept rewards are negative (down to {min(r['weight'] for r in kept):g}); raise the "
                          f"{kind}s above 0, or train with improve.objective=sft")
    stats = {"improve": improve, kind: tau, "samples": len(rows), "scored": len(scored), "kept": len(kept),
             "kept_share": len(kept) / len(rows), "empty_dropped": empty,
             "prompts_kept": sum(any(keep) for keep in mask), "prompts": len(groups),
             "mean_reward_all": sum(scored) / max(len(scored), 1),
             "mean_reward_kept": sum(row["reward"] for row in kept) / len(kept),
             "mean_threshold": _mean([t for t in taus if t is not None])}
    _write_jsonl(output, kept)
    _write_json(output.parent / "filter.json", stats)
    print(f"filter: {len(kept)} of {len(rows)} samples above the {where} (mean reward {stats['mean_reward_kept']:.4f}"
          f", all {stats['mean_reward_all']:.4f})", file=sys.stderr)
    return stats


# ---- the plan ---------------------------------------------------------------------------------------


def plan(cfg: RestConfig, out: Path, config_path: Path) -> list[pipeline.Step]:
    """The stages in dependency order (engine.pipeline.Step: a command, what it needs, its done marker)."""
    ev = cfg.evaluation
    evaluation = ["--prompts", ev.prompts, "--pairs", "none", "--judge", ev.judge, "--num-prompts", str(ev.num_prompts),
                  "--data-seed", str(ev.data_seed), "--seed", str(ev.seed), "--max-new-tokens", str(ev.max_new_tokens),
                  "--temperature", str(ev.temperature), "--batch-size", str(ev.batch_size)]

    def evaluate(name: str, model: Path | str, path: Path, needs: tuple[str, ...]) -> pipeline.Step:
        argv = ["-m", "engine.evaluate", "--model", str(model), *evaluation, "--out", str(path)]
        return pipeline.Step(name, argv, needs, path, path.with_suffix(".log"), training=False)

    config = ["--config", str(config_path)]
    steps = [evaluate("eval base", cfg.policy, out / "eval_base.json", ())] if ev.base else []
    policy, made_by = cfg.policy, ()  # the latest policy and the step that trains it
    for g in range(1, cfg.grow_steps + 1):
        grow_dir = out / f"grow_{g}"
        samples = grow_dir / "samples.jsonl"
        argv = ["-m", "engine.rest", "grow", *config, "--grow", str(g), "--model", str(policy), "--output", str(samples)]
        steps.append(pipeline.Step(f"grow {g}", argv, made_by, samples, grow_dir / "grow.log", training=False))
        for i in range(1, cfg.improve_steps + 1):
            step_dir, name = grow_dir / f"improve_{i}", f"{g}.{i}"
            kept = step_dir / "kept.jsonl"
            argv = ["-m", "engine.rest", "filter", *config, "--improve", str(i), "--samples", str(samples),
                    "--output", str(kept)]
            steps.append(pipeline.Step(f"filter {name}", argv, (f"grow {g}",), step_dir / "filter.json",
                                       step_dir / "filter.log", training=False))
            start, start_by = (policy, made_by) if cfg.improve_from == "previous" else (cfg.policy, ())
            train_dir = step_dir / "policy"
            # ReST's settings last, so that an override in improve.overrides cannot move a stage's files
            argv = ["-m", "engine.train", "--config", cfg.improve.config, f"objective.name={cfg.improve.objective}",
                    *cfg.improve.overrides, f"output_dir={train_dir}", f"model.name_or_path={start}",
                    f"data.path={kept}", f"seed={cfg.seed}", "checkpoint.resume_from=latest",
                    "logging.progress_bar=false"]
            steps.append(pipeline.Step(f"improve {name}", argv, (f"filter {name}", *start_by), train_dir / "done.json",
                                       train_dir / "train.log", headline="loss/nll", resumes=True))
            steps.append(evaluate(f"eval {name}", train_dir / "final", step_dir / "eval.json", (f"improve {name}",)))
            policy, made_by = train_dir / "final", (f"improve {name}",)
    return steps


# ---- the report -------------------------------------------------------------------------------------


def report(cfg: RestConfig, out: Path) -> dict:
    """report.json and report.md from the stages' files: per Grow step its samples and their mean reward, per
    Improve step its threshold, the samples kept, the mean reward of the kept and of all samples, and the
    held-out judge score after it (the Grow step's row: the score after its last Improve step)."""

    def judge(path: Path) -> dict:
        metrics = json.loads(path.read_text())["metrics"] if path.exists() else {}
        return {"judge": metrics.get("judge/score"), "solved": metrics.get("judge/solved")}

    result = {"base": {"policy": cfg.policy, **judge(out / "eval_base.json")}, "grow": []}
    for g in range(1, cfg.grow_steps + 1):
        lines = [json.loads(line) for line in (out / f"grow_{g}" / "samples.jsonl").read_text().splitlines()]
        scored = [line["reward"] for line in lines if line["reward"] is not None]
        names = list(lines[0]["rewards"]) if lines else []
        improves = []
        for i in range(1, cfg.improve_steps + 1):
            step_dir = out / f"grow_{g}" / f"improve_{i}"
            done = json.loads((step_dir / "policy" / "done.json").read_text())
            improves.append({**json.loads((step_dir / "filter.json").read_text()), **judge(step_dir / "eval.json"),
                             "train_seconds": done["seconds"]})
        result["grow"].append({
            "grow": g, "samples": len(lines), "prompts": len({line["prompt_index"] for line in lines}),
            "mean_reward": _mean(scored),
            "mean_rewards": {n: _mean([x["rewards"][n] for x in lines if x["rewards"][n] is not None]) for n in names},
            "judge": improves[-1]["judge"], "solved": improves[-1]["solved"], "improve": improves})
    table = ["| step | threshold | samples kept | mean reward, kept | mean reward, all | judge (held-out) | solved |",
             "|---|---|---|---|---|---|---|",
             f"| start | | | | | {_fmt(result['base']['judge'])} | {_fmt(result['base']['solved'])} |"]
    for grown in result["grow"]:
        table.append(f"| grow {grown['grow']} | | {grown['samples']} samples of {grown['prompts']} prompts | | "
                     f"{_fmt(grown['mean_reward'])} | {_fmt(grown['judge'])} | {_fmt(grown['solved'])} |")
        for step in grown["improve"]:
            tau = f"> {step['threshold']:g}" if "threshold" in step else f"> p{step['percentile']:g} of each prompt"
            table.append(f"| improve {grown['grow']}.{step['improve']} | {tau} | {step['kept']} "
                         f"({step['kept_share']:.1%}) | {_fmt(step['mean_reward_kept'])} | "
                         f"{_fmt(step['mean_reward_all'])} | {_fmt(step['judge'])} | {_fmt(step['solved'])} |")
    result["table"] = table
    _write_json(out / "report.json", result)
    title = (f"# ReST: {cfg.grow_steps} Grow x {cfg.improve_steps} Improve steps from {cfg.policy}\n\n"
             f"K = {cfg.num_samples} samples per prompt, improve.objective = {cfg.improve.objective}, "
             f"improve_from = {cfg.improve_from}; judge: {cfg.evaluation.num_prompts} held-out prompts, seed "
             f"{cfg.evaluation.seed}. A Grow step's judge is the score after its last Improve step.\n\n")
    (out / "report.md").write_text(title + "\n".join(table) + "\n")
    return result


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(path)  # all or nothing: a stage's output is its done marker


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


# ---- start-up ---------------------------------------------------------------------------------------


def check(cfg: RestConfig) -> None:
    """What can be checked before any stage runs: the policy, the improve config and objective, the reward
    functions and their kwargs."""
    from engine.tiny import resolve_model_path
    from engine.train import check_reward_functions
    from losses import get_objective

    try:
        resolve_model_path(cfg.policy)
    except FileNotFoundError as error:
        raise ConfigError(str(error).replace("model.name_or_path", "policy")) from error
    if not Path(cfg.improve.config).is_file():
        raise ConfigError(f"improve.config={cfg.improve.config!r} does not exist; name an SFT run config, e.g. "
                          "configs/rest/improve.yaml")
    try:
        objective = get_objective(cfg.improve.objective)
    except ValueError as error:
        raise ConfigError(f"improve.objective: {error}") from error
    if objective.family != "sft":
        raise ConfigError(f"improve.objective={cfg.improve.objective!r} is of family {objective.family!r}; an "
                          "Improve step fine-tunes on kept samples: name an sft-family objective (sft, "
                          "reward_weighted_sft)")
    check_reward_functions(cfg.rewards, "rewards")
    for key, path in (("prompts.path", cfg.prompts.path), ("evaluation.prompts", cfg.evaluation.prompts)):
        if path != "synthetic" and not Path(path).is_file():
            raise ConfigError(f"{key}={path!r} does not exist; name a .jsonl or .txt file, or 'synthetic'")


def absolute(cfg: RestConfig) -> RestConfig:
    """The config with its local paths made absolute, since every stage runs from the repository root; a path
    found neither here nor under the repository stays as written (a hub id, "tiny", "synthetic")."""

    def local(path: str) -> str:
        if path == "synthetic":
            return path
        for candidate in (Path(path), pipeline.REPO_ROOT / path):
            if candidate.exists():
                return str(candidate.resolve())
        return path

    rewards = tuple(replace(r, model=local(r.model)) if r.model else r for r in cfg.rewards)
    return replace(cfg, output_dir=str(Path(cfg.output_dir).resolve()), policy=local(cfg.policy),
                   prompts=replace(cfg.prompts, path=local(cfg.prompts.path)), rewards=rewards,
                   improve=replace(cfg.improve, config=local(cfg.improve.config)),
                   evaluation=replace(cfg.evaluation, prompts=local(cfg.evaluation.prompts)))


def main(argv: Iterable[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["grow"], ["filter"]):
        return _stage(argv)
    parser = argparse.ArgumentParser(prog="python -m engine.rest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, action="append", metavar="YAML", help="a ReST config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. num_samples=8")
    parser.add_argument("--out", help="the run directory (output_dir)")
    parser.add_argument("--seed", type=int, help="seed of the Grow sampling and of every Improve run")
    parser.add_argument("--jobs", type=int, default=2, help="stages run side by side")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each stage")
    args = parser.parse_intermixed_args(argv)  # overrides before and after the flags alike
    overrides = [*args.overrides, *([f"output_dir={args.out}"] if args.out else []),
                 *([f"seed={args.seed}"] if args.seed is not None else [])]
    cfg = absolute(load_config(args.config, overrides, cls=RestConfig))
    check(cfg)
    out = Path(cfg.output_dir)
    started = time.perf_counter()
    config_path = save_config(cfg, out / "config.yaml")
    steps = plan(cfg, out, config_path)
    pipeline.run(steps, jobs=args.jobs, threads=args.threads, log=_log, first=1, total=len(steps) + 1)
    result = report(cfg, out)
    _log(f"[{len(steps) + 1}/{len(steps) + 1}] report: {out / 'report.json'}, {out / 'report.md'}")
    for line in result["table"]:
        _log("    " + line)
    _log(f"ReST done in {time.perf_counter() - started:.0f} s")
    return result


def _stage(argv: list[str]) -> dict:
    """`python -m engine.rest grow|filter ...`: one stage, with the run's resolved config."""
    parser = argparse.ArgumentParser(prog=f"python -m engine.rest {argv[0]}")
    parser.add_argument("--config", required=True, help="the run's resolved config, <out>/config.yaml")
    parser.add_argument("--output", required=True, type=Path)
    if argv[0] == "grow":
        parser.add_argument("--grow", type=int, required=True, help="the Grow step, from 1")
        parser.add_argument("--model", required=True, help="the policy that samples")
    else:
        parser.add_argument("--improve", type=int, required=True, help="the Improve step, from 1")
        parser.add_argument("--samples", required=True, type=Path, help="the Grow step's samples.jsonl")
    args = parser.parse_args(argv[1:])
    cfg = load_config(args.config, cls=RestConfig)
    if argv[0] == "grow":
        return grow(cfg, args.grow, args.model, args.output)
    return filter_samples(cfg, args.improve, args.samples, args.output)


def _log(message: str) -> None:
    print(message, flush=True)


def cli() -> None:
    from data import DataError
    from rollout.scoring import RewardError

    try:
        main()
    except (ConfigError, DataError, RewardError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
