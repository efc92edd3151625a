"""One GPU: every family in bf16 and in 4-bit QLoRA on a Llama-3.2-1B and a Llama-3-8B shape, checked for a
finite loss that moves the objective's way, peak memory against the start-up estimate, throughput and MFU.

    make gpu-wheels                                                     # here: wheels into .whl/ (ignored)
    python3 -m benchmarks.gpu_check --wheels .whl --out $OUT           # on the GPU, about 6 minutes
    python -m benchmarks.gpu_check --dry-run --out /tmp/gpu_check       # CPU: the tiny model, the same path

Every model is built from its config with seeded random weights (no download) and every run goes through
`engine.train.main` with a few steps on the same rows (so the loss must move), in its own process (its peak
memory is its own, a crash or a hang ends that run only) under a hard timeout, in priority order, until the
global `--budget` is spent; whatever is left is recorded as skipped with the reason. Writes gpu_check.json
and gpu_check.md (a table per model, ready for benchmarks/RESULTS.md) into `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

from benchmarks.workloads import ONLINE

REPO_ROOT = Path(__file__).resolve().parents[1]
H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM by the datasheet; MFU is against this on CUDA
WHEEL_PACKAGES = ("bitsandbytes", "datasets", "trl")  # on the GPU image torch/transformers/peft/accelerate are

_LLAMA = {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5, "initializer_range": 0.02,
          "vocab_size": 128256, "max_position_embeddings": 8192,
          "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
SHAPES = {
    # meta-llama/Llama-3.2-1B's config.json (1.24B parameters, tied head), without the long-context rope scaling
    "1b": _LLAMA | {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True},
    # meta-llama/Meta-Llama-3-8B's (8.03B parameters, untied head)
    "8b": _LLAMA | {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False},
}
TINY = REPO_ROOT / "configs" / "tiny" / "model.json"  # both shapes in a dry run

QLORA = ("model.quant={bits: 4, quant_type: nf4, double_quant: true, compute_dtype: bfloat16}",
         "model.lora={enabled: true, r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}")
FAMILIES = {  # objective -> (config, data family, the metric that must move, +1 up / -1 down)
    "sft": ("configs/tiny/sft.yaml", "sft", "loss", -1),
    "reward": ("configs/tiny/reward.yaml", "preference", "loss", -1),
    "dpo": ("configs/tiny/dpo.yaml", "preference", "loss", -1),
    "orpo": ("configs/tiny/orpo.yaml", "preference", "loss", -1),
    # a random reward model gives the policy nothing to learn in three iterations; what must fall is the clipped
    # surrogate on the same rollout, from the first epoch over it to the second (one minibatch per epoch)
    "ppo": ("configs/tiny/ppo.yaml", "prompt", "loss/policy, epoch 2 - epoch 1", -1),
    # the critic-free family: the same surrogate check over two epochs of each rollout
    "grpo": ("configs/tiny/grpo.yaml", "prompt", "loss/policy, epoch 2 - epoch 1", -1),
    "rloo": ("configs/tiny/rloo.yaml", "prompt", "loss/policy, epoch 2 - epoch 1", -1),
}
# ONLINE (ppo, grpo, rloo): an optimizer step is an iteration, a rollout then two epochs over it
GROUP_SIZE = 4  # GRPO / RLOO responses per prompt: `Sizes.rollout` rollouts from rollout / GROUP_SIZE prompts


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    group: str  # the table it goes into: "1b", "8b", "sharded", or "technique: ..."
    shape: str
    objective: str
    overrides: tuple[str, ...] = ()
    config: str | None = None  # default: the family's tiny config; the 8B runs use configs/recipes/
    launcher: str | None = None  # an accelerate config: run under `accelerate launch --num_processes 1`
    cuda_only: bool = False
    timeout: float = 120.0


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Rows and lengths of one mode: the GPU's (realistic lengths) or the dry run's (the tiny data)."""

    steps: int  # optimizer steps (PPO: iterations); the first is warmup for the clock
    rows: int  # rows per step (pairs for preference data); the training set is exactly these rows
    letters: tuple[int, int]  # the synthetic sorting task's row length (about a token per letter)
    max_length: int
    max_prompt_length: int
    rollout: int  # PPO prompts per iteration
    new_tokens: int
    budget: float  # seconds for the whole check


