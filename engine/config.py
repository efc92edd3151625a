"""The one typed configuration of a run: frozen dataclasses filled from YAML plus dotted overrides."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    attn_implementation: str = "sdpa"
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
