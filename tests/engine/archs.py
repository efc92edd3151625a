"""Tiny random-init models of real architectures (2 layers, hidden 64), each built with its own transformers
classes and saved beside a locally trained byte-level BPE tokenizer that carries the family's own special
tokens, as its hub tokenizer does: GPT-2 and Mistral have no pad token, OPT prepends `</s>` as BOS,
Qwen2 ends turns with `<|im_end|>`, DeBERTa-v2 wraps every text in `[CLS] ... [SEP]`."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from data.tiny_tokenizer import training_texts
from data.tokenize import CHATML

SIZE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
        "max_position_embeddings": 256}


@dataclass(frozen=True)
class Arch:
    config: str  # the transformers config class
    model: str  # its model class
    specials: tuple[str, ...]  # special tokens, ids 0.. in this order
    roles: dict = field(default_factory=dict)  # tokenizer kwargs: bos_token, eos_token, pad_token, ...
    prefix: str | None = None  # the token the tokenizer prepends to every text
    suffix: str | None = None  # the token it appends
    chat_template: str | None = None
    config_kwargs: dict = field(default_factory=dict)
    attn: str = "sdpa"


ARCHS = {
    "gpt2": Arch("GPT2Config", "GPT2LMHeadModel", ("<|endoftext|>",),
                 {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
                 config_kwargs={"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}),
    "opt": Arch("OPTConfig", "OPTForCausalLM", ("<s>", "<pad>", "</s>", "<unk>"),
                {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
                prefix="</s>", config_kwargs={"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "qwen2": Arch("Qwen2Config", "Qwen2ForCausalLM", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                  {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, chat_template=CHATML,
                  config_kwargs={"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "mistral": Arch("MistralConfig", "MistralForCausalLM", ("<unk>", "<s>", "</s>"),
                    {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, prefix="<s>",
                    config_kwargs={"num_key_value_heads": 2}),
    "gemma2": Arch("Gemma2Config", "Gemma2ForCausalLM", ("<pad>", "<eos>", "<bos>", "<unk>"),
                   {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
                   prefix="<bos>", attn="eager",
                   config_kwargs={"num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
                                  "sliding_window": 128}),
    "gemma3": Arch("Gemma3TextConfig", "Gemma3ForCausalLM", ("<pad>", "<eos>", "<bos>", "<unk>"),
                   {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
                   prefix="<bos>",
                   config_kwargs={"num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
                                  "sliding_window": 128}),
    "neox": Arch("GPTNeoXConfig", "GPTNeoXForCausalLM", ("<|endoftext|>", "<|padding|>"),
                 {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                  "pad_token": "<|padding|>"}),
    "deberta": Arch("DebertaV2Config", "DebertaV2ForSequenceClassification",
                    ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"),
                    {"bos_token": "[CLS]", "eos_token": "[SEP]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                     "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]"},
                    prefix="[CLS]", suffix="[SEP]", attn="eager",
                    config_kwargs={"num_labels": 1, "initializer_range": 0.2}),  # scores that differ row to row
}
# Gemma-2 needs attn_implementation=eager, which engine.generate cannot choose yet: Gemma-3 text stands in
MATRIX = ["gpt2", "opt", "qwen2", "mistral", "gemma3", "neox"]


@cache
def _bpe_state(specials: tuple[str, ...], vocab_size: int) -> str:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(training_texts(), trainer)
    return bpe.to_str()


def build_tokenizer(arch: Arch, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    bpe = Tokenizer.from_str(_bpe_state(arch.specials, vocab_size))
    if arch.prefix or arch.suffix:
        marks = [t for t in (arch.prefix, arch.suffix) if t]
        single = " ".join(([arch.prefix] if arch.prefix else []) + ["$A"] + ([arch.suffix] if arch.suffix else []))
        bpe.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[(t, bpe.token_to_id(t)) for t in dict.fromkeys(marks)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, model_max_length=256, padding_side="right",
                                        **arch.roles)
    if arch.chat_template:
        tokenizer.chat_template = arch.chat_template
    return tokenizer


def build(name: str, out_dir: Path, *, seed: int = 0) -> Path:
    """Build architecture `name` with random weights into `out_dir` (model and tokenizer)."""
    arch = ARCHS[name]
    tokenizer = build_tokenizer(arch)
    kwargs = {k: v for k, v in SIZE.items() if name != "gpt2"} | arch.config_kwargs
    ids = {f"{role}_id": tokenizer.convert_tokens_to_ids(arch.roles[role]) for role in
           ("bos_token", "eos_token", "pad_token") if role in arch.roles}
    config = getattr(tf, arch.config)(vocab_size=len(tokenizer), **kwargs, **ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(tf, arch.model)(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def with_pad_token(src: Path, out_dir: Path) -> Path:
    """The fix the engine's error message gives a tokenizer without a pad token: add `<pad>`, resize the
    embeddings, save both."""
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