GPU = Sizes(steps=4, rows=8, letters=(200, 240), max_length=512, max_prompt_length=256, rollout=16,
            new_tokens=64, budget=330)
DRY = Sizes(steps=3, rows=4, letters=(4, 10), max_length=64, max_prompt_length=32, rollout=4, new_tokens=4,
            budget=240)


def plan() -> list[Run]:
    """Every run, most important first: the budget cuts from the end."""
    runs = []
    for mode, extra in (("bf16", ()), ("qlora", QLORA)):
        for objective in FAMILIES:
            references = (("copy",), ("copy", "disabled"))[mode == "qlora"] if objective == "dpo" else (None,)
            for ref in references:
                name = f"1b {mode} {objective}" + (f" ({ref} reference)" if ref else "")
                runs.append(Run(name, "1b", "1b", objective, extra + ((f"reference.mode={ref}",) if ref else ())))
    for launcher in ("fsdp", "zero3_offload"):
        runs.append(Run(f"1b bf16 ppo under {launcher}.yaml", "sharded", "1b", "ppo",
                        launcher=f"configs/accelerate/{launcher}.yaml", timeout=150))
    for objective in ("dpo", "ppo"):
        runs.append(Run(f"8b recipe llama3_8b_qlora_{objective}", "8b", "8b", objective,
                        config=f"configs/recipes/llama3_8b_qlora_{objective}.yaml", timeout=180))
    for technique, objective, on, off in TECHNIQUES:
        for side, overrides in (("with", on), ("without", off)):
            runs.append(Run(f"1b bf16 {objective} {side} {technique}", f"technique: {technique}", "1b", objective,
                            overrides, cuda_only=True))
    return runs


TECHNIQUES = (  # (technique, objective, overrides with it, without it)
    ("shared-prompt batches", "dpo", ("data.share_prompt=true",), ("data.share_prompt=false",)),
    ("gradient checkpointing", "sft", ("model.gradient_checkpointing=true",), ("model.gradient_checkpointing=false",)),
    ("torch.compile of the loss", "dpo", ("check.compile_loss=true",), ()),
    ("fused AdamW", "sft", ("optim.fused=true",), ("optim.fused=false",)),
)


# ---- models and data -------------------------------------------------------------------------------


def shape_dir(shape: str, cache: Path, device: str) -> Path:
    """The seeded build of a shape (the tiny model in a dry run) with the tiny tokenizer, made once."""
    from engine.tiny import build_tiny_model

    spec = json.loads(TINY.read_text()) if device == "cpu" else SHAPES[shape]
    out = cache / f"{shape}-{device}"
    if not (out / "config.json").exists():
        import torch

        cache.mkdir(parents=True, exist_ok=True)
        config_path = cache / f"{shape}-{device}.json"
        config_path.write_text(json.dumps(spec))
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        build_tiny_model(out, config_path=config_path, dtype=dtype, device=device)
    return out


def data_path(sizes: Sizes, family: str, cache: Path, rows: int) -> Path:
    """`rows` training rows of the sorting task at the mode's length: every step sees the same rows."""
    from data.synthetic import write_synthetic

    low, high = sizes.letters
    out = cache / f"data-{low}-{high}-{rows}"
    if not (out / f"{family}_train.jsonl").exists():
        write_synthetic(out, n_train=rows, n_test=4, min_letters=low, max_letters=high)
    return out / f"{family}_train.jsonl"


