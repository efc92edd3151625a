"""Experiment trackers beside TensorBoard: Weights & Biases and MLflow, through Accelerate's tracker API.

`logging.report_to` names them. TensorBoard stays RunLogger's own writer (it purges the steps a resumed run
repeats); wandb and mlflow are `Accelerator(log_with=...)` trackers, started by `start` on the main process
before any model loads, fed by RunLogger through `accelerator.log`, and ended by `finish`.

What a tracker run holds: the resolved config flattened to dotted keys (`optim.lr`) with the git commit and
library versions (W&B config, MLflow params), every logged metric at its step, sample tables (a W&B Table;
an MLflow JSON artifact under `samples/`), and files attached with `attach` (an evaluation's JSON, the
quickstart report). Each checkpoint saves the runs' ids (`trackers` in trainer_state.json) and the run
directory keeps them in `trackers.json`, so a resumed run, and a later evaluation of its model, continue
the same tracker runs.

The standard variables win over the config: WANDB_PROJECT, WANDB_NAME, WANDB_TAGS, WANDB_ENTITY,
WANDB_RUN_ID, WANDB_DIR and WANDB_MODE (offline: `wandb sync` later); MLFLOW_TRACKING_URI,
MLFLOW_EXPERIMENT_NAME, MLFLOW_RUN_ID and MLFLOW_TAGS (read by Accelerate's MLflowTracker).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from accelerate.tracking import MLflowTracker, WandBTracker

from engine.checkpoint import STATE_FILE, resolve_resume
from engine.config import ConfigError, RunConfig, to_dict

# tracker -> the module it needs and the extra that installs it
PACKAGES = {"tensorboard": ("tensorboard", "the tensorboard package"), "wandb": ("wandb", '".[wandb]"'),
            "mlflow": ("mlflow", '".[mlflow]"')}
EXTERNAL = ("wandb", "mlflow")  # the ones Accelerate runs; TensorBoard is RunLogger's
RUNS_FILE = "trackers.json"
DEFAULT_PROJECT = "rlhf-engine"
_VERSIONS = ("torch", "transformers", "accelerate", "peft", "datasets", "rlhf-engine", "wandb", "mlflow-skinny", "mlflow")


def installed(name: str) -> bool:
    return importlib.util.find_spec(PACKAGES[name][0]) is not None


def resolve(report_to: Sequence[str]) -> tuple[str, ...]:
    """`logging.report_to` -> the trackers to run, in a fixed order; "all" means those installed."""
    if "none" in report_to:
        return ()
    if "all" in report_to:
        return tuple(name for name in PACKAGES if installed(name))
    return tuple(name for name in PACKAGES if name in report_to)


def check(cfg: RunConfig) -> None:
    """Fail at start-up, before any model loads, when a named tracker cannot run here."""
    for name in resolve(cfg.logging.report_to):
        if not installed(name):
            raise ConfigError(f"logging.report_to names {name!r}, but the {PACKAGES[name][0]!r} package is not "
                              f"installed; install it with pip install -e {PACKAGES[name][1]} (or drop {name!r} from "
                              "logging.report_to)")
    if "mlflow" in resolve(cfg.logging.report_to):
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        # mlflow-skinny (the extra) has no SQL store, and MLflow 3's default store is sqlite:///mlflow.db
        if (not uri or uri.startswith(("sqlite:", "postgresql:", "mysql:", "mssql:"))) \
                and importlib.util.find_spec("sqlalchemy") is None:
            raise ConfigError(f"logging.report_to names 'mlflow' and MLFLOW_TRACKING_URI is "
                              f"{uri or 'unset (MLflow then uses sqlite:///mlflow.db)'}, a database store that needs "
                              "the full mlflow package (pip install mlflow); with mlflow-skinny, set "
                              "MLFLOW_TRACKING_URI to a tracking server (http://host:5000) or to a local store "
                              "(file:./mlruns, with MLFLOW_ALLOW_FILE_STORE=true)")


def log_with(cfg: RunConfig) -> list[str] | None:
    """What `Accelerator(log_with=...)` gets: None rather than an empty list, which Accelerate warns about."""
    return [name for name in resolve(cfg.logging.report_to) if name in EXTERNAL] or None


def start(accelerator, cfg: RunConfig, saved: dict | None = None) -> None:
    """Start (or, with the `saved` run ids of a checkpoint, continue) the tracker runs on the main process and
    log the resolved config, the git commit and the library versions. Errors of a tracker's own client (a
    server that cannot be reached, an MLflow store it refuses) become a ConfigError naming the tracker."""
    if not accelerator.log_with or not accelerator.is_main_process:
        return
    saved, log, env = saved or {}, cfg.logging, os.environ.get
    name = log.run_name or Path(cfg.output_dir).name
    tags = env("WANDB_TAGS").split(",") if env("WANDB_TAGS") else log.tags
    wandb_kwargs = {"name": env("WANDB_NAME") or name, "tags": [t.strip() for t in tags if t.strip()],
                    "entity": env("WANDB_ENTITY") or log.entity}
    if env("WANDB_RUN_ID") or saved.get("wandb"):
        wandb_kwargs.update(id=env("WANDB_RUN_ID") or saved["wandb"], resume="allow")
    if not env("WANDB_DIR"):
        wandb_kwargs["dir"] = cfg.output_dir  # <output_dir>/wandb/, beside the run's other files
    mlflow_kwargs = {"run_id": saved.get("mlflow"), "run_name": name, "tags": {tag: "" for tag in log.tags} or None}
    # the W&B project, and the MLflow experiment unless MLFLOW_EXPERIMENT_NAME is set
    project = env("WANDB_PROJECT") or log.project or DEFAULT_PROJECT
    try:
        accelerator.init_trackers(project, init_kwargs={"wandb": wandb_kwargs, "mlflow": mlflow_kwargs})
        values = run_config(cfg)
        for tracker in accelerator.trackers:
            tracker.store_init_configuration(_new_params(tracker, values))
    except Exception as error:  # noqa: BLE001 - a client error at start-up is a setting to fix
        accelerator.trackers.clear()  # what did start ends at exit, through the clients' own atexit hooks
        raise ConfigError(f"logging.report_to={list(log.report_to)}: a tracker could not start "
                          f"({type(error).__name__}: {error})") from error
    record = {"trackers": run_ids(accelerator), "wandb": {"project": project, **{k: wandb_kwargs.get(k) for k in
                                                                           ("entity", "dir")}}}
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow":
            import mlflow

            record["mlflow"] = {"tracking_uri": mlflow.get_tracking_uri(),
                                "experiment": mlflow.get_experiment(tracker.active_run.info.experiment_id).name}
    Path(cfg.output_dir, RUNS_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _new_params(tracker, values: dict[str, Any]) -> dict[str, Any]:
    """MLflow refuses to change a param, so a continued run keeps the values it started with (a resume that
    raises max_steps, say); W&B config values may change."""
    if tracker.name != "mlflow":
        return values
    import mlflow

    logged = mlflow.get_run(tracker.active_run.info.run_id).data.params
    return {key: value for key, value in values.items() if key not in logged}


def saved_run_ids(cfg: RunConfig) -> dict[str, str]:
    """The tracker run ids in the checkpoint that `checkpoint.resume_from` will load ({} for a fresh start)."""
    path, _ = resolve_resume(cfg.output_dir, cfg.checkpoint.resume_from)
    return json.loads((path / STATE_FILE).read_text()).get("trackers", {}) if path is not None else {}


def run_ids(accelerator) -> dict[str, str]:
    """The id of each started tracker run, for the checkpoint: what `start(saved=...)` continues."""
    ids = {}
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            ids["wandb"] = tracker.run.id
        elif tracker.name == "mlflow":
            ids["mlflow"] = tracker.active_run.info.run_id
    return ids


def log(accelerator, values: dict[str, float], step: int) -> None:
    """`accelerator.log`, with MLflow's metric names written with "." for "/": its file store keeps a metric in
    a file of that path, so `loss` and `loss/nll` could not both be there."""
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow":
            tracker.log({key.replace("/", "."): value for key, value in values.items()}, step=step)
        else:
            tracker.log(values, step=step)


def log_table(trackers, name: str, columns: list[str], rows: list[list], step: int | None) -> None:
    """A table of rows at `step`: a W&B Table under `name`; an MLflow artifact `<name>/step_<N>.json` (with no
    step `<name>/<name>.json`) in pandas' "split" layout (`{"columns": [...], "data": [[...], ...]}`)."""
    for tracker in trackers:
        if tracker.name == "wandb":
            tracker.log_table(name, columns=columns, data=rows, step=step)
        elif tracker.name == "mlflow":
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp, f"step_{step}.json" if step is not None else f"{Path(name).name}.json")
                path.write_text(json.dumps({"columns": columns, "data": rows}))
                tracker.log_artifact(str(path), artifact_path=name)


