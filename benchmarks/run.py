"""Throughput, memory and MFU of every objective, the engine beside TRL, in one run on one machine.

    python -m benchmarks.run --size tiny                                # CI smoke: engine only, seconds
    python -m benchmarks.run --size small --peer trl --repeats 3        # engine vs TRL, alternating
    python -m benchmarks.run --size small --peer trl --objectives grpo rloo --repeats 3   # GRPO, RLOO vs TRL
    python -m benchmarks.run --size small --techniques --repeats 3      # each technique on vs off
    python -m benchmarks.run --device cuda --size llama-1b --peer trl --objectives dpo --repeats 3 --decoding

Every measurement runs in its own process (its peak RSS is its own), on `--threads` threads, with the peak of
a large matmul measured in that process before and after; the runners alternate (engine, peer, peer, engine,
...), and the table gives medians over repeats and the median of the paired ratios engine / peer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import machine, median, table, write_json
from benchmarks.workloads import DEFAULT_OBJECTIVES, OBJECTIVES, SIZES

REPO_ROOT = Path(__file__).resolve().parents[1]
TRL_OLD_PYTHON = os.environ.get("BENCH_TRL_OLD_PYTHON", "/tmp/trl-old/bin/python")
PEER_MALLOC_TUNING = "BENCH_PEER_MALLOC_TUNING"
BASELINE = "BENCH_BASELINE"  # the checkout whose engine the "baseline" runner measures (--baseline)

# (objective, technique, engine overrides without it, with it)
TECHNIQUES = (
    ("dpo", "precomputed reference log-probs", (), ("reference.mode=precomputed",)),
    ("dpo", "adapter-disabled reference (LoRA r=16)", ("model.lora.enabled=true", "reference.mode=copy"),
     ("model.lora.enabled=true", "reference.mode=disabled")),
    ("dpo", "length-grouped batches", (), ("data.group_by_length=true",)),
    ("dpo", "shared-prompt batches", ("data.share_prompt=false",), ("data.share_prompt=true",)),
    ("reward", "shared-prompt batches", ("data.share_prompt=false",), ("data.share_prompt=true",)),
    ("orpo", "shared-prompt batches", ("data.share_prompt=false",), ("data.share_prompt=true",)),
    ("sft", "padding-free packing", (), ("data.packing=true",)),
    ("ppo", "value head on the policy instead of a critic copy", (), ("ppo.critic=null",)),
    ("grpo", "rollout log-probs from the sampling pass", ("ppo.rollout_logprobs=recompute",),
     ("ppo.rollout_logprobs=sampling",)),
    ("rloo", "rollout log-probs from the sampling pass", ("ppo.rollout_logprobs=recompute",),
     ("ppo.rollout_logprobs=sampling",)),
    ("orpo", "no position_ids on right-padded batches (prototype)", (), ("bench.drop_position_ids=true",)),
)


def peak_kind(device: str, precision: str) -> dict:
    """The matmul whose FLOP/s is the MFU's denominator: float32 1024^2 on the CPU, the precision's dtype at
    8192^2 on a GPU (bf16 autocast runs the matmuls in bf16)."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return {"device": device, "dtype": dtype, "size": 8192 if device == "cuda" else 1024}


def measure_one(runner: str, objective: str, size: str, threads: int, overrides: tuple[str, ...],
                steps: int | None, device: str = "cpu", precision: str = "fp32") -> dict:
    """One measurement in this process; called by the worker subprocess."""
    import torch

    torch.set_num_threads(threads)
    from benchmarks.harness import matmul_peak_flops
    from engine.hostmem import keep_freed_memory

    # engine/train.py's main tunes malloc itself (RLHF_ENGINE_MALLOC_TUNING=0 switches it off); the peer only
    # with --peer-malloc-tuning. Tuned here before anything large is allocated, and recorded.
    tuned = keep_freed_memory() if runner == "engine" or os.environ.get(PEER_MALLOC_TUNING) == "1" else False
    peak = peak_kind(device, precision)
    peak_before = matmul_peak_flops(repeats=SIZES[size].peak_repeats, **peak)
    if runner == "engine":
        from benchmarks.engine_runner import run_engine

        if precision == "bf16":
            overrides = ("mixed_precision=bf16", *overrides)
        clock = run_engine(objective, size, steps=steps, overrides=overrides, device=device)
    else:
        import yaml

        from benchmarks.trl_runner import run_trl

        options = {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in overrides)}
        clock = run_trl(objective, size, steps=steps, options=options, device=device, precision=precision)
    peak_after = matmul_peak_flops(repeats=SIZES[size].peak_repeats, **peak)
    peak = max(peak_before, peak_after)
    return {"runner": runner, "objective": objective, "size": size, "overrides": list(overrides),
            "device": device, "precision": precision,
            "matmul_peak_gflops": peak / 1e9, **clock.summary(peak), "machine": machine(),
            "malloc_tuning": tuned}


