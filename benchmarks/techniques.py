"""Prototype measurements of single techniques, each against its absence, alternating in one process.

    python -m benchmarks.techniques --size small --repeats 5 [--only logprobs kv_cache ...]

The techniques the engine switches by config (precomputed and adapter-disabled references, packing, length
grouping, a shared value head) are measured through the real loop by `python -m benchmarks.run --techniques`.
These are the ones that live below the config: the concatenated chosen/rejected forward, per-token log-probs
without a float32 log-softmax copy, logits computed only where log-probs are needed, KV-cache rollouts and
`torch.compile`. Each reports time and extra peak RSS (VmHWM above the RSS before the call) with and without.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from benchmarks.harness import machine, median, peak_rss_mib, reset_peak_rss, rss_mib, table, write_json
from benchmarks.workloads import SIZES, model_dir


def timed(fn, *args) -> tuple[float, float]:
    """(seconds, extra peak MiB) of one call."""
    reset_peak_rss()
    before = rss_mib()
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start, peak_rss_mib() - before


def alternate(with_fn, without_fn, repeats: int) -> dict:
    """Median seconds of each, alternating which runs first; extra peak memory is measured apart, one fresh
    process per variant (`probe_memory`): in one process the allocator's reuse of freed pages hides it."""
    with_fn(), without_fn()  # warm both
    runs = {"with": [], "without": []}
    for repeat in range(repeats):
        order = [("with", with_fn), ("without", without_fn)]
        for name, fn in order if repeat % 2 == 0 else order[::-1]:
            runs[name].append(timed(fn))
    out = {f"{name}_seconds": median(t for t, _ in r) for name, r in runs.items()}
    out["gain"] = out["without_seconds"] / out["with_seconds"]
    return out


class Variants(Exception):
    """Raised by a technique in probe mode to hand its two callables to `probe_memory`."""

    def __init__(self, with_fn, without_fn):
        super().__init__()
        self.fns = {"with": with_fn, "without": without_fn}


PROBE: dict = {}


def measured(with_fn, without_fn, repeats: int) -> dict:
    if PROBE:
        raise Variants(with_fn, without_fn)
    return alternate(with_fn, without_fn, repeats)


def probe_memory(name: str, size: str, threads: int) -> dict:
    """Extra peak RSS (MiB above the RSS before the call) of each variant's second call, one process each."""
    import subprocess

    out = {}
    for variant in ("with", "without"):
        done = subprocess.run([sys.executable, "-m", "benchmarks.techniques", "--size", size, "--threads",
                               str(threads), "--probe", name, variant], capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        out[f"{variant}_extra_peak_mib"] = json.loads(lines[-1])["extra_peak_mib"] if lines else None
    return out


def run_probe(name: str, variant: str, size: str) -> None:
    PROBE["on"] = True
    try:
        TECHNIQUES[name](size, 1)
    except Variants as variants:
        fn = variants.fns[variant]
        fn()  # the first call's one-off allocations (weights' gradients, optimizer state) are not the technique's
        seconds, extra = timed(fn)
        print(json.dumps({"extra_peak_mib": extra, "seconds": seconds}))


def preference_batch(size: str, tokenizer, pairs: int) -> dict:
    from benchmarks.workloads import engine_args
    from data import build_datasets, make_collator
    from engine.config import load_config

    args = engine_args("dpo", size, "/tmp/unused")
    cfg = load_config(args[1], args[2:])
    rows = build_datasets("preference", cfg.data, tokenizer).train.select(range(pairs))
    return make_collator("preference", tokenizer)(list(rows))


def load(size: str, **config_changes):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = model_dir(size, "causal")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not config_changes:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer
    config = AutoConfig.from_pretrained(path, **config_changes)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32), tokenizer


# ---- the techniques ---------------------------------------------------------------------------------


def concatenated_forward(size: str, repeats: int) -> dict:
    """DPO's policy pass: chosen and rejected in one (2B, T) forward and backward, or two (B, T) ones."""
    from losses import dpo_loss, token_logprobs

    model, tokenizer = load(size)
    batch = preference_batch(size, tokenizer, SIZES[size].batch)
    ref = torch.zeros(SIZES[size].batch)

    def logps(part):
        logits = model(input_ids=batch["input_ids"][part], attention_mask=batch["attention_mask"][part],
                       position_ids=batch["position_ids"][part], use_cache=False).logits
        logprobs, mask = token_logprobs(logits, batch["labels"][part])
        return (logprobs * mask).sum(-1)

    half = len(batch["input_ids"]) // 2

    def together():
        chosen, rejected = logps(slice(None)).chunk(2)
        dpo_loss(chosen, rejected, ref, ref, beta=0.1)[0].backward()

    def apart():
        chosen, rejected = logps(slice(0, half)), logps(slice(half, None))
        dpo_loss(chosen, rejected, ref, ref, beta=0.1)[0].backward()

    return measured(together, apart, repeats)