def attach(trackers, paths: Sequence[str | Path], folder: str) -> None:
    """Files as artifacts of the tracker runs: MLflow under `<folder>/`, W&B as one artifact of type `folder`."""
    for tracker in trackers:
        if tracker.name == "wandb":
            import wandb

            artifact = wandb.Artifact(f"{folder}-{tracker.run.id}", type=folder)
            for path in paths:
                artifact.add_file(str(path))
            tracker.run.log_artifact(artifact)
        elif tracker.name == "mlflow":
            for path in paths:
                tracker.log_artifact(str(path), artifact_path=folder)


@contextmanager
def reopened(run_dir: str | Path) -> Iterator[list]:
    """The tracker runs of the training run in `run_dir` (its trackers.json), continued for more entries (an
    evaluation of its model, the quickstart report) and ended again; [] when it used none, or when the
    package of one it used is no longer installed (said in a line)."""
    path = Path(run_dir, RUNS_FILE)
    saved = json.loads(path.read_text()) if path.is_file() else {"trackers": {}}
    trackers = []
    for name, run_id in saved["trackers"].items():
        if not installed(name):
            print(f"{path}: the run also logged to {name}, which is not installed here; not attached there")
            continue
        if name == "wandb":
            options = {k: v for k, v in saved["wandb"].items() if k != "project" and v is not None}
            trackers.append(WandBTracker(saved["wandb"]["project"], id=run_id, resume="allow", **options))
        else:
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                import mlflow

                mlflow.set_tracking_uri(saved["mlflow"]["tracking_uri"])
            trackers.append(MLflowTracker(saved["mlflow"]["experiment"], run_id=run_id))
    for tracker in trackers:
        tracker.start()
    try:
        yield trackers
    finally:
        for tracker in trackers:
            tracker.finish()


def finish(accelerator, failed: bool = False) -> None:
    """End the tracker runs (without `accelerator.end_training`, which would also end the process group)."""
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow" and failed:
            import mlflow

            mlflow.end_run(status="FAILED")  # a resumed run sets it running again
        elif tracker.name == "wandb" and failed:
            tracker.run.finish(exit_code=1)
        else:
            tracker.finish()
    accelerator.trackers.clear()


def run_config(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as dotted keys, with `git.commit` and `versions.<package>`."""
    flat: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(item, f"{prefix}{key}.")
        else:
            flat[prefix.rstrip(".")] = value

    walk(to_dict(cfg), "")
    flat["git.commit"] = _git_commit()
    for package in _VERSIONS:
        try:
            flat[f"versions.{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return flat


def _git_commit() -> str | None:
    """The engine checkout's commit, "+dirty" with uncommitted changes; None outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty else "")
