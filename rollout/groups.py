"""Group-sampled rollouts: G responses to each prompt, each group's rows next to each other.

Shapes: P prompts, G = `group_size` responses per prompt, B = P * G rows, R response length. Rows
[g*G, (g+1)*G) of a batch are the G responses to prompt g; `repeat_prompts` lays a prompt batch out so,
and every helper here reads scores in that layout. A GRPO-style loop (Shao et al. 2024, DeepSeekMath
Sec. 4.1) compares each response with the rest of its group, so it needs, besides these helpers:

- the groups whole on one process: repeat the prompts after the data loader has split them over
  processes (not before), so no group straddles two processes and per-group statistics need no gather;
- a sampling temperature above 0: the G rows of a group are drawn independently from one generate call
  on the repeated prompts, and greedy decoding would give G equal responses, so every group would tie;
- `group_rows` to turn a per-group decision (`informative_groups`) into the (B,) row mask that
  `Experience.select` takes.

`valid` is the Scorer's (B,) bool: False where a reward function failed on the row (it is skipped).
Everything here is pure tensor math under no gradient.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def as_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B, ...) -> (B // G, G, ...), one group a row (a view where x is contiguous); an error naming both
    when G does not divide B."""
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    if x.shape[0] % group_size:
        raise ValueError(f"{x.shape[0]} rows do not split into groups of {group_size}")
    return x.reshape(x.shape[0] // group_size, group_size, *x.shape[1:])


def _grouped(scores: torch.Tensor, group_size: int, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (P, G) in float64 and valid (P, G) bool (all True when None)."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be (B,), got shape {tuple(scores.shape)}")
    # the scorer's validity flags stay on the CPU while the scores may sit with the sequences on the GPU
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.to(scores.device, torch.bool)
    if valid.shape != scores.shape:
        raise ValueError(f"valid has shape {tuple(valid.shape)}, scores {tuple(scores.shape)}")
    return as_groups(scores.double(), group_size), as_groups(valid, group_size)


def _spread(s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (P,): the largest and the smallest valid score (-inf and inf for a group with none)."""
    return s.masked_fill(~v, -torch.inf).amax(-1), s.masked_fill(~v, torch.inf).amin(-1)


@torch.no_grad()
def group_stats(scores: torch.Tensor, group_size: int, *, solved_threshold: float | None = None,
                valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """How the rewards spread within groups of G responses to one prompt; invalid rows are left out.

    Args:
        scores: (B,) one score per response, the G of prompt g at rows [g*G, (g+1)*G).
        group_size: G.
        solved_threshold: a score at or above it counts as solved. The solved metrics are computed only
            when it is given: a reward's "solved" level (1.0 for exact_match, but not for a sum with a
            format bonus or a length penalty) is not known here, and no default is guessed.
        valid: (B,) bool, False for rows to leave out (None: all rows count).

    Returns metrics, 0-dim float64 tensors (NaN where no group qualifies):
        groups/reward_mean: mean of the valid scores.
        groups/reward_std: mean over groups with at least 2 valid rows of the within-group standard
            deviation, Bessel-corrected (divides by n - 1), as torch.std; the spread a group-normalised
            advantage divides by.
        groups/tied: share of groups (with a valid row) whose valid scores are all equal, a group with one
            valid row included: such groups give a group-relative advantage of 0 everywhere.
        groups/all_solved: share of groups (with a valid row) whose every valid score >= solved_threshold.
        groups/none_solved: share of groups (with a valid row) with no valid score >= solved_threshold.
    """
    s, v = _grouped(scores, group_size, valid)
    n = v.sum(-1)
    has_row, has_pair = n > 0, n > 1
    mean = (s * v).sum(-1) / n.clamp(min=1)
    var = (((s - mean[:, None]) * v) ** 2).sum(-1) / (n - 1).clamp(min=1)
    high, low = _spread(s, v)
    metrics = {
        "groups/reward_mean": s[v].mean(),
        "groups/reward_std": var[has_pair].sqrt().mean(),
        "groups/tied": (high == low)[has_row].double().mean(),
    }
    if solved_threshold is not None:
        solved = s >= solved_threshold
        metrics["groups/all_solved"] = (solved | ~v).all(-1)[has_row].double().mean()
        metrics["groups/none_solved"] = (~(solved & v).any(-1))[has_row].double().mean()
    return metrics


@torch.no_grad()
def informative_groups(scores: torch.Tensor, group_size: int, *, valid: torch.Tensor | None = None,
                       atol: float = 0.0) -> torch.Tensor:
    """(B // G,) bool: True for the groups whose rewards differ, the ones DAPO's dynamic sampling keeps
    (Yu et al. 2025, Sec. 3.2: a group whose G rewards all tie, e.g. all correct or all wrong, has a
    group-relative advantage of 0 and gives no gradient).

    Args:
        scores: (B,) one score per response, the G of prompt g at rows [g*G, (g+1)*G).
        group_size: G.
        valid: (B,) bool, False for rows to leave out (None: all rows count).
        atol: scores whose max - min is at most atol count as tied.

    A group is False when its valid scores spread by no more than `atol`, or it has fewer than 2 valid rows.
    """
    s, v = _grouped(scores, group_size, valid)
    high, low = _spread(s, v)
    return (v.sum(-1) >= 2) & (high - low > atol)


def group_rows(group_mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """(P,) bool per group -> (P * G,) bool per row, each group's value on its G rows: e.g.
    `experience.select(group_rows(informative_groups(scores, G), G))` keeps the informative groups."""
    return group_mask.bool().repeat_interleave(group_size)


def repeat_prompts(batch: Mapping[str, object], group_size: int) -> dict[str, object]:
    """A prompt batch of P rows -> P * G rows, each row G times in a row (repeat_interleave), so rows
    [g*G, (g+1)*G) hold prompt g.

    Args:
        batch: the prompt collator's batch: tensors (P, ...) (input_ids, attention_mask) and lists of P
            (prompt texts, `extras` dicts); None values pass through. A list's items are repeated by
            reference, not copied.
        group_size: G.

    Returns the same keys, each of P * G rows. An error when the entries disagree on P.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    out, sizes = {}, {}
    for key, value in batch.items():
        if value is None:
            out[key] = None
            continue
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            sizes[key] = value.shape[0]
            out[key] = value.repeat_interleave(group_size, dim=0)
        elif isinstance(value, (list, tuple)):
            sizes[key] = len(value)
            out[key] = [item for item in value for _ in range(group_size)]
        else:
            raise TypeError(f"batch[{key!r}] is a {type(value).__name__}; repeat_prompts repeats tensors of "
                            "(P, ...) and lists of P")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"the batch's entries disagree on the number of prompts: {sizes}")
    return out


def overlong_filter(action_mask: torch.Tensor, no_eos: torch.Tensor) -> torch.Tensor:
    """(B, R) action mask with the rows that hit their length budget without an EOS set all False, so a
    token-weighted loss leaves truncated responses out: DAPO's overlong filtering (Yu et al. 2025,
    Sec. 3.4), which keeps a reasoning cut short by the budget from being punished as a wrong one.
    An all-False row is how an Experience already marks a row to skip.

    Args:
        action_mask: (B, R) bool, True on the response tokens that count.
        no_eos: (B,) bool, True for a response that ended at its budget without an EOS.
    """
    if no_eos.shape != action_mask.shape[:1]:
        raise ValueError(f"no_eos has shape {tuple(no_eos.shape)}, action_mask {tuple(action_mask.shape)}")
    return action_mask.bool() & ~no_eos.bool().to(action_mask.device)[:, None]
