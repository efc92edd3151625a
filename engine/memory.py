"""How much device memory a run needs, from the model's config alone (no weights loaded), checked at start-up.

    estimate = estimate_memory(cfg, family="pairwise", needs_reference=True)
    print(estimate.format())           # the parts, in GiB
    check_memory(cfg, objective, device)   # stops with the parts and what would make them fit

The model is built on the `meta` device from its `AutoConfig` (as a causal LM, or as a sequence classifier
when the architecture has no causal LM, e.g. a DeBERTa reward model), and LoRA is applied to it by peft, so
parameter counts are exact for any architecture; bytes per parameter then follow the run config:

| part         | bytes                                                                                  |
| ------------ | -------------------------------------------------------------------------------------- |
| weights      | params x dtype; 4-bit: 4 bits (+0.127 double-quantised, +0.5 not) per Linear or Conv1D weight but the head, 8-bit: 1 byte; a QLoRA policy's other weights (embeddings, head, norms) in fp32, as peft's prepare_model_for_kbit_training casts them |
| adapters     | the trainable parameters peft adds to the meta-device model (r x (in + out) per adapted Linear or Conv1D), fp32 (peft's autocast_adapter_dtype) |
| gradients    | one per trainable parameter, in its dtype                                              |
| optimizer    | AdamW: 2 states in the parameter's dtype (8 bytes for fp32); 8-bit and paged: 2 bytes   |
| activations  | per token and layer, compute-dtype bytes x (5h + 2 kv + 4 I) + fp32 x 2h (the block's saved tensors with SDPA, which stores no T x T scores); with checkpointing only the layer inputs (h per token and layer) plus one layer recomputed; plus the logits and their gradient (rows x T x V) |
| reference    | `copy`: the starting weights once more (quantised alike); `disabled`, `precomputed`: 0  |
| reward models| each PPO reward model's weights, without the LM head (a score head replaces it)        |
| kv cache     | PPO generation: 2 x layers x kv heads x head dim x (prompt + new tokens) x rollout micro-batch |
| runtime      | 1 GiB on a GPU (CUDA context, allocator slack), 0.5 GiB on CPU                          |

Every figure is per process and assumes each process holds the whole model (DDP, one GPU); under FSDP or
ZeRO-3 the weights, gradients and optimizer state are split across the GPUs, so this is an upper bound.

Worked example (tests/engine/test_memory.py checks it): Llama-3-8B (vocab 128256, h 4096, 32 layers,
32 heads of 128, 8 KV heads, I 14336, untied head) has per layer q 4096^2 + k, v 2 x 4096 x 1024 + o 4096^2
+ MLP 3 x 4096 x 14336 + norms 2 x 4096 = 218,112,000 parameters; x 32 = 6,979,584,000, plus embeddings and
head 2 x 128256 x 4096 = 1,050,673,152, plus the final norm 4096: 8,030,261,248 parameters (8.03B).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field, replace
from functools import lru_cache

from engine.config import ConfigError, ModelConfig, RunConfig
from engine.families import FAMILIES
from losses import get_objective

GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
ADAM_STATE_BYTES = {"adamw": None, "adamw_8bit": 2, "paged_adamw_8bit": 2}  # None: 2 x the parameter's bytes


class MemoryCheckError(ConfigError):
    """The run will not fit on the device; the message lists the estimate by part and what would fit."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a model config, and its parameter counts from a meta-device build."""

    params: int  # every parameter
    block_linear_params: int  # weights of the linear layers inside the blocks (what bitsandbytes quantises)
    head_params: int  # the LM head (0 when tied to the embeddings); a reward model has a 1-row score head instead
    lora_params: int  # LoRA parameters for the run's r and target modules (0 when LoRA is off)
    hidden: int
    intermediate: int
    layers: int
    kv_dim: int  # key/value heads x head dim
    vocab: int


@dataclass
class Estimate:
    parts: dict[str, int] = field(default_factory=dict)  # bytes per part, per process
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def format(self) -> str:
        width = max(len(k) for k in self.parts)
        lines = [f"  {name:<{width}}  {gib(size):>8.2f} GiB" for name, size in self.parts.items() if size]
        return "\n".join([*lines, f"  {'total':<{width}}  {gib(self.total):>8.2f} GiB", *(f"  ({n})" for n in self.notes)])


def gib(size: float) -> float:
    return size / GiB


