"""The typed configuration of a run: one tree of frozen dataclasses, RunConfig, filled from YAML plus dotted
overrides. Its sections are defined here, except `data:` (data/config.py's DataConfig) and `ppo:`
(engine/ppo_config.py's PPOConfig, whose sampling fields are rollout/generation.py's Decoding); the keyword
arguments in `objective:` are those of the named function in losses/.

    cfg = load_config(["configs/dpo.yaml"], ["optim.lr=1e-5", "objective.beta=0.05"])

Files are merged in order (a preset after a base config), then each `key=value` override is applied,
its value parsed as a YAML scalar; setting a different `objective.name` drops the previous objective's
keyword arguments. Unknown keys are an error naming the nearest valid key; values are
converted to the annotated types. The result is frozen: nothing changes it after start-up.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data.config import DataConfig
from engine.ppo_config import PPOConfig
from rollout.generation import RolloutConfig


class ConfigError(ValueError):
    """A config that cannot run; the message names the key to change."""


@dataclass(frozen=True)
class LoraConfig:
    """LoRA through peft; `target_modules="all-linear"` adapts every linear layer but the head."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"


@dataclass(frozen=True)
class QuantConfig:
    """bitsandbytes loading: bits 4 (QLoRA, nf4 by default) or 8; None loads unquantised weights."""

    bits: int | None = None
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"


@dataclass(frozen=True)
class FreezeConfig:
    """Which parameter groups stop training; layers listed in `keep_layers` (indices) never freeze."""

    embeddings: bool = False
    layer_norms: bool = False
    attention: bool = False
    feed_forward: bool = False
    other: bool = False
    keep_layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    """The policy (or reward model) and how it is loaded."""

    name_or_path: str = "tiny"
    dtype: str = "float32"
    attn_implementation: str = "auto"
    """auto (sdpa where the model class has it, else eager), sdpa, eager, flash_attention_2/3 or flex_attention;
    a choice the class cannot do is refused at start-up."""
    disable_dropout: bool | None = None
    """Switch off the model's own dropout (and LoRA's) while training. None: on for the preference (DPO, ORPO,
    ...) and PPO families, whose log-prob ratios against an eval-mode reference or rollout must start at 1,
    off for SFT and reward training."""
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)


@dataclass(frozen=True)
class ReferenceConfig:
    """Where reference log-probs come from: a frozen `copy`, the policy with its adapter `disabled`,
    or `precomputed` once before training and cached on disk."""

    mode: str = "copy"
    name_or_path: str | None = None
    cache_dir: str | None = None


OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
SCHEDULERS = ("constant", "linear", "cosine")
REFERENCE_MODES = ("copy", "disabled", "precomputed")
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass(frozen=True)
class ObjectiveConfig:
    """The objective by registry name (or "package.module:function") and its keyword arguments.

    In YAML the arguments sit beside the name: `objective: {name: dpo, beta: 0.1}`; they are bound
    against the function's signature at start-up (losses.bind_objective), before any model loads."""

    name: str = "sft"
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "kwargs", types.MappingProxyType(dict(self.kwargs)))


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adamw"
    """adamw (torch), adamw_8bit or paged_adamw_8bit (bitsandbytes)."""
    fused: bool | None = None
    """torch AdamW's fused kernel (one kernel for every parameter's update; equal to the loop kernel up to
    rounding): None uses it where torch has it for the parameters' device and dtype, except under FSDP or
    DeepSpeed (not yet measured there); true always; false never."""
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; 0 or None disables clipping (as in transformers)."""
    scheduler: str = "cosine"
    """constant, linear or cosine decay to 0, after the warmup."""
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the run's optimizer steps; used when warmup_steps is 0."""
    max_bad_steps: int = 10
    """Stop the run after this many optimizer steps in a row with a non-finite loss or gradient (each one
    skipped, not applied), saving a checkpoint of the last good weights; 0 never stops."""


