"""The `ppo:` section of a run config: sampling, reward sources, KL shaping, GAE and the PPO update.

In a PPO run one optimizer step is one minibatch of `batch.global_batch_size` rollouts (forwarded in
micro-batches of `batch.micro_batch_size`), and `max_steps` counts PPO iterations: rollout of
`ppo.rollout_batch_size` prompts, then `ppo.epochs` passes over its shuffled minibatches.
The policy loss is `objective` (registry family "ppo", e.g. `objective: {name: ppo, clip_coef: 0.2}`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from losses import Estimator, get_advantage, get_objective
from losses.kl import KL_ESTIMATORS
from rollout.generation import Decoding, SamplingConfig

ROLLOUT_LOGPROBS = ("auto", "sampling", "recompute")


class PPOConfigError(ValueError):
    pass


@dataclass(frozen=True)
class RewardSourceConfig:
    """One reward source: a reward model (`model`, a sequence-classification checkpoint), a reward
    function (`function`, "package.module:function") or an AI judge (`judge`, a causal LM read through its
    answer-label probabilities, rollout.judge.JudgeReward), with its weight in the summed score."""

    name: str = "reward"
    """Metric name: `objective/score/<name>`."""
    function: str | None = None
    model: str | None = None
    """Reward model path or hub id; loaded with the dtype/quantisation of `reward_model:` (or `model:`)."""
    weight: float = 1.0
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the reward function."""
    template: str | None = None
    """Reward-model text: None = the data layer's format (its chat template's generation prompt, or
    data.prompt_format, then the response and EOS); "chat" = the full chat template; or a format string
    with {prompt} and {response}."""
    max_length: int = 1024
    timeout_s: float | None = None
    """Seconds one call of the reward function may take; the rows of a call that runs past it are skipped
    (counted against ppo.max_skipped_fraction). None: no limit."""
    judge: str | None = None
    """An AI judge: a causal LM's path or hub id (full or adapter), loaded once, frozen, in float32. A response
    scores sum_k label_values[k] * P(labels[k] | judge_template filled with the constitution, prompt and
    response), the label probabilities renormalised over `labels`."""
    constitution: str | None = None
    """With `judge`: the text file of principles put into the template's {constitution}."""
    judge_template: str | None = None
    """With `judge`: a template file with {constitution}, {prompt} and {response}; None:
    configs/rlaif/score_template.txt (answer 1 for yes, 2 for no)."""
    labels: tuple[str, ...] = ("1", "2")
    """With `judge`: the answer labels, one token each of the judge's tokenizer."""
    label_values: tuple[float, ...] | None = None
    """With `judge`: the worth of each label; None: 1 for the first and 0 for the others, so the score is
    P(first label). Labels "1".."5" with values 1..5 score the expected rating."""
    judge_format: str = "auto"
    """With `judge`: "auto" (one user turn of the judge's chat template, if it has one) or "plain" (the text)."""

    def __post_init__(self):
        kinds = [key for key in ("function", "model", "judge") if getattr(self, key) is not None]
        if len(kinds) != 1:
            raise PPOConfigError(f"reward source {self.name!r}: set exactly one of `function`, `model` and `judge`"
                                 + (f" (got {', '.join(kinds)})" if kinds else ""))
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise PPOConfigError(f"reward source {self.name!r}: timeout_s must be positive (or null: no limit), "
                                 f"got {self.timeout_s}")
        judge_keys = [key for key in ("constitution", "judge_template", "label_values")
                      if getattr(self, key) is not None]
        if self.judge is None and judge_keys:
            raise PPOConfigError(f"reward source {self.name!r}: {', '.join(judge_keys)} belong to a `judge` source")
        if self.judge is not None:
            if self.constitution is None:
                raise PPOConfigError(f"reward source {self.name!r}: a judge needs `constitution`, a text file of "
                                     "the principles it judges by")
            if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
                raise PPOConfigError(f"reward source {self.name!r}: labels must be two or more distinct answers, "
                                     f"got {list(self.labels)}")
            if self.label_values is not None and len(self.label_values) != len(self.labels):
                raise PPOConfigError(f"reward source {self.name!r}: {len(self.label_values)} label_values for "
                                     f"{len(self.labels)} labels {list(self.labels)}")
            if self.judge_format not in ("auto", "plain"):
                raise PPOConfigError(f"reward source {self.name!r}: judge_format must be 'auto' or 'plain', "
                                     f"got {self.judge_format!r}")

    def values(self) -> tuple[float, ...]:
        """A judge source's label values, the default (1, 0, ..., 0) filled in."""
        return self.label_values or (1.0,) + (0.0,) * (len(self.labels) - 1)


