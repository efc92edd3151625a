"""Reference log-probs for KL-regularised objectives (DPO and friends), three ways chosen by `reference.mode`:

- `copy`: a separate frozen copy of the starting model (same dtype and quantisation), in eval mode.
- `disabled`: the policy itself with its LoRA adapter switched off (`PeftModel.disable_adapter()`); the base
  weights never train, so this is exactly the starting model with no second copy in memory.
- `precomputed`: per-sequence reference log-probs of the whole training set computed once before training
  and cached on disk as safetensors, keyed by a fingerprint of the model and the data; each batch then looks
  its rows up by a `row_index` column, and no reference model stays in memory while training.

A preference batch holds 2B rows, chosen first then rejected (the collator's layout); `Reference.logps`
returns `(ref_chosen_logps, ref_rejected_logps)`, each (B,).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from data.build import rows_fingerprint
from engine.config import REFERENCE_MODES, ModelConfig, ReferenceConfig
from engine.logprobs import label_logprobs
from engine.models import has_adapter, load_policy, reference_model_config
from engine.tiny import cache_root, resolve_model_path
from losses import LOGPS_REDUCTIONS, reduce_logprobs, sequence_sums, split_pairs


class Reference:
    """Reference log-probs for batches; see the module docstring for the modes."""

    mode: str

    def logprobs(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Per-token reference log-probs and mask, each (N, T-1), under no_grad."""
        raise NotImplementedError(f"reference.mode={self.mode} keeps per-sequence log-probs only")

    def logps(
        self, batch: Mapping[str, Tensor], *, reduction: str = "sum", split: str = "train"
    ) -> tuple[Tensor, Tensor]:
        """Per-sequence reference log-probs of a preference batch: (chosen (B,), rejected (B,))."""
        logprobs, mask = self.logprobs(batch)
        return split_pairs(reduce_logprobs(logprobs, mask, reduction, seq_lens=batch.get("seq_lens")))

    def precompute(
        self,
        dataset,
        collate_fn: Callable,
        *,
        batch_size: int = 8,
        split: str = "train",
        extra_key: Mapping | None = None,
    ) -> Path | None:
        """Prepare `dataset` before training; only the precomputed mode has work to do."""
        return None


