"""What every benchmark shares: the machine, peak RSS, the matmul peak, model FLOPs counted from the forwards
that really ran, per-step timings, medians, and the table/JSON output.

FLOPs follow the convention of the issue (and of PaLM's appendix B): a forward costs 2 x the matmul parameters
per token plus 4 x layers x width x context per token for attention scores and their weighted sum; a training
forward and backward cost 3 x that (6N), or 2 x with LoRA (4N: no weight gradients of the frozen base). The LM
head is counted only on the positions where it ran (`head_positions`): every real token when the model returns
(B, T, V) logits, K when it returns (K, V) logits (the engine's boolean `logits_to_keep`), and for TRL's fused
LM head (an output with `label_mask` and no logits) every real token on CPU, where TRL scores every position,
or the labelled ones on CUDA/XPU, where its Triton path scores only those. A classifier's `score` head runs at
every position before pooling. Recomputation (TRL's fused head runs its matmul again in backward, gradient
checkpointing reruns the layers) is not counted: each forward's FLOPs count once, as in PaLM's MFU.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

# ---- machine and memory ----------------------------------------------------------------------------


def machine() -> dict:
    """CPU model, core count and library versions, for the header of every result."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "accelerate", "peft", "datasets", "trl"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional library is reported, not fatal
            versions[name] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "loadavg": os.getloadavg()[0], "versions": versions}


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """The process's peak resident set (VmHWM) since start or since the last `reset_peak_rss`."""
    return _status_kib("VmHWM") / 1024


def reset_peak_rss() -> None:
    """Start a new peak window: writing 5 to clear_refs sets VmHWM back to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued kernels, so a clock read after it times them (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(size: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> float:
    """FLOP/s of the best of `repeats` (size x size) @ (size x size) products on the current threads (or GPU)."""
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
    torch.mm(a, b)
    inner = max(1, int(2e9 // (2 * size**3)))  # about 2 GFLOP per timing, long enough for the clock
    if torch.device(device).type == "cuda":
        inner *= 100  # a GPU does 2 GFLOP in well under a millisecond
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2 * size**3 / best


def copy_bandwidth(device: str | torch.device = "cpu", mib: int = 256, repeats: int = 5) -> float:
    """Bytes/s moved by the best of `repeats` copies of a `mib` MiB buffer into another on the same device,
    counting the read and the write (2 x the buffer): the memory bandwidth a decoding step can hope for."""
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


# ---- FLOPs from the forwards that ran --------------------------------------------------------------


def _inner_model(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


@dataclass
class ModelShape:
    """Matmul parameters of a decoder: the body (every Linear in the layers) and the output head."""

    body: int
    head: int
    layers: int
    width: int
    vocab_head: bool = False  # the head is an LM head onto the vocabulary (not a score or value head)

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelShape:
        model = _inner_model(model)
        config = model.config
        head_names = ("lm_head", "score", "v_head", "value_head")
        body = head = 0
        vocab_head = False
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                weight = getattr(module, "base_layer", module).weight
                parts = name.split(".")
                if any(part in head_names for part in parts):
                    head += weight.shape[0] * weight.shape[1]
                    vocab_head = vocab_head or "lm_head" in parts
                elif "lora_" not in name:
                    body += weight.shape[0] * weight.shape[1]
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        width = config.num_attention_heads * head_dim
        return cls(body=body, head=head, layers=config.num_hidden_layers, width=width, vocab_head=vocab_head)


def head_positions(output, real: int, vocab_head: bool) -> int:
    """Positions at which the output head ran in a forward over `real` real tokens (see the module docstring)."""
    if not vocab_head:
        return real
    logits = getattr(output, "logits", None)
    if logits is not None and logits.dim() == 3:  # (B, T, V): every position, padding not counted
        return min(logits.shape[0] * logits.shape[1], real)
    if logits is not None and logits.dim() == 2:  # (K, V): the kept positions only
        return min(logits.shape[0], real)
    label_mask = getattr(output, "label_mask", None)
    if label_mask is not None and label_mask.device.type in ("cuda", "xpu"):
        return min(int(label_mask.sum()), real)
    return real


@dataclass
class FlopCounter:
    """Tokens and FLOPs of every forward of the hooked models, split by whether gradients flowed."""

    train_tokens: int = 0
    frozen_tokens: int = 0
    flops: float = 0.0
    head_positions: int = 0  # positions the LM heads ran at, every forward (trained or frozen) together
    handles: list = field(default_factory=list)

    def snapshot(self) -> tuple[int, int, float, int]:
        return self.train_tokens, self.frozen_tokens, self.flops, self.head_positions

    def watch(self, model: torch.nn.Module, *, lora: bool | None = None) -> torch.nn.Module:
        """Count this model's forwards from now on; returns the model."""
        shape = ModelShape.of(model)
        if lora is None:
            params = list(model.parameters())
            trainable = sum(p.numel() for p in params if p.requires_grad)
            lora = 0 < trainable < 0.5 * sum(p.numel() for p in params)
        state: dict = {}

        def before(module, args, kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is None:
                state.clear()
                return
            mask = kwargs.get("attention_mask")
            new = input_ids.shape[1]
            if mask is None:
                position_ids = kwargs.get("position_ids")
                lengths = _segment_lengths(position_ids) if position_ids is not None else [new] * len(input_ids)
                real, context = sum(lengths), sum(n * n for n in lengths)
            elif mask.dim() == 4:
                real, context = _mask_work(mask)
            else:
                mask = mask.bool()
                real = int(mask[:, -new:].sum())
                # each new token attends over its row's real context (the whole row, or the KV cache + itself)
                context = int((mask[:, -new:].sum(-1) * mask.sum(-1)).sum())
            state.update(real=real, context=context, grad=torch.is_grad_enabled() and module.training)

        def after(module, args, kwargs, output):
            if not state:
                return
            positions = head_positions(output, state["real"], shape.vocab_head)
            forward = 2 * shape.body * state["real"] + 2 * shape.head * positions \
                + 4 * shape.layers * shape.width * state["context"]
            if shape.vocab_head:
                self.head_positions += positions
            if state["grad"] and any(p.requires_grad for p in module.parameters()):
                self.flops += forward * (2 if lora else 3)
                self.train_tokens += state["real"]
            else:
                self.flops += forward
                self.frozen_tokens += state["real"]

        self.handles.append(model.register_forward_pre_hook(before, with_kwargs=True))
        self.handles.append(model.register_forward_hook(after, with_kwargs=True))
        return model


def _mask_work(mask: torch.Tensor) -> tuple[int, int]:
    """Real tokens and attention context of a (B, 1, T, T) mask (True or 0 = the query attends to the key), as
    in the engine's shared-prompt preference batches.

    A position is real when it attends to, or is attended by, another position (padding sees itself only). The
    context is 2 x the allowed (query, key) pairs among real positions - the real positions, which is n^2 for
    a causal sequence of n tokens, the convention of the 2-D case; a prompt shared by two responses counts its
    own P^2 once instead of twice, the work the layout saves."""
    allowed = (mask if mask.dtype == torch.bool else mask == 0)[:, 0]
    own = torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)
    others = allowed & ~own
    is_real = others.any(-1) | others.any(-2)  # (B, T)
    real = int(is_real.sum())
    pairs = int((allowed & is_real[:, :, None] & is_real[:, None, :]).sum())
    return real, 2 * pairs - real