# ---- the model's shape from its config ------------------------------------------------------------


def load_model_config(name_or_path: str, *, trust_remote_code: bool = False):
    """The transformers config of a model path or hub id (config.json only, no weights)."""
    from transformers import AutoConfig

    from engine.tiny import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)


def model_shape(config, lora_r: int = 0, lora_targets: str | tuple[str, ...] = "all-linear") -> ModelShape:
    """Parameter counts of the causal LM `config` describes, built on the meta device (no memory, no weights)."""
    return _model_shape(config.to_json_string(), lora_r, lora_targets if isinstance(lora_targets, str) else tuple(lora_targets))


@lru_cache(maxsize=16)
def _model_shape(config_json: str, lora_r: int, lora_targets) -> ModelShape:
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.pytorch_utils import Conv1D

    raw = json.loads(config_json)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    encoder = type(config) not in AutoModelForCausalLM._model_mapping
    with torch.device("meta"):
        if encoder:  # an encoder reward model (DeBERTa, BERT): built as the classifier it is loaded as
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    params = sum(p.numel() for p in model.parameters())
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    # bitsandbytes quantises nn.Linear and transformers' Conv1D (GPT-2), all but the output head
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear | Conv1D) and m is not head)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        params=params,
        block_linear_params=linear,
        head_params=0 if head is None or tied else head.weight.numel(),
        lora_params=_lora_params(model, lora_r, lora_targets, "SEQ_CLS" if encoder else "CAUSAL_LM"),
        hidden=config.hidden_size,
        intermediate=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
        layers=config.num_hidden_layers,
        kv_dim=(getattr(config, "num_key_value_heads", None) or heads) * head_dim,
        vocab=1 if encoder else config.vocab_size,  # a classifier's logits are one score, not V
    )


def _lora_params(model, r: int, targets, task_type: str) -> int:
    """The trainable parameters peft gives `model` (on the meta device): its own matching of the targets
    (Conv1D, fused query_key_value, all-linear without the head), so the count is what will train."""
    if not r:
        return 0
    import torch
    from peft import LoraConfig, get_peft_model

    with torch.device("meta"):
        adapted = get_peft_model(model, LoraConfig(r=r, target_modules=targets if isinstance(targets, str)
                                                   else list(targets), task_type=task_type))
    return sum(p.numel() for p in adapted.parameters() if p.requires_grad)


# ---- the estimate ---------------------------------------------------------------------------------


def weight_bytes(shape: ModelShape, model: ModelConfig, *, training: bool) -> int:
    """The weights as loaded: dtype, or 4/8-bit linear layers in the blocks with the rest unquantised."""
    dtype = DTYPE_BYTES[model.dtype]
    bits = model.quant.bits
    if bits is None:
        return shape.params * dtype
    per_weight = {4: (4 + (0.127 if model.quant.double_quant else 0.5)) / 8, 8: 1.0}[bits]
    # a QLoRA policy's remaining half-precision weights are upcast to fp32 by prepare_model_for_kbit_training
    rest = 4 if training and model.lora.enabled else dtype
    return int(shape.block_linear_params * per_weight) + (shape.params - shape.block_linear_params) * rest


def activation_bytes(shape: ModelShape, model: ModelConfig, rows: int, length: int, compute_bytes: int) -> int:
    """Saved activations of one forward and backward of `rows` sequences of `length` tokens."""
    tokens = rows * length
    h, kv, inter = shape.hidden, shape.kv_dim, shape.intermediate
    per_layer = tokens * (compute_bytes * (5 * h + 2 * kv + 4 * inter) + 4 * 2 * h)
    blocks = tokens * h * compute_bytes * shape.layers + per_layer if model.gradient_checkpointing else per_layer * shape.layers
    logits = 2 * tokens * shape.vocab * compute_bytes  # the logits and their gradient
    return blocks + logits


