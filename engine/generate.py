"""Answer prompts with a trained checkpoint: a full model, a LoRA adapter on its base, or a merged model.

    python -m engine.generate --model runs/quickstart/dpo/final --prompts prompts.txt
    echo "Sort the letters: q e b m" | python -m engine.generate --model runs/quickstart/sft/final
    python -m engine.generate --model runs/quickstart/ppo/final --prompts test.jsonl --num-beams 4 --output out.jsonl
    python -m engine.generate --model runs/quickstart/sft/final --prompts synthetic --num-prompts 2000 \
        --num-samples 4 --pairs-by data.synthetic:judge_reward --output runs/quickstart/pairs.jsonl

Prompts come one per line (a .txt file or stdin) or as the `prompt` field of JSON lines. They are formatted
exactly as training formatted them (the tokenizer's chat template, or `--template plain` with
`--prompt-format`). Sampling and greedy decoding (`--temperature 0`) use rollout.generation, the decoder PPO
samples with; beam search uses transformers' `generate`. One JSON line per prompt is written:
{"prompt": ..., "response": ...}, or with `--num-samples K` {"prompt": ..., "responses": [K texts]}.

`--pairs-by package.module:function` turns the K samples into on-policy preference pairs: each response is
scored by that reward function (the same `fn(prompts, responses, **fields)` PPO's `ppo.rewards` take, the
prompt rows' other fields passed as `fields`), the best becomes `chosen`, the worst `rejected`, and prompts
whose samples all score the same are left out; with `--min-chosen-score S` so are those whose best scores
below S, so that every chosen response is a good one (rejection sampling). The output is a preference file
any DPO/ORPO/reward config reads with `data.path`. The quickstart's DPO and ORPO train on such pairs from the
SFT model: the policy's own samples show it the mistakes it makes, as in Xiong et al. 2024, "Iterative
Preference Learning from Human Feedback", and Guo et al. 2024, "Direct Language Model Alignment from Online
AI Feedback". `--prompts synthetic` draws prompts of the sorting task with `--data-seed` (`--num-prompts` of
them), never from the held-out split evaluation uses; `--prompts synthetic-test` draws that held-out split
(engine.evaluate's prompts for the same `--data-seed`), for measurements on prompts no run trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from data import make_collator
from data.config import DataConfig
from data.formats import canonical, detect_format
from data.tokenize import Formatter
from engine.config import ModelConfig
from engine.hostmem import keep_freed_memory
from rollout.generation import BACKENDS, RolloutConfig, SamplingConfig, generate
from rollout.scoring import load_reward_function


def load_model(path: str, *, kind: str = "causal", dtype: str = "float32", attn_implementation: str = "auto"):
    """A frozen model in eval mode from a `final/` directory (or any path or hub id `engine.models` loads).

    A directory holding `adapter_config.json` is a LoRA adapter: its base (recorded by peft) is loaded
    first and the adapter applied on top. `kind` is "causal" (a policy) or "reward" (a scalar head);
    `attn_implementation` is model.attn_implementation's choice (auto: sdpa where the class has it).
    """
    from engine import models

    load = models.load_policy if kind == "causal" else models.load_reward_model
    adapter_config = Path(path) / "adapter_config.json"
    if not adapter_config.exists():
        return load(ModelConfig(name_or_path=str(path), dtype=dtype, attn_implementation=attn_implementation),
                    for_training=False)
    from peft import PeftModel

    base_path = json.loads(adapter_config.read_text())["base_model_name_or_path"]
    base = load(ModelConfig(name_or_path=base_path, dtype=dtype, attn_implementation=attn_implementation),
                for_training=False)
    model = PeftModel.from_pretrained(base, str(path))
    model.eval()
    model.requires_grad_(False)
    return model


@dataclass
class PromptEncoder:
    """Prompt text -> the token ids training used for it (template, BOS, left truncation)."""

    tokenizer: object
    template: str | None = None
    prompt_format: str = DataConfig.prompt_format
    max_prompt_length: int | None = 256

    def __post_init__(self):
        max_length = (self.max_prompt_length or 1 << 30) + 1
        cfg = DataConfig(template=self.template, prompt_format=self.prompt_format, max_length=max_length,
                         max_prompt_length=self.max_prompt_length)
        self.formatter = Formatter(cfg, self.tokenizer)

    def ids(self, prompt: str) -> list[int]:
        ids, _ = self.formatter.cut_prompt(self.formatter.prompt_ids([{"role": "user", "content": prompt}]))
        return ids

    def batch(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P) input_ids and attention_mask, left padded as the prompt collator pads them."""
        batch = make_collator("prompt", self.tokenizer, allow_pad_as_eos=True)(
            [{"prompt_input_ids": self.ids(p), "prompt": p} for p in prompts])
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        return input_ids, attention_mask


