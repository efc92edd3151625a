"""Where a training step's time goes on this device: matrix products against everything else.

    python -m benchmarks.profile_step --size small --objective sft

Runs the engine's SFT or DPO policy step (forward, `losses.token_logprobs`, the objective, backward, clipping,
AdamW) under `torch.profiler` and groups self CPU time into matmuls (mm, addmm, bmm, linear backward), attention
(scaled_dot_product_attention and its backward), the optimizer, and the rest (norms, activations, rotary,
copies). The matmul share bounds the MFU a step can reach: MFU <= matmul share x the matmuls' own efficiency.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.harness import FlopCounter, matmul_peak_flops, write_json
from benchmarks.techniques import load, preference_batch
from benchmarks.workloads import SIZES

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention": ("scaled_dot_product", "_flash_attention", "_efficient_attention", "aten::_softmax"),
    "optimizer": ("Optimizer.step", "aten::_foreach", "aten::addcdiv", "aten::lerp", "aten::sqrt"),
}


def profile(size: str, objective: str, steps: int = 3) -> dict:
    from losses import dpo_loss, sft_loss, token_logprobs

    model, tokenizer = load(size)
    model.train()
    counter = FlopCounter()
    counter.watch(model)
    batch = preference_batch(size, tokenizer, SIZES[size].batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False).logits
        logprobs, mask = token_logprobs(logits, batch["labels"])
        if objective == "sft":
            loss, _ = sft_loss(logprobs, mask)
        else:
            chosen, rejected = (logprobs * mask).sum(-1).chunk(2)
            loss, _ = dpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), beta=0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    flops_before = counter.flops
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    flops = (counter.flops - flops_before) / steps
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = {name: 0.0 for name in (*GROUPS, "other")}
    for event in events:
        group = next((g for g, keys in GROUPS.items() if any(k in event.key for k in keys)), "other")
        shares[group] += event.self_cpu_time_total
    seconds = total / 1e6 / steps
    peak = matmul_peak_flops()
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    return {"size": size, "objective": objective, "step_seconds_profiled": seconds,
            "flops_per_step": flops, "matmul_peak_gflops": peak / 1e9, "mfu_profiled": flops / seconds / peak,
            "shares": {k: v / total for k, v in shares.items()},
            "top_ops": [(e.key, e.self_cpu_time_total / total) for e in top]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--objective", choices=("sft", "dpo"), default="sft")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = profile(args.size, args.objective)
    print("RESULT " + json.dumps(result))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
