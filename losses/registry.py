"""Objectives by name: the engine and researchers pick a loss with a string from the config.

Each family has one call convention (shapes as in ``losses/__init__.py``):

- ``sft``:      fn(logprobs, mask, **kw); row_weights=True: fn(logprobs, mask, weights, **kw), ``weights``
                (B,) the data's per-row ``weight`` column (a reward-weighted SFT loss)
- ``reward``:   fn(chosen_rewards, rejected_rewards, *, margin=None, **kw)
- ``pairwise``: needs_reference=True:  fn(policy_chosen_logps, policy_rejected_logps,
                                          ref_chosen_logps, ref_rejected_logps, **kw), each (B,),
                                          reduced from per-token log-probs per ``logps_reduction``;
                needs_reference=False: fn(chosen_logprobs, chosen_mask, rejected_logprobs, rejected_mask,
                                          **kw), each (B, R) per-token log-probs and response masks
- ``ppo``:      fn(logprobs, old_logprobs, advantages, mask, **kw); ``advantage`` names the estimator
                (``losses.get_advantage``) whose output it is meant for: "gae" for ppo, "grpo" for grpo

Per-pair tensors from the data (``PAIR_FIELDS``: ``margin``, ``soft_label``, each (B,)) reach an objective
of the reward or pairwise family as keyword arguments of those names, when its signature names them
(``pair_fields``); the reward family always gets ``margin``. They are data, never config keys.

A new objective is a new function decorated with ``@register(...)``; a function outside this
repository decorated the same way can be named in a config as ``"package.module:function"``.
Each keyword argument may declare the values that train right, e.g. ``ranges={"beta": Range(gt=0)}``:
``bind_objective`` refuses others before a model loads (a DPO beta of -1 would learn to prefer the
rejected response while its logged accuracy looks fine).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

FAMILIES = ("sft", "reward", "pairwise", "ppo")
LOGPS_REDUCTIONS = ("sum", "mean")
PAIR_FIELDS = ("margin", "soft_label")
"""Columns of a preference row that the loops pass to an objective, per pair, as (B,) keyword tensors."""


@dataclass(frozen=True)
class Range:
    """The real numbers a keyword argument may take: above `gt` (or from `ge`), below `lt` (or up to `le`)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    why: str = ""
    """What a value outside the range would do, for the error message."""

    def __str__(self) -> str:
        low = f"> {self.gt}" if self.gt is not None else f">= {self.ge}" if self.ge is not None else ""
        high = f"< {self.lt}" if self.lt is not None else f"<= {self.le}" if self.le is not None else ""
        return " and ".join(part for part in (low, high) if part) or "any number"

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # NaN
            return False
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))