def synthetic_prompts(n: int, seed: int = 0, *, held_out: bool = False) -> list[dict]:
    """The first `n` prompts the sorting task (data.synthetic) draws with `seed`, with their `answer` fields;
    evaluation's held-out prompts come from a different stream, and `held_out` returns those instead (the
    first `n` prompts engine.evaluate uses with the same seed)."""
    if held_out:
        from engine.evaluate import synthetic_rows as held_out_rows

        return held_out_rows("prompt", n, seed)
    from data.synthetic import generate as synthetic_rows

    return synthetic_rows("prompt", n, seed=seed)


def read_prompts(source: str | Path | None) -> list[dict]:
    """Rows with at least a `prompt`: JSON lines (other fields are kept), or plain text one prompt a line.

    `source` None or "-" reads stdin."""
    if source is None or str(source) == "-":
        text, name = sys.stdin.read(), "stdin"
    else:
        text, name = Path(source).read_text(), str(source)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            row = json.loads(line)
            fmt = detect_format("prompt", "auto", row, f"{name}:{number}")
            record = canonical("prompt", fmt, row, f"{name}:{number}")
            rows.append({k: v for k, v in record.items() if k != "prompt_messages"})
        else:
            rows.append({"prompt": line.rstrip("\n")})
    if not rows:
        raise ValueError(f"no prompts in {name}")
    return rows


