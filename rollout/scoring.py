"""Scores for sampled responses: reward models and reward functions, weighted, normalised and clipped.

A reward model is a sequence-classification model with its own tokenizer: the prompt and response
texts are re-templated and re-tokenised for it, and the score is read at the last real token whatever
the padding side. A reward function is any Python callable named "package.module:function" with the
signature `fn(prompts: list[str], responses: list[str], **fields) -> list[float]`, where `fields` are
the row's other dataset columns (one list per column), e.g. the reference answer of a verifiable task.

A failing reward is a `RewardError` that names its source, the rows and the values, never a silent
wrong number. The one exception is a reward function that raises on some rows of a batch, or runs past
its `timeout_s`: the rows that raise are retried one by one, and those that still fail (or timed out)
are skipped (counted in `rollout/skipped`, logged, and left out of training), until a source has failed
on more than `max_skipped_fraction` of the rows it has scored in the run: then the run stops.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from rollout.generation import position_ids_from_mask

logger = logging.getLogger(__name__)


def load_reward_function(spec: str) -> Callable:
    """Resolve "package.module:function" to the callable; a clear error if either part is missing."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {spec!r} must be written 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # not only ImportError: a SyntaxError or any error the module raises on import
        raise ValueError(f"reward function {spec!r}: cannot import module {module_name!r} "
                         f"({type(err).__name__}: {err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: module {module_name!r} has no callable {attr!r}")
    return fn


def check_reward_kwargs(fn: Callable, kwargs: Mapping) -> None:
    """Raise ValueError now for `kwargs` that `fn` would refuse on its first call: those its signature cannot
    take beside (prompts, responses), then whatever its own `fn.check_kwargs(**kwargs)` refuses, where it has
    one (the functions in rollout/verifiable.py check their setting names and values and compile their regex
    there). Run at start-up, before any model loads."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a callable written in C: nothing to bind against
        signature = None
    if signature is not None:
        try:
            signature.bind_partial([], [], **kwargs)
        except TypeError as error:
            raise ValueError(f"kwargs {dict(kwargs)} do not fit its signature {signature}: {error}") from None
    check = getattr(fn, "check_kwargs", None)
    if callable(check):
        check(**kwargs)


class RewardError(ValueError):
    """A reward source that cannot give B finite numbers: the message names it, the rows and the values."""


class RewardTimeout(Exception):
    """A reward function call that ran past its `timeout_s`."""


def call_with_timeout(fn: Callable, timeout_s: float | None, *args, **kwargs):
    """`fn(*args, **kwargs)`, raising RewardTimeout after `timeout_s` seconds (None: wait for ever). The call
    runs in a daemon thread, which Python cannot stop: a hung one is abandoned, and does not keep the
    process from exiting."""
    if timeout_s is None:
        return fn(*args, **kwargs)
    result: dict = {}

    def target():
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True, name="reward-function")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RewardTimeout(f"no result after timeout_s={timeout_s:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


@dataclass
class RewardFunction:
    """A Python reward: `fn(prompts, responses, **fields, **kwargs) -> B numbers`."""

    name: str
    fn: Callable
    weight: float = 1.0
    kwargs: Mapping = field(default_factory=dict)
    timeout_s: float | None = None
    """Seconds one call may take; the rows of a call that runs past it are skipped. None: no limit."""

    def __call__(self, prompts: list[str], responses: list[str], fields: Mapping[str, list]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns scores (B,) float64 and ok (B,) bool (False: the function raised on that row or timed out)."""
        n = len(prompts)
        try:
            out = call_with_timeout(self.fn, self.timeout_s, prompts, responses, **fields, **self.kwargs)
            return self._checked(out, prompts, responses, range(n)), torch.ones(n, dtype=torch.bool)
        except RewardError:
            raise
        except RewardTimeout as err:  # retrying row by row would wait up to B times as long
            logger.warning("reward function %s skipped a batch of %d: %s", self.name, n, err)
            return torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.bool)
        except Exception as err:  # any failure of user code: retry row by row
            logger.warning("reward function %s raised on a batch of %d (%r); retrying row by row", self.name, n, err)
        scores, ok = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.bool)
        for i in range(n):
            row_fields = {k: v[i:i + 1] for k, v in fields.items()}
            try:
                out = call_with_timeout(self.fn, self.timeout_s, prompts[i:i + 1], responses[i:i + 1], **row_fields,
                                        **self.kwargs)
            except Exception as err:
                logger.warning("reward function %s skipped row %d: %r", self.name, i, err)
                continue
            scores[i], ok[i] = self._checked(out, prompts, responses, [i])[0], True
        return scores, ok

    def _checked(self, out, prompts: list[str], responses: list[str], rows) -> torch.Tensor:
        """`out` as (len(rows),) float64, or a RewardError naming the rows (of the batch) and their values."""
        rows = list(rows)
        n = len(rows)
        head = f"reward function {self.name!r}"
        fix = ("; it must return one finite number (int or float) per response, in the order of `responses`. "
               "Fix the function, or raise inside it to skip a row")
        if isinstance(out, torch.Tensor) or type(out).__module__ == "numpy":
            out = out.tolist() if getattr(out, "ndim", 1) else [out.item()]
        if isinstance(out, (str, bytes, Mapping)) or not isinstance(out, Sequence):
            shown = f"keys {list(out)[:5]}" if isinstance(out, Mapping) else _short(out)
            raise RewardError(f"{head} returned a {type(out).__name__} ({shown}) for {n} responses{fix}")
        values = [v[0] if isinstance(v, Sequence) and not isinstance(v, str) and len(v) == 1 else v for v in out]
        if len(values) != n:
            raise RewardError(f"{head} returned {len(values)} values for {n} responses (rows "
                              f"{_span(rows)} of the batch){fix}")
        bad = [(row, v) for row, v in zip(rows, values)
               if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)]
        if bad:
            shown = "; ".join(f"row {row} ({_short(responses[row])}): {_short(v)}" for row, v in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise RewardError(f"{head} returned {len(bad)} bad value(s) of {n}: {shown}{more}{fix}")
        return torch.tensor([float(v) for v in values], dtype=torch.float64)


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _span(rows: list[int]) -> str:
    return f"{rows[0]}-{rows[-1]}" if len(rows) > 1 else str(rows[0])


def default_format(tokenizer, prompt_format: str = "{prompt}", template: str | None = None) -> Callable[[str, str], str]:
    """The text a reward model reads for (prompt, response), as the data layer builds a preference row.

    template None: the tokenizer's chat template up to the assistant turn (`add_generation_prompt`) then
    the response, or `prompt_format` then the response when it has no chat template; "chat": the full
    chat template of the two turns (for reward models trained on whole conversations); any other string
    is a format with `{prompt}` and `{response}`. EOS is the `RewardModel`'s `append_eos`.
    """
    if template == "chat" or (template is None and getattr(tokenizer, "chat_template", None)):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat template")

        def chat(prompt: str, response: str) -> str:
            user = [{"role": "user", "content": prompt}]
            if template == "chat":
                return tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}],
                                                     tokenize=False)
            return tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True) + response
        return chat
    if template is not None:
        return lambda prompt, response: template.format(prompt=prompt, response=response)
    return lambda prompt, response: prompt_format.format(prompt=prompt) + response


