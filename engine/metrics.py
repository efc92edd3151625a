"""Metrics as a run logs them: weighted means over micro-batches and processes, reduced once per step."""

from __future__ import annotations

import torch
from accelerate import Accelerator


class MeanMetrics:
    """Weighted means of metric dicts over micro-batches and processes (weights: tokens, pairs or rows)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.weight = 0.0

    def add(self, metrics: dict, weight) -> None:
        weight = float(weight)
        for key, value in metrics.items():
            value = torch.as_tensor(value).detach().float().cpu() * weight
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.weight += weight

    def compute(self, accelerator: Accelerator) -> dict[str, float]:
        keys = sorted(self.sums)
        packed = torch.stack([self.sums[k] for k in keys] + [torch.tensor(self.weight)]).to(accelerator.device)
        packed = accelerator.reduce(packed, "sum").cpu()
        return {key: (packed[i] / packed[-1]).item() for i, key in enumerate(keys)}