@dataclass(frozen=True)
class BatchConfig:
    global_batch_size: int = 8
    """Rows (SFT) or pairs (reward, DPO, ORPO) per optimizer step, over all processes."""
    micro_batch_size: int = 1
    """Rows or pairs per forward pass on one process."""
    eval_batch_size: int | None = None
    """Defaults to micro_batch_size."""

    def accumulation_steps(self, num_processes: int) -> int:
        """Micro-batches per optimizer step on each process: global = micro x accumulation x processes."""
        per_step = self.micro_batch_size * num_processes
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"batch.global_batch_size={self.global_batch_size} is not a multiple of "
                f"batch.micro_batch_size={self.micro_batch_size} x {num_processes} process(es); "
                f"set batch.global_batch_size to a multiple of {per_step}"
            )
        return self.global_batch_size // per_step


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 0
    """Evaluate on the held-out split every N optimizer steps and at the end; 0 disables."""
    max_batches: int | None = None
    """Evaluate on the first N batches of the held-out split (of batch.eval_batch_size rows), the same rows
    whatever the number of processes; None: the whole split."""


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 0
    """Save `<output_dir>/checkpoints/step_<N>` every N optimizer steps; 0 disables."""
    keep_last: int = 2
    resume_from: str = "none"
    """"none", "latest" (the newest checkpoint in output_dir, or a fresh start if none), or a path."""


REPORT_TO = ("tensorboard", "wandb", "mlflow", "all", "none")


@dataclass(frozen=True)
class LoggingConfig:
    every_steps: int = 1
    """Write metrics (metrics.jsonl, the trackers, progress bar) every N optimizer steps."""
    progress_bar: bool = True
    report_to: str | tuple[str, ...] = ("tensorboard",)
    """Trackers (engine/tracking.py): tensorboard, wandb, mlflow; "all" those installed; "none" only
    metrics.jsonl. wandb and mlflow need their extra (pip install -e ".[wandb]")."""
    project: str | None = None
    """The W&B project and MLflow experiment (WANDB_PROJECT, MLFLOW_EXPERIMENT_NAME win); None: rlhf-engine."""
    run_name: str | None = None
    """The tracker run's name (WANDB_NAME wins); None: the output_dir's last part."""
    tags: tuple[str, ...] = ()
    """Tags of the tracker run (WANDB_TAGS, MLFLOW_TAGS win)."""
    entity: str | None = None
    """The W&B team or user (WANDB_ENTITY wins); None: the account's default."""

    def __post_init__(self):
        names = (self.report_to,) if isinstance(self.report_to, str) else tuple(self.report_to)
        for name in names:
            _choice("logging.report_to", name, REPORT_TO)
        if "none" in names and len(names) > 1:
            raise ConfigError(f"logging.report_to={list(names)} names 'none' with other trackers; give one or the other")
        object.__setattr__(self, "report_to", names)


@dataclass(frozen=True)
class ExportConfig:
    merge: bool = False
    """Merge a LoRA adapter into the base weights (merge_and_unload) in `<output_dir>/final/`."""


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/default"
    max_steps: int | None = None
    """Optimizer steps to run; when None, `epochs` passes over the training split."""
    epochs: float = 1.0
    seed: int = 0
    mixed_precision: str = "no"
    """no, bf16 or fp16 (Accelerate autocast; fp16 with a gradient scaler)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    reward_model: ModelConfig | None = None
    """PPO's reward model when `ppo.rewards` is empty; its dtype and quantisation also load the reward models
    that `ppo.rewards` names (default: those of `model:`)."""
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """Rollouts, rewards, KL shaping and the PPO update; read by the ppo family only."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """How rollouts are decoded: backend (generate, continuous, auto), static KV cache, compiled step."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    memory_check: bool = True
    """Stop at start-up when the memory estimate (engine/memory.py) exceeds the device's free memory;
    false (or --skip-memory-check) starts anyway."""

    def __post_init__(self):
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _choice("optim.optimizer", self.optim.optimizer, OPTIMIZERS)
        _choice("optim.scheduler", self.optim.scheduler, SCHEDULERS)
        _choice("reference.mode", self.reference.mode, REFERENCE_MODES)
        positive = {
            "max_steps": self.max_steps,
            "epochs": self.epochs,
            "batch.global_batch_size": self.batch.global_batch_size,
            "batch.micro_batch_size": self.batch.micro_batch_size,
            "batch.eval_batch_size": self.batch.eval_batch_size,
            "checkpoint.keep_last": self.checkpoint.keep_last,
            "logging.every_steps": self.logging.every_steps,
            "eval.max_batches": self.eval.max_batches,
        }
        for key, value in positive.items():
            if value is not None and value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        non_negative = {
            "optim.warmup_steps": (self.optim.warmup_steps, "no warmup steps"),
            "optim.max_grad_norm": (self.optim.max_grad_norm, "no clipping"),
            "optim.lr": (self.optim.lr, "no updates"),
            "optim.weight_decay": (self.optim.weight_decay, "none"),
            "eval.every_steps": (self.eval.every_steps, "no evaluation"),
            "checkpoint.every_steps": (self.checkpoint.every_steps, "no step checkpoints"),
            "data.share_prompt_row_tokens": (self.data.share_prompt_row_tokens, "one pair per row"),
            "ppo.min_new_tokens": (self.ppo.min_new_tokens, "no minimum"),
            "ppo.top_k": (self.ppo.top_k, "no top-k filter"),
            "ppo.log_samples": (self.ppo.log_samples, "none"),
        }
        for key, (value, zero) in non_negative.items():
            if value is not None and value < 0:
                raise ConfigError(f"{key} must be 0 ({zero}) or more, got {value}")
        lora = self.model.lora
        if lora.enabled and (lora.r <= 0 or lora.alpha <= 0):
            key, value = ("model.lora.r", lora.r) if lora.r <= 0 else ("model.lora.alpha", lora.alpha)
            raise ConfigError(f"{key} must be positive, got {value}; the adapter's rank is typically 8 to 64")
        if lora.enabled and not 0.0 <= lora.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {lora.dropout}")
        if lora.enabled and not isinstance(lora.target_modules, str) and not lora.target_modules:
            raise ConfigError("model.lora.target_modules is an empty list; name modules (e.g. [q_proj, v_proj]) "
                              "or set it to all-linear")
        if self.optim.max_bad_steps < 0:
            raise ConfigError(f"optim.max_bad_steps must be 0 (never stop) or more, got {self.optim.max_bad_steps}")
        if not 0.0 <= self.optim.warmup_ratio < 1.0:
            raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {self.optim.warmup_ratio}")


