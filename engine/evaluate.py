"""Evaluate a checkpoint on held-out prompts and preference pairs; write one JSON file.

    python -m engine.evaluate --model runs/quickstart/dpo/final --reference runs/quickstart/sft/final \
        --reward-model runs/quickstart/reward/final --prompts synthetic --out runs/quickstart/eval/dpo.json
    python -m engine.evaluate --model runs/quickstart/reward/final --reward-model-only --pairs test_pairs.jsonl

On prompts (a .txt or .jsonl file, or `synthetic`: the sorting task's test split), responses are sampled with
a fixed seed by rollout.generation, the decoder PPO uses; the reference answers the same prompts from the same
seed. Metrics, each a mean over prompts:

    judge/score, judge/solved      a programmatic judge (the sorting task's, or --judge package.module:fn)
    reward_model/score             the reward model's score of the response
    reward_model/win_rate          P(reward of the response > reward of the reference's), ties count 1/2
    objective/kl                   sum over response tokens of log pi(y_t) - log pi_ref(y_t), y ~ pi
    response/length, response/eos  tokens per response (EOS included); share that ended with EOS

On preference pairs: `pairs/reward_model_accuracy` (the reward model ranks chosen over rejected),
`pairs/dpo_accuracy` (implicit reward log pi - log pi_ref of chosen above rejected; needs --reference) and
`pairs/orpo_accuracy` (log-odds of the mean token log-prob, ORPO's implicit reward). Side-by-side samples of
prompt, reference response, response and their scores go in `samples`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from data import make_collator
from data.config import DataConfig
from data.formats import canonical, detect_format
from data.tokenize import reward_pair_encoder
from engine.generate import PromptEncoder, add_rollout_arguments, load_model, read_prompts, rollout_config
from engine.logprobs import label_logprobs
from engine.models import load_tokenizer
from losses import log1m_exp, reduce_logprobs
from rollout.generation import Generation, RolloutConfig, SamplingConfig, generate
from rollout.logprobs import response_logprobs
from rollout.scoring import RewardModel, default_format, load_reward_function

SYNTHETIC_JUDGE = "data.synthetic:judge_reward"


@dataclass(frozen=True)
class EvaluationConfig:
    model: str | None = None
    """The checkpoint to evaluate (final/ directory: full, adapter or merged)."""
    reference: str | None = None
    """The baseline (usually the SFT model): win rate, KL and the DPO implicit reward are measured against it."""
    reward_model: str | None = None
    prompts: str | None = "synthetic"
    """Held-out prompts: a .txt / .jsonl file, or "synthetic"; None skips generation."""
    pairs: str | None = "synthetic"
    """Held-out preference pairs (.jsonl with prompt, chosen, rejected) or "synthetic"; None skips them."""
    judge: str | None = "auto"
    """A reward function "package.module:function" scoring (prompts, responses); "auto": the sorting
    task's judge when every prompt is a sorting prompt; None: no judge."""
    num_prompts: int = 200
    """How many held-out prompts; 0 skips generation, as `prompts=None` does."""
    num_pairs: int = 200
    """How many held-out pairs; 0 skips them, as `pairs=None` does."""
    data_seed: int = 0
    """The synthetic task's seed (its test split is drawn from a stream disjoint from training)."""
    seed: int = 0
    """Sampling seed; the model and the reference draw from the same one."""
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int = 64
    samples: int = 8
    template: str | None = None
    prompt_format: str = DataConfig.prompt_format
    max_prompt_length: int | None = 256
    attn_implementation: str = "auto"
    """The policy's and reference's attention, as model.attn_implementation."""
    reward_attn_implementation: str = "auto"
    rollout: RolloutConfig = RolloutConfig()
    """The decoding backend (--backend, --static-cache, --compile); the reference decodes with it too."""


# ---- metrics on tensors -------------------------------------------------------------------------


