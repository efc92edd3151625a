"""Loading the policy, reward model and tokenizer as one `ModelConfig` describes them, and saving the result.

Every model comes through the transformers Auto classes, so any causal LM on the hub or on disk works. The
order of the steps in `_load` matters: quantised weights are prepared for k-bit training before the adapter
is added, freezing only applies to full fine-tuning, and checkpointing is switched on last with input
gradients enabled, so an adapter behind a frozen embedding still receives gradients.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch

from engine.config import ConfigError, FreezeConfig, ModelConfig
from engine.tiny import resolve_model_path

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
FREEZE_GROUPS = ("embeddings", "layer_norms", "attention", "feed_forward", "other")

# Parameter-name conventions across the common architectures (Llama/Mistral/Qwen, GPT-2, GPT-NeoX, BERT).
# Norms are tested first: `post_attention_layernorm` and `self_attn.q_norm` are norms, not attention.
_GROUP_PATTERNS = (
    ("layer_norms", re.compile(r"(^|\.)(\w*norm\w*|ln_\w+|ln\d*)\.")),
    (
        "embeddings",
        re.compile(r"(^|\.)(embed_tokens|embed_positions|embed_in|wte|wpe|\w+_embeddings|embeddings)\."),
    ),
    ("attention", re.compile(r"(^|\.)(\w*attn\w*|\w*attention\w*)\.")),
    ("feed_forward", re.compile(r"(^|\.)(mlp|feed_forward|ffn|\w*experts?)\.")),
)
# As TRL's DPO, ORPO and PPO trainers: a log-prob ratio against an eval-mode reference (or rollout) starts at 1
# only if the training forward has no dropout either.
# Config fields that set a dropout (or LayerDrop) rate: OPT's `dropout`, GPT-2's `attn_pdrop`, BERT's
# `hidden_dropout_prob`, OPT's `layerdrop`.
_DROPOUT_FIELD = re.compile(r"dropout|pdrop|layerdrop")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def torch_dtype(name: str, *, key: str = "model.dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{key}={name!r} is not a dtype; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(model_cfg: ModelConfig | str):
    """The model's tokenizer with a pad token; a tokenizer without one pads with its EOS token (not saved
    with the model: see save_final). The families that read a reward refuse that at start-up
    (validate.check_pad_tokens). A path or hub id stands for `ModelConfig(name_or_path=...)`."""
    from transformers import AutoTokenizer

    if not isinstance(model_cfg, ModelConfig):
        model_cfg = ModelConfig(name_or_path=str(model_cfg))
    path = resolve_model_path(model_cfg.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"the tokenizer of model.name_or_path={model_cfg.name_or_path!r} has neither a pad nor an EOS "
                "token; add a pad token to it (tokenizer.add_special_tokens({'pad_token': '<pad>'})) and save it"
            )
        logger.warning("tokenizer has no pad token; padding with its EOS token %r", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
        # borrowed for batching only: save_final writes the tokenizer without it, so a later stage that
        # needs a pad of its own (reward, PPO) is told so instead of finding pad == EOS
        tokenizer.pad_from_eos = True
    return tokenizer


def load_policy(model_cfg: ModelConfig, *, for_training: bool = True, disable_dropout: bool = False):
    """A causal LM with the config's dtype, attention, quantisation, LoRA, freezing and checkpointing.

    With `for_training=False` (a reference model, an evaluator) the model is in eval mode with every
    parameter frozen, and no adapter, freezing or checkpointing is applied. `disable_dropout` trains it with
    every dropout rate at 0 (see `dropout_fields` and `without_dropout`).
    """
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, model_cfg, for_training=for_training, task_type="CAUSAL_LM",
                 disable_dropout=disable_dropout)


def load_reward_model(model_cfg: ModelConfig, *, num_labels: int = 1, for_training: bool = True,
                      disable_dropout: bool = False):
    """A sequence-classification model with `num_labels` outputs scoring each sequence at its last non-pad
    token; a causal-LM checkpoint gains a freshly initialised `score` head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(model_cfg.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"the tokenizer of the reward model model.name_or_path={model_cfg.name_or_path!r} has no pad token, "
            "and a reward model reads its score at the last non-pad token. Add one and save both beside each "
            "other: tokenizer.add_special_tokens({'pad_token': '<pad>'}); "
            "model.resize_token_embeddings(len(tokenizer)); then point model.name_or_path at that directory"
        )
    return _load(
        AutoModelForSequenceClassification,
        model_cfg,
        for_training=for_training,
        task_type="SEQ_CLS",
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
        disable_dropout=disable_dropout,
    )