def estimate_memory(cfg: RunConfig, family: str, *, needs_reference: bool = False, shape: ModelShape | None = None,
                    reward_shapes: list[ModelShape] | None = None, device_type: str = "cuda") -> Estimate:
    """The memory one process needs for `cfg`, by part (see the module docstring for each formula).

    `shape` defaults to the policy's config (`model.name_or_path`); `reward_shapes` to the PPO reward
    models' configs."""
    model = cfg.model
    if shape is None:
        shape = model_shape(load_model_config(model.name_or_path, trust_remote_code=model.trust_remote_code),
                            model.lora.r if model.lora.enabled else 0, model.lora.target_modules)
    facts = FAMILIES[family]
    if facts.model == "reward":  # a sequence-classification model: a one-row score head instead of the LM head
        shape = replace(shape, params=shape.params - shape.head_params, head_params=0)
    estimate = Estimate()
    parts = estimate.parts
    lora = model.lora.enabled
    parts["weights"] = weight_bytes(shape, model, training=True)
    if lora:
        parts["adapters"] = shape.lora_params * 4
    trainable, param_bytes = (shape.lora_params, 4) if lora else (shape.params, DTYPE_BYTES[model.dtype])
    parts["gradients"] = trainable * param_bytes
    state = ADAM_STATE_BYTES[cfg.optim.optimizer]
    parts["optimizer"] = trainable * (2 * param_bytes if state is None else state)

    compute = 2 if cfg.mixed_precision != "no" or model.quant.bits else DTYPE_BYTES[model.dtype]
    if facts.online:
        length = cfg.data.max_prompt_length + cfg.ppo.max_new_tokens
        rows = cfg.batch.micro_batch_size
    else:
        length = cfg.data.max_length
        rows = cfg.batch.micro_batch_size * facts.sequences_per_example
    parts["activations"] = activation_bytes(shape, model, rows, length, compute)

    needs_critic = False
    if facts.online:  # a value function and a reference only where the online run uses them
        from engine.ppo_config import advantage_estimator, kl_settings

        needs_critic = advantage_estimator(cfg).needs_critic
        needs_reference = kl_settings(cfg, {**get_objective(cfg.objective.name).defaults,
                                            **dict(cfg.objective.kwargs)})[1]
    if needs_reference:
        if cfg.reference.mode == "copy":
            parts["reference"] = weight_bytes(shape, model, training=False)
        elif cfg.reference.mode == "precomputed":
            estimate.notes.append("reference.mode=precomputed: a reference copy is loaded once before training, "
                                  "when the policy has no adapter to switch off, and freed")
    if facts.online:
        reward_cfg = cfg.reward_model or replace(model, lora=replace(model.lora, enabled=False))
        if reward_shapes is None:
            reward_shapes = [model_shape(load_model_config(path, trust_remote_code=reward_cfg.trust_remote_code))
                             for path in _reward_model_paths(cfg)]
        # a sequence-classification model: the LM head replaced by a one-row score head (never quantised)
        head_bytes = DTYPE_BYTES[reward_cfg.dtype]
        parts["reward models"] = sum(weight_bytes(s, reward_cfg, training=False) - s.head_params * head_bytes
                                     for s in reward_shapes)
        rollout_rows = cfg.ppo.rollout_micro_batch_size
        parts["kv cache"] = 2 * shape.layers * shape.kv_dim * length * rollout_rows * compute
        if cfg.ppo.critic and needs_critic:
            parts["critic"] = parts["weights"] + parts.get("adapters", 0) + parts["gradients"] + parts["optimizer"]
            estimate.notes.append("ppo.critic counted as a second policy of the same shape")
    parts["runtime"] = GiB if device_type == "cuda" else GiB // 2
    return estimate


def _reward_model_paths(cfg: RunConfig) -> list[str]:
    paths = [source.model for source in cfg.ppo.rewards if source.model]
    if not cfg.ppo.rewards and cfg.reward_model is not None:
        paths = [cfg.reward_model.name_or_path]
    return paths


# ---- what would fit -------------------------------------------------------------------------------


def remedies(cfg: RunConfig, family: str, needs_reference: bool, estimate_fn, available: int,
             copies: int = 1) -> list[tuple[str, int]]:
    """Changes that lower the estimate, each added to the ones before, the largest saving first, until the run
    fits: [(overrides, total bytes per process with this and every earlier change)]."""
    chosen: list[tuple[str, int]] = []
    while True:
        options = sorted(((text, estimate_fn(changed).total) for text, changed in _options(cfg, family, needs_reference)),
                         key=lambda item: item[1])
        if not options or (chosen and options[0][1] >= chosen[-1][1]):
            return chosen
        text = options[0][0]
        cfg = next(changed for t, changed in _options(cfg, family, needs_reference) if t == text)
        chosen.append(options[0])
        if options[0][1] * copies <= available:
            return chosen