@dataclass(frozen=True)
class PPOConfig(Decoding):
    """The sampling keys (max_new_tokens, min_new_tokens, temperature, top_k, top_p, response_length) are the
    decoder's own, `rollout.generation.Decoding`; `sampling()` gives the rollout's SamplingConfig."""

    rollout_batch_size: int = 16
    """Prompts sampled per iteration, over all processes; each gives `group_size` rollouts."""
    group_size: int = 1
    """Responses sampled per prompt, G. The critic-free estimators compare a response with its group's: G of 2
    or more (grpo, dr_grpo, rloo); PPO's gae needs none (G = 1)."""
    advantage: str | None = None
    """The advantage estimator (losses.advantages): gae, grpo, dr_grpo, rloo, reinforce_pp, or a registered
    one. None: the objective's own (ppo -> gae, grpo -> grpo, rloo -> rloo, ...). A value function (the
    value head or `critic`) is built only for an estimator that needs one."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (Yu et al. 2025): drop the groups whose rewards all tie (no advantage) and
    sample more prompts until the batch is full, for at most `max_sampling_rounds` rounds; tied groups fill
    what is still missing after that. Logged as groups/filtered and rollout/sampling_rounds."""
    max_sampling_rounds: int = 3
    overlong_filter: bool = False
    """DAPO's overlong filtering: a response cut at max_new_tokens without EOS is masked out of the loss (it
    still counts in its group's baseline)."""
    overlong_buffer: int | None = None
    """DAPO's soft overlong punishment: a response longer than max_new_tokens - overlong_buffer tokens loses up
    to `overlong_penalty`, linearly over the buffer (Yu et al. 2025, eq. 13). None: off."""
    overlong_penalty: float = 1.0
    solved_threshold: float | None = None
    """A response scoring at least this counts as solved, for the group metrics groups/all_solved and
    groups/none_solved (verifiable rewards: 1.0). None: those two are not logged."""
    rollout_micro_batch_size: int = 8
    """Rows per forward while generating, scoring and computing reference log-probs and values."""

    rewards: tuple[RewardSourceConfig, ...] = ()
    """Reward models, reward functions and AI judges; their weighted sum is the score. Empty: `reward_model:`."""
    normalize_scores: bool = False
    """Divide (score - running mean) by the running std (Welford, saved in checkpoints)."""
    score_clip: float | None = None
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a response that hit its budget without EOS."""
    max_skipped_fraction: float = 0.5
    """Stop the run once a reward function has failed (raised or timed out) on more than this fraction of the
    rows it has scored; those rows are skipped until then. 1.0: never stop."""

    kl_coef: float | None = None
    """Initial beta of the per-token KL penalty in the reward. None: the advantage estimator's default (0.05
    for PPO's gae and for rloo, 0.01 for reinforce_pp, 0 for grpo and dr_grpo, which put their KL in the
    loss as the objective's kl_coef). 0 in the reward and in the loss loads no reference model."""
    kl_target: float | None = None
    """Adaptive controller (Ziegler et al. 2019) steering the KL to this target; None keeps beta fixed."""
    kl_horizon: float = 10000.0
    kl_estimator: str = "k1"
    """k1, k2 or k3 (Schulman 2020) for the per-token penalty."""

    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    epochs: int = 4
    """Passes over each rollout batch."""
    value_clip: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    """Entropy bonus: loss -= entropy_coef * mean token entropy."""
    max_approx_kl: float | None = None
    """Stop an iteration's epochs once a minibatch's approx KL to the rollout policy exceeds this."""
    critic: str | None = None
    """A separate critic model (path or hub id) with its own value head; None: the head shares the policy."""
    rollout_logprobs: str = "auto"
    """Where the rollout policy's log-probs (and a value head on the policy: the values) come from.
    "sampling": kept from the decoding pass, so the experience pass skips one policy forward (TRL's PPOTrainer
    does the same); they equal a fresh forward's within float32 rounding (1e-5, tested). "recompute": a forward
    of the policy over the finished sequences, as the training forward sees them. "auto": "sampling" when the
    policy computes in float32 (no mixed precision, no quantised weights), else "recompute": in bf16 the cached
    decoding pass and a full forward round differently, and the first update's ratio would not start at 1."""
    log_samples: int = 4
    """Sample generations written to TensorBoard text every logged iteration."""

    def __post_init__(self):
        if self.kl_estimator not in KL_ESTIMATORS:
            raise PPOConfigError(f"ppo.kl_estimator={self.kl_estimator!r} is not one of {list(KL_ESTIMATORS)}")
        if self.rollout_logprobs not in ROLLOUT_LOGPROBS:
            raise PPOConfigError(f"ppo.rollout_logprobs={self.rollout_logprobs!r} is not one of "
                                 f"{list(ROLLOUT_LOGPROBS)}")
        for key in ("rollout_batch_size", "rollout_micro_batch_size", "max_new_tokens", "epochs", "group_size",
                    "max_sampling_rounds"):
            if getattr(self, key) <= 0:
                raise PPOConfigError(f"ppo.{key} must be positive, got {getattr(self, key)}")
        if self.temperature <= 0:
            raise PPOConfigError(f"ppo.temperature must be positive (PPO needs a sampling policy), got {self.temperature}")
        for key in ("gamma", "lam"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise PPOConfigError(f"ppo.{key} must be in [0, 1], got {getattr(self, key)}")
        for key in ("kl_coef", "vf_coef", "entropy_coef", "missing_eos_penalty", "overlong_penalty"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise PPOConfigError(f"ppo.{key} must be 0 (off) or more, got {getattr(self, key)}; a negative "
                                     "weight rewards what it is meant to penalise")
        for key in ("value_clip", "kl_horizon", "score_clip", "max_approx_kl"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise PPOConfigError(f"ppo.{key} must be positive, got {getattr(self, key)}")
        if self.overlong_buffer is not None and not 0 < self.overlong_buffer < self.max_new_tokens:
            raise PPOConfigError(f"ppo.overlong_buffer must be between 0 and max_new_tokens={self.max_new_tokens} "
                                 f"(exclusive), got {self.overlong_buffer}; null turns the punishment off")
        if self.dynamic_sampling and self.group_size < 2:
            raise PPOConfigError("ppo.dynamic_sampling drops groups whose rewards tie, so it needs ppo.group_size >= 2")
        if self.advantage is not None:
            try:
                get_advantage(self.advantage)
            except ValueError as error:
                raise PPOConfigError(f"ppo.advantage: {error}") from None
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise PPOConfigError(f"ppo.max_skipped_fraction must be in [0, 1], got {self.max_skipped_fraction}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise PPOConfigError(f"ppo.kl_target must be positive, got {self.kl_target}")
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise PPOConfigError(f"ppo.rewards need distinct names, got {names}")
        try:
            super().__post_init__()
        except ValueError as error:
            raise PPOConfigError(f"ppo.{error}") from None

    def sampling(self) -> SamplingConfig:
        """The rollout's sampling: the Decoding fields, `rollout_micro_batch_size` rows at a time."""
        return SamplingConfig(**{f.name: getattr(self, f.name) for f in fields(Decoding)},
                              micro_batch_size=self.rollout_micro_batch_size)


def advantage_estimator(cfg) -> Estimator:
    """The run's advantage estimator: `ppo.advantage`, or the objective's own (PPO's: gae). `cfg` is a RunConfig."""
    return get_advantage(cfg.ppo.advantage or get_objective(cfg.objective.name).advantage or "gae")


def kl_settings(cfg, loss_kwargs: Mapping[str, Any]) -> tuple[float, bool]:
    """The KL coefficient in the rewards (`ppo.kl_coef`, or the estimator's default), and whether any KL is
    used: in the rewards, an adaptive target, or the loss's own `kl_coef` (in `loss_kwargs`, the objective's
    bound keyword arguments). Without one no reference model loads."""
    reward_kl = cfg.ppo.kl_coef if cfg.ppo.kl_coef is not None else advantage_estimator(cfg).kl_coef
    in_loss = float(loss_kwargs.get("kl_coef", 0.0) or 0.0)
    return reward_kl, reward_kl > 0 or cfg.ppo.kl_target is not None or in_loss > 0