@dataclass
class RewardModel:
    """A sequence-classification reward model with its own tokenizer and text format.

    `encode(prompt, response) -> ids`, when given, is how the model's training pairs were tokenised (the
    data layer's `Tokenise.scored_ids`, which the reward loop trains on), and the fields below are unused.
    Otherwise `format(prompt, response) -> text` must match what the model was trained on (see
    `default_format`); the text is encoded without the tokenizer's special tokens, then given the BOS
    the tokenizer adds (`add_special_tokens`; off when a chat template writes BOS itself) and, with
    `append_eos`, the EOS the reward loop reads its score at, each exactly once (a tokenizer that adds
    `[CLS] ... [SEP]` itself would otherwise end the text on a second `[SEP]`).
    """

    name: str
    model: nn.Module
    tokenizer: object
    format: Callable[[str, str], str]
    weight: float = 1.0
    max_length: int = 1024
    micro_batch_size: int = 8
    add_special_tokens: bool = True
    append_eos: bool = True
    encode: Callable[[str, str], list[int]] | None = None

    def __post_init__(self) -> None:
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"reward model {self.name}: its tokenizer has no pad token, so a batch cannot be "
                             "padded; set tokenizer.pad_token (a dedicated token, or the EOS)")
        labels = getattr(self.model.config, "num_labels", 1)
        if labels != 1:
            raise ValueError(f"reward model {self.name} has {labels} labels; a reward model has 1")

    def text_ids(self, text: str) -> list[int]:
        tok = self.tokenizer
        ids = tok(text, add_special_tokens=False).input_ids
        bos, eos = tok.bos_token_id, tok.eos_token_id
        if self.add_special_tokens and bos is not None and ids[:1] != [bos] and tok("a").input_ids[:1] == [bos]:
            ids = [bos] + ids
        if self.append_eos and eos is not None and ids[-1:] != [eos]:
            ids = ids + [eos]
        return ids

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str], fields: Mapping[str, list]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = list(zip(prompts, responses, strict=True))
        if self.encode is not None:
            rows = [self.encode(p, r) for p, r in pairs]
        else:
            rows = [self.text_ids(self.format(p, r)) for p, r in pairs]
        rows = [ids[: self.max_length] for ids in rows]
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        scores = []
        try:
            for i in range(0, len(rows), self.micro_batch_size):
                enc = self.tokenizer.pad({"input_ids": rows[i:i + self.micro_batch_size]},
                                         return_tensors="pt").to(device)
                scores.append(last_token_scores(self.model, enc["input_ids"], enc["attention_mask"]))
        finally:
            self.model.train(was_training)
        scores = torch.cat(scores).double().cpu()
        if not torch.isfinite(scores).all():
            bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
            raise RewardError(f"reward model {self.name!r} produced non-finite scores at rows {bad[:10]} of the batch "
                              f"({[float(scores[i]) for i in bad[:5]]}); check its weights and model.dtype "
                              "(float16 overflows where bfloat16 does not)")
        return scores, torch.ones(len(rows), dtype=torch.bool)