@dataclass(frozen=True)
class Objective:
    """A registered loss function and what the engine needs to know to call it."""

    name: str
    fn: Callable[..., Any]
    family: str
    """One of FAMILIES; fixes the positional arguments the engine passes."""
    needs_reference: bool = False
    """Whether the engine must load a frozen reference model for it."""
    defaults: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """Keyword arguments applied before the user's, e.g. cdpo's label_smoothing=0.1."""
    logps_reduction: str = "sum"
    """For pairwise objectives with a reference: per-sequence log-probs as the "sum" or "mean" over tokens."""
    ranges: Mapping[str, Range] = field(default_factory=dict, hash=False)
    """The values each keyword argument may take; checked with the arguments when they are bound."""
    advantage: str | None = None
    """For the ppo family: the advantage estimator (``losses.get_advantage``) the objective goes with."""
    row_weights: bool = False
    """For the sft family: the loop passes each row's ``weight`` (a data column, (B,)) as a third argument."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(
                f"objective {self.name!r}: family must be one of {FAMILIES}, got {self.family!r}"
            )
        if self.advantage is not None and self.family != "ppo":
            raise ValueError(f"objective {self.name!r}: only the ppo family has an advantage estimator, "
                             f"got advantage={self.advantage!r} for family {self.family!r}")
        if self.row_weights and self.family != "sft":
            raise ValueError(f"objective {self.name!r}: only the sft family reads row weights, got family "
                             f"{self.family!r}")
        if self.logps_reduction not in LOGPS_REDUCTIONS:
            raise ValueError(
                f"objective {self.name!r}: logps_reduction must be one of {LOGPS_REDUCTIONS}, "
                f"got {self.logps_reduction!r}"
            )
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        object.__setattr__(self, "ranges", MappingProxyType(dict(self.ranges)))
        _check_kwargs(self.name, self.fn, self.ranges, require_all=False)
        _check_kwargs(self.name, self.fn, self.defaults, require_all=False)
        _check_ranges(self, self.defaults)


_REGISTRY: dict[str, Objective] = {}


def register(
    name: str | None = None,
    *,
    family: str,
    needs_reference: bool = False,
    defaults: Mapping[str, Any] | None = None,
    logps_reduction: str = "sum",
    ranges: Mapping[str, Range] | None = None,
    advantage: str | None = None,
    row_weights: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator that registers ``fn`` as an objective under ``name`` (default: the function's name).

    The function is returned unchanged, marked with ``fn.__objective__`` (its first registration),
    so ``get_objective("package.module:function")`` resolves it with its family and defaults.
    Registering one function twice under different names with different defaults is how variants
    such as ``cdpo`` are made.

    Args:
        name: registry key; must not already name a different function.
        family: one of "sft", "reward", "pairwise", "ppo".
        needs_reference: whether the engine must provide reference log-probs.
        defaults: keyword arguments applied before the user's; checked against the signature.
        logps_reduction: "sum" or "mean" of per-token log-probs (pairwise with a reference).
        ranges: the values each keyword argument may take; None: those of the function's first
            registration (a variant keeps its base's ranges). A keyword whose default is None may
            also be given None (the feature off), whatever its range.
        advantage: ppo family only: the name of the advantage estimator the objective goes with
            (``losses.get_advantage``), e.g. "gae" for ppo, "grpo" for grpo.
        row_weights: sft family only: the function takes a third positional argument, ``weights``
            (B,), which the loop fills from the data's ``weight`` column.

    Returns:
        The decorator.
    """

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        first = getattr(fn, "__objective__", None)
        objective = Objective(
            name=name or fn.__name__,
            fn=fn,
            family=family,
            needs_reference=needs_reference,
            defaults=dict(defaults or {}),
            logps_reduction=logps_reduction,
            ranges=dict(ranges if ranges is not None else first.ranges if isinstance(first, Objective) else {}),
            advantage=advantage,
            row_weights=row_weights,
        )
        existing = _REGISTRY.get(objective.name)
        if existing is not None and _qualified_name(existing.fn) != _qualified_name(fn):
            raise ValueError(
                f"objective name {objective.name!r} is already registered for {_qualified_name(existing.fn)}"
            )
        _REGISTRY[objective.name] = objective
        if not isinstance(getattr(fn, "__objective__", None), Objective):
            fn.__objective__ = objective
        return fn

    return decorator


def get_objective(name: str) -> Objective:
    """Look up an objective by registry name or as ``"package.module:function"``.

    Args:
        name: a registered name ("dpo", "orpo", ...) or an importable path to a function decorated
            with ``@register``.

    Returns:
        The Objective.

    Raises:
        ValueError: unknown name (the message names the nearest registered one), a module that does
            not import, a missing attribute, or a function that was never registered.
    """
    if ":" in name:
        return _import_objective(name)
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown objective {name!r}{_did_you_mean(name, _REGISTRY)}; registered: "
            f"{', '.join(sorted(_REGISTRY))}; or name a function as 'package.module:function'"
        )
    return _REGISTRY[name]