def _segment_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of packed sequences: a new one starts wherever the position id is 0."""
    lengths = []
    for row in position_ids:
        starts = (row == 0).nonzero().flatten().tolist() + [len(row)]
        lengths += [b - a for a, b in zip(starts, starts[1:]) if b > a]
    return lengths


# ---- steps -----------------------------------------------------------------------------------------


@dataclass
class StepClock:
    """Wall time, tokens and FLOPs of each optimizer step (or PPO iteration), read at step ends.

    The first `warmup` steps are dropped; the peak RSS window opens at the end of the last of them."""

    counter: FlopCounter
    warmup: int = 1
    rows_per_step: int = 0
    steps: list[dict] = field(default_factory=list)
    _last: tuple | None = None
    _seen: int = 0
    rss_at_start: float = 0.0
    device: str = "cpu"
    """On "cuda" each tick waits for the GPU, and the peak memory is the GPU's (torch's allocator), not RSS."""
    info: dict = field(default_factory=dict)
    """What the run was set up with (e.g. the optimizer it built), copied into the summary as it is."""

    def tick(self, **extra) -> None:
        synchronize(self.device)
        now = (time.perf_counter(), *self.counter.snapshot())
        self._seen += 1
        if self._seen > self.warmup and self._last is not None:
            t0, train0, frozen0, flops0, head0 = self._last
            self.steps.append({"seconds": now[0] - t0, "train_tokens": now[1] - train0,
                               "frozen_tokens": now[2] - frozen0, "flops": now[3] - flops0,
                               "head_positions": now[4] - head0, **extra})
        if self._seen == self.warmup:
            reset_peak_rss()
            self.rss_at_start = rss_mib()
            if self.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
        self._last = (time.perf_counter(), *self.counter.snapshot())

    def summary(self, peak_flops: float) -> dict:
        """Medians over the timed steps: samples/s, trained tokens/s, MFU, and the peak RSS of the window."""
        if not self.steps:
            raise RuntimeError("no timed steps: run more steps than `warmup`")
        seconds = statistics.median(s["seconds"] for s in self.steps)
        total_time = sum(s["seconds"] for s in self.steps)
        out = {
            "steps": len(self.steps),
            "step_seconds": seconds,
            "samples_per_s": self.rows_per_step / seconds,
            "tokens_per_s": sum(s["train_tokens"] for s in self.steps) / total_time,
            "train_tokens_per_step": statistics.median(s["train_tokens"] for s in self.steps),
            "frozen_tokens_per_step": statistics.median(s["frozen_tokens"] for s in self.steps),
            "flops_per_step": statistics.median(s["flops"] for s in self.steps),
            "head_positions_per_step": statistics.median(s["head_positions"] for s in self.steps),
            "mfu": sum(s["flops"] for s in self.steps) / total_time / peak_flops,
            "peak_rss_mib": peak_rss_mib(),
            "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else peak_rss_mib(),
            "rss_at_start_mib": self.rss_at_start,
            **self.info,
        }
        phases = sorted({k for s in self.steps for k in s if k.startswith("time/")})
        for key in phases:
            out[key] = statistics.median(s.get(key, 0.0) for s in self.steps)
        if any("generated_tokens" in s for s in self.steps):
            generation = sum(s["time/generation"] for s in self.steps)
            out["generation_tokens_per_s"] = sum(s["generated_tokens"] for s in self.steps) / generation
        return out


# ---- results ---------------------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))
    return path


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table; `columns` are (header, key, format spec)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key, spec in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, spec) if spec else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