def engine_argv(run: Run, sizes: Sizes, model: Path, cache: Path, output_dir: str) -> list[str]:
    config, family, _, _ = FAMILIES[run.objective]
    qlora = run.config is not None or any(o.startswith("model.quant") for o in run.overrides)
    online = run.objective in ONLINE
    rows = sizes.rollout if online else sizes.rows
    argv = ["--config", str(REPO_ROOT / (run.config or config)), f"output_dir={output_dir}",
            f"model.name_or_path={model}", f"max_steps={sizes.steps}", "epochs=1",
            f"data.path={data_path(sizes, family, cache, rows)}", "data.eval_split=null", "data.eval_fraction=0.0", "data.split=train",
            f"data.max_length={sizes.max_length}", f"data.max_prompt_length={sizes.max_prompt_length}",
            f"batch.global_batch_size={rows}", f"batch.micro_batch_size={rows}", "eval.every_steps=0",
            "checkpoint.every_steps=0", "checkpoint.resume_from=none", "logging.every_steps=1",
            "logging.progress_bar=false", "optim.scheduler=constant", "optim.warmup_steps=0",
            "optim.warmup_ratio=0.0", f"optim.lr={1e-3 if qlora else 1e-4}", "mixed_precision=bf16",
            "model.dtype=bfloat16"]
    if online:
        group = 1 if run.objective == "ppo" else GROUP_SIZE
        # scored by a random reward model: a random policy ties every group on the task's judge (all zero
        # advantages), while the reward model's scores differ within a group
        argv += [f"ppo.rollout_batch_size={rows // group}", f"ppo.group_size={group}",
                 f"ppo.rollout_micro_batch_size={rows}", f"ppo.max_new_tokens={sizes.new_tokens}",
                 f"ppo.min_new_tokens={sizes.new_tokens}", "ppo.temperature=1.0", "ppo.epochs=2",
                 f"ppo.rewards=[{{name: rm, model: {model}}}]"]
    if run.objective == "ppo":
        argv += ["ppo.kl_target=null", "ppo.max_approx_kl=null", "reward_model=null", "ppo.critic=null"]
        if run.config is not None:  # the recipe's 4-bit reward model, on the built shape
            argv += [f"reward_model.name_or_path={model}", "reward_model.dtype=bfloat16",
                     "reward_model.quant={bits: 4, quant_type: nf4, double_quant: true, compute_dtype: bfloat16}"]
            argv.remove("reward_model=null")
        else:
            argv += ["reference.mode=copy"]
    if sizes is DRY:
        # 4-bit needs bitsandbytes' CPU kernels, paged optimizers need CUDA: the dry run takes the plain AdamW
        argv += ["optim.optimizer=adamw"]
    return argv + [o for o in run.overrides if not o.startswith("check.")]


# ---- one run, in its own process --------------------------------------------------------------------