def chunked_logprobs(size: str, repeats: int, vocab: int = 32000) -> dict:
    """losses.token_logprobs (chunked logsumexp, softmax recomputed in backward) against
    `log_softmax(-1).gather`, which keeps a full float32 (B, T, V) copy for backward; forward and backward."""
    from losses import token_logprobs

    rows, length = SIZES[size].batch, 64
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, length, vocab, generator=generator).requires_grad_()
    labels = torch.randint(vocab, (rows, length), generator=generator)

    def chunked():
        logprobs, mask = token_logprobs(logits, labels)
        (logprobs * mask).sum().backward()
        logits.grad = None

    def full_copy():
        logprobs = logits[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:, None]).squeeze(-1)
        logprobs.sum().backward()
        logits.grad = None

    return measured(chunked, full_copy, repeats) | {"vocab": vocab, "logits_mib": logits.numel() * 4 / 2**20}


class _InPlaceBackwardLogprobs(torch.autograd.Function):
    """Prototype for losses/logprobs.py: the same chunked forward; the backward writes exp(logits - lse)
    straight into the gradient in place (two passes per chunk, no temporaries, no copy into `grad`)."""

    @staticmethod
    def forward(ctx, logits, labels, rows):
        lse = torch.cat([torch.logsumexp(logits[i:i + rows], -1) for i in range(0, len(logits), rows)])
        ctx.save_for_backward(logits, labels, lse)
        ctx.rows = rows
        return logits.gather(-1, labels[:, None]).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for i in range(0, len(logits), ctx.rows):
            rows = slice(i, i + ctx.rows)
            part = torch.sub(logits[rows], lse[rows, None], out=grad[rows]).exp_()
            part.mul_(-grad_out[rows, None]).scatter_add_(-1, labels[rows, None], grad_out[rows, None])
        return grad, None, None


def inplace_backward_logprobs(size: str, repeats: int, vocab: int = 32000) -> dict:
    """The engine's token_logprobs against the prototype above, forward and backward, (B, 64, V) logits;
    the two gradients are checked equal first."""
    from losses import token_logprobs

    rows, length = SIZES[size].batch, 64
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, length, vocab, generator=generator).requires_grad_()
    labels = torch.randint(vocab, (rows, length), generator=generator)
    chunk = max(1, (1 << 24) // vocab)

    def prototype():
        flat = logits[:, :-1].reshape(-1, vocab)
        _InPlaceBackwardLogprobs.apply(flat, labels[:, 1:].reshape(-1), chunk).sum().backward()

    def engine():
        logprobs, mask = token_logprobs(logits, labels)
        (logprobs * mask).sum().backward()

    prototype()
    expected, logits.grad = logits.grad, None
    engine()
    torch.testing.assert_close(logits.grad, expected)

    def clear(fn):
        def run():
            fn()
            logits.grad = None
        return run

    return measured(clear(prototype), clear(engine), repeats) | {"vocab": vocab}


def logits_where_needed(size: str, repeats: int, vocab: int | None = None) -> dict:
    """SFT/DPO step: the LM head on the completion positions only (hidden states gathered by the label mask),
    against the head on every position (what `policy(...).logits` does in engine/loops/{sft,pairwise}.py)."""
    from losses import gather_logprobs, token_logprobs

    model, tokenizer = load(size, **({"vocab_size": vocab} if vocab else {}))
    batch = preference_batch(size, tokenizer, SIZES[size].batch)
    labels = batch["labels"]
    if vocab:
        labels = labels.clamp(max=vocab - 1)
    kwargs = dict(input_ids=batch["input_ids"].clamp(max=model.config.vocab_size - 1),
                  attention_mask=batch["attention_mask"], position_ids=batch["position_ids"], use_cache=False)

    def everywhere():
        logits = model(**kwargs).logits
        logprobs, mask = token_logprobs(logits, labels)
        (logprobs * mask).sum().backward()

    def where_needed():
        hidden = model.model(**kwargs).last_hidden_state[:, :-1]
        mask = labels[:, 1:] != -100
        logits = model.lm_head(hidden[mask])  # (N, V): completion positions only
        (gather_logprobs(logits[None], labels[:, 1:][mask][None])).sum().backward()

    out = measured(where_needed, everywhere, repeats)
    mask = labels[:, 1:] != -100
    return out | {"vocab": model.config.vocab_size, "completion_fraction": float(mask.float().mean())}


def no_position_ids(size: str, repeats: int) -> dict:
    """A DPO policy pass (forward, token log-probs, backward) on a right-padded batch called without
    `position_ids` (they equal 0..T-1 there) against with them, as engine/loops/{sft,pairwise}.py call it."""
    from losses import token_logprobs

    model, tokenizer = load(size)
    batch = preference_batch(size, tokenizer, SIZES[size].batch)

    def run(position_ids: bool):
        def step():
            kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            if position_ids:
                kwargs["position_ids"] = batch["position_ids"]
            logprobs, mask = token_logprobs(model(**kwargs).logits, batch["labels"])
            (logprobs * mask).sum().backward()
        return step

    return measured(run(False), run(True), repeats)


def kv_cache_rollout(size: str, repeats: int) -> dict:
    """rollout.generation.generate (KV cache, new token only) against re-running the whole sequence for each
    new token; same prompts, greedy, full length."""
    from benchmarks.workloads import engine_args
    from data import build_datasets, make_collator
    from engine.config import load_config
    from rollout.generation import SamplingConfig, generate, position_ids_from_mask

    model, tokenizer = load(size)
    model.eval()
    spec = SIZES[size]
    args = engine_args("sft", size, "/tmp/unused")
    cfg = load_config(args[1], args[2:])
    rows = build_datasets("prompt", cfg.data, tokenizer).train.select(range(spec.rollout_batch))
    batch = make_collator("prompt", tokenizer)(list(rows))
    sampling = SamplingConfig(max_new_tokens=spec.max_new_tokens, min_new_tokens=spec.max_new_tokens,
                              temperature=0, micro_batch_size=spec.rollout_batch)

    def cached():
        generate(model, batch["input_ids"], batch["attention_mask"], sampling, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)

    @torch.no_grad()
    def uncached():
        ids, mask = batch["input_ids"], batch["attention_mask"]
        for _ in range(spec.max_new_tokens):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                           use_cache=False, logits_to_keep=1).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)

    out = measured(cached, uncached, repeats)
    tokens = spec.rollout_batch * spec.max_new_tokens
    return out | {"generated_tokens": tokens, "with_tokens_per_s": tokens / out["with_seconds"]}


