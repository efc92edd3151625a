"""W&B and MLflow runs through the real clients, offline: W&B in offline mode writes its run directory, which is
read back record by record; MLflow logs to a local file store, read back with MlflowClient. A run stopped
after a checkpoint and resumed continues the same tracker runs, each step logged once; a tracker whose package
is missing stops the run at start-up."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient  # the wandb and mlflow extras are part of dev
from wandb.proto import wandb_internal_pb2

from engine import lifecycle, optim
from engine.config import ConfigError, load_config
from tests.engine.runs import REPO_ROOT, TINY, run
from tests.engine.test_ppo_runs import SMALL as PPO_SMALL
from tests.engine.test_ppo_runs import run_ppo

BOTH = "logging.report_to=[tensorboard,wandb,mlflow]"


def offline_env(root: Path) -> dict[str, str]:
    """W&B offline with every directory under `root` and nothing sent; MLflow on a file store under `root`."""
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true",
           "WANDB_DISABLE_CODE": "true", "WANDB_INIT_TIMEOUT": "60", "WANDB_CONFIG_DIR": str(root / "wandb-config"),
           "WANDB_CACHE_DIR": str(root / "wandb-cache"), "WANDB_DATA_DIR": str(root / "wandb-data"),
           "MLFLOW_TRACKING_URI": (root / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    return env


UNSET = ("WANDB_DIR", "WANDB_PROJECT", "WANDB_NAME", "WANDB_TAGS", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_API_KEY",
         "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TAGS", "MLFLOW_NESTED_RUN")


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    for key in UNSET:
        monkeypatch.delenv(key, raising=False)
    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    return tmp_path


def wandb_records(run_dir: Path) -> list:
    """Every record of a W&B run file (`run-<id>.wandb`): the W&B header (7 bytes), then LevelDB-log framing
    (32 KiB blocks of chunks: crc32 4 bytes, length 2, type 1 = full, 2 first, 3 middle, 4 last), each whole
    record a wandb_internal_pb2.Record."""
    (path,) = run_dir.glob("run-*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(run_dir: Path) -> dict:
    """The run's id, name, tags and project, its config, and its history as {step: {key: value}}."""
    out = {"config": {}, "history": {}}
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(id=record.run.run_id, name=record.run.display_name, tags=list(record.run.tags),
                       project=record.run.project)
            out["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            out["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            row = out["history"].setdefault(record.history.step.num, {})
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                assert key not in row or key.startswith("_"), f"step {record.history.step.num}: {key} logged twice"
                row[key] = json.loads(item.value_json)
    return out


def jsonl(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    merged: dict[int, dict] = {}
    for row in rows:
        merged.setdefault(row["step"], {}).update(row)
    return merged


@pytest.fixture(scope="module")
def tracked_ppo(tmp_path_factory) -> Path:
    """Two PPO iterations logging to TensorBoard, W&B (offline) and MLflow (a file store), with samples."""
    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as patch:
        for key in UNSET:
            patch.delenv(key, raising=False)
        for key, value in offline_env(root).items():
            patch.setenv(key, value)
        run_ppo(root / "run", *PPO_SMALL, "max_steps=2", BOTH, "logging.project=tracking-test",
                "logging.run_name=ppo-two-steps", "logging.tags=[tiny,ppo]", "ppo.log_samples=3",
                "logging.every_steps=1")
    return root


def test_wandb_offline_run_holds_the_scalars_config_and_samples_table(tracked_ppo):
    (run_dir,) = (tracked_ppo / "run" / "wandb").glob("offline-run-*")
    logged = wandb_run(run_dir)
    assert (logged["project"], logged["name"], logged["tags"]) == ("tracking-test", "ppo-two-steps", ["tiny", "ppo"])
    config = logged["config"]
    assert config["ppo.rollout_batch_size"] == 8 and config["objective.name"] == "ppo" and config["max_steps"] == 2
    assert config["versions.torch"] and config["versions.accelerate"] and "git.commit" in config
    expected = jsonl(tracked_ppo / "run")
    assert sorted(logged["history"]) == sorted(expected) == [1, 2]
    for step, row in expected.items():
        for key in ("loss/total", "objective/kl", "objective/score/judge", "lr"):
            assert logged["history"][step][key] == pytest.approx(row[key], rel=1e-9), (step, key)
    # the samples table, written as a W&B Table file in the run's media, one per logged iteration
    table = logged["history"][2]
    assert table["samples/_type"] == "table-file" and table["samples/nrows"] == 3
    saved = json.loads((run_dir / "files" / table["samples/path"]).read_text())
    assert saved["columns"] == ["prompt", "response", "score"] and len(saved["data"]) == 3
    assert all(prompt.startswith("Sort the letters") and isinstance(score, float) for prompt, _, score in saved["data"])


def test_mlflow_run_holds_the_metrics_params_and_samples_artifacts(tracked_ppo):
    client = MlflowClient(tracking_uri=(tracked_ppo / "mlruns").as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "tracking-test"]
    (found,) = client.search_runs([experiment.experiment_id])
    ids = json.loads((tracked_ppo / "run" / "trackers.json").read_text())["trackers"]
    assert found.info.run_id == ids["mlflow"] and found.info.run_name == "ppo-two-steps"
    assert found.info.status == "FINISHED" and {"tiny", "ppo"} <= set(found.data.tags)
    params = found.data.params
    assert params["ppo.rollout_batch_size"] == "8" and params["objective.name"] == "ppo"
    assert params["versions.torch"] and "git.commit" in params
    expected = jsonl(tracked_ppo / "run")
    for key in ("loss/total", "objective/kl", "lr"):
        history = client.get_metric_history(found.info.run_id, key.replace("/", "."))
        assert [(m.step, m.value) for m in history] == [(s, pytest.approx(expected[s][key], rel=1e-6)) for s in (1, 2)]
    samples = [a.path for a in client.list_artifacts(found.info.run_id, "samples")]
    assert samples == ["samples/step_1.json", "samples/step_2.json"]
    local = client.download_artifacts(found.info.run_id, "samples/step_2.json", str(tracked_ppo / "download"))
    table = json.loads(Path(local).read_text())
    assert table["columns"] == ["prompt", "response", "score"] and len(table["data"]) == 3


def test_a_run_stopped_after_a_checkpoint_and_resumed_continues_the_same_tracker_runs(offline):
    out = offline / "run"
    settings = ["max_steps=4", "checkpoint.every_steps=0", "checkpoint.resume_from=latest", BOTH,
                "logging.project=resume-test"]
    step_fn, calls = optim.optimizer_step, []

    def signalled_in_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return step_fn(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(lifecycle.RunStopped, match="after step 2"):
        patch.setattr(optim, "optimizer_step", signalled_in_step_2)
        run("sft.yaml", out, *settings)
    first = json.loads((out / "trackers.json").read_text())["trackers"]
    state = json.loads((out / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state["trackers"] == first and set(first) == {"wandb", "mlflow"}

    run("sft.yaml", out, *settings)
    assert json.loads((out / "trackers.json").read_text())["trackers"] == first

    # W&B offline writes one directory per process start; both are the one run, and together they hold
    # steps 1-4 once each (a step logged twice fails inside wandb_run)
    parts = [wandb_run(d) for d in sorted((out / "wandb").glob("offline-run-*"))]
    assert len(parts) == 2 and {part["id"] for part in parts} == {first["wandb"]}
    steps = [step for part in parts for step in part["history"] if "loss" in part["history"][step]]
    assert steps == [1, 2, 3, 4]

    client = MlflowClient(tracking_uri=(offline / "mlruns").as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "resume-test"]
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_id == first["mlflow"] and found.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(found.info.run_id, "loss")] == [1, 2, 3, 4]


MISSING = """
import sys
sys.modules[{package!r}] = None  # `import {package}` fails and find_spec finds nothing: as if not installed
from engine import models
def refuse(*args, **kwargs):
    raise AssertionError("a model was loaded")
models.load_policy = models.load_reward_model = refuse
from engine.train import cli
sys.argv = ["engine/train.py", "--config", {config!r}, "output_dir=" + {out!r}, "logging.report_to=" + {package!r}]
cli()
"""


@pytest.mark.parametrize("package", ["wandb", "mlflow"])
def test_a_tracker_whose_package_is_missing_stops_at_start_up(tmp_path, package):
    code = MISSING.format(package=package, config=str(TINY / "sft.yaml"), out=str(tmp_path / "run"))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **offline_env(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert f"logging.report_to names '{package}'" in done.stderr
    assert f'pip install -e ".[{package}]"' in done.stderr


def test_report_to_names_are_checked_and_resolved(monkeypatch):
    from engine import tracking

    assert load_config(TINY / "sft.yaml").logging.report_to == ("tensorboard",)
    assert load_config(TINY / "sft.yaml", ["logging.report_to=wandb"]).logging.report_to == ("wandb",)
    assert tracking.resolve(("all",)) == ("tensorboard", "wandb", "mlflow")
    assert tracking.resolve(("none",)) == ()
    with pytest.raises(ConfigError, match="logging.report_to='wanb' is not one of .*did you mean 'wandb'"):
        load_config(TINY / "sft.yaml", ["logging.report_to=[wanb]"])
    with pytest.raises(ConfigError, match="names 'none' with other trackers"):
        load_config(TINY / "sft.yaml", ["logging.report_to=[none,wandb]"])
    # mlflow-skinny has no SQL store, MLflow 3's default: told to set MLFLOW_TRACKING_URI
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI is unset.*file:./mlruns"):
        tracking.check(load_config(TINY / "sft.yaml", ["logging.report_to=mlflow"]))


def test_an_evaluation_of_a_tracked_run_adds_its_samples_and_json_to_that_run(offline):
    from engine import evaluate

    out = offline / "run"
    run("sft.yaml", out, "max_steps=2", BOTH, "logging.project=eval-test")
    ids = json.loads((out / "trackers.json").read_text())["trackers"]
    evaluate.main(["--model", str(out / "final"), "--prompts", "synthetic", "--pairs", "none", "--judge", "auto",
                   "--num-prompts", "4", "--samples", "3", "--max-new-tokens", "4", "--out", str(offline / "eval.json")])

    client = MlflowClient(tracking_uri=(offline / "mlruns").as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "eval-test"]
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_id == ids["mlflow"]
    assert [a.path for a in client.list_artifacts(found.info.run_id, "evaluation")] == [
        "evaluation/eval.json", "evaluation/samples"]
    local = client.download_artifacts(found.info.run_id, "evaluation/samples/samples.json", str(offline / "dl"))
    table = json.loads(Path(local).read_text())
    assert table["columns"][0] == "prompt" and "response" in table["columns"] and len(table["data"]) == 3

    # W&B: a later part of the same run holds the table, and the JSON is in an artifact of type evaluation
    parts = [(d, wandb_run(d)) for d in sorted((out / "wandb").glob("offline-run-*"))]
    assert len(parts) == 2 and {part["id"] for _, part in parts} == {ids["wandb"]}
    later_dir, later = parts[1]
    (row,) = later["history"].values()
    assert row["evaluation/samples/_type"] == "table-file" and row["evaluation/samples/nrows"] == 3
    artifacts = [r.artifact for r in wandb_records(later_dir) if r.WhichOneof("record_type") == "artifact"]
    assert any(a.type == "evaluation" and any(f.path == "eval.json" for f in a.manifest.contents) for a in artifacts)