def _load(auto_cls, cfg: ModelConfig, *, for_training: bool, task_type: str, disable_dropout: bool = False,
          **config_kwargs):
    from transformers import BitsAndBytesConfig

    attention = resolve_attention(cfg, kind="reward" if task_type == "SEQ_CLS" else "causal")
    if for_training and cfg.quant.bits and not cfg.lora.enabled:
        raise ValueError(
            f"model.quant.bits={cfg.quant.bits} weights cannot be trained directly; set model.lora.enabled=true "
            "(QLoRA) or model.quant.bits=null"
        )
    if for_training and cfg.lora.enabled and frozen_groups(cfg.freeze):
        raise ValueError(
            "model.freeze.* applies to full fine-tuning; with model.lora.enabled=true only the adapter trains. "
            "Unset model.freeze or model.lora.enabled"
        )

    kwargs = dict(config_kwargs)
    dropout = dropout_fields(cfg) if for_training and disable_dropout else {}
    kwargs.update(dict.fromkeys(dropout, 0.0))
    if cfg.quant.bits is not None:
        from accelerate import PartialState

        if cfg.quant.bits == 4:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=cfg.quant.quant_type,
                bnb_4bit_use_double_quant=cfg.quant.double_quant,
                bnb_4bit_compute_dtype=torch_dtype(cfg.quant.compute_dtype, key="model.quant.compute_dtype"),
            )
        elif cfg.quant.bits == 8:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            raise ValueError(f"model.quant.bits={cfg.quant.bits} is not supported; use 4, 8 or null")
        # bitsandbytes quantises while loading, so each process places its copy on its own device.
        kwargs["device_map"] = {"": PartialState().device}

    model = auto_cls.from_pretrained(
        resolve_model_path(cfg.name_or_path),
        dtype=torch_dtype(cfg.dtype),
        attn_implementation=attention,
        trust_remote_code=cfg.trust_remote_code,
        **kwargs,
    )
    # the modules took their rates at construction; the saved config keeps the model's own
    for name, rate in dropout.items():
        setattr(model.config, name, rate)
    if not for_training:
        model.eval()
        model.requires_grad_(False)
        return model

    if cfg.quant.bits is not None:
        from peft import prepare_model_for_kbit_training

        # Freezes the quantised base and upcasts the remaining half-precision weights (norms, head) to fp32.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora.target_modules
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=targets if isinstance(targets, str) else list(targets),
                task_type=task_type,
            ),
        )
    else:
        apply_freeze(model, cfg.freeze)
    if disable_dropout:
        without_dropout(model)
        logger.info("dropout off in %s (model.disable_dropout): config rates %s and every nn.Dropout set to 0",
                    cfg.name_or_path, dropout or "none")
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    return model


# The layer types peft's LoRA can wrap (torch's, and transformers' Conv1D, GPT-2's linear layer).
LORA_LAYER_TYPES = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "MultiheadAttention")


