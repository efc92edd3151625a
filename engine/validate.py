"""Start-up checks that need more than the config file: the tokenizer, the model's config (never its
weights), the distributed setup and the disk. Each fails before any weights load, naming the fix.

    check_startup(cfg, objective, accelerator)   # engine/train.py, once Accelerate is set up

Checked elsewhere, and not repeated here: batch sizes that do not divide (BatchConfig.accumulation_steps,
ppo.check_sizes), an output directory that cannot be written and paths that do not exist
(train.check_inputs). Two data-layer checks run here early, where they would otherwise wait for the
model: pad == EOS where a reward is read (data.check_tokenizer), no pad token at all there
(check_pad_tokens) and a template that writes BOS twice (data's Formatter). LoRA with gradient
checkpointing but no input gradients is checked on the loaded model, by `check_gradient_flow`
(engine.optim.build_optimizer).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from engine.config import ConfigError, RunConfig
from engine.families import FAMILIES
from losses import Objective

SENTINEL = "\u2063TURN\u2063"
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}  # per trainable parameter


def check_startup(cfg: RunConfig, objective: Objective, accelerator) -> None:
    from transformers import AutoTokenizer

    from data.tokenize import Formatter, check_tokenizer
    from engine.memory import load_model_config
    from engine.tiny import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.name_or_path),
                                              trust_remote_code=cfg.model.trust_remote_code)
    family = FAMILIES[objective.family]
    data_family, allow_pad_as_eos = family.data, family.pad_may_be_eos
    if tokenizer.pad_token_id is not None:  # none at all: check_pad_tokens, or EOS pads (load_tokenizer)
        check_tokenizer(tokenizer, data_family, allow_pad_as_eos=allow_pad_as_eos)
    check_pad_tokens(cfg, objective.family, tokenizer)
    Formatter(cfg.data, tokenizer)  # a template that writes BOS twice, a prompt_format without {prompt}
    if family.online:
        check_turns_end_with_a_stop_token(cfg, tokenizer, stop_tokens(tokenizer, cfg.model.name_or_path))
    check_quantised_distribution(cfg, accelerator)
    check_export_merge(cfg, accelerator)
    check_attention(cfg, objective.family)
    try:
        model_config = load_model_config(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
        check_positions(cfg, objective.family, getattr(model_config, "max_position_embeddings", None))
        if cfg.model.lora.enabled:
            from engine.models import check_lora_targets

            check_lora_targets(cfg.model, model_config, task_type="SEQ_CLS" if family.model == "reward" else "CAUSAL_LM")
        check_disk(cfg, model_config)
    except (OSError, ValueError, ImportError) as error:
        if isinstance(error, ConfigError):
            raise
        # a hub id not cached offline, a custom architecture: the model loader reports what it finds
        warnings.warn(f"position and disk checks skipped: the model config could not be read or built ({error})",
                      stacklevel=2)


def check_pad_tokens(cfg: RunConfig, family: str, tokenizer) -> None:
    """A tokenizer with no pad token where a reward is read: the policy of reward training or PPO, and each
    PPO reward model. Elsewhere (SFT, DPO, ORPO) the engine pads with EOS, which no score is read at; here
    that would read every score before the EOS, so the model needs a pad token of its own."""
    from transformers import AutoTokenizer

    from engine.tiny import resolve_model_path

    checked = [] if FAMILIES[family].pad_may_be_eos else [("model.name_or_path", cfg.model.name_or_path, tokenizer)]
    if FAMILIES[family].online:
        base = cfg.reward_model or cfg.model
        sources = [(f"ppo.rewards[{i}].model", s.model) for i, s in enumerate(cfg.ppo.rewards) if s.model]
        if not cfg.ppo.rewards and cfg.reward_model is not None:
            sources = [("reward_model.name_or_path", cfg.reward_model.name_or_path)]
        for key, path in sources:
            try:
                checked.append((key, path, AutoTokenizer.from_pretrained(resolve_model_path(path),
                                                                         trust_remote_code=base.trust_remote_code)))
            except OSError:  # a path that does not exist, a hub id not cached: the reward loader says so
                continue
    for key, path, tok in checked:
        if tok.pad_token_id is not None:
            continue
        role = "policy" if key == "model.name_or_path" and FAMILIES[family].online else "reward model"
        raise ConfigError(
            f"the {role} {key}={path!r} has no pad token in its tokenizer, and {family} reads a score at the "
            "last non-pad token, so it cannot pad with the EOS as SFT and DPO do. Add a pad token and save the "
            "model and tokenizer together: tokenizer.add_special_tokens({'pad_token': '<pad>'}); "
            "model.resize_token_embeddings(len(tokenizer)); model.config.pad_token_id = tokenizer.pad_token_id; "
            f"model.save_pretrained(d); tokenizer.save_pretrained(d); then set {key}=d")


def stop_tokens(tokenizer, name_or_path: str) -> list[str]:
    """EOS and the generation config's EOS ids (chat models end a turn with their own token), as text."""
    from transformers import GenerationConfig

    from engine.tiny import resolve_model_path

    ids = [tokenizer.eos_token_id]
    try:
        configured = GenerationConfig.from_pretrained(resolve_model_path(name_or_path)).eos_token_id
    except OSError:
        configured = None
    ids += [configured] if isinstance(configured, int) else list(configured or [])
    return [tokenizer.convert_ids_to_tokens(i) for i in dict.fromkeys(ids) if i is not None]