def measure(run: Run, sizes: Sizes, cache: Path, peak_flops: float | None) -> dict:
    """Run `run` through `engine.train.main` in this process and read the clock, the memory and the losses."""
    import torch

    from benchmarks.engine_runner import _recording_optimizer
    from benchmarks.harness import FlopCounter, StepClock, matmul_peak_flops, peak_rss_mib, reset_peak_rss
    from engine import lifecycle, memory, models, optim, reference, train

    cuda = torch.cuda.is_available() and sizes is GPU
    model = shape_dir(run.shape, cache, "cuda" if cuda else "cpu")
    counter = FlopCounter()
    rows = sizes.rollout if run.objective in ONLINE else sizes.rows
    clock = StepClock(counter, warmup=1, rows_per_step=rows)
    recorded: dict = {}

    def watched(load):
        def load_and_watch(*args, **kwargs):
            return counter.watch(load(*args, **kwargs))
        return load_and_watch

    def timed_after_step(accelerator, cfg, logger, position, total, metrics, *args, **kwargs):
        extra = {k: v for k, v in metrics.items() if k.startswith("time/")}
        if "rollout/response_length" in metrics:
            extra["generated_tokens"] = metrics["rollout/response_length"] * cfg.ppo.rollout_batch_size * cfg.ppo.group_size
        after_step(accelerator, cfg, logger, position, total, metrics, *args, **kwargs)
        clock.tick(**extra)

    def no_final_save(accelerator, cfg, model, tokenizer, logger, total, *args, **kwargs):
        logger.close()
        return lifecycle.RunResult(Path(cfg.output_dir), None, total, logger.history)

    def recording_check(cfg, family, *, needs_reference, device, **kwargs):
        recorded["estimate"] = memory.estimate_memory(cfg, family, needs_reference=needs_reference,
                                                      device_type=device.type)
        return check_memory(cfg, family, needs_reference=needs_reference, device=device, **kwargs)

    calls: list[float] = []

    def recorded_objective(*args, **kwargs):
        objective, loss_fn = bind_objective(*args, **kwargs)
        loss_fn = torch.compile(loss_fn) if "check.compile_loss=true" in run.overrides else loss_fn
        if run.objective not in ONLINE:
            return objective, loss_fn

        def recorded(*a, **k):
            loss, metrics = loss_fn(*a, **k)
            calls.append(float(loss.detach()))
            return loss, metrics
        # the online loop reads the loss's signature and bound settings from a partial's func and keywords
        recorded.func, recorded.keywords = getattr(loss_fn, "func", loss_fn), getattr(loss_fn, "keywords", {})
        return objective, recorded

    after_step, check_memory, bind_objective = lifecycle.after_step, train.check_memory, train.bind_objective
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as out, ExitStack() as stack:
        patch = stack.enter_context
        patch(mock.patch.object(models, "load_policy", watched(models.load_policy)))
        patch(mock.patch.object(models, "load_reward_model", watched(models.load_reward_model)))
        patch(mock.patch.object(reference, "load_policy", watched(reference.load_policy)))
        patch(mock.patch.object(lifecycle, "after_step", timed_after_step))
        patch(mock.patch.object(lifecycle, "save_final", no_final_save))
        patch(mock.patch.object(optim, "build_optimizer", _recording_optimizer(optim.build_optimizer, clock.info)))
        patch(mock.patch.object(train, "check_memory", recording_check))
        patch(mock.patch.object(train, "bind_objective", recorded_objective))
        result = train.main(engine_argv(run, sizes, model, cache, out))
    wall = time.perf_counter() - start
    from accelerate import PartialState

    distributed = str(PartialState().distributed_type).rsplit(".", 1)[-1]  # FSDP, DEEPSPEED, NO, ...

    _, _, key, direction = FAMILIES[run.objective]
    losses = [row[key] for row in result.history if key in row]
    if run.objective in ONLINE:  # (epoch 2 - epoch 1) of each iteration: below 0 where the update pays
        losses = [b - a for a, b in zip(calls[::2], calls[1::2])]
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_mib() * 2**20
    estimate = recorded.get("estimate")
    summary = clock.summary(peak_flops or (H200_BF16_PEAK if cuda else matmul_peak_flops(repeats=1)))
    first_step = result.history[0] if result.history else {}
    return {
        "name": run.name, "group": run.group, "wall_s": wall, "distributed_type": distributed, "metric": key,
        "losses": losses,
        "finite": bool(losses) and all(math.isfinite(v) for v in losses),
        "moved": (bool(losses) and direction * sum(losses) > 0) if run.objective in ONLINE else
                 (len(losses) > 1 and direction * (losses[-1] - losses[0]) > 0),
        "peak_gib": peak / 2**30, "peak_kind": "max_memory_allocated" if cuda else "peak RSS (VmHWM)",
        "estimate_gib": estimate.total / 2**30 if estimate else None,
        "estimate_parts_gib": {k: v / 2**30 for k, v in estimate.parts.items()} if estimate else None,
        "ratio": peak / estimate.total if estimate else None,
        "first_step": {k: v for k, v in first_step.items() if k.startswith(("loss", "logps/", "rewards/"))},
        **{k: summary.get(k) for k in ("tokens_per_s", "mfu", "samples_per_s", "step_seconds",
                                        "generation_tokens_per_s", "time/generation", "adamw_fused", "steps")},
    }


# ---- the plan, under a budget ------------------------------------------------------------------------


def install_wheels(folder: Path | None, site: Path) -> dict:
    """Install the wheels in `folder` into `site` (prepended to the path) when a package of WHEEL_PACKAGES is
    missing: the GPU machine reaches no registry."""
    missing = [name for name in WHEEL_PACKAGES if importlib.util.find_spec(name) is None]
    if not missing:
        return {"installed": [], "missing": []}
    wheels = sorted(folder.glob("*.whl")) if folder else []
    if not wheels:
        return {"installed": [], "missing": missing, "note": f"no wheels in {folder}; see `make gpu-wheels`"}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    importlib.invalidate_caches()
    broken = {}
    for name in missing:  # installed without their needs: an import that fails names what the image lacks
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - recorded in the results, the runs that need it are skipped
            broken[name] = f"{type(error).__name__}: {error}"
    return {"installed": [w.name for w in wheels], "missing": sorted(broken), "import_errors": broken}