def bind_objective(
    name: str | Objective, kwargs: Mapping[str, Any] | None = None
) -> tuple[Objective, Callable[..., Any]]:
    """Check config keyword arguments against an objective's signature and bind them, before any model loads.

    Args:
        name: as for ``get_objective``, or an Objective.
        kwargs: the user's keyword arguments (they override the objective's defaults).

    Returns:
        ``(objective, fn)`` with ``fn = functools.partial(objective.fn, **defaults, **kwargs)``.

    Raises:
        ValueError: a key that is not a keyword-only parameter (naming the nearest valid one), a
            required keyword-only parameter left without a value, or a value outside its Range.
    """
    objective = name if isinstance(name, Objective) else get_objective(name)
    merged = {**objective.defaults, **(kwargs or {})}
    _check_kwargs(objective.name, objective.fn, merged, require_all=True)
    _check_ranges(objective, merged)
    return objective, functools.partial(objective.fn, **merged)


def pair_fields(objective: Objective) -> tuple[str, ...]:
    """The per-pair data columns (of ``PAIR_FIELDS``) the loop passes to this objective: those its signature
    names, and ``margin`` for every reward-family objective (the family's convention)."""
    params = inspect.signature(objective.fn).parameters
    return tuple(name for name in PAIR_FIELDS
                 if name in params or (name == "margin" and objective.family == "reward"))


def list_objectives() -> list[Objective]:
    """All registered objectives, sorted by name."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def _check_kwargs(name: str, fn: Callable[..., Any], kwargs: Mapping[str, Any], *, require_all: bool) -> None:
    params = inspect.signature(fn).parameters.values()
    keyword_only = {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    for key in kwargs:
        if key in PAIR_FIELDS and key in keyword_only:
            raise ValueError(f"objective {name!r}: {key!r} is read per pair from the data's {key!r} column, "
                             "not set in the config; add the column to the preference rows")
        if key not in keyword_only and not accepts_any:
            valid = ", ".join(keyword_only) or "none"
            raise ValueError(
                f"objective {name!r} has no keyword argument {key!r}{_did_you_mean(key, keyword_only)}; "
                f"valid: {valid}"
            )
    if require_all:
        missing = [
            k for k, p in keyword_only.items() if p.default is inspect.Parameter.empty and k not in kwargs
        ]
        if missing:
            raise ValueError(f"objective {name!r} needs keyword argument(s) {', '.join(map(repr, missing))}")


def _check_ranges(objective: Objective, kwargs: Mapping[str, Any]) -> None:
    params = inspect.signature(objective.fn).parameters
    for key, value in kwargs.items():
        allowed = objective.ranges.get(key)
        if allowed is None or allowed.contains(value):
            continue
        if value is None and key in params and params[key].default is None:
            continue  # None is the parameter's own default: the feature is off
        found = f"{value!r} ({type(value).__name__})" if isinstance(value, (str, bool)) else repr(value)
        why = f": {allowed.why}" if allowed.why else ""
        if isinstance(value, str):
            why += "; YAML reads a number such as 1e-1 (no dot) as text: write 1.0e-1"
        raise ValueError(f"objective {objective.name!r}: {key} must be a number {allowed}, got {found}{why}")


def _did_you_mean(name: str, candidates: Any) -> str:
    by_lower = {str(c).lower(): c for c in candidates}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.0)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


def _qualified_name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def _import_objective(path: str) -> Objective:
    module_name, _, attr_path = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"objective {path!r}: cannot import module {module_name!r} ({err})") from err
    target: Any = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            public = [n for n in dir(target) if not n.startswith("_")]
            raise ValueError(
                f"objective {path!r}: {module_name!r} has no attribute {part!r}{_did_you_mean(part, public)}"
            )
        target = getattr(target, part)
    objective = getattr(target, "__objective__", None)
    if not isinstance(objective, Objective):
        raise ValueError(
            f"objective {path!r} is not registered: decorate it with "
            "@losses.register(family=...) to declare its family"
        )
    return objective
