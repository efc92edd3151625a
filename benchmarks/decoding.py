"""Rollout decoding by backend: the engine's loop, its static KV cache (compiled on CUDA), continuous batching.

    python -m benchmarks.decoding --size tiny --repeats 5                 # CPU, seconds
    python -m benchmarks.decoding --size small --repeats 5
    python -m benchmarks.decoding --size llama-1b --device cuda --repeats 3 --backends generate static compile continuous

Each backend samples the same seeded rollout (`rollout.generation.generate`, temperature 1, log-probs kept as
PPO keeps them) of `WORKLOADS[size]`: that many random prompts of half to all of the prompt length, each row
with its own length budget drawn from [max_new_tokens / 4, max_new_tokens] (a random model seldom samples EOS, so
the budgets set the lengths, and rows of different lengths are what continuous batching schedules). One
untimed call per backend first (continuous batching's set-up, compilation); then the backends take turns,
the order reversed every repeat, and the table gives medians.

Memory bandwidth: a decoding step must read every weight once and the KV cache of every row's context so far.
Over a rollout that is `steps x weight bytes + sum over rows and tokens of (context x KV bytes per token)`,
with `steps` the longest response (all rows decoding together, the fewest weight reads); divided by the
rollout's time it is the bandwidth the backend achieved, given against a device-to-device copy of the same
device (read + write counted). Prefill is inside the time and outside the bytes, so the figure is a lower
bound on the decoding steps' own.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch

from benchmarks.harness import copy_bandwidth, machine, median, synchronize, table, write_json
from benchmarks.workloads import model_dir

WORKLOADS = {  # size: (rows, prompt length, max_new_tokens)
    "tiny": (16, 32, 64),
    "small": (16, 32, 64),
    "small-v652": (16, 32, 64),
    "small-long": (16, 256, 64),
    "llama-1b": (64, 256, 256),
}
BACKENDS = {
    "generate": {"backend": "generate"},
    "static": {"backend": "generate", "static_cache": True},
    "compile": {"backend": "generate", "static_cache": True, "compile": True},
    "continuous": {"backend": "continuous"},
}


def rollout_bytes(model, gen) -> int:
    """Bytes a decoding pass over `gen` must read at the least: weights once per step, and each row's KV cache
    of its context at every token it decoded (see the module docstring)."""
    config = model.config
    itemsize = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) * itemsize
    if not config.tie_word_embeddings:  # the input embedding is a lookup of b rows, not a read of the matrix
        weights -= model.get_input_embeddings().weight.numel() * itemsize
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * itemsize
    prompt = gen.attention_mask[:, :gen.prompt_length].sum(-1)  # (B,)
    lengths = gen.response_length  # (B,)
    # row b reads contexts prompt_b, prompt_b + 1, ..., prompt_b + length_b - 1 while it decodes
    contexts = (lengths * prompt + lengths * (lengths - 1) // 2).sum()
    return int(lengths.max()) * weights + int(contexts) * kv_per_token


def compare_backends(size: str, device: str = "cpu", *, repeats: int = 3, backends: list[str] | None = None,
                     dtype: str | None = None, log=print) -> dict:
    """Time each backend on one seeded rollout, alternating; medians of tokens/s and bandwidth fractions."""
    from engine.generate import load_model
    from engine.models import load_tokenizer
    from rollout.generation import RolloutConfig, SamplingConfig, finished_locally, generate, resolve_backend

    rows, width, new_tokens = WORKLOADS[size]
    backends = backends or (["generate", "static", "compile", "continuous"] if device == "cuda"
                            else ["generate", "static", "continuous"])
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    path = str(model_dir(size, "causal"))
    model, tokenizer = load_model(path, dtype=dtype).to(device).eval(), load_tokenizer(path)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(width // 2, width + 1, (rows,), generator=g)
    ids = torch.randint(4, len(tokenizer), (rows, width), generator=g)
    mask = torch.arange(width)[None, :] >= (width - lengths)[:, None]
    ids = ids.masked_fill(~mask, tokenizer.pad_token_id).to(device)
    mask = mask.long().to(device)
    sampling = SamplingConfig(max_new_tokens=new_tokens, min_new_tokens=1, temperature=1.0,
                              response_length=(max(1, new_tokens // 4), new_tokens),
                              micro_batch_size=rows)
    rollouts = {name: RolloutConfig(**BACKENDS[name]) for name in backends}

    def run(name: str) -> dict:
        synchronize(device)
        start = time.perf_counter()
        gen = generate(model, ids, mask, sampling, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, generator=torch.Generator(device).manual_seed(1),
                       with_logprobs=True, rollout=rollouts[name])
        synchronize(device)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "tokens": int(gen.response_length.sum()), "bytes": rollout_bytes(model, gen)}

    bandwidth = copy_bandwidth(device)
    for name in backends:  # set-up and compilation, untimed
        run(name)
    runs: dict[str, list[dict]] = {name: [] for name in backends}
    for repeat in range(repeats):
        for name in (backends if repeat % 2 == 0 else backends[::-1]):
            result = run(name)
            runs[name].append(result)
            log(f"  {name:10s} {result['seconds']:8.3f} s  {result['tokens'] / result['seconds']:9.0f} tokens/s")
    rows_out = []
    for name in backends:
        done = runs[name]
        seconds = median(r["seconds"] for r in done)
        rows_out.append({
            "backend": name, "ran_as": resolve_backend(rollouts[name], model, finished_locally),
            "seconds": seconds, "tokens_per_s": median(r["tokens"] / r["seconds"] for r in done),
            "bandwidth_fraction": median(r["bytes"] / r["seconds"] / bandwidth for r in done),
            "speedup": median(a["seconds"] / b["seconds"] for a, b in zip(runs[backends[0]], done)),
            "runs": done,
        })
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "size": size,
            "device": device, "dtype": dtype, "rows": rows, "max_prompt_length": width,
            "max_new_tokens": new_tokens, "repeats": repeats, "copy_bandwidth_gbs": bandwidth / 1e9,
            "machine": machine(), "backends": rows_out}


def format_decoding(result: dict) -> str:
    header = (f"decoding, {result['size']} model, {result['device']} {result['dtype']}, {result['rows']} rows, "
              f"{result['repeats']} repeat(s), copy bandwidth {result['copy_bandwidth_gbs']:.1f} GB/s; "
              f"{result['date']}")
    columns = [("backend", "backend", ""), ("ran as", "ran_as", ""), ("rollout s", "seconds", ".3f"),
               ("tokens/s", "tokens_per_s", ".0f"), ("speed vs first", "speedup", ".2f"),
               ("of copy bandwidth", "bandwidth_fraction", ".3f")]
    return header + "\n\n" + table(result["backends"], columns)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decoding", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(WORKLOADS), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="weights (default: float32 on the CPU, bfloat16 on CUDA)")
    parser.add_argument("--backends", nargs="+", choices=sorted(BACKENDS), default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = compare_backends(args.size, args.device, repeats=args.repeats, backends=args.backends,
                              dtype=args.dtype, log=lambda line: print(line, file=sys.stderr, flush=True))
    result["command"] = "python -m benchmarks.decoding " + " ".join(argv if argv is not None else sys.argv[1:])
    print(format_decoding(result))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