def check_turns_end_with_a_stop_token(cfg: RunConfig, tokenizer, stops: list[str]) -> None:
    """A chat template that closes an assistant turn with a special token (`<|im_end|>`, `<|eot_id|>`) that
    is not a stop token: a policy tuned on that template ends its turns with it, generation runs on past it
    to max_new_tokens, and every response takes the missing-EOS penalty."""
    from data.tokenize import NAMED_TEMPLATES

    template = cfg.data.template
    if template in ("plain", "raw") or (template is None and not tokenizer.chat_template):
        return
    template = NAMED_TEMPLATES.get(template, template)
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": SENTINEL}],
            chat_template=template, tokenize=False)
    except Exception:  # a template that refuses this conversation is the data layer's to report
        return
    tail = text.partition(SENTINEL)[2]
    if not tail.strip() or any(stop and stop in tail for stop in stops):
        return
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special} | set(
        tokenizer.all_special_tokens)
    closing = sorted(t for t in specials if t and t in tail)
    if closing:
        raise ConfigError(
            f"the chat template ends an assistant turn with {tail!r}, which holds no EOS: {closing[0]!r} is not "
            f"among the stop tokens {stops}, so generation would run past the end of every turn. Add its id "
            f"({tokenizer.convert_tokens_to_ids(closing[0])}) to eos_token_id in the model's "
            "generation_config.json, or write {{ eos_token }} after each assistant message in the template "
            "(data.template)")


def check_positions(cfg: RunConfig, family: str, limit: int | None) -> None:
    """Sequences no longer than the model's position embeddings."""
    if limit is None:
        return
    where = f"the {limit} positions of model.name_or_path={cfg.model.name_or_path!r} (max_position_embeddings)"
    if FAMILIES[family].online:
        prompt = cfg.data.max_prompt_length or cfg.data.max_length
        if prompt + cfg.ppo.max_new_tokens > limit:
            raise ConfigError(f"prompts of up to {prompt} tokens (data.max_prompt_length) plus ppo.max_new_tokens="
                              f"{cfg.ppo.max_new_tokens} exceed {where}; lower one so they sum to at most {limit}")
    elif cfg.data.max_length > limit:
        raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds {where}; set data.max_length={limit} or less")


def check_attention(cfg: RunConfig, family: str) -> None:
    """Every model the run loads can use its attention implementation (engine.models.resolve_attention)."""
    from dataclasses import replace

    from engine.models import resolve_attention

    resolve_attention(cfg.model, kind=FAMILIES[family].model)
    # a reference from another checkpoint, and PPO's separate critic, load with the policy's settings
    others = [cfg.reference.name_or_path] if FAMILIES[family].dropout_free else []  # the two with a reference
    others += [cfg.ppo.critic] if FAMILIES[family].online else []
    for path in filter(None, others):
        resolve_attention(replace(cfg.model, name_or_path=path))
    if not FAMILIES[family].online:
        return
    base, key = (cfg.reward_model, "reward_model") if cfg.reward_model is not None else (cfg.model, "model")
    for spec in cfg.ppo.rewards or ((cfg.reward_model and cfg.reward_model.name_or_path),):
        path = getattr(spec, "model", spec)
        if path:
            resolve_attention(replace(base, name_or_path=path), kind="reward", key=f"{key}.attn_implementation")


def sharding_mode(accelerator) -> str | None:
    """"FSDP" or "DeepSpeed ZeRO-3" where each process holds only shards of the weights, else None."""
    from accelerate.utils import DistributedType

    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if accelerator.distributed_type == DistributedType.FSDP:
        return "FSDP"
    if accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3:
        return "DeepSpeed ZeRO-3"
    return None


def check_quantised_distribution(cfg: RunConfig, accelerator) -> None:
    """bitsandbytes weights with FSDP or DeepSpeed ZeRO-3, which shard parameters: they need the 4-bit
    weights stored in a float dtype (bnb_4bit_quant_storage) that model.quant does not set, and 8-bit weights
    cannot be sharded at all."""
    bits = cfg.model.quant.bits
    mode = sharding_mode(accelerator)
    if bits is None or mode is None:
        return
    raise ConfigError(
        f"model.quant.bits={bits} cannot train under {mode}, which shards the weights: bitsandbytes weights shard "
        "only as 4-bit stored in the compute dtype (bnb_4bit_quant_storage), which model.quant does not set. "
        "Launch with DDP (accelerate launch --multi_gpu) or DeepSpeed ZeRO-2, or set model.quant.bits=null")