def skip_reason(run: Run, cuda: bool) -> str | None:
    if run.cuda_only and not cuda:
        return "measured on CUDA only: on CPU the timings say nothing about the GPU's choice"
    if run.launcher and "zero3" in run.launcher and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed"
    if any(o.startswith("model.quant") for o in run.overrides) or run.config:
        if importlib.util.find_spec("bitsandbytes") is None:
            return "bitsandbytes is not installed (pass --wheels with its wheel)"
    if importlib.util.find_spec("datasets") is None:
        return "datasets is not installed (pass --wheels with its wheel)"
    return None


def spawn(run: Run, args, timeout: float) -> dict:
    """`run` in a fresh process (under `accelerate launch` for a sharded one), killed with its children at
    `timeout`: a hang is reported, not waited on."""
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        worker = ["-m", "benchmarks.gpu_check", "--worker", json.dumps(dataclasses.asdict(run)), "--result",
                  result.name, "--cache", str(args.cache)] + (["--dry-run"] if args.dry_run else [])
        command = [sys.executable, *worker]
        if run.launcher:
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       str(REPO_ROOT / run.launcher), "--num_processes", "1", "--main_process_port", "0", *worker]
        env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
                            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            return {"name": run.name, "group": run.group, "error": f"timeout: killed after {timeout:.0f} s",
                    "log_tail": output[-1500:]}
        if process.returncode != 0 or not Path(result.name).read_text():
            return {"name": run.name, "group": run.group, "error": f"exit status {process.returncode}",
                    "log_tail": output[-3000:]}
        return json.loads(Path(result.name).read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, the tiny model in place of both shapes")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "gpu_check")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole check (GPU: 330)")
    parser.add_argument("--wheels", type=Path, default=None,
                        help="folder of wheels to install missing packages from (bitsandbytes, datasets, trl)")
    parser.add_argument("--only", default=None, metavar="TEXT", help="only the runs whose name contains TEXT (or one of several, comma-separated)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the unsharded runs in this process (fast; no hard timeout, shared peak RSS)")
    parser.add_argument("--cache", type=Path, default=None, help="where the built models and rows go")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = DRY if args.dry_run else GPU
    if args.cache is None:
        from engine.tiny import cache_root

        args.cache = cache_root() / "gpu_check"

    if args.worker:
        os.environ.setdefault("OMP_NUM_THREADS", "1") if args.dry_run else None
        result = measure(Run(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.worker).items()}),
                         sizes, args.cache, None)
        from accelerate import PartialState

        if PartialState().is_main_process:
            Path(args.result).write_text(json.dumps(result))
        return result

    import torch

    from benchmarks.harness import machine

    started = time.perf_counter()
    wheels = install_wheels(args.wheels, Path(tempfile.gettempdir()) / "gpu_check_site")
    cuda = torch.cuda.is_available() and not args.dry_run
    if not args.dry_run and not cuda:
        parser.error("no CUDA device: use --dry-run on a CPU")
    budget = args.budget or sizes.budget
    runs, skipped = [], []
    for run in plan():
        if args.only and not any(text in run.name for text in args.only.split(",")):
            continue
        reason = skip_reason(run, cuda)
        left = budget - (time.perf_counter() - started)
        if reason is None and left < 15:
            reason = f"the {budget:.0f} s budget ran out"
        if reason:
            skipped.append({"name": run.name, "group": run.group, "reason": reason})
            print(f"skip  {run.name}: {reason}", file=sys.stderr, flush=True)
            continue
        if args.in_process and not run.launcher:
            try:
                result = measure(run, sizes, args.cache, None)
            except Exception as error:  # noqa: BLE001 - one broken run is reported, the rest still run
                result = {"name": run.name, "group": run.group, "error": f"{type(error).__name__}: {error}"}
        else:
            result = spawn(run, args, min(run.timeout, left))
        runs.append(result)
        print(f"done  {run.name}: " + (result["error"] if "error" in result else
              f"finite {result['finite']} moved {result['moved']} peak {result['peak_gib']:.2f} GiB "
              f"ratio {result['ratio'] or float('nan'):.2f} {result['wall_s']:.0f} s"), file=sys.stderr, flush=True)

    info = machine()
    info["versions"]["bitsandbytes"] = _version("bitsandbytes")
    info["versions"]["deepspeed"] = _version("deepspeed")
    if cuda:
        info["gpu"] = torch.cuda.get_device_name()
    payload = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": "python -m benchmarks.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:]),
               "device": "cuda" if cuda else "cpu", "dry_run": args.dry_run, "budget_s": budget,
               "wall_s": time.perf_counter() - started, "sizes": dataclasses.asdict(sizes), "wheels": wheels,
               "machine": info, "runs": runs, "skipped": skipped, "techniques": decide(runs)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(payload, indent=2, sort_keys=True))
    text = markdown(payload)
    (args.out / "gpu_check.md").write_text(text)
    print(text)
    return payload


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - not installed
        return None


def decide(runs: list[dict]) -> list[dict]:
    """Each technique's pair of runs: tokens/s with over without (> 1 pays), peak memory with over without, and
    for shared-prompt batches whether the first step's loss and log-probs agree between the layouts."""
    by_name = {r["name"]: r for r in runs if "error" not in r}
    out = []
    for technique, objective, _, _ in TECHNIQUES:
        on, off = by_name.get(f"1b bf16 {objective} with {technique}"), by_name.get(f"1b bf16 {objective} without {technique}")
        if not (on and off):
            continue
        row = {"technique": technique, "objective": objective, "with_tokens_per_s": on["tokens_per_s"],
               "without_tokens_per_s": off["tokens_per_s"], "gain": on["tokens_per_s"] / off["tokens_per_s"],
               "memory": on["peak_gib"] / off["peak_gib"]}
        a, b = on["first_step"], off["first_step"]
        common = sorted(set(a) & set(b))
        row["first_step_max_rel_diff"] = max((abs(a[k] - b[k]) / max(abs(b[k]), 1e-6) for k in common), default=None)
        out.append(row)
    return out


def markdown(payload: dict) -> str:
    from benchmarks.harness import table

    versions = ", ".join(f"{k} {v}" for k, v in payload["machine"]["versions"].items() if v)
    lines = [f"`{payload['command']}` on {payload['machine'].get('gpu') or payload['machine']['cpu']}, "
             f"{payload['date']}, {payload['wall_s']:.0f} s of a {payload['budget_s']:.0f} s budget. {versions}.", ""]
    columns = [("run", "name", ""), ("finite", "finite", ""), ("loss moved", "moved", ""), ("peak GiB", "peak_gib", ".2f"),
               ("estimate GiB", "estimate_gib", ".2f"), ("ratio", "ratio", ".2f"), ("tokens/s", "tokens_per_s", ".0f"),
               ("MFU", "mfu", ".3f"), ("decode tok/s", "generation_tokens_per_s", ".0f")]
    for group in ("1b", "8b", "sharded"):
        rows = [r for r in payload["runs"] if r["group"] == group and "error" not in r]
        if rows:
            extra = [("launched as", "distributed_type", "")] if group == "sharded" else []
            lines += [f"**{group}**", "", table(rows, columns + extra), ""]
    if payload["techniques"]:
        lines += ["**does it pay** (tokens/s with / without; peak memory with / without)", "",
                  table(payload["techniques"], [("technique", "technique", ""), ("objective", "objective", ""),
                        ("tokens/s with", "with_tokens_per_s", ".0f"), ("without", "without_tokens_per_s", ".0f"),
                        ("gain", "gain", ".2f"), ("memory", "memory", ".2f"),
                        ("first-step max rel. diff", "first_step_max_rel_diff", ".1e")]), ""]
    failed = [r for r in payload["runs"] if "error" in r]
    for r in failed:
        lines.append(f"- failed: {r['name']}: {r['error']}")
    for r in payload["skipped"]:
        lines.append(f"- skipped: {r['name']}: {r['reason']}")
    lines.append(f"\npeak memory is {'torch.cuda.max_memory_allocated' if payload['device'] == 'cuda' else 'peak RSS'}"
                 "; ratio = peak / the start-up estimate (engine/memory.py)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
