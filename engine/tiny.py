"""The built-in tiny model: a small Llama built from configs/tiny/model.json with seeded random weights and
the locally trained tiny tokenizer, so every config runs on a CPU-only machine with no network.

`model.name_or_path: tiny` (or `tiny-reward`, or the path of a model config JSON) resolves to a build cached
under `$RLHF_ENGINE_CACHE/tiny/` (default `<repo>/.cache/tiny/`); anything else is a hub id or local path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO_ROOT / "configs" / "tiny" / "model.json"
TINY_NAMES = {"tiny": "causal", "tiny-causal": "causal", "tiny-reward": "reward"}
KINDS = ("causal", "reward")
_BUILD_FORMAT = "1"  # bump when the build itself changes, so stale cached builds are not reused
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def cache_root() -> Path:
    """Where the engine caches derived files (tiny builds, precomputed reference log-probs)."""
    return Path(os.environ.get("RLHF_ENGINE_CACHE") or REPO_ROOT / ".cache")


def build_tiny_model(
    out_dir: str | os.PathLike, *, kind: str = "causal", seed: int = 0, config_path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32, device: str = "cpu",
) -> Path:
    """Build the tiny model and its tokenizer into `out_dir` with `save_pretrained` (safetensors).

    Plain `AutoModelForCausalLM.from_pretrained(out_dir)` loads a `kind="causal"` build and
    `AutoModelForSequenceClassification.from_pretrained(out_dir)` a `kind="reward"` one (one output, pad_token_id
    set). The build is written into a temporary directory beside `out_dir` and moved into place with one
    `os.replace`, so a reader never sees half a model; if another process finished the same build first, its
    copy is kept and this one discarded. `dtype` and `device` are where the random weights are drawn and how
    they are saved: a model of billions of parameters (benchmarks/gpu_check.py) is drawn on the GPU in bf16.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from data.tiny_tokenizer import build_tokenizer

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; pick a new directory for the tiny model")
    spec = _read_model_json(Path(config_path) if config_path else TINY_CONFIG)

    tokenizer = build_tokenizer()
    # a config may give a larger vocabulary (as real models pad theirs): the tokenizer's ids come first
    vocab_size = spec.pop("vocab_size", len(tokenizer))
    if vocab_size < len(tokenizer):
        raise ValueError(f"{config_path or TINY_CONFIG}: vocab_size {vocab_size} is smaller than the tokenizer's "
                         f"{len(tokenizer)}")
    config = AutoConfig.for_model(
        spec.pop("model_type"),
        **spec,
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )
    auto_cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = auto_cls.from_config(config, dtype=dtype)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not (out_dir / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_path(name_or_path: str | os.PathLike, *, seed: int = 0) -> str:
    """Map `model.name_or_path` to something `from_pretrained` accepts, building the tiny model if needed.

    "tiny" / "tiny-reward" / a model-config JSON file -> a cached build (built once, safe when several
    processes race); an existing local directory or a hub id ("org/name") -> unchanged; anything else ->
    FileNotFoundError naming `model.name_or_path`.
    """
    name = os.fspath(name_or_path)
    if name in TINY_NAMES:
        return str(_cached_build(TINY_CONFIG, TINY_NAMES[name], seed))
    path = Path(name).expanduser()
    if path.suffix == ".json" and path.is_file():
        return str(_cached_build(path, "causal", seed))
    if path.exists():
        return str(path)
    first = Path(name).parts[0] if Path(name).parts else name
    if not _HUB_ID.match(name) or Path(first).is_dir():
        raise FileNotFoundError(
            f"model.name_or_path={name!r} is not an existing local path nor a hub id like 'org/name'; "
            "fix the path, or use 'tiny' for the built-in CPU model"
        )
    return name


def _read_model_json(path: Path) -> dict:
    spec = json.loads(path.read_text())
    spec = {k: v for k, v in spec.items() if not k.startswith("_")}
    if "model_type" not in spec:
        raise ValueError(f"{path} needs a 'model_type' key (for example 'llama')")
    return spec


def _cached_build(config_path: Path, kind: str, seed: int) -> Path:
    import data.tiny_tokenizer as tiny_tokenizer

    # The tokenizer is trained on the synthetic corpus, so a change to either source is a new build.
    sources = [Path(tiny_tokenizer.__file__), Path(tiny_tokenizer.__file__).with_name("synthetic.py")]
    key = hashlib.sha256(f"{_BUILD_FORMAT}|{kind}|{seed}|".encode() + config_path.read_bytes())
    for source in sources:
        if source.exists():
            key.update(source.read_bytes())
    out_dir = cache_root() / "tiny" / f"{config_path.stem}-{kind}-seed{seed}-{key.hexdigest()[:12]}"
    if not (out_dir / "config.json").exists():
        try:
            build_tiny_model(out_dir, kind=kind, seed=seed, config_path=config_path)
        except FileExistsError:
            if not (out_dir / "config.json").exists():
                raise
    return out_dir