@torch.no_grad()
def add_rollout_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rollout:` options of a run config as flags (engine.generate and engine.evaluate)."""
    parser.add_argument("--backend", choices=BACKENDS, default=RolloutConfig.backend,
                        help="decoding backend: the engine's loop, transformers' continuous batching, or auto")
    parser.add_argument("--memory-fraction", type=float, default=RolloutConfig.memory_fraction,
                        help="continuous: largest share of free device memory for its KV cache")
    parser.add_argument("--static-cache", action="store_true", help="generate: preallocated KV cache")
    parser.add_argument("--compile", action="store_true", help="generate on CUDA: compiled decoding step")


def rollout_config(args: argparse.Namespace) -> RolloutConfig:
    try:
        return RolloutConfig(backend=args.backend, memory_fraction=args.memory_fraction,
                             static_cache=args.static_cache, compile=args.compile)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def answer(model, tokenizer, encoder: PromptEncoder, prompts: Sequence[str], sampling: SamplingConfig, *,
           seed: int = 0, num_beams: int = 1, batch_size: int = 32,
           rollout: RolloutConfig | None = None) -> list[str]:
    """The response text to each prompt, `batch_size` prompts at a time.

    Sampling draws from one `torch.Generator` seeded with `seed`, so a rerun gives the same responses; with
    `num_beams > 1` the `num_beams` best beams are searched (sampling options are ignored)."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    responses = []
    for start in range(0, len(prompts), batch_size):
        input_ids, attention_mask = encoder.batch(prompts[start:start + batch_size])
        input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
        if num_beams > 1:
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, num_beams=num_beams,
                                 do_sample=False, max_new_tokens=sampling.max_new_tokens,
                                 min_new_tokens=sampling.min_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            tokens = out[:, input_ids.shape[1]:]
        else:
            gen = generate(model, input_ids, attention_mask, sampling, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, generator=generator, rollout=rollout or RolloutConfig())
            tokens = gen.responses.masked_fill(~gen.action_mask, tokenizer.pad_token_id)
        responses += tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return responses


def preference_pairs(rows: Sequence[dict], samples: Sequence[Sequence[str]], score_fn: Callable, *,
                     min_chosen_score: float | None = None) -> list[dict]:
    """Best against worst of each row's samples under `score_fn`; rows whose samples all tie are left out,
    and with `min_chosen_score` the rows whose best sample scores below it.

    Args:
        rows: prompt rows ({"prompt": ..., other fields}), one per prompt.
        samples: the K responses to each row's prompt.
        score_fn: a reward function, `fn(prompts, responses, **fields) -> numbers`, called once on all.

    Returns:
        {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"} per kept row; among equal
        scores the earliest sample wins (the choice is deterministic).
    """
    flat_rows = [row for row, responses in zip(rows, samples) for _ in responses]
    fields = {k: [row.get(k) for row in flat_rows] for k in rows[0] if k != "prompt"} if rows else {}
    scores = [float(x) for x in score_fn([r["prompt"] for r in flat_rows], [x for xs in samples for x in xs], **fields)]
    pairs, start = [], 0
    for row, responses in zip(rows, samples):
        own = scores[start:start + len(responses)]
        start += len(responses)
        best = max(range(len(own)), key=lambda i: (own[i], -i))
        worst = min(range(len(own)), key=lambda i: (own[i], i))
        if own[best] > own[worst] and (min_chosen_score is None or own[best] >= min_chosen_score):
            pairs.append({"prompt": row["prompt"], "chosen": responses[best], "rejected": responses[worst],
                          "chosen_score": own[best], "rejected_score": own[worst]})
    return pairs


def parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a final/ directory (full, adapter or merged), or a hub id")
    parser.add_argument("--prompts", default="-",
                        help="a .txt (one prompt a line) or .jsonl file; '-' for stdin; 'synthetic': the task's training "
                             "prompts; 'synthetic-test': its held-out ones, those engine.evaluate uses")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="use the first N prompts (default: all of a file, 1000 synthetic ones)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic prompts")
    parser.add_argument("--num-samples", type=int, default=1, help="responses sampled per prompt")
    parser.add_argument("--pairs-by", default=None, metavar="package.module:function",
                        help="write best-vs-worst preference pairs of the samples under this reward function")
    parser.add_argument("--min-chosen-score", type=float, default=None,
                        help="with --pairs-by: keep only pairs whose chosen response scores at least this")
    parser.add_argument("--output", default="-", help="JSON lines out; '-' for stdout")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--min-new-tokens", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 decodes greedily")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--num-beams", type=int, default=1, help="beam search when > 1")
    parser.add_argument("--batch-size", type=int, default=32)
    add_rollout_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--template", default=None,
                        help="prompt formatting as data.template: unset = the tokenizer's chat template; 'plain'")
    parser.add_argument("--prompt-format", default=DataConfig.prompt_format)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attn-implementation", default="auto",
                        help="as model.attn_implementation: auto (sdpa where the model has it, else eager), sdpa, "
                             "eager, flash_attention_2")
    return parser.parse_args(None if argv is None else list(argv))


def main(argv: Iterable[str] | None = None) -> list[dict]:
    from transformers.utils import logging as hf_logging

    from engine.models import load_tokenizer

    keep_freed_memory()  # large CPU tensors reuse freed pages instead of faulting in fresh ones every batch
    args = parse_args(argv)
    rollout = rollout_config(args)  # a bad value fails before the weights load
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model would bury the answers
    model = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn_implementation)
    if torch.cuda.is_available():
        model = model.to("cuda")
    tokenizer = load_tokenizer(args.model)
    encoder = PromptEncoder(tokenizer, args.template, args.prompt_format, args.max_prompt_length)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              micro_batch_size=args.batch_size)
    if args.min_chosen_score is not None and not args.pairs_by:
        raise SystemExit("--min-chosen-score filters pairs: it needs --pairs-by")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise SystemExit(f"--num-prompts must be at least 1, got {args.num_prompts}")
    if args.num_samples < 1 or (args.pairs_by and args.num_samples < 2):
        raise SystemExit(f"--num-samples must be at least {2 if args.pairs_by else 1}, got {args.num_samples}")
    if args.num_samples > 1 and (args.num_beams > 1 or args.temperature == 0):
        raise SystemExit("--num-samples > 1 needs sampling (--temperature > 0, --num-beams 1)")
    score_fn = load_reward_function(args.pairs_by) if args.pairs_by else None  # a bad spec fails before decoding
    if args.prompts in ("synthetic", "synthetic-test"):
        rows = synthetic_prompts(args.num_prompts or 1000, args.data_seed, held_out=args.prompts == "synthetic-test")
    else:
        rows = read_prompts(args.prompts)[: args.num_prompts]
    k = args.num_samples
    # each prompt K times in a row: one batched decode, the K samples of a prompt side by side
    flat = answer(model, tokenizer, encoder, [r["prompt"] for r in rows for _ in range(k)], sampling,
                  seed=args.seed, num_beams=args.num_beams, batch_size=args.batch_size, rollout=rollout)
    samples = [flat[i * k:(i + 1) * k] for i in range(len(rows))]
    if score_fn is not None:
        out = preference_pairs(rows, samples, score_fn, min_chosen_score=args.min_chosen_score)
        why = "tied" if args.min_chosen_score is None else f"tied or best below {args.min_chosen_score:g}"
        print(f"{len(out)} pairs from {len(rows)} prompts x {k} samples (the rest {why})", file=sys.stderr)
        if not out:  # an empty file would pass for a finished step and fail every run that reads it
            raise SystemExit(f"no preference pairs: every prompt's samples were {why}; sample more (--num-samples, "
                             "--num-prompts, --temperature) or lower --min-chosen-score")
    elif k == 1:
        out = [{"prompt": row["prompt"], "response": xs[0]} for row, xs in zip(rows, samples)]
    else:
        out = [{"prompt": row["prompt"], "responses": xs} for row, xs in zip(rows, samples)]
    text = "".join(json.dumps(row) + "\n" for row in out)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)  # all or nothing: a run stopped while writing leaves no half file behind
    return out


def exit_2_on_config_error(main) -> None:
    """Run a command's `main`; a ConfigError (a model whose attention cannot be what was asked) exits 2 with
    its message and no traceback. engine.evaluate's command line shares it."""
    from engine.config import ConfigError

    try:
        main()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def cli() -> None:
    exit_2_on_config_error(main)


if __name__ == "__main__":
    cli()