class ModelReference(Reference):
    """A model that computes reference log-probs on the fly: a frozen copy, or the policy with its adapter off."""

    def __init__(self, model, *, disable_adapter: bool = False):
        self.model = model
        self.disable_adapter = disable_adapter
        self.mode = "disabled" if disable_adapter else "copy"

    @torch.no_grad()
    def logprobs(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        model = getattr(self.model, "module", self.model)  # the peft model inside a DDP wrapper
        was_training = model.training
        model.eval()  # no dropout in the reference, whatever state the policy is in
        try:
            with model.disable_adapter() if self.disable_adapter else contextlib.nullcontext():
                return label_logprobs(model, batch)
        finally:
            model.train(was_training)


class PrecomputedReference(Reference):
    """Per-sequence reference log-probs read from a cache on disk, by the batch's `row_index` (B,) column.

    `precompute` runs the reference model over a dataset once; the main process writes the cache and the
    others wait for it (accelerate's `main_process_first`), and a file lock keeps separate runs that share a
    cache directory from computing the same file twice. The cache stores, per pair, the summed log-probs
    and the token counts of chosen and rejected, so both reductions (sum, mean) come from one file.
    """

    mode = "precomputed"

    def __init__(self, model_key: Mapping, make_source: Callable[[], ModelReference], cache_dir):
        self.model_key = dict(model_key)
        self.make_source = make_source
        self.cache_dir = Path(cache_dir)
        self.tables: dict[str, dict[str, Tensor]] = {}

    def cache_path(self, dataset, extra_key: Mapping | None = None) -> Path:
        key = {"model": self.model_key, "data": rows_fingerprint(dataset), "extra": dict(extra_key or {})}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
        return self.cache_dir / f"ref-logps-{digest}.safetensors"

    def precompute(
        self,
        dataset,
        collate_fn: Callable,
        *,
        batch_size: int = 8,
        split: str = "train",
        extra_key: Mapping | None = None,
    ) -> Path:
        """Compute (or find) the cache for `dataset` and load it as the table of `split`.

        `extra_key` joins the fingerprint: pass what shapes the tokenised rows but is not in the data
        fingerprint (max_length, max_prompt_length, the template).
        """
        from accelerate import PartialState
        from filelock import FileLock
        from safetensors.torch import load_file

        path = self.cache_path(dataset, extra_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with PartialState().main_process_first(), FileLock(f"{path}.lock"):
            if not path.exists():
                self._write(path, dataset, collate_fn, batch_size)
        table = load_file(path)
        if len(table["chosen_logps"]) != len(dataset):
            raise RuntimeError(f"{path} holds {len(table['chosen_logps'])} rows, the dataset {len(dataset)}; delete it")
        self.tables[split] = table
        return path

    def _write(self, path: Path, dataset, collate_fn: Callable, batch_size: int) -> None:
        from safetensors.torch import save_file

        source = self.make_source()  # a copy loaded here is dropped when this returns
        device = next(source.model.parameters()).device
        sums, counts = [], []
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in collate_fn(rows).items()}
            total, count = sequence_sums(*source.logprobs(batch), batch.get("seq_lens"))
            sums.append(split_pairs(total.float().cpu()))
            counts.append(split_pairs(count.cpu()))
        table = {
            "chosen_logps": torch.cat([c for c, _ in sums]),
            "rejected_logps": torch.cat([r for _, r in sums]),
            "chosen_tokens": torch.cat([c for c, _ in counts]),
            "rejected_tokens": torch.cat([r for _, r in counts]),
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(table, tmp, metadata={"model": json.dumps(self.model_key, default=str), "rows": str(len(dataset))})
        os.replace(tmp, path)

    def logps(
        self, batch: Mapping[str, Tensor], *, reduction: str = "sum", split: str = "train"
    ) -> tuple[Tensor, Tensor]:
        if reduction not in LOGPS_REDUCTIONS:
            raise ValueError(f"reduction must be one of {LOGPS_REDUCTIONS}, got {reduction!r}")
        if split not in self.tables:
            raise RuntimeError(
                f"reference.mode=precomputed has no log-probs for split {split!r}; call "
                f"reference.precompute(dataset, collate_fn, split={split!r}) before training"
            )
        if "row_index" not in batch:
            raise KeyError("reference.mode=precomputed looks rows up by a 'row_index' column; add it with add_row_index")
        table, index = self.tables[split], batch["row_index"].long().cpu()
        device = batch["input_ids"].device if "input_ids" in batch else index.device
        out = []
        for side in ("chosen", "rejected"):
            logps = table[f"{side}_logps"][index]
            if reduction == "mean":
                logps = logps / table[f"{side}_tokens"][index].clamp(min=1)
            out.append(logps.to(device))
        return out[0], out[1]


def make_reference(ref_cfg: ReferenceConfig, policy_model_cfg: ModelConfig, policy) -> Reference:
    """The reference of `ref_cfg.mode` for a policy loaded from `policy_model_cfg`.

    Create it before training starts: `precomputed` (without an adapter) and `copy` load the starting
    weights from `reference.name_or_path`, defaulting to the policy's own path.
    """
    if ref_cfg.mode not in REFERENCE_MODES:
        raise ValueError(f"reference.mode={ref_cfg.mode!r} is not one of {REFERENCE_MODES}")
    model_cfg = reference_model_config(policy_model_cfg, ref_cfg.name_or_path)
    if ref_cfg.mode == "disabled":
        if not has_adapter(getattr(policy, "module", policy)):
            raise ValueError(
                "reference.mode=disabled switches the policy's LoRA adapter off, but the policy has none; "
                "set model.lora.enabled=true or reference.mode=copy"
            )
        if ref_cfg.name_or_path not in (None, policy_model_cfg.name_or_path):
            raise ValueError("reference.mode=disabled uses the policy's own base; unset reference.name_or_path")
        return ModelReference(policy, disable_adapter=True)
    if ref_cfg.mode == "copy":
        return ModelReference(_load_copy(model_cfg, policy))

    use_adapter = has_adapter(getattr(policy, "module", policy)) and ref_cfg.name_or_path in (
        None,
        policy_model_cfg.name_or_path,
    )

    def make_source() -> ModelReference:
        if use_adapter:
            return ModelReference(policy, disable_adapter=True)
        return ModelReference(_load_copy(model_cfg, policy))

    cache_dir = ref_cfg.cache_dir or cache_root() / "reference"
    return PrecomputedReference(model_fingerprint(model_cfg), make_source, cache_dir)


def _load_copy(model_cfg: ModelConfig, policy):
    model = load_policy(model_cfg, for_training=False)
    if model_cfg.quant.bits is None:
        model.to(next(policy.parameters()).device)
    return model


def model_fingerprint(model_cfg: ModelConfig) -> dict:
    """What determines a reference model's outputs: its weights (by path, and for a local directory the
    config and weight files' sizes and times), dtype, attention implementation and quantisation."""
    path = resolve_model_path(model_cfg.name_or_path)
    files = {}
    if Path(path).is_dir():
        for f in sorted(Path(path).iterdir()):
            if f.suffix in (".json", ".safetensors", ".bin"):
                stat = f.stat()
                files[f.name] = [stat.st_size, stat.st_mtime_ns]
    return {
        "path": str(Path(path).resolve()) if Path(path).exists() else path,
        "files": files,
        "dtype": model_cfg.dtype,
        "attn_implementation": model_cfg.attn_implementation,
        "quant": repr(model_cfg.quant) if model_cfg.quant.bits else None,
    }


def add_row_index(dataset, column: str = "row_index"):
    """The dataset with a `row_index` column 0..N-1, the key `PrecomputedReference.logps` looks rows up by."""
    if column in getattr(dataset, "column_names", ()):
        return dataset
    return dataset.add_column(column, list(range(len(dataset))))

