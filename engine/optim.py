"""The optimizer and its schedule, each micro-batch's share of an optimizer step's loss, and the optimizer step
itself: gradient clipping, then the update, skipped when the gradient is not finite.
"""

from __future__ import annotations

import math
import os

import torch
from accelerate import Accelerator

from engine.config import OptimConfig
from engine.validate import check_gradient_flow

SKIPPED = "train/skipped"  # 1.0 in optimizer_step's metrics when the update was not applied


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and norms (1-D tensors), as nanoGPT;
    torch's fused kernel unless `optim.fused` is false, the parameters' device has none, or (when unset)
    the run is under FSDP or DeepSpeed. Built before `accelerator.prepare`: on CPU or CUDA parameters."""
    check_gradient_flow(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    kwargs = {"lr": optim.lr, "betas": optim.betas, "eps": optim.eps}
    if optim.optimizer == "adamw":
        # auto leaves FSDP and DeepSpeed, which wrap or shard the optimizer, on the loop kernel
        sharded = any(os.environ.get(f"ACCELERATE_USE_{x}", "").lower() in ("1", "true") for x in ("FSDP", "DEEPSPEED"))
        fused = optim.fused if optim.fused is not None else not sharded and has_fused_adamw(params)
        return torch.optim.AdamW(groups, fused=fused, **kwargs)
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if optim.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return cls(groups, **kwargs)


def has_fused_adamw(params: list[torch.Tensor]) -> bool:
    """Whether torch has a fused AdamW kernel for every parameter (floating point, on a supported device).

    torch checks only at the first `step()`, so the engine asks beforehand; the device list is private
    torch API, and without it the answer is no."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except (ImportError, AttributeError):
        return False
    return all(p.is_floating_point() and p.device.type in devices for p in params)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total: int):
    """Linear warmup to the peak lr, then constant, linear or cosine decay to 0 at step `total`."""
    warmup = optim.warmup_steps or int(optim.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if optim.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if optim.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loss_shares(accelerator: Accelerator, counts: list) -> torch.Tensor:
    """Each micro-batch's share of the units (tokens or pairs) in the optimizer step, over all processes.

    Accelerate divides each micro-batch loss by the accumulation steps and DDP averages over processes, so
    a loss scaled by share x steps x processes gives the gradient of the mean over every unit of the global
    batch, however it is split into micro-batches (1 x 8 equals 8 x 1)."""
    counts = torch.stack([torch.as_tensor(c, dtype=torch.float32) for c in counts]).to(accelerator.device)
    total = accelerator.reduce(counts.sum(), "sum").clamp(min=1)
    return counts / total * (accelerator.gradient_accumulation_steps * accelerator.num_processes)


def optimizer_step(accelerator: Accelerator, model, optimizer, scheduler, max_grad_norm: float | None) -> dict:
    """Clip, step, advance the schedule and clear the gradients; call when `accelerator.sync_gradients`.

    A non-finite gradient norm (a NaN or inf loss makes one) skips the update: no optimizer or scheduler
    step, the gradients cleared, `SKIPPED` 1.0 in the metrics. The norm is of the gradients synced over the
    processes, and the flag is reduced too, so every process skips the same steps. Under fp16 the gradient
    scaler skips the optimizer step itself (and lowers its scale); the schedule waits in the same way."""
    metrics = {"lr": optimizer.param_groups[0]["lr"]}
    norm = clip_gradients(accelerator, model.parameters(), max_grad_norm)
    bad = torch.zeros(1, device=accelerator.device)
    if norm is not None:
        metrics["grad_norm"] = norm
        bad += (~torch.isfinite(torch.as_tensor(norm, dtype=torch.float32))).float().to(accelerator.device)
    skipped = accelerator.reduce(bad, "max").item() > 0 if accelerator.num_processes > 1 else bad.item() > 0
    if accelerator.scaler is not None:
        optimizer.step()  # the scaler needs the step to see the inf and lower its scale
        skipped = skipped or optimizer.step_was_skipped
    elif not skipped:
        optimizer.step()
    if not skipped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    metrics[SKIPPED] = float(skipped)
    return metrics


# Launches after which every process holds whole gradients as plain tensors (synced by DDP in backward):
# one process, or data parallelism on any device. FSDP, DeepSpeed, XLA and Megatron-LM clip their own way.
PLAIN_DATA_PARALLEL = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA",
                       "MULTI_XPU", "MULTI_HPU", "MULTI_NEURON")


def clip_gradients(accelerator: Accelerator, parameters, max_norm: float | None) -> torch.Tensor | None:
    """Scale the gradients down to a total norm of `max_norm` where it is above (0 or None: only measure, as
    transformers reads max_grad_norm); the norm before clipping, as `accelerator.clip_grad_norm_` returns it.

    torch's clip multiplies every gradient by min(1, max_norm / (norm + 1e-6)), a full pass over all of them
    even when that factor is 1. With plain gradients (PLAIN_DATA_PARALLEL, no device mesh) this takes the steps
    accelerate takes (unscale fp16 gradients, norm, clip) with torch's arithmetic, but multiplies only when the
    factor is below 1. Reading that comparison on the host is a sync, which optimizer_step's skip check makes
    anyway."""
    max_norm = max_norm or None  # 0 would scale every gradient to zero
    plain = (accelerator.distributed_type.value in PLAIN_DATA_PARALLEL
             and getattr(accelerator, "parallelism_config", None) is None  # tensor or context parallel: DTensors
             and hasattr(torch.nn.utils, "clip_grads_with_norm_"))  # torch >= 2.6
    if not plain:
        # an infinite max_norm measures the norm and scales the gradients by exactly 1
        return accelerator.clip_grad_norm_(parameters, math.inf if max_norm is None else max_norm)
    accelerator.unscale_gradients()
    parameters = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if max_norm is not None and (max_norm / (norm + 1e-6) < 1).item():
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm
