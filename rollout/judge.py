"""An AI judge: preferences and scores read from a causal LM's next-token probabilities of answer labels.

RLAIF (Bai et al. 2022, "Constitutional AI"; Lee et al. 2023, "RLAIF vs. RLHF") asks a language model which
of two responses better follows a set of principles, the constitution, and reads its answer from the
probabilities of the label tokens, not from sampled text. Here:

- the judge prompt is a text template with named fields ({constitution}, {prompt}, {response_1},
  {response_2} for a comparison; {constitution}, {prompt}, {response} for a score), filled with `fill`;
- `Judge.label_probs` gives, for each judge prompt, the next-token probabilities of the L labels,
  renormalised over those L tokens (a softmax of their logits), in float64;
- `compare` scores a pair in both orders and averages, which removes the judge's position bias (Lee et al.
  2023, Sec. 2.1): with q(X, Y) the probability of label 1 when X is shown first and Y second,

      p = (P(1 | A, B) + P(2 | B, A)) / 2 = 1/2 + (q(A, B) - q(B, A)) / 2,

  the probability that A is preferred, and the confidence |2p - 1| = |q(A, B) - q(B, A)|. A judge that
  always answers the same label, whatever it reads, gives p = 1/2 and confidence 0 exactly;
- `JudgeReward` is a reward source for `rollout.scoring.Scorer` (PPO and the GRPO family): the score of a
  response is sum_k value_k * P(label_k), e.g. P("good") with values (1, 0), or the expected rating with
  labels "1".."5" and values 1..5 (direct RLAIF, Lee et al. 2023, Sec. 2.2).

How a judge prompt becomes token ids (a chat template or not, BOS) is the caller's `encode`; the engine
builds it with the data layer's formatter (`engine.label.load_judge`), so a judge fine-tuned by the engine
reads exactly the tokens it was trained on. A label is the first token of the judge's answer, tokenised on
its own as the data layer tokenises a response; each label must be one token.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from rollout.generation import position_ids_from_mask

PAIR_FIELDS = ("constitution", "prompt", "response_1", "response_2")
SCORE_FIELDS = ("constitution", "prompt", "response")


def template_fields(template: str) -> list[str]:
    """The named {fields} of a str.format template, in order of appearance ({{ and }} are literal braces)."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def check_template(template: str, fields: Sequence[str], where: str = "judge template") -> None:
    """A ValueError naming what is wrong unless `template` uses exactly the named `fields` (each at least once)."""
    try:
        used = template_fields(template)
    except ValueError as error:  # a lone { or }
        raise ValueError(f"{where}: {error}; write a literal brace as {{{{ or }}}}") from None
    unknown = sorted({name for name in used if name not in fields})
    missing = [name for name in fields if name not in used]
    if unknown or missing:
        problems = ([f"unknown field(s) {', '.join('{' + n + '}' for n in unknown)}"] if unknown else []) + \
                   ([f"missing {', '.join('{' + n + '}' for n in missing)}"] if missing else [])
        raise ValueError(f"{where}: {'; '.join(problems)}; it must use {', '.join('{' + n + '}' for n in fields)} "
                         "(literal braces as {{ and }})")


def fill(template: str, **values: str) -> str:
    """The template with each {field} replaced by its value (values are inserted as they are, braces and all)."""
    return template.format_map(values)


def label_token_ids(encode_label: Callable[[str], list[int]], labels: Sequence[str]) -> list[int]:
    """One token id per label, as `encode_label` tokenises each on its own; a ValueError naming every label
    that is not exactly one token (with its tokens), or labels that share a token."""
    ids, bad = [], []
    for label in labels:
        tokens = encode_label(label)
        if len(tokens) != 1:
            bad.append(f"{label!r} -> {len(tokens)} tokens {tokens}")
        ids.append(tokens[0] if tokens else None)
    if bad:
        raise ValueError(f"each judge label must be one token of the judge's tokenizer: {'; '.join(bad)}. Pick "
                         "labels that are single tokens (e.g. 1 and 2, or A and B) and say them in the template")
    if len(set(ids)) != len(ids):
        raise ValueError(f"judge labels {list(labels)} must be distinct tokens, got ids {ids}")
    if len(ids) < 2:
        raise ValueError(f"a judge needs at least two labels, got {list(labels)}")
    return ids


@dataclass
class Judge:
    """A frozen causal LM that answers judge prompts with one of `labels`."""

    model: nn.Module
    encode: Callable[[str], list[int]]
    """Judge prompt text -> the token ids the model reads (template, BOS); the answer label comes next."""
    label_ids: Sequence[int]
    """(L,) the token id of each label, in the order of `labels`."""
    pad_token_id: int
    labels: Sequence[str] = ()
    micro_batch_size: int = 16

    @torch.no_grad()
    def label_probs(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """(N, L) float64: each judge prompt's next-token probabilities of the labels, renormalised over them.

        Prompts are left padded, positions follow the attention mask, and the LM head runs on the last
        position only (`logits_to_keep=1`); `progress(n)` is called after every micro-batch of n prompts."""
        device = next(self.model.parameters()).device
        label_ids = torch.tensor(list(self.label_ids), device=device)
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            for start in range(0, len(texts), self.micro_batch_size):
                rows = [self.encode(t) for t in texts[start:start + self.micro_batch_size]]
                width = max(len(r) for r in rows)
                input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
                attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
                for i, ids in enumerate(rows):
                    input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[i, width - len(ids):] = 1
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids_from_mask(attention_mask), logits_to_keep=1,
                                    use_cache=False).logits[:, -1]  # a model that ignores logits_to_keep: all T
                out.append(torch.softmax(logits.index_select(-1, label_ids).double(), dim=-1).cpu())
                if progress is not None:
                    progress(len(rows))
        finally:
            self.model.train(was_training)
        if not out:
            return torch.zeros((0, len(self.label_ids)), dtype=torch.float64)
        probs = torch.cat(out)
        if not torch.isfinite(probs).all():
            bad = (~torch.isfinite(probs).all(-1)).nonzero().flatten().tolist()
            raise ValueError(f"the judge gave non-finite label probabilities for prompts {bad[:10]}; check its "
                             "weights and dtype (float16 overflows where bfloat16 does not)")
        return probs


class Comparison(NamedTuple):
    p: torch.Tensor  # (N,) float64 probability that A is preferred to B, averaged over both orders
    confidence: torch.Tensor  # (N,) |2p - 1| = |q_ab - q_ba| in [0, 1]
    q_ab: torch.Tensor  # (N,) P(label 1 | A first, B second), normalised over the two labels
    q_ba: torch.Tensor  # (N,) P(label 1 | B first, A second)


def compare(judge: Judge, template: str, constitution: str, prompts: Sequence[str], responses_a: Sequence[str],
            responses_b: Sequence[str], progress: Callable[[int], None] | None = None) -> Comparison:
    """Which of two responses the judge prefers, scored in both orders and averaged (module docstring).

    Args:
        judge: a Judge with exactly two labels; label 1 means "response 1 is better".
        template: the comparison template, with {constitution}, {prompt}, {response_1}, {response_2}.
        prompts, responses_a, responses_b: N prompts and the two responses to each.
        progress: called with the number of judge prompts done, after every micro-batch (2N in all).
    """
    if len(judge.label_ids) != 2:
        raise ValueError(f"a pairwise judge needs exactly two labels, got {len(judge.label_ids)}")
    n = len(prompts)
    if not len(responses_a) == len(responses_b) == n:
        raise ValueError(f"{n} prompts, {len(responses_a)} first and {len(responses_b)} second responses")
    texts = [fill(template, constitution=constitution, prompt=x, response_1=a, response_2=b)
             for x, a, b in zip(prompts, responses_a, responses_b)]
    texts += [fill(template, constitution=constitution, prompt=x, response_1=b, response_2=a)
              for x, a, b in zip(prompts, responses_a, responses_b)]
    q = judge.label_probs(texts, progress)[:, 0]
    q_ab, q_ba = q[:n], q[n:]
    # (q_ab + (1 - q_ba)) / 2 written so that identical judgements in both orders give exactly 1/2
    p = 0.5 + 0.5 * (q_ab - q_ba)
    return Comparison(p, (q_ab - q_ba).abs(), q_ab, q_ba)


@dataclass
class JudgeReward:
    """A reward source (`rollout.scoring.Scorer`) that scores each response with the judge:
    sum_k values[k] * P(label_k | the score template filled with the constitution, prompt and response)."""

    name: str
    judge: Judge
    template: str
    """The score template, with {constitution}, {prompt} and {response}."""
    constitution: str
    values: Sequence[float]
    """(L,) the worth of each label: (1, 0) scores P(first label); 1..5 the expected rating."""
    weight: float = 1.0

    def __post_init__(self) -> None:
        check_template(self.template, SCORE_FIELDS, f"reward source {self.name!r}: judge template")
        if len(self.values) != len(self.judge.label_ids):
            raise ValueError(f"reward source {self.name!r}: {len(self.values)} label values for "
                             f"{len(self.judge.label_ids)} labels")

    def __call__(self, prompts: list[str], responses: list[str], fields: Mapping[str, list]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns scores (B,) float64 and ok (B,) bool, all True."""
        texts = [fill(self.template, constitution=self.constitution, prompt=p, response=r)
                 for p, r in zip(prompts, responses, strict=True)]
        probs = self.judge.label_probs(texts)
        scores = probs @ torch.tensor([float(v) for v in self.values], dtype=torch.float64)
        return scores, torch.ones(len(texts), dtype=torch.bool)