def check_export_merge(cfg: RunConfig, accelerator) -> None:
    """export.merge of a LoRA adapter under FSDP or ZeRO-3: the final save gets the gathered state dict,
    which models.save_final cannot merge (merge_and_unload works on the module, whose weights are shards),
    so the run would train to the end and then fail without writing its adapter."""
    mode = sharding_mode(accelerator)
    if not (cfg.export.merge and cfg.model.lora.enabled and mode is not None):
        return
    raise ConfigError(
        f"export.merge=true cannot merge a LoRA adapter under {mode}, which shards the weights: the final save "
        "writes the gathered state dict, and merging needs the whole model in one process. Set export.merge=false "
        "and merge the saved adapter afterwards in one process (PeftModel.from_pretrained(base, "
        "'<output_dir>/final').merge_and_unload()), or launch with DDP or DeepSpeed ZeRO-2")


def checkpoint_bytes(cfg: RunConfig, model_config) -> tuple[int, int]:
    """(bytes, trainable parameters) of one checkpoint: the trainable weights and their optimizer state
    (frozen weights are not saved). LoRA adapters are saved in float32."""
    from engine.memory import DTYPE_BYTES, model_shape

    lora = cfg.model.lora
    shape = model_shape(model_config, lora.r if lora.enabled else 0, lora.target_modules)
    trainable = shape.lora_params if lora.enabled else shape.params
    weight = 4 if lora.enabled else DTYPE_BYTES[cfg.model.dtype]
    return trainable * (weight + OPTIMIZER_STATE_BYTES[cfg.optim.optimizer]), trainable


def final_bytes(cfg: RunConfig, model_config) -> int:
    """Bytes of `final/`: the adapter (float32), or the whole model in its dtype (full fine-tuning or merged)."""
    from engine.memory import DTYPE_BYTES, model_shape

    lora = cfg.model.lora
    shape = model_shape(model_config, lora.r if lora.enabled else 0, lora.target_modules)
    if lora.enabled and not cfg.export.merge:
        return shape.lora_params * 4
    return shape.params * DTYPE_BYTES[cfg.model.dtype]


def check_disk(cfg: RunConfig, model_config) -> None:
    """Room under output_dir for what the run will add to it, so that it does not fail hours in: during a save
    `checkpoint.keep_last` checkpoints plus the one being written (one only when checkpoint.every_steps is 0:
    a stop on a signal writes it), and at the end the kept ones plus `final/`. Checkpoints already in
    output_dir (a resumed run) hold their space already."""
    from engine.checkpoint import list_checkpoints

    one, trainable = checkpoint_bytes(cfg, model_config)
    final = final_bytes(cfg, model_config)
    keep = cfg.checkpoint.keep_last
    if not cfg.checkpoint.every_steps:
        kept = 0
    elif keep:
        kept = keep
    else:  # 0 keeps every checkpoint
        kept = cfg.max_steps // cfg.checkpoint.every_steps if cfg.max_steps else 1
    present = min(len(list_checkpoints(cfg.output_dir)), kept)
    need = (kept - present) * one + max(one, final)
    free = shutil.disk_usage(Path(cfg.output_dir)).free
    if free < need:
        gib = 1024**3
        raise ConfigError(
            f"output_dir={cfg.output_dir!r} has {free / gib:.2f} GiB free, less than the run will write "
            f"(~{need / gib:.2f} GiB: {kept} kept checkpoint(s) (checkpoint.keep_last={keep}) of which {present} "
            f"exist, plus one being saved or final/ (~{max(one, final) / gib:.2f} GiB); one checkpoint is "
            f"~{one / gib:.2f} GiB: {trainable:,} trainable parameters x weight and {cfg.optim.optimizer} state). "
            "Free some space, choose another output_dir, or lower checkpoint.keep_last; LoRA "
            "(model.lora.enabled=true) or optim.optimizer=adamw_8bit make checkpoints smaller")


def check_gradient_flow(model) -> None:
    """Gradient checkpointing with frozen input embeddings (LoRA, 4-bit, model.freeze.embeddings) needs the
    embedding output to require grad, or (reentrant) checkpointed blocks pass no gradient to the adapters
    inside them and they never train."""
    model = getattr(model, "policy", model)  # PPO's ActorCritic
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    checkpointing = getattr(base, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(base, "is_gradient_checkpointing", False)
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if not checkpointing or embeddings is None or any(p.requires_grad for p in embeddings.parameters()):
        return
    if getattr(base, "_require_grads_hooks", None) or getattr(base, "_require_grads_hook", None):
        return
    raise ConfigError(
        "model.gradient_checkpointing=true with frozen input embeddings and no input gradients: the adapters in "
        "the checkpointed blocks would get no gradient. Call model.enable_input_require_grads() after enabling "
        "checkpointing (engine.models.enable_gradient_checkpointing does), or set model.gradient_checkpointing=false")