def spawn(runner: str, objective: str, size: str, threads: int, overrides: tuple[str, ...] = (),
          steps: int | None = None, device: str = "cpu", precision: str = "fp32") -> dict:
    """`measure_one` in a fresh process; PPO's peer runs in the old-TRL environment. The "baseline" runner is
    the engine of the checkout at $BENCH_BASELINE, measured by that checkout's own benchmark code, on this
    checkout's model files (RLHF_ENGINE_CACHE, unless set)."""
    python = TRL_OLD_PYTHON if runner == "trl" and objective == "ppo" else sys.executable
    root, extra_env = REPO_ROOT, {}
    if runner == "baseline":
        from engine.tiny import cache_root

        root, extra_env = Path(os.environ[BASELINE]).resolve(), {"RLHF_ENGINE_CACHE": str(cache_root())}
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        worker = "engine" if runner == "baseline" else runner
        command = [python, "-m", "benchmarks.run", "--worker", worker, objective, "--size", size,
                   "--threads", str(threads), "--out", out.name, *(["--steps", str(steps)] if steps else []),
                   "--device", device, "--precision", precision,
                   *[f"--override={o}" for o in overrides]]
        env = os.environ | extra_env | {
            "OMP_NUM_THREADS": str(threads), "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false",
            # the repo first; a PYTHONPATH given (e.g. TRL installed with pip --target) after it
            "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return {"runner": runner, "objective": objective, "error": done.stderr[-2000:]}
        return json.loads(Path(out.name).read_text()) | ({"runner": runner, "checkout": str(root)}
                                                         if runner == "baseline" else {})


SUMMARY_KEYS = ("samples_per_s", "tokens_per_s", "step_seconds", "peak_rss_mib", "peak_memory_mib", "mfu", "matmul_peak_gflops",
                "train_tokens_per_step", "flops_per_step", "head_positions_per_step", "time/generation",
                "time/scoring", "time/experience", "time/training", "generation_tokens_per_s")


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    out = {key: median(r.get(key) for r in ok) for key in SUMMARY_KEYS if any(key in r for r in ok)}
    out["repeats"] = len(ok)
    kernels = {r.get("adamw_fused") for r in ok}
    if len(kernels) == 1:
        out["adamw_fused"] = kernels.pop()  # None: the runner did not say
    if len(ok) < len(runs):
        out["errors"] = [r["error"] for r in runs if "error" in r]
    return out


def _peak(run: dict) -> float:
    """The peak memory of a measurement: the GPU allocator's on CUDA, RSS on the CPU (and in older results)."""
    return run.get("peak_memory_mib", run["peak_rss_mib"])


def compare(a_runs: list[dict], b_runs: list[dict]) -> dict:
    """Median of the paired ratios a / b (throughput and memory), pairs taken in run order."""
    pairs = [(a, b) for a, b in zip(a_runs, b_runs) if "error" not in a and "error" not in b]
    return {
        "throughput_ratio": median(a["samples_per_s"] / b["samples_per_s"] for a, b in pairs),
        "memory_ratio": median(_peak(a) / _peak(b) for a, b in pairs),
    }


def alternate(first: tuple, second: tuple, repeats: int, size: str, threads: int, steps: int | None, log,
              device: str = "cpu", precision: str = "fp32") -> tuple:
    """Run the two specs (runner, objective, overrides) `repeats` times each, alternating which goes first."""
    a_runs, b_runs = [], []
    for repeat in range(repeats):
        order = [(first, a_runs), (second, b_runs)]
        for (runner, objective, overrides), runs in (order if repeat % 2 == 0 else order[::-1]):
            result = spawn(runner, objective, size, threads, overrides, steps, device, precision)
            runs.append(result)
            log(f"  {runner:6s} {objective:6s} {' '.join(overrides) or '-':40s} "
                + (f"{result['samples_per_s']:8.2f} samples/s  {_peak(result):7.0f} MiB  "
                   f"mfu {result['mfu']:.3f}" if "error" not in result else "ERROR " + result["error"][-300:]))
    return a_runs, b_runs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(DEFAULT_OBJECTIVES),
                        help="default: " + " ".join(DEFAULT_OBJECTIVES) + " (grpo and rloo when named)")
    parser.add_argument("--peer", choices=("none", "trl"), default="none")
    parser.add_argument("--baseline", default=None, metavar="CHECKOUT",
                        help="instead of a peer: the engine of another checkout (e.g. a `git worktree add` of an "
                             "earlier commit), run by its own benchmark code, alternating with this one; the "
                             "ratios are this checkout / the baseline")
    parser.add_argument("--peer-defaults", action="store_true",
                        help="TRL with its own defaults (gradient checkpointing on) against the engine with "
                             "model.gradient_checkpointing=true; default: both without checkpointing")
    parser.add_argument("--techniques", action="store_true", help="each technique on vs off, engine only")
    parser.add_argument("--only", default=None, metavar="TEXT",
                        help="with --techniques: only the techniques whose name contains TEXT")
    parser.add_argument("--engine-override", action="append", default=[], metavar="KEY=VALUE",
                        help="engine config override (or a prototype, e.g. bench.drop_position_ids=true) for "
                             "the engine side of a peer comparison")
    parser.add_argument("--peer-override", action="append", default=[], metavar="KEY=VALUE",
                        help="trainer-config option for the peer side, e.g. gradient_checkpointing=true")
    parser.add_argument("--adamw", choices=("fused", "non-fused"), default="fused",
                        help="the AdamW kernel on both sides: fused (default: the engine's optim.fused default, "
                             "TRL's default optim adamw_torch_fused) or non-fused (engine optim.fused=false, TRL "
                             "optim=adamw_torch); with --techniques, on both variants")
    parser.add_argument("--peer-malloc-tuning", action="store_true",
                        help="give the peer's processes the malloc tuning that engine/train.py applies to the "
                             "engine's (engine/hostmem.py); the engine's is switched off with the environment "
                             "variable RLHF_ENGINE_MALLOC_TUNING=0")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both sides train; cuda compares in bf16 unless --precision fp32")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="fp32 weights and math, or bf16 autocast over fp32 weights on both sides "
                             "(default: fp32 on the CPU, bf16 on CUDA)")
    parser.add_argument("--decoding", action="store_true",
                        help="also time decoding by backend against memory bandwidth (benchmarks.decoding)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default: the size's)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--worker", nargs=2, metavar=("RUNNER", "OBJECTIVE"), help=argparse.SUPPRESS)
    parser.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")

    if args.worker:
        runner, objective = args.worker
        result = measure_one(runner, objective, args.size, args.threads, tuple(args.override), args.steps,
                             args.device, precision)
        write_json(args.out, result)
        return result

    if args.peer_malloc_tuning:
        os.environ[PEER_MALLOC_TUNING] = "1"  # the worker processes inherit it
    if args.baseline:
        if args.peer != "none" or args.techniques:
            parser.error("--baseline compares two engines: give it without --peer and --techniques")
        os.environ[BASELINE] = args.baseline

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    payload: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "baseline": args.baseline,
                     "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "size": args.size, "threads": args.threads, "repeats": args.repeats, "machine": machine(),
                     "device": args.device, "precision": precision, "rows": []}
    # Both sides run their own defaults, fused AdamW; --adamw non-fused switches both to the loop kernel.
    engine_adamw = ("optim.fused=false",) if args.adamw == "non-fused" else ()
    peer_adamw = ("optim=adamw_torch",) if args.adamw == "non-fused" else ()
    groups = []  # (row fields, {side: runs})
    if args.techniques:
        for objective, name, off, on in TECHNIQUES:
            if objective not in args.objectives or (args.only and args.only not in name):
                continue
            on, off = engine_adamw + on, engine_adamw + off
            log(f"{name} ({objective})")
            with_runs, without_runs = alternate(("engine", objective, on), ("engine", objective, off),
                                                args.repeats, args.size, args.threads, args.steps, log,
                                                args.device, precision)
            groups.append(({"objective": objective, "technique": name}, {"with": with_runs, "without": without_runs}))
    else:
        for objective in args.objectives:
            log(objective)
            if args.baseline:
                engine_runs, base_runs = alternate(("engine", objective, engine_adamw),
                                                   ("baseline", objective, engine_adamw), args.repeats, args.size,
                                                   args.threads, args.steps, log, args.device, precision)
                groups.append(({"objective": objective}, {"engine": engine_runs, "baseline": base_runs}))
                continue
            if args.peer == "none":
                runs = [spawn("engine", objective, args.size, args.threads, engine_adamw, args.steps, args.device,
                              precision) for _ in range(args.repeats)]
                groups.append(({"objective": objective}, {"engine": runs}))
                continue
            # TRL >= 0.20 turns gradient checkpointing on by default; the engine leaves it off. Compare like
            # with like: both off (default), or both on (--peer-defaults). TRL's PPOTrainer leaves it off.
            engine_on = (("model.gradient_checkpointing=true",) if args.peer_defaults else ()) \
                + engine_adamw + tuple(args.engine_override)
            peer_on = (() if args.peer_defaults or objective == "ppo" else ("gradient_checkpointing=false",)) \
                + peer_adamw + tuple(args.peer_override)
            engine_runs, peer_runs = alternate(("engine", objective, engine_on), ("trl", objective, peer_on),
                                               args.repeats, args.size, args.threads, args.steps, log,
                                               args.device, precision)
            groups.append(({"objective": objective}, {"engine": engine_runs, "peer": peer_runs}))

    # MFU against the best matmul peak of the whole run: the device's capability, not one process's luck
    # with the other loads on a shared machine.
    every = [r for _, sides in groups for runs in sides.values() for r in runs if "error" not in r]
    payload["matmul_peak_gflops"] = max((r["matmul_peak_gflops"] for r in every), default=float("nan"))
    for r in every:
        r["mfu_own_peak"] = r["mfu"]
        r["mfu"] = r["mfu"] * r["matmul_peak_gflops"] / payload["matmul_peak_gflops"]
    for fields, sides in groups:
        row = dict(fields) | {side: summarise(runs) for side, runs in sides.items()}
        first, second = list(sides.values())[:2] if len(sides) == 2 else (None, None)
        if first is not None:
            row |= compare(first, second)
        row["runs"] = sides
        payload["rows"].append(row)

    if args.decoding:
        from benchmarks.decoding import compare_backends

        payload["decoding"] = compare_backends(args.size, args.device, repeats=args.repeats, log=log)
    print(format_table(payload))
    if args.json:
        write_json(args.json, payload)
    return payload