def check_lora_targets(cfg: ModelConfig, model_config, *, task_type: str = "CAUSAL_LM") -> list[str]:
    """The module names `cfg.lora.target_modules` selects, matched as peft matches them ("all-linear", a
    regex string, or a list of name suffixes), on the model `model_config` describes built on the meta
    device: no weights load, and a target that matches nothing fails here rather than after the load.

    Raises:
        ConfigError: no module matches, or a matched module is of a type LoRA cannot wrap.
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from engine.config import ConfigError

    targets = cfg.lora.target_modules
    auto_cls = AutoModelForSequenceClassification if task_type == "SEQ_CLS" else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = auto_cls.from_config(model_config, trust_remote_code=cfg.trust_remote_code)
    except Exception as error:  # an architecture that cannot be built on meta: peft checks after the load
        logger.warning("model.lora.target_modules not checked before the load: %s cannot be built on the meta "
                       "device (%s)", cfg.name_or_path, error)
        return []
    peft_config = LoraConfig(r=cfg.lora.r, target_modules=targets if isinstance(targets, str) else list(targets),
                             task_type=task_type)
    peft_config = _maybe_include_all_linear_layers(peft_config, model)
    modules = dict(model.named_modules())
    matched = [name for name in modules if name and check_target_module_exists(peft_config, name)]
    layers = sorted({name.rsplit(".", 1)[-1] for name, module in modules.items()
                     if type(module).__name__ in ("Linear", "Conv1D")})
    where = f"model.lora.target_modules={targets!r}"
    if not matched:
        raise ConfigError(f"{where} matches no module of {cfg.name_or_path!r} ({type(model).__name__}); its linear "
                          f"layers are named {layers}. Name some of them, or use all-linear")
    unsupported = [name for name in matched if type(modules[name]).__name__ not in LORA_LAYER_TYPES]
    if unsupported:
        raise ConfigError(f"{where} matches {unsupported[0]!r}, a {type(modules[unsupported[0]]).__name__}, which "
                          f"LoRA cannot wrap; name linear layers such as {layers}")
    return matched


def disables_dropout(cfg: ModelConfig, family: str) -> bool:
    """`model.disable_dropout` resolved for a family: None means on for the preference and PPO families."""
    from engine.families import FAMILIES

    return cfg.disable_dropout if cfg.disable_dropout is not None else FAMILIES[family].dropout_free


def dropout_fields(cfg: ModelConfig) -> dict[str, float]:
    """The model config's non-zero dropout rates by field name, read from its config alone.

    Zeroing these at load time reaches the dropout that modules apply functionally from a float they copied
    (OPT's `nn.functional.dropout(p=self.dropout)`, attention kernels' `dropout_p`, OPT's LayerDrop), which
    setting `nn.Dropout.p` alone (TRL's `disable_dropout_in_model`) misses."""
    from engine.memory import load_model_config

    config = load_model_config(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    return {name: value for name, value in vars(config).items()
            if _DROPOUT_FIELD.search(name) and isinstance(value, float) and value > 0}


def without_dropout(model) -> None:
    """Every `nn.Dropout` (the model's own, LoRA's `lora_dropout`, a classifier head's) at p=0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
# what each choice needs: the model class's flag, and where a package provides the kernel, its check
_SUPPORT_FLAG = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn",
                 "flash_attention_3": "_supports_flash_attn", "flex_attention": "_supports_flex_attn"}
_said: set[tuple[str, str]] = set()


def model_class(name_or_path: str, *, kind: str = "causal", trust_remote_code: bool = False):
    """The transformers class the Auto loader would build for `name_or_path` (read from its config only), or
    None where it cannot tell without the weights (remote code)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    auto_cls = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
    try:
        return auto_cls._model_mapping[type(config)]
    except (KeyError, AttributeError):
        return None


def resolve_attention(cfg: ModelConfig, *, kind: str = "causal", key: str = "model.attn_implementation") -> str | None:
    """`cfg.attn_implementation` as transformers should get it. `auto` is sdpa where the model class has it and
    eager where it has not (Gemma-2, DeBERTa-v2), said in one line; an explicit choice the class (or the
    installed packages) cannot do is a ConfigError naming `key`, raised before any weights load."""
    requested = cfg.attn_implementation
    if requested not in ATTENTION:
        raise ConfigError(f"{key}={requested!r} is not one of {list(ATTENTION)}")
    cls = model_class(cfg.name_or_path, kind=kind, trust_remote_code=cfg.trust_remote_code)
    if cls is None:  # remote code: transformers picks, as it does when given nothing
        return None if requested == "auto" else requested
    if requested == "auto":
        chosen = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
        if chosen == "eager" and (cls.__name__, chosen) not in _said:
            _said.add((cls.__name__, chosen))
            print(f"{key}=auto: {cls.__name__} has no SDPA attention; using eager")
        return chosen
    flag = _SUPPORT_FLAG.get(requested)
    if flag is not None and not getattr(cls, flag, False):
        raise ConfigError(f"{key}={requested}: {cls.__name__} does not support it; set {key}=auto (or eager)")
    if requested.startswith("flash_attention"):
        from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

        available = is_flash_attn_2_available() if requested.endswith("2") else is_flash_attn_3_available()
        if not available:
            raise ConfigError(f"{key}={requested} needs the flash-attn package and a CUDA GPU "
                              f"(`pip install flash-attn --no-build-isolation`), or set {key}=auto")
    return requested


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in the backward pass instead of storing them.

    Non-reentrant checkpointing, plus a hook making the embedding output require grad: with the reentrant
    variant and a frozen embedding, a checkpointed block sees no input needing grad and the adapter weights
    inside it never get one (the failure `enable_input_require_grads` exists for in transformers and peft).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(kwargs)
    model.enable_input_require_grads()
    model.config.use_cache = False


def parameter_group(name: str) -> str:
    """The freeze group of a parameter name: embeddings, layer_norms, attention, feed_forward or other.

    `other` holds everything else, notably the output head (`lm_head`, a reward model's `score`).
    """
    for group, pattern in _GROUP_PATTERNS:
        if pattern.search(name):
            return group
    return "other"


def layer_index(name: str) -> int | None:
    """The transformer-block index a parameter belongs to (`model.layers.3.mlp...` -> 3), None outside blocks."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def frozen_groups(freeze: FreezeConfig) -> tuple[str, ...]:
    return tuple(group for group in FREEZE_GROUPS if getattr(freeze, group))


def frozen_parameter_names(names: Iterable[str], freeze: FreezeConfig) -> set[str]:
    """The parameter names `freeze` stops training. Layers in `freeze.keep_layers` never freeze; negative
    indices count from the last block (-1 is the last)."""
    names = list(names)
    groups = set(frozen_groups(freeze))
    indices = [i for i in map(layer_index, names) if i is not None]
    num_layers = max(indices) + 1 if indices else 0
    keep = {k % num_layers if num_layers else k for k in freeze.keep_layers}
    return {n for n in names if parameter_group(n) in groups and layer_index(n) not in keep}


def apply_freeze(model, freeze: FreezeConfig) -> list[str]:
    """Turn off requires_grad on the frozen parameters; returns their names. Freezing everything is an error."""
    params = dict(model.named_parameters())
    frozen = frozen_parameter_names(params, freeze)
    if frozen and len(frozen) == len(params):
        raise ValueError(f"model.freeze freezes every parameter ({', '.join(frozen_groups(freeze))}); unfreeze one")
    for name in frozen:
        params[name].requires_grad_(False)
    return sorted(frozen)


def has_adapter(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_final(model, tokenizer, out_dir, *, merge: bool = False, state_dict: dict | None = None) -> Path:
    """Save the trained model and its tokenizer with `save_pretrained` in safetensors.

    An adapter model saves its adapter (plain `PeftModel.from_pretrained(base, out_dir)` reloads it), or with
    `merge=True` the base with the adapter merged in (plain `from_pretrained(out_dir)` loads it). The adapter
    is merged in place, so `model` is a plain model afterwards. A quantised base is merged into a fresh
    full-precision copy of the base instead, since merging into 4-bit weights would round the update away.
    Pass the unwrapped model (`accelerator.unwrap_model`) and call this on the main process only.

    `state_dict` is what gets written instead of `model.state_dict()`: under FSDP or DeepSpeed ZeRO-3 each
    process holds only shards, so pass the full state dict from `accelerator.get_state_dict(model)` (keys as
    in `model.state_dict()`; an adapter model keeps only its adapter weights from it).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if merge and has_adapter(model):
        if state_dict is not None:
            raise ValueError("export.merge with sharded weights (FSDP, DeepSpeed ZeRO-3) is not supported: "
                             "save the adapter (export.merge=false) and merge it in one process afterwards")
        model = _quantised_base_merged(model) if is_quantised(model) else model.merge_and_unload()
        model.config.use_cache = True  # switched off for gradient checkpointing; generation wants it back
    model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
    if getattr(tokenizer, "pad_from_eos", False):  # load_tokenizer's borrowed pad is not the model's own
        tokenizer.pad_token = None
        try:
            tokenizer.save_pretrained(out_dir)
        finally:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def is_quantised(model) -> bool:
    """Loaded in 4 or 8 bits by bitsandbytes (a peft model answers for its base)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def _quantised_base_merged(model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    peft_cfg = model.peft_config[model.active_adapter]
    config = model.get_base_model().config
    kwargs = {"dtype": config.quantization_config.bnb_4bit_compute_dtype}
    if peft_cfg.task_type == "SEQ_CLS":
        base_cls = AutoModelForSequenceClassification
        kwargs.update(num_labels=config.num_labels, pad_token_id=config.pad_token_id)
    else:
        base_cls = AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as adapter_dir:
        model.save_pretrained(adapter_dir, safe_serialization=True)
        base = base_cls.from_pretrained(peft_cfg.base_model_name_or_path, **kwargs)
        return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def reference_model_config(policy_cfg: ModelConfig, name_or_path: str | None = None) -> ModelConfig:
    """The config of a frozen reference copy of the policy: same weights, dtype and quantisation, no adapter."""
    return replace(
        policy_cfg,
        name_or_path=name_or_path or policy_cfg.name_or_path,
        gradient_checkpointing=False,
        lora=replace(policy_cfg.lora, enabled=False),
        freeze=FreezeConfig(),
    )