def _choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {list(choices)}{_nearest(value, choices)}")


def _nearest(word: str, candidates: Sequence[str]) -> str:
    match = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


# ---- loading -----------------------------------------------------------------------------------


def load_config(paths: str | Path | Sequence[str | Path], overrides: Sequence[str] = (), cls: type = RunConfig) -> Any:
    """Merge the YAML files in order, apply `key=value` overrides, and build the typed config: a RunConfig, or
    another frozen dataclass `cls` read the same way (engine.rest's RestConfig)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    raw: dict = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; check --config")
        loaded = _parse_yaml(path.read_text(), str(path)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
        raw = _merge(raw, loaded)
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r} must look like section.key=value, e.g. optim.lr=1e-5")
        _set_dotted(raw, key.strip(), _parse_yaml(text, f"override {override!r}") if text.strip() else None)
    return from_dict(cls, raw)


def _parse_yaml(text: str, where: str) -> Any:
    """YAML with a syntax error reported by file (or override), line and column, 1-based as editors count."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        context = getattr(error, "context", None)
        detail = f"{context}, {problem}" if context else problem
        raise ConfigError(f"{where}{at}: YAML syntax error ({detail}); fix the YAML there "
                          "(quote a value holding ': ', '#', '{' or '[')") from None


def from_dict(cls: type, raw: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested mapping, converting values to the annotated field types."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping, got {raw!r}")
    if cls is ObjectiveConfig:
        raw = {"name": raw.get("name", ObjectiveConfig.name), "kwargs": {k: v for k, v in raw.items() if k != "name"}}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            match = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix + match[0]!r}?" if match else ""
            raise ConfigError(f"unknown key {prefix + str(key)!r}{hint} (valid keys here: {', '.join(names)})")
    values = {key: _convert(hints[key], value, prefix + key) for key, value in raw.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {error}") from error


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {hint}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, {} if value is None else value, key + ".")
    if hint is Any:
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        item_types = [args[0]] * len(value) if args[1:] == (Ellipsis,) else list(args)
        if len(item_types) != len(value):
            raise ConfigError(f"{key} must have {len(item_types)} items, got {value!r}")
        return tuple(_convert(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(item_types, value)))
    if origin in (Mapping, dict) or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return types.MappingProxyType(dict(value))
    return _scalar(hint, value, key)


def _scalar(hint: type, value: Any, key: str) -> Any:
    # PyYAML reads `1e-5` (no dot) as a string, so numeric fields also accept numeric strings.
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise ConfigError(f"{key}: unsupported field type {hint!r}")
    quote = " (YAML reads no/yes/off/on as booleans: quote the word)" if isinstance(value, bool) else ""
    raise ConfigError(f"{key} must be {hint.__name__}, got {value!r}{quote}")


def _merge(base: dict, update: Mapping) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if key == "objective" and _renames_objective(merged.get(key), value):
            merged[key] = dict(value)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    if key == "objective.name" and _renames_objective(raw.get("objective"), {"name": value}):
        raw["objective"] = {}
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def _renames_objective(old: Any, new: Any) -> bool:
    """A different objective name starts the section afresh: the old keyword arguments were the old
    function's, so `objective.name=x objective.beta=2` gives x only beta."""
    return isinstance(old, Mapping) and isinstance(new, Mapping) and "name" in new and new["name"] != old.get("name")