def last_token_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) score of a sequence-classification model at the last real token, left or right padded.

    transformers pools at the rightmost token that is not the pad id, which is the token before the EOS
    when pad == EOS; reading the head at the last attention-mask position is right in every case.
    """
    index = (torch.arange(input_ids.shape[1], device=input_ids.device) * attention_mask).argmax(-1)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    position_ids = position_ids_from_mask(attention_mask)
    head = getattr(model, "score", None)
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if isinstance(head, nn.Module) and isinstance(backbone, nn.Module):
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids).last_hidden_state
        return head(hidden[rows, index]).squeeze(-1).float()
    pad = model.config.pad_token_id
    if pad is not None and (input_ids[rows, index] == pad).any():
        raise ValueError("reward model's pad token is also the last real token of a sequence, and the model "
                         "pools at the last non-pad token; use a pad token distinct from the EOS")
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits.squeeze(-1).float()


class RunningMoments:
    """Running mean and variance of all scores seen (Welford / Chan et al. parallel update), in float64."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.double().flatten()
        n = x.numel()
        if n == 0:
            return
        batch_mean = float(x.mean())
        batch_m2 = float(((x - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: Mapping) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


@dataclass
class ScoreResult:
    scores: torch.Tensor  # (B,) float32 final score of each response
    valid: torch.Tensor  # (B,) bool: False where a reward function failed on the row (skip it)
    metrics: dict[str, float]
    by_source: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,) float64 its unweighted score
    raw: torch.Tensor | None = None  # (B,) float64 the weighted sum, before normalising, clipping and the EOS penalty


class Scorer:
    """Weighted sum of reward sources, then optional running normalisation and clipping, then the
    missing-EOS penalty (subtracted last, so it is in the same units whatever the reward scale)."""

    def __init__(self, sources: Sequence[RewardFunction | RewardModel], *, normalize: bool = False,
                 clip: float | None = None, missing_eos_penalty: float | None = None,
                 all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 max_skipped_fraction: float = 1.0):
        """`all_gather` (e.g. `accelerator.gather`) lets every process update the running moments with the
        scores of all processes, so they normalise alike, and count the skipped rows of all processes, so they
        stop alike. `max_skipped_fraction`: a RewardError once a source has skipped more than this fraction of
        the rows it has scored in the run (1.0: never)."""
        if not sources:
            raise ValueError("PPO needs at least one reward model or reward function")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"reward sources need distinct names, got {names}")
        self.sources = list(sources)
        self.moments = RunningMoments() if normalize else None
        self.clip = clip
        self.missing_eos_penalty = missing_eos_penalty
        self.all_gather = all_gather
        self.max_skipped_fraction = max_skipped_fraction
        self.rows_scored = 0
        self.rows_skipped = dict.fromkeys(names, 0)

    def __call__(self, prompts: list[str], responses: list[str], *, no_eos: torch.Tensor,
                 fields: Mapping[str, list] | None = None) -> ScoreResult:
        fields = dict(fields or {})
        n = len(prompts)
        for key, column in fields.items():
            if len(column) != n:
                raise ValueError(f"field {key!r} has {len(column)} values for {n} prompts")
        total = torch.zeros(n, dtype=torch.float64)
        valid = torch.ones(n, dtype=torch.bool)
        metrics: dict[str, float] = {}
        skipped = []
        by_source = {}
        for source in self.sources:
            scores, ok = source(prompts, responses, fields)
            by_source[source.name] = scores
            total += source.weight * scores
            valid &= ok
            skipped.append(int((~ok).sum()))
            metrics[f"objective/score/{source.name}"] = float(scores[ok].mean())
        self._count_skipped(n, skipped)
        raw = total
        self._check_finite(raw, valid, "the weighted sum of the scores")
        if self.moments is not None:
            seen = raw[valid]
            if self.all_gather is not None:
                everywhere = self.all_gather(torch.where(valid, raw, torch.nan))
                seen = everywhere[~everywhere.isnan()]
            try:
                self.moments.update(seen)
            except OverflowError:
                self.moments.mean = math.nan
            total = (total - self.moments.mean) / (self.moments.std + 1e-8)
            # a variance that overflows divides every score to 0 rather than to inf: check the moments too
            moments = torch.tensor([self.moments.mean, self.moments.std], dtype=torch.float64).expand(n, 2)
            self._check_finite(torch.where(torch.isfinite(moments).all(-1), total, torch.nan), valid,
                               "the normalised scores (ppo.normalize_scores: their running mean and variance)")
        if self.clip is not None:
            total = total.clamp(-self.clip, self.clip)
        no_eos = no_eos.cpu().bool()
        if self.missing_eos_penalty:
            total = total - self.missing_eos_penalty * no_eos.double()
        total = torch.where(valid, total, 0.0)
        metrics.update({
            "objective/score": float(total[valid].mean()),
            "objective/score_raw": float(raw[valid].mean()),
            "rollout/skipped": float((~valid).sum()),
        })
        return ScoreResult(scores=total.float(), valid=valid, metrics=metrics, by_source=by_source, raw=raw)

    def _count_skipped(self, n: int, skipped: list[int]) -> None:
        """Add this batch's rows and each source's skipped rows (of every process) to the run's counts, and stop
        once a source has skipped more than max_skipped_fraction of them."""
        counts = torch.tensor([[n, *skipped]], dtype=torch.float64)
        if self.all_gather is not None:
            counts = self.all_gather(counts)
        counts = counts.sum(0).long().tolist()
        self.rows_scored += counts[0]
        for name, count in zip(self.rows_skipped, counts[1:]):
            self.rows_skipped[name] += count
            fraction = self.rows_skipped[name] / self.rows_scored
            if fraction > self.max_skipped_fraction:
                raise RewardError(
                    f"reward function {name!r} failed (raised or timed out) on {self.rows_skipped[name]} of the "
                    f"{self.rows_scored} rows scored so far ({fraction:.0%}), more than ppo.max_skipped_fraction="
                    f"{self.max_skipped_fraction:g}; the warnings above give its errors. Fix the function, or raise "
                    "ppo.max_skipped_fraction to train on the rows it can score")

    def _check_finite(self, scores: torch.Tensor, valid: torch.Tensor, what: str) -> None:
        if torch.isfinite(scores[valid]).all():
            return
        rows = (valid & ~torch.isfinite(scores)).nonzero().flatten().tolist()
        raise RewardError(
            f"{what} overflow to inf or NaN at rows {rows[:10]} of the batch ({[float(scores[i]) for i in rows[:5]]}), "
            f"from the sources {[s.name for s in self.sources]} (weights {[s.weight for s in self.sources]}). Keep "
            "rewards well inside float64 range (e.g. |reward| < 1e100): rescale the reward function or its weight")

    def state_dict(self) -> dict:
        return {"moments": self.moments.state_dict() if self.moments is not None else None,
                "rows_scored": self.rows_scored, "rows_skipped": dict(self.rows_skipped)}

    def load_state_dict(self, state: Mapping) -> None:
        if self.moments is not None and state.get("moments") is not None:
            self.moments.load_state_dict(state["moments"])
        self.rows_scored = int(state.get("rows_scored", 0))
        self.rows_skipped.update({k: int(v) for k, v in state.get("rows_skipped", {}).items() if k in self.rows_skipped})