def format_table(payload: dict) -> str:
    flat = []
    for row in payload["rows"]:
        if "technique" in row:
            flat.append({"objective": row["objective"], "technique": row["technique"],
                         "with": row["with"].get("samples_per_s"), "without": row["without"].get("samples_per_s"),
                         "gain": row["throughput_ratio"], "memory": row["memory_ratio"],
                         "mfu": row["with"].get("mfu")})
            continue
        for side in ("engine", "peer", "baseline"):
            if side in row:
                flat.append({"objective": row["objective"], "runner": side, **row[side],
                             "ratio": row.get("throughput_ratio") if side == "engine" else None,
                             "memory": row.get("memory_ratio") if side == "engine" else None})
    if any("technique" in r for r in flat):
        columns = [("objective", "objective", ""), ("technique", "technique", ""), ("samples/s with", "with", ".2f"),
                   ("samples/s without", "without", ".2f"), ("gain", "gain", ".2f"), ("memory with/without", "memory", ".2f"),
                   ("MFU with", "mfu", ".3f")]
    else:
        columns = [("objective", "objective", ""), ("runner", "runner", ""), ("samples/s", "samples_per_s", ".2f"),
                   ("tokens/s", "tokens_per_s", ".0f"), ("step s", "step_seconds", ".3f"),
                   ("peak GPU MiB" if payload.get("device") == "cuda" else "peak RSS MiB", "peak_memory_mib", ".0f"),
                   ("MFU", "mfu", ".3f"),
                   *([("engine/baseline throughput", "ratio", ".2f"), ("engine/baseline memory", "memory", ".2f")]
                     if any(r["runner"] == "baseline" for r in flat) else
                     [("engine/peer throughput", "ratio", ".2f"), ("engine/peer memory", "memory", ".2f")]),
                   ("gen s", "time/generation", ".3f"), ("score s", "time/scoring", ".3f"),
                   ("exp s", "time/experience", ".3f"), ("train s", "time/training", ".3f"),
                   ("gen tok/s", "generation_tokens_per_s", ".0f")]
    header = (f"{payload['size']} model, {payload['threads']} thread(s), {payload['repeats']} repeat(s); "
              f"{payload['machine']['cpu']}, {payload['machine']['cores']} cores; {payload['date']}")
    text = header + "\n\n" + table(flat, columns)
    if "decoding" in payload:
        from benchmarks.decoding import format_decoding

        text += "\n\n" + format_decoding(payload["decoding"])
    return text


if __name__ == "__main__":
    main()
