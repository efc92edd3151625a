"""build_optimizer: torch's fused AdamW where it exists, the same update as the loop kernel, a fallback elsewhere."""

from __future__ import annotations

import torch

from engine.config import OptimConfig
from engine.loops.common import build_optimizer, has_fused_adamw


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))


def _train(fused: bool | None) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    model = _model()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1, fused=fused))
    for step in range(3):
        model.zero_grad()
        model(torch.full((2, 4), float(step + 1))).pow(2).sum().backward()
        optimizer.step()
    return optimizer, [p.detach().clone() for p in model.parameters()]


def test_fused_by_default_and_equal_to_the_loop_kernel():
    fused, fused_params = _train(None)
    plain, plain_params = _train(False)
    assert all(group["fused"] for group in fused.param_groups)
    assert not any(group["fused"] for group in plain.param_groups)
    # decay on the matrix only: the bias and the norm's 1-D tensors are in the second group
    assert [group["weight_decay"] for group in fused.param_groups] == [0.1, 0.0]
    for a, b in zip(fused_params, plain_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_device_without_the_fused_kernel_keeps_the_loop_kernel():
    """torch checks the device only at the first step(), so the choice is made before building: parameters
    on the meta device (no fused kernel) get the loop kernel."""
    model = torch.nn.Linear(4, 3, device="meta")
    assert has_fused_adamw(list(_model().parameters()))
    assert not has_fused_adamw(list(model.parameters()))
    assert not any(group["fused"] for group in build_optimizer(model, OptimConfig()).param_groups)


def test_fsdp_and_deepspeed_launches_keep_the_loop_kernel_unless_asked(monkeypatch):
    for variable in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        with monkeypatch.context() as patch:
            patch.setenv(variable, "true")
            assert not any(g["fused"] for g in build_optimizer(_model(), OptimConfig()).param_groups)
            assert all(g["fused"] for g in build_optimizer(_model(), OptimConfig(fused=True)).param_groups)