def win_rate(scores: torch.Tensor, reference_scores: torch.Tensor) -> float:
    """Share of rows where `scores` beats `reference_scores`, ties counting one half. (B,) each."""
    return float(((scores > reference_scores).double() + 0.5 * (scores == reference_scores).double()).mean())


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs ranked right (strictly; a tie is wrong, as losses.reward's accuracy). (B,) each."""
    return float((chosen > rejected).double().mean())


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log p / (1 - p) from log p (ORPO, Hong et al. 2024, eq. 4), with ORPO's loss's own `log1m_exp`."""
    return mean_logps - log1m_exp(mean_logps)


@torch.no_grad()
def generation_logprobs(model, gen: Generation, temperature: float) -> torch.Tensor:
    """(B, R) log-probs under `model` of the sampled response tokens, 0 off `gen.action_mask`."""
    return response_logprobs(model, gen.sequences, gen.attention_mask, gen.action_mask, temperature=temperature)


@torch.no_grad()
def response_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and mean of the response tokens' log-probs, (B,) each, for a collated SFT batch whose labels are
    -100 outside the response."""
    logprobs, mask = label_logprobs(model, batch)
    return reduce_logprobs(logprobs, mask, "sum"), reduce_logprobs(logprobs, mask, "mean")


# ---- data ---------------------------------------------------------------------------------------


def synthetic_rows(family: str, n: int, seed: int) -> list[dict]:
    """The first `n` rows of the sorting task's test split ("prompt" or "preference"), as written to disk."""
    from data.synthetic import write_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        path = write_synthetic(tmp, seed=seed, n_train=1, n_test=n)[f"{family}_test"]
        return [json.loads(line) for line in path.read_text().splitlines()]


def read_pairs(path: str) -> list[dict]:
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            where = f"{path}:{number}"
            record = canonical("preference", detect_format("preference", "auto", row, where), row, where)
            rows.append({"prompt": record["prompt_messages"][-1]["content"], "chosen": record["chosen"],
                         "rejected": record["rejected"]})
    return rows


def resolve_judge(spec: str | None, prompts: Sequence[str]) -> Callable | None:
    if spec is None or spec == "none":
        return None
    if spec != "auto":
        return load_reward_function(spec)
    from data.synthetic import parse_prompt

    try:
        for prompt in prompts:
            parse_prompt(prompt)
    except ValueError:
        return None
    return load_reward_function(SYNTHETIC_JUDGE)


# ---- the evaluation -----------------------------------------------------------------------------


class Evaluator:
    """Loads the models once; `prompts()` and `pairs()` compute the metrics of each half."""

    def __init__(self, cfg: EvaluationConfig):
        self.cfg = cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.policy = self.reference = self.reward = None
        if cfg.model is not None:
            self.policy = load_model(cfg.model, attn_implementation=cfg.attn_implementation).to(self.device)
            self.tokenizer = load_tokenizer(cfg.model)
        if cfg.reference is not None:
            self.reference = load_model(cfg.reference, attn_implementation=cfg.attn_implementation).to(self.device)
            if self.reference.config.vocab_size != self.policy.config.vocab_size:
                raise ValueError(f"--reference {cfg.reference} has another vocabulary than --model {cfg.model}; "
                                 "KL and implicit rewards need the same tokenizer")
        if cfg.reward_model is not None:
            tokenizer = load_tokenizer(cfg.reward_model)
            plain = cfg.prompt_format + "{response}" if cfg.template == "plain" else None
            fmt = default_format(tokenizer, cfg.prompt_format, plain)
            # a chat template that writes BOS itself must not get a second one from the tokenizer
            bos_in_text = bool(tokenizer.bos_token) and fmt("", "").startswith(tokenizer.bos_token)
            model = load_model(cfg.reward_model, kind="reward",
                               attn_implementation=cfg.reward_attn_implementation).to(self.device)
            encode = reward_pair_encoder(DataConfig(template="plain" if cfg.template == "plain" else None,
                                                    prompt_format=cfg.prompt_format, max_length=1024,
                                                    max_prompt_length=None), tokenizer)
            self.reward = RewardModel("reward_model", model, tokenizer, fmt, micro_batch_size=cfg.batch_size,
                                      add_special_tokens=not bos_in_text, encode=encode)
        if self.policy is not None:
            self.encoder = PromptEncoder(self.tokenizer, cfg.template, cfg.prompt_format, cfg.max_prompt_length)
            self.sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                           top_k=cfg.top_k, top_p=cfg.top_p, micro_batch_size=cfg.batch_size)

    def run(self) -> dict:
        cfg = self.cfg
        result = {"config": asdict(cfg), "metrics": {}, "samples": []}
        if cfg.prompts is not None and cfg.num_prompts > 0 and self.policy is not None:
            if cfg.prompts == "synthetic":
                rows = synthetic_rows("prompt", cfg.num_prompts, cfg.data_seed)
            else:
                rows = read_prompts(cfg.prompts)[: cfg.num_prompts]
            metrics, samples = self.prompts(rows)
            result["metrics"].update(metrics)
            result["samples"] = samples
        if cfg.pairs is not None and cfg.num_pairs > 0 and (self.policy is not None or self.reward is not None):
            pairs = (synthetic_rows("preference", cfg.num_pairs, cfg.data_seed) if cfg.pairs == "synthetic"
                     else read_pairs(cfg.pairs)[: cfg.num_pairs])
            result["metrics"].update(self.pairs(pairs))
        return result

    def sample(self, model, prompts: Sequence[str]) -> tuple[list[str], list[Generation]]:
        """Responses to every prompt from one generator seeded with `cfg.seed`."""
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        texts, generations = [], []
        for start in range(0, len(prompts), self.cfg.batch_size):
            input_ids, attention_mask = self.encoder.batch(prompts[start:start + self.cfg.batch_size])
            gen = generate(model, input_ids.to(self.device), attention_mask.to(self.device), self.sampling,
                           eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                           generator=generator, rollout=self.cfg.rollout)
            tokens = gen.responses.masked_fill(~gen.action_mask, self.tokenizer.pad_token_id)
            texts += self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
            generations.append(gen)
        return texts, generations

    def prompts(self, rows: list[dict]) -> tuple[dict[str, float], list[dict]]:
        cfg = self.cfg
        prompts = [row["prompt"] for row in rows]
        fields = {key: [row.get(key) for row in rows] for key in rows[0] if key != "prompt"}
        responses, generations = self.sample(self.policy, prompts)
        lengths = torch.cat([g.response_length for g in generations]).double()
        no_eos = torch.cat([g.no_eos for g in generations]).double()
        metrics = {"response/length": float(lengths.mean()), "response/eos": float(1 - no_eos.mean()),
                   "num_prompts": len(prompts)}
        scores: dict[str, list] = {"response": responses}

        reference_responses = None
        if self.reference is not None:
            reference_responses, _ = self.sample(self.reference, prompts)
            scores["reference_response"] = reference_responses
            kl = torch.cat([(generation_logprobs(self.policy, g, cfg.temperature)
                             - generation_logprobs(self.reference, g, cfg.temperature)).sum(-1)
                            for g in generations])
            metrics["objective/kl"] = float(kl.mean())

        judge = resolve_judge(cfg.judge, prompts)
        if judge is not None:
            judged = torch.tensor(judge(prompts, responses, **fields), dtype=torch.float64)
            metrics.update({"judge/score": float(judged.mean()), "judge/solved": float((judged >= 1).double().mean())})
            scores["judge"] = judged.tolist()
            if reference_responses is not None:
                judged_ref = torch.tensor(judge(prompts, reference_responses, **fields), dtype=torch.float64)
                metrics["judge/score_reference"] = float(judged_ref.mean())
                scores["judge_reference"] = judged_ref.tolist()

        if self.reward is not None:
            rewards, _ = self.reward(prompts, responses, fields)
            metrics["reward_model/score"] = float(rewards.mean())
            scores["reward"] = rewards.tolist()
            if reference_responses is not None:
                reference_rewards, _ = self.reward(prompts, reference_responses, fields)
                metrics["reward_model/score_reference"] = float(reference_rewards.mean())
                metrics["reward_model/win_rate"] = win_rate(rewards, reference_rewards)
                scores["reward_reference"] = reference_rewards.tolist()

        samples = [{"prompt": prompt, **{key: values[i] for key, values in scores.items()}}
                   for i, prompt in enumerate(prompts[: cfg.samples])]
        return metrics, samples

    def pairs(self, rows: list[dict]) -> dict[str, float]:
        prompts = [row["prompt"] for row in rows]
        chosen, rejected = [row["chosen"] for row in rows], [row["rejected"] for row in rows]
        metrics: dict[str, float] = {"num_pairs": len(rows)}
        if self.reward is not None:
            chosen_rewards, _ = self.reward(prompts, chosen, {})
            rejected_rewards, _ = self.reward(prompts, rejected, {})
            metrics["pairs/reward_model_accuracy"] = pair_accuracy(chosen_rewards, rejected_rewards)
        if self.policy is not None:
            policy = {name: self.pair_logps(self.policy, prompts, texts)
                      for name, texts in (("chosen", chosen), ("rejected", rejected))}
            metrics["pairs/orpo_accuracy"] = pair_accuracy(log_odds(policy["chosen"][1]),
                                                           log_odds(policy["rejected"][1]))
            if self.reference is not None:
                reference = {name: self.pair_logps(self.reference, prompts, texts)[0]
                             for name, texts in (("chosen", chosen), ("rejected", rejected))}
                metrics["pairs/dpo_accuracy"] = pair_accuracy(policy["chosen"][0] - reference["chosen"],
                                                              policy["rejected"][0] - reference["rejected"])
        return metrics

    def pair_logps(self, model, prompts: Sequence[str], responses: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum and mean log-probs (B,) of each response after its prompt, tokenised as the data layer does."""
        formatter = self.encoder.formatter
        collate = make_collator("sft", self.tokenizer, allow_pad_as_eos=True)
        sums, means = [], []
        for start in range(0, len(prompts), self.cfg.batch_size):
            rows = []
            for prompt, response in zip(prompts[start:start + self.cfg.batch_size],
                                        responses[start:start + self.cfg.batch_size]):
                prompt_ids, response_ids = self.encoder.ids(prompt), formatter.response_ids(response)
                rows.append({"input_ids": prompt_ids + response_ids, "labels": [-100] * len(prompt_ids) + response_ids})
            batch = {key: value.to(self.device) for key, value in collate(rows).items()}
            total, mean = response_logps(model, batch)
            sums.append(total.cpu())
            means.append(mean.cpu())
        return torch.cat(sums), torch.cat(means)


def evaluate(cfg: EvaluationConfig, out: str | Path | None = None) -> dict:
    """Run the evaluation; write the JSON to `out` when given."""
    result = Evaluator(cfg).run()
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def parse_args(argv: Iterable[str] | None) -> tuple[EvaluationConfig, str | None]:
    parser = argparse.ArgumentParser(prog="python -m engine.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="the checkpoint to evaluate (a policy); omit to evaluate only --reward-model")
    parser.add_argument("--reference", help="the baseline policy (the SFT model)")
    parser.add_argument("--reward-model", help="a reward model checkpoint")
    parser.add_argument("--prompts", default="synthetic", help="'synthetic', a .txt or .jsonl file, or 'none'")
    parser.add_argument("--pairs", default="synthetic", help="'synthetic', a .jsonl of prompt/chosen/rejected, or 'none'")
    parser.add_argument("--judge", default="auto", help="'auto', 'none' or a reward function package.module:fn")
    parser.add_argument("--num-prompts", type=int, default=EvaluationConfig.num_prompts)
    parser.add_argument("--num-pairs", type=int, default=EvaluationConfig.num_pairs)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=EvaluationConfig.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 decodes greedily")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=EvaluationConfig.batch_size)
    parser.add_argument("--samples", type=int, default=EvaluationConfig.samples)
    parser.add_argument("--template", default=None)
    parser.add_argument("--prompt-format", default=DataConfig.prompt_format)
    parser.add_argument("--attn-implementation", default="auto",
                        help="the policy's and reference's, as model.attn_implementation (auto: sdpa where the "
                             "model has it, else eager)")
    parser.add_argument("--reward-attn-implementation", default="auto", help="the reward model's, likewise")
    add_rollout_arguments(parser)
    parser.add_argument("--out", help="write the JSON here (it is printed either way)")
    args = parser.parse_args(None if argv is None else list(argv))
    if args.model is None and args.reward_model is None:
        parser.error("give --model, --reward-model, or both")
    for flag in ("num_prompts", "num_pairs"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be 0 (none) or more, got {getattr(args, flag)}")
    none = {"none": None}
    cfg = EvaluationConfig(
        model=args.model, reference=args.reference, reward_model=args.reward_model,
        prompts=none.get(args.prompts, args.prompts), pairs=none.get(args.pairs, args.pairs), judge=args.judge,
        num_prompts=args.num_prompts, num_pairs=args.num_pairs, data_seed=args.data_seed, seed=args.seed,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        batch_size=args.batch_size, samples=args.samples, template=args.template, prompt_format=args.prompt_format,
        attn_implementation=args.attn_implementation, reward_attn_implementation=args.reward_attn_implementation,
        rollout=rollout_config(args),
    )
    return cfg, args.out


def main(argv: Iterable[str] | None = None) -> dict:
    from transformers.utils import logging as hf_logging

    cfg, out = parse_args(argv)
    hf_logging.disable_progress_bar()
    result = evaluate(cfg, out)
    json.dump(result["metrics"], sys.stdout, indent=2)
    print()
    if cfg.model is not None:
        attach_to_training_run(Path(cfg.model).parent, result, out)
    return result


def attach_to_training_run(run_dir: Path, result: dict, out: str | None) -> None:
    """Where the model's training run logged to W&B or MLflow (`<run_dir>/trackers.json`), add the samples as
    the table `evaluation/samples` and the JSON as an artifact in `evaluation/` of that same run."""
    from engine import tracking

    with tracking.reopened(run_dir) as trackers:
        if result["samples"]:
            columns = list(result["samples"][0])
            rows = [[sample.get(column) for column in columns] for sample in result["samples"]]
            tracking.log_table(trackers, "evaluation/samples", columns, rows, step=None)
        if out is not None:
            tracking.attach(trackers, [out], "evaluation")


def cli() -> None:
    from engine.generate import exit_2_on_config_error

    exit_2_on_config_error(main)


if __name__ == "__main__":
    cli()
