"""Fixtures shared by the engine tests, and the CI-sized quickstart started in the background."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data import DataConfig, build_datasets, make_collator
from engine import loaders, models
from engine.tiny import resolve_model_path


@pytest.fixture
def no_model_load(monkeypatch):
    """Any run that loads a policy or reward model, or gets as far as an optimizer step, fails the test: what
    a start-up check must refuse is refused before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_policy", refuse)
    monkeypatch.setattr(models, "load_reward_model", refuse)
    monkeypatch.setattr(loaders, "optimizer_steps", refuse)


def warmup_cosine(steps: int, warmup: int = 10):
    """A LambdaLR factor: linear warm-up over `warmup` steps, then cosine to 0 at `steps`."""
    return lambda s: (s + 1) / (warmup + 1) if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))


def train_plainly(model, rows, collate, *, steps: int, lr: float, loss) -> None:
    """`steps` AdamW steps at `lr` (warm-up, then cosine) on batches of 16 rows drawn with seed 0; `loss(batch)`
    is the scalar to minimise. The fixtures' models train with this loop, not the engine's."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss(collate([rows[i] for i in torch.randint(len(rows), (16,), generator=generator).tolist()])).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()


@pytest.fixture(scope="session")
def sft_policy(tmp_path_factory) -> Path:
    """The tiny model after 150 steps of plain SFT on the sorting task: it answers in the right format with
    some letters out of place, so the judge has room to go up (a random model never earns any credit)."""
    out = tmp_path_factory.mktemp("sft")
    path = resolve_model_path("tiny")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    rows = build_datasets("sft", DataConfig(path="synthetic"), tokenizer, log=None).train
    collate = make_collator("sft", tokenizer)
    train_plainly(model, rows, collate, steps=150, lr=2e-3,
                  loss=lambda batch: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                           labels=batch["labels"]).loss)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# The CI-sized quickstart (test_pipeline.py) is the suite's longest job: a chain of single-threaded engine
# commands, about eight minutes in one process. When its tests are collected it starts at once in a process
# of its own, on the core the single-threaded suite leaves idle, and its tests are moved to the end of the
# run, where they wait for it. Its steps are seeded and single-threaded, so running beside the suite changes
# their time, not their results.
QUICKSTART = pytest.StashKey[tuple]()
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected what they deselect
def pytest_collection_modifyitems(session, config, items):
    pipeline = [item for item in items if item.path.name == "test_pipeline.py"]
    if not pipeline or config.option.collectonly:
        return
    items[:] = [item for item in items if item.path.name != "test_pipeline.py"] + pipeline
    folder = Path(tempfile.mkdtemp(prefix="quickstart-ci-"))
    log = (folder / "pipeline.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "engine.pipeline", "--out", str(folder / "run"), "--ci",
                                "--seed", "0", "--jobs", "1"], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env=os.environ | {"PYTHONUNBUFFERED": "1"}, start_new_session=True)
    log.close()
    config.stash[QUICKSTART] = (process, folder)


def pytest_unconfigure(config):
    process, folder = config.stash.get(QUICKSTART, (None, None))
    if process is not None:
        if process.poll() is None:  # the suite stopped first: end the pipeline and the steps it started
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def background_quickstart(request) -> tuple[Path, str]:
    """The background quickstart's run directory and printed output, once it has finished (exit status 0)."""
    process, folder = request.config.stash[QUICKSTART]
    process.wait()
    output = (folder / "pipeline.log").read_text()
    assert process.returncode == 0, output[-4000:]
    return folder / "run", output