# ---- saving ------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> Any:
    """Plain YAML-ready data (objective kwargs flattened back beside the name)."""
    if isinstance(cfg, ObjectiveConfig):
        return {"name": cfg.name, **{k: to_dict(v) for k, v in cfg.kwargs.items()}}
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML; `load_config(path)` gives back an equal RunConfig."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


# ---- describing --------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls` (and of the dataclasses it inherits from)."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def describe_config(cfg: Any = None, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, value, doc) for every key of a run config, sections first with their class docstring as
    doc and value None. `cfg` is a RunConfig (default: RunConfig(), i.e. the defaults) or a section of one."""
    cfg = RunConfig() if cfg is None else cfg
    rows: list[tuple[str, Any, str]] = []
    docs = field_docs(type(cfg))
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        key, value, doc = prefix + f.name, getattr(cfg, f.name), docs.get(f.name, "")
        if isinstance(value, ObjectiveConfig):
            rows.append((key, SECTION, _class_doc(ObjectiveConfig)))
            rows += _describe_objective(value, key + ".")
        elif dataclasses.is_dataclass(value):
            rows.append((key, SECTION, " ".join(filter(None, (doc, _class_doc(type(value)))))))
            rows += describe_config(value, key + ".")
        else:
            item = _dataclass_in(hints[f.name])
            if item is not None:  # a list of sections, or a section that is null by default
                many = typing.get_origin(hints[f.name]) is tuple
                shape = f"each item has the keys {key}[].*" if many else f"when set, the keys of {item.__name__}"
                rows.append((key, to_dict(value), f"{doc} ({shape})".strip()))
                if many:
                    item_docs = field_docs(item)
                    rows += [(f"{key}[].{g.name}", to_dict(_default(g)), item_docs.get(g.name, ""))
                             for g in dataclasses.fields(item)]
            else:
                rows.append((key, to_dict(value), doc))
    return rows


SECTION = object()  # the value of a section's own row in describe_config


def format_config(rows: list[tuple[str, Any, str]], width: int = 100) -> str:
    """`key: value` lines (YAML flow style) with each doc indented below; sections as headers."""
    import textwrap

    lines = []
    for key, value, doc in rows:
        lines.append(f"{key}:" if value is SECTION else f"{key}: {_yaml_value(value)}")
        if doc:
            lines += textwrap.wrap(doc, width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)


def _yaml_value(value: Any) -> str:
    if isinstance(value, str) and "\n" in value:
        return json.dumps(value)  # a YAML double-quoted scalar, on one line
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def _class_doc(cls: type) -> str:
    doc = cls.__doc__ or ""
    return "" if doc.startswith(cls.__name__ + "(") else " ".join(doc.split())  # dataclass's generated doc


def _dataclass_in(hint: Any) -> type | None:
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _describe_objective(objective: ObjectiveConfig, prefix: str) -> list[tuple[str, Any, str]]:
    """objective.name and the keyword arguments of that objective: its defaults, the config's values."""
    import inspect

    from losses import get_objective

    rows = [(prefix + "name", objective.name, "A registered objective (losses.list_objectives()) or "
             "package.module:function; the keys below are its keyword arguments.")]
    try:
        registered = get_objective(objective.name)
    except ValueError:
        return rows
    args = _args_docs(registered.fn.__doc__ or "")
    for name, param in inspect.signature(registered.fn).parameters.items():
        if param.kind is not inspect.Parameter.KEYWORD_ONLY or "Tensor" in str(param.annotation):
            continue  # a tensor the loop passes (a reward margin), not a config value
        default = objective.kwargs.get(name, registered.defaults.get(name, param.default))
        shown = "(required)" if default is inspect.Parameter.empty else to_dict(default)
        rows.append((prefix + name, shown, args.get(name, "")))
    return rows


def _args_docs(doc: str) -> dict[str, str]:
    """The `name: text` entries of a Google-style docstring's Args section."""
    import re

    section = doc.partition("Args:")[2].split("\n\n")[0]
    entries: dict[str, str] = {}
    name = None
    for line in section.splitlines():
        match = re.match(r"\s{4,8}(\w+): (.*)", line)
        if match and len(line) - len(line.lstrip()) <= 8:
            name = match.group(1)
            entries[name] = match.group(2).strip()
        elif name and line.strip():
            entries[name] += " " + line.strip()
    return entries