def _options(cfg: RunConfig, family: str, needs_reference: bool) -> list[tuple[str, RunConfig]]:
    model, options = cfg.model, []

    def option(text: str, **changes) -> None:
        options.append((text, _replace_nested(cfg, changes)))

    if not model.lora.enabled:
        option("model.lora.enabled=true", **{"model.lora.enabled": True})
    if model.quant.bits != 4:
        changes = {"model.quant.bits": 4, "model.lora.enabled": True}
        option("model.quant.bits=4 model.lora.enabled=true (QLoRA)", **changes)
    if not model.gradient_checkpointing:
        option("model.gradient_checkpointing=true", **{"model.gradient_checkpointing": True})
    if cfg.batch.micro_batch_size > 1:
        option("batch.micro_batch_size=1 (global_batch_size kept: more accumulation)", **{"batch.micro_batch_size": 1})
    if (needs_reference or FAMILIES[family].online) and cfg.reference.mode == "copy":
        if model.lora.enabled:
            option("reference.mode=disabled (the policy with its adapter off)", **{"reference.mode": "disabled"})
        if not FAMILIES[family].online:
            option("reference.mode=precomputed (log-probs computed once, no model while training)",
                   **{"reference.mode": "precomputed"})
    if cfg.optim.optimizer == "adamw":
        option("optim.optimizer=paged_adamw_8bit", **{"optim.optimizer": "paged_adamw_8bit"})
    if FAMILIES[family].online and cfg.ppo.rollout_micro_batch_size > 1:
        option("ppo.rollout_micro_batch_size=1 (a smaller KV cache)", **{"ppo.rollout_micro_batch_size": 1})
    return options


def _replace_nested(cfg, changes: dict):
    for key, value in changes.items():
        cfg = _set(cfg, key.split("."), value)
    return cfg


def _set(obj, path: list[str], value):
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: value})
    return dataclasses.replace(obj, **{path[0]: _set(getattr(obj, path[0]), path[1:], value)})


# ---- the check at start-up ------------------------------------------------------------------------


def available_memory(device) -> tuple[int, str]:
    """Free bytes on `device` and a description: CUDA's free memory, or MemAvailable from /proc/meminfo."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free, f"{torch.cuda.get_device_name(device)} ({gib(free):.1f} of {gib(total):.1f} GiB free)"
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                return free, f"CPU RAM ({gib(free):.1f} GiB available)"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "CPU RAM"


def check_memory(cfg: RunConfig, family: str, *, needs_reference: bool, device, processes_per_device: int = 1,
                 available: int | None = None) -> Estimate | None:
    """Estimate the run's memory and stop with a MemoryCheckError when it exceeds what `device` has free.

    On CPU the processes of one machine share its RAM, so the estimate counts `processes_per_device` times.
    `available` overrides the measured free memory (tests)."""
    device_type = getattr(device, "type", str(device))

    def estimate_fn(run_cfg: RunConfig) -> Estimate:
        return estimate_memory(run_cfg, family, needs_reference=needs_reference, device_type=device_type)

    try:
        estimate = estimate_fn(cfg)
    except (OSError, ValueError, ImportError) as error:  # a hub id not cached offline, a custom architecture
        warnings.warn(f"memory check skipped: the model could not be built from its config ({error})", stacklevel=2)
        return None
    where = f"{available / GiB:.1f} GiB available" if available is not None else None
    if available is None:
        available, where = available_memory(device)
    need = estimate.total * processes_per_device
    if need <= available:
        return estimate
    copies = f" x {processes_per_device} processes" if processes_per_device > 1 else ""
    steps = remedies(cfg, family, needs_reference, estimate_fn, available, processes_per_device)
    lines = [f"  {('+ ' if i else '') + text:<74} -> {gib(total * processes_per_device):6.2f} GiB"
             + (" (fits)" if total * processes_per_device <= available else "") for i, (text, total) in enumerate(steps)]
    raise MemoryCheckError(
        f"this run needs about {gib(need):.2f} GiB{copies} but the device has {where}. Estimate per process:\n"
        f"{estimate.format()}\n"
        "What would make it fit (each line adds to the ones above):\n" + "\n".join(lines or ["  (none left)"]) + "\n"
        "Under FSDP or DeepSpeed ZeRO-3 (configs/accelerate/) the weights, gradients and optimizer state split "
        "across GPUs. Skip this check with --skip-memory-check or memory_check=false."
    )
