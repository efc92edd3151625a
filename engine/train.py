"""Train a model with one config file.

    accelerate launch engine/train.py --config configs/dpo.yaml [--config configs/presets/low_memory.yaml] [key=value ...]
    python engine/train.py --config configs/tiny/sft.yaml optim.lr=1e-4      # one device
    python -m engine.train --config configs/tiny/dpo.yaml objective.beta=0.05

The objective's family picks the loop: sft -> engine/loops/sft.py, reward -> engine/loops/reward.py,
pairwise (DPO, IPO, ORPO, a registered function of your own) -> engine/loops/pairwise.py, ppo ->
engine/loops/ppo.py. Everything that can
be checked before a model loads is checked first, and each error names the key to change.

SIGTERM or SIGINT stops a run after its current optimizer step with a checkpoint (engine/signals.py);
`checkpoint.resume_from=latest` continues it exactly. Exit status: 0 done, 1 diverged (optim.max_bad_steps
non-finite steps in a row; the last good weights saved), 2 a config, data or reward-function error, 128 + the
signal number (143 SIGTERM, 130 SIGINT) stopped early with a checkpoint to resume from.

On Linux with glibc, freed CPU blocks of up to 256 MiB stay in the process for the next step to reuse
(engine/hostmem.py): faster, at the cost of resident memory; `RLHF_ENGINE_MALLOC_TUNING=0` switches it off.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    # Run as a file: put the repo root on the path, and take engine/ off it (engine/logging.py would
    # otherwise shadow the standard library's logging).
    _engine_dir = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _engine_dir]
    sys.path.insert(0, os.path.dirname(_engine_dir))

import argparse  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from accelerate import Accelerator, PartialState  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from accelerate.utils import GradientAccumulationPlugin, parse_flag_from_env, set_seed  # noqa: E402

from engine import signals, tracking  # noqa: E402
from engine.checkpoint import clean_partial, resolve_resume  # noqa: E402
from engine.config import ConfigError, RunConfig, describe_config, format_config, load_config, save_config  # noqa: E402
from engine.families import FAMILIES  # noqa: E402
from engine.hostmem import keep_freed_memory  # noqa: E402
from engine.lifecycle import RunResult, RunStopped, TrainingDiverged  # noqa: E402
from engine.loops import pairwise, reward, sft  # noqa: E402
from engine.memory import check_memory  # noqa: E402
from engine.tiny import resolve_model_path  # noqa: E402
from engine.validate import check_startup  # noqa: E402
from losses import Objective, bind_objective  # noqa: E402


def _ppo(*args) -> RunResult:
    from engine.loops import ppo  # generation, scoring and value heads load only for PPO runs

    return ppo.train(*args)


LOOPS = {"sft": sft.train, "reward": reward.train, "pairwise": pairwise.train, "ppo": _ppo}
_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="engine/train.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set in the YAML or as key=value), with their defaults:\n\n"
               + format_config(describe_config()))
    parser.add_argument("--config", action="append", metavar="YAML",
                        help="a config file; repeat to layer a preset over a base config (later files win)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides parsed as YAML scalars, e.g. optim.lr=1e-5 objective.beta=0.1")
    parser.add_argument("--skip-memory-check", action="store_true",
                        help="start even when the memory estimate (engine/memory.py) exceeds the device's free memory")
    parser.add_argument("--print-config", action="store_true",
                        help="print every config key with its value (the defaults, or what --config files and "
                             "overrides give) and its doc, then exit")
    args = parser.parse_args(argv)
    if not args.config and not args.print_config:
        parser.error("the following arguments are required: --config")
    return args


def main(argv: list[str] | None = None) -> RunResult | None:
    keep_freed_memory()  # large CPU tensors reuse freed pages instead of faulting in fresh ones every step
    args = parse_args(argv)
    # 1. The typed config, the bound objective and every check that needs no model.
    cfg = load_config(args.config or [], args.overrides)
    if args.print_config:
        print(format_config(describe_config(cfg)))
        return None
    try:
        objective, loss_fn = bind_objective(cfg.objective.name, dict(cfg.objective.kwargs))
    except ValueError as error:
        raise ConfigError(f"objective: {error}") from error
    # CPU processes form one gloo group only if the first PartialState is told cpu=True: from ACCELERATE_USE_CPU,
    # or by itself when torchrun (`accelerate launch --multi_gpu`) started it on a machine without CUDA; alone,
    # each process would train by itself. (`accelerate launch --cpu` starts a single process.)
    use_cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or ("LOCAL_RANK" in os.environ and not torch.cuda.is_available())
    processes = PartialState(cpu=use_cpu).num_processes
    accumulation = cfg.batch.accumulation_steps(processes)
    check_inputs(cfg, objective)
    tracking.check(cfg)

    # 2. Accelerate: devices, mixed precision, accumulation. One Python process may train several times
    # (the quickstart, tests), so settings left by an earlier run are dropped; the process group stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # Gradients sync every `accumulation` micro-batches (the loops hand over whole optimizer steps), and the
    # schedule advances once per optimizer step.
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accumulation, sync_with_dataloader=False),
        step_scheduler_with_optimizer=False,
        log_with=tracking.log_with(cfg),
    )
    check_startup(cfg, objective, accelerator)
    # an estimate from the model's config alone, before any weights load
    if cfg.memory_check and not args.skip_memory_check:
        check_memory(cfg, objective.family, needs_reference=objective.needs_reference, device=accelerator.device,
                     processes_per_device=accelerator.num_processes if accelerator.device.type == "cpu" else 1)
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    accelerator.print(
        f"{objective.name} ({objective.family}): {cfg.batch.global_batch_size} per step = "
        f"{cfg.batch.micro_batch_size} x {accumulation} accumulation x {accelerator.num_processes} process(es)"
        f" -> {cfg.output_dir}"
    )

    # W&B and MLflow runs (engine/tracking.py), continued from the ids in the checkpoint a resume loads.
    tracking.start(accelerator, cfg, tracking.saved_run_ids(cfg))

    # 3. One loop per family; a signal stops it after a step, with a checkpoint, by raising RunStopped.
    failed = True
    try:
        with signals.graceful_stop():
            result = LOOPS[objective.family](cfg, accelerator, objective, loss_fn)
        failed = False
        return result
    except RunStopped:
        failed = False  # stopped with a checkpoint: the tracker runs end cleanly, and a resume continues them
        raise
    finally:
        tracking.finish(accelerator, failed=failed)


def check_inputs(cfg: RunConfig, objective: Objective) -> None:
    """Fail before any model loads, naming what to change."""
    if objective.family not in LOOPS:
        raise ConfigError(f"objective {objective.name!r} is of family {objective.family!r}, which has no loop "
                          f"here; pick an objective of family {', '.join(LOOPS)}")
    if cfg.data.packing and objective.family != "sft":
        raise ConfigError(f"data.packing=true applies to SFT only; set data.packing=false for {objective.name}")
    if cfg.data.packing and objective.row_weights:
        raise ConfigError(f"objective {objective.name!r} weights each row, and a packed row holds many; set "
                          "data.packing=false")
    if objective.needs_reference and cfg.reference.mode == "disabled" and not cfg.model.lora.enabled:
        raise ConfigError("reference.mode=disabled switches off the policy's LoRA adapter, but model.lora.enabled "
                          "is false; set model.lora.enabled=true or reference.mode=copy")

    if FAMILIES[objective.family].online:
        check_reward_functions(cfg.ppo.rewards, "ppo.rewards")
    for key, model_cfg in (("model", cfg.model), ("reward_model", cfg.reward_model)):
        if model_cfg is not None:
            _check_model_path(f"{key}.name_or_path", model_cfg.name_or_path)
    if objective.needs_reference and cfg.reference.name_or_path:
        _check_model_path("reference.name_or_path", cfg.reference.name_or_path)

    path = cfg.data.path
    looks_local = path.startswith((".", "/", "~")) or path.endswith(_DATA_SUFFIXES)
    if path != "synthetic" and looks_local and not Path(path).expanduser().exists():
        raise ConfigError(f"data.path={path!r} does not exist; point data.path at a data file or directory, "
                          "a Hugging Face dataset name, or 'synthetic'")

    output_dir = Path(cfg.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise ConfigError(f"output_dir={cfg.output_dir!r} cannot be written ({error.strerror or error}); "
                          "choose another output_dir") from error

    # The engine's own leftovers go before the disk check counts the free space they hold.
    if PartialState().is_main_process:
        clean_partial(cfg.output_dir)
    PartialState().wait_for_everyone()
    try:
        resolve_resume(cfg.output_dir, cfg.checkpoint.resume_from)  # an explicit path must verify
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from error


def check_reward_functions(specs, key: str) -> None:
    """Import each reward function of `specs` (RewardSourceConfigs, the config's `key`) and check its kwargs
    now: a typo in its module, its name or a setting (or a regex that does not compile) would otherwise
    surface after every model has loaded."""
    from rollout.scoring import check_reward_kwargs, load_reward_function

    for i, spec in enumerate(specs):
        if spec.function is not None:
            try:
                fn = load_reward_function(spec.function)
            except ValueError as error:
                raise ConfigError(f"{key}[{i}].function ({spec.name!r}): {error}") from error
            try:
                check_reward_kwargs(fn, spec.kwargs)
            except ValueError as error:
                raise ConfigError(f"{key}[{i}].kwargs ({spec.name!r}, {spec.function}): {error}") from error
        if spec.judge is not None:
            _check_judge(f"{key}[{i}]", spec)


def _check_judge(key: str, spec) -> None:
    """A judge source's files, template fields and labels (one token each), read before any weights load."""
    from engine.label import SCORE_TEMPLATE, judge_formatter, read_template
    from engine.models import load_tokenizer
    from rollout.judge import SCORE_FIELDS, check_template, label_token_ids

    _check_model_path(f"{key}.judge", spec.judge)
    for name, path in (("constitution", spec.constitution), ("judge_template", spec.judge_template or SCORE_TEMPLATE)):
        if not Path(path).is_file():
            raise ConfigError(f"{key}.{name}={str(path)!r} is not a file ({spec.name!r})")
    try:
        check_template(read_template(spec.judge_template or SCORE_TEMPLATE), SCORE_FIELDS, f"{key}.judge_template")
        label_token_ids(judge_formatter(load_tokenizer(spec.judge), spec.judge_format).encode, spec.labels)
    except ValueError as error:
        raise ConfigError(f"{key} ({spec.name!r}): {error}") from error


def _check_model_path(key: str, name_or_path: str) -> None:
    try:
        resolve_model_path(name_or_path)
    except FileNotFoundError as error:
        raise ConfigError(str(error).replace("model.name_or_path", key)) from error


def cli() -> None:
    from data import DataError
    from rollout.scoring import RewardError

    try:
        main(sys.argv[1:])
    except (ConfigError, DataError, RewardError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except RunStopped as stopped:
        if stopped.is_main_process:
            print(stopped, flush=True)
        raise SystemExit(signals.exit_code(stopped.result.stopped_by)) from None


if __name__ == "__main__":
    cli()