def compiled_step(size: str, repeats: int) -> dict:
    """An SFT training step (forward, token log-probs, backward, AdamW) with the model under `torch.compile`
    (inductor, dynamic=False; the batch shape is fixed) against eager. Compile time is reported apart."""
    from benchmarks.workloads import engine_args
    from data import build_datasets, make_collator
    from engine.config import load_config
    from losses import sft_loss, token_logprobs

    model, tokenizer = load(size)
    args = engine_args("sft", size, "/tmp/unused")
    cfg = load_config(args[1], args[2:])
    rows = build_datasets("sft", cfg.data, tokenizer).train.select(range(SIZES[size].batch))
    batch = make_collator("sft", tokenizer)(list(rows))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    compiled = torch.compile(model, dynamic=False)

    def step(module):
        logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], use_cache=False).logits
        loss, _ = sft_loss(*token_logprobs(logits, batch["labels"]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    if not PROBE:
        step(compiled)
    compile_seconds = time.perf_counter() - start
    return measured(lambda: step(compiled), lambda: step(model), repeats) | {"compile_seconds": compile_seconds}


TECHNIQUES = {
    "concatenated_forward": concatenated_forward,
    "chunked_logprobs": chunked_logprobs,
    "inplace_backward_logprobs": inplace_backward_logprobs,
    "logits_where_needed": logits_where_needed,
    "logits_where_needed_32k": lambda size, repeats: logits_where_needed(size, repeats, vocab=32000),
    "kv_cache": kv_cache_rollout,
    "no_position_ids": no_position_ids,
    "torch_compile": compiled_step,
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.techniques", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", choices=sorted(TECHNIQUES), default=sorted(TECHNIQUES))
    parser.add_argument("--json", default=None)
    parser.add_argument("--probe", nargs=2, metavar=("TECHNIQUE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe:
        run_probe(*args.probe, args.size)
        return {}
    rows = []
    for name in args.only:
        print(name, file=sys.stderr, flush=True)
        try:
            row = {"technique": name, **TECHNIQUES[name](args.size, args.repeats)}
            if name != "torch_compile":  # a fresh process would compile again, minutes on this CPU
                row |= probe_memory(name, args.size, args.threads)
            rows.append(row)
        except Exception as error:  # noqa: BLE001 - one failing prototype must not hide the others
            rows.append({"technique": name, "error": f"{type(error).__name__}: {error}"[:500]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    payload = {"size": args.size, "repeats": args.repeats, "threads": args.threads, "machine": machine(),
               "command": "python -m benchmarks.techniques " + " ".join(argv if argv is not None else sys.argv[1:]),
               "rows": rows}
    print(table(rows, [("technique", "technique", ""), ("with s", "with_seconds", ".4f"),
                       ("without s", "without_seconds", ".4f"), ("gain", "gain", ".2f"),
                       ("extra peak MiB with", "with_extra_peak_mib", ".0f"),
                       ("extra peak MiB without", "without_extra_peak_mib", ".0f")]))
    if args.json:
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
