"""build_optimizer: torch's fused AdamW where it exists, the same update as the loop kernel, a fallback elsewhere.
optimizer_step: clipping that equals torch's and leaves gradients below the limit unwritten; non-finite steps
skipped."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from engine.config import OptimConfig
from engine.optim import (
    SKIPPED,
    build_optimizer,
    build_scheduler,
    clip_gradients,
    has_fused_adamw,
    optimizer_step,
)


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


def _with_gradients() -> torch.nn.Module:
    """A model whose gradients have a total norm near 6.9; the norm's weight gets none (frozen)."""
    model = _model()
    model[1].weight.requires_grad_(False)
    model(torch.arange(8.0).view(2, 4)).pow(2).sum().backward()
    return model


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


def test_above_max_norm_the_gradients_are_torchs_clipped_ones():
    model, reference = _with_gradients(), _with_gradients()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    assert expected > 2.0  # the clip is active

    norm = clip_gradients(Accelerator(cpu=True), model.parameters(), 1.0)
    assert torch.equal(norm, expected)
    assert len(_grads(model)) == 3
    for mine, theirs in zip(_grads(model), _grads(reference)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-7)
    assert math.isclose(torch.linalg.vector_norm(torch.cat([g.flatten() for g in _grads(model)])), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("max_norm", [1e3, None, 0.0], ids=["below-max-norm", "measure-only", "zero-is-none"])
def test_below_max_norm_or_without_one_no_gradient_is_written(max_norm):
    """A tensor's version counter moves with every in-place write: torch's clip writes every gradient (times
    1.0) even when the clip is inactive; clip_gradients writes none."""
    model, reference = _with_gradients(), _with_gradients()
    before = [(g, g.clone(), g._version) for g in _grads(model)]
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e3)
    assert all(g._version > version for g, (_, _, version) in zip(_grads(reference), before))

    norm = clip_gradients(Accelerator(cpu=True), model.parameters(), max_norm)
    for grad, (same, value, version) in zip(_grads(model), before):
        assert grad is same and grad._version == version and torch.equal(grad, value)
    oracle = torch.linalg.vector_norm(torch.cat([g.double().flatten() for _, g, _ in before]))
    assert math.isclose(norm, oracle, rel_tol=1e-6) and 2 < norm < 1e3


def _fake_accelerator(distributed_type, calls: list, parallelism_config=None, unscale=lambda: None):
    """What clip_gradients reads of an Accelerator. Its own clip records max_norm in `calls` and returns 5."""
    return SimpleNamespace(distributed_type=distributed_type, parallelism_config=parallelism_config,
                           unscale_gradients=unscale,
                           clip_grad_norm_=lambda params, max_norm: calls.append(max_norm) or torch.tensor(5.0))


def test_sharded_and_special_backends_clip_through_accelerate():
    """FSDP, DeepSpeed, XLA, Megatron-LM and a device mesh keep `accelerator.clip_grad_norm_` (max_norm inf when
    there is none); a single process and DDP take the norm here, with torch's result."""
    calls = []
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.XLA, DistributedType.MEGATRON_LM):
        assert clip_gradients(_fake_accelerator(kind, calls), _with_gradients().parameters(), None) == 5.0
    mesh = _fake_accelerator(DistributedType.MULTI_GPU, calls, parallelism_config=object())
    clip_gradients(mesh, _with_gradients().parameters(), 2.0)
    assert calls == [math.inf] * 4 + [2.0]
    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        model, reference = _with_gradients(), _with_gradients()
        expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 2.0)
        assert torch.equal(clip_gradients(_fake_accelerator(kind, calls), model.parameters(), 2.0), expected)
        assert all(torch.equal(a, b) for a, b in zip(_grads(model), _grads(reference)))
    assert len(calls) == 5


def test_a_max_grad_norm_of_zero_is_no_clipping_through_accelerate_too():
    """0 means no clipping, as in transformers; passed on as is it would scale every gradient to zero."""
    calls = []
    clip_gradients(_fake_accelerator(DistributedType.FSDP, calls), _with_gradients().parameters(), 0.0)
    assert calls == [math.inf]


def test_fp16_gradients_are_unscaled_before_the_norm():
    """Under fp16 the loss, so every gradient, is multiplied by the scaler's scale; accelerate's unscale_gradients
    divides it out (here: by 1024) before the norm is taken and compared with max_norm."""
    model, reference = _with_gradients(), _with_gradients()
    for grad in _grads(model):
        grad.mul_(1024.0)
    unscale = lambda: [grad.div_(1024.0) for grad in _grads(model)]  # noqa: E731
    norm = clip_gradients(_fake_accelerator(DistributedType.NO, [], unscale=unscale), model.parameters(), 2.0)
    assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(reference.parameters(), 2.0))
    assert all(torch.equal(a, b) for a, b in zip(_grads(model), _grads(reference)))


def test_optimizer_step_applies_a_clipped_step_and_skips_a_non_finite_one():
    accelerator = Accelerator(cpu=True)
    for poison, skipped in ((1.0, False), (math.nan, True), (math.inf, True)):
        model, reference = _with_gradients(), _with_gradients()
        model[0].weight.grad[0, 0] *= poison
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = build_scheduler(optimizer, OptimConfig(scheduler="linear", warmup_steps=0), total=4)
        weights = [p.detach().clone() for p in model.parameters()]

        metrics = optimizer_step(accelerator, model, optimizer, scheduler, 1.0)
        assert metrics[SKIPPED] == float(skipped)
        assert scheduler.last_epoch == (0 if skipped else 1)
        assert all(p.grad is None for p in model.parameters())
        if skipped:
            assert not math.isfinite(metrics["grad_norm"])
            assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
            continue
        # SGD: the weights moved by lr x torch's clipped gradient; the frozen one stayed
        assert torch.equal(metrics["grad_norm"], torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0))
        for p, w, r in zip(model.parameters(), weights, reference.parameters()):
            expected = w if r.grad is None else w - 0.1 * r.grad
            torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)
