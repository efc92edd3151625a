"""Properties every masked function keeps: junk under the mask never shows, micro-batching is exact,
low precision is computed in fp32 and float64 stays float64."""

import pytest
import torch

from losses import (
    clipped_policy_loss,
    gae,
    grpo_advantages,
    kl_penalty,
    kl_shaped_rewards,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    orpo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    reinforce_pp_advantages,
    reward_weighted_sft_loss,
    rloo_advantages,
    sft_loss,
)

F64 = torch.float64
B, R = 4, 6
LENGTHS = [6, 3, 1, 4]
SCORES = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
ROW_WEIGHTS = torch.tensor([0.5, 2.0, 1.0, 0.25], dtype=F64)

# Each case: (number of (B, R) inputs, fn(inputs, mask) -> tensor). Inputs are log-prob-like (<= 0).
CASES = {
    "masked_sum": (1, lambda x, m: masked_sum(x[0], m)),
    "masked_mean": (1, lambda x, m: masked_mean(x[0], m, dim=-1)),
    "masked_var": (1, lambda x, m: masked_var(x[0], m)),
    "masked_whiten": (1, lambda x, m: masked_whiten(x[0], m)),
    "sft_loss": (1, lambda x, m: sft_loss(x[0], m)[0]),
    "reward_weighted_sft_loss": (1, lambda x, m: reward_weighted_sft_loss(x[0], m, ROW_WEIGHTS.to(x[0].dtype))[0]),
    "orpo_loss": (2, lambda x, m: orpo_loss(x[0], m, x[1], m, lam=0.3, sft_mask=m)[0]),
    "kl_k1": (2, lambda x, m: kl_penalty(x[0], x[1], mask=m)),
    "kl_k3": (2, lambda x, m: kl_penalty(x[0], x[1], estimator="k3", mask=m)),
    "kl_shaped_rewards": (
        2,
        lambda x, m: kl_shaped_rewards(SCORES.to(x[0].dtype), x[0], x[1], m, kl_coef=0.1, estimator="k3")[0],
    ),
    "gae": (2, lambda x, m: gae(x[0], x[1], m, gamma=0.99, lam=0.95)[0]),
    "ppo_policy_loss": (3, lambda x, m: ppo_policy_loss(x[0], x[1], x[2], m, clip_coef=0.2)[0]),
    "ppo_value_loss": (3, lambda x, m: ppo_value_loss(x[0], x[1], x[2], m, clip_coef=0.2)[0]),
    "grpo_loss": (4, lambda x, m: clipped_policy_loss(x[0], x[1], x[2], m, aggregation="seq-mean-token-mean",
                                                      ref_logprobs=x[3], kl_coef=0.04)[0]),
    "gspo_loss": (3, lambda x, m: clipped_policy_loss(x[0], x[1], x[2], m, ratio_level="sequence", clip_low=3e-4,
                                                      clip_high=4e-4, aggregation="seq-mean-token-mean")[0]),
    "dr_grpo_loss": (3, lambda x, m: clipped_policy_loss(x[0], x[1], x[2], m, aggregation="seq-mean-token-sum",
                                                         max_length=R, dual_clip=3.0)[0]),
    "grpo_advantages": (1, lambda x, m: grpo_advantages(x[0], m, group_size=2)[0]),
    "rloo_advantages": (1, lambda x, m: rloo_advantages(x[0], m, group_size=2)[0]),
    "reinforce_pp_advantages": (1, lambda x, m: reinforce_pp_advantages(x[0], m, group_size=1, gamma=0.9)[0]),
}


def _inputs(n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs = [-torch.rand(B, R, generator=gen, dtype=F64) * 2 - 0.05 for _ in range(n)]
    mask = torch.arange(R)[None] < torch.tensor(LENGTHS)[:, None]
    return [x.to(dtype) for x in xs], mask


def _value_and_grads(fn, xs, mask):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(xs, mask)
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view(out.shape) if out.ndim else 1.0
    (out * weights).sum().backward()
    # an input the graph does not reach (old log-probs under GSPO's stop-gradient ratio) has gradient 0
    return out.detach(), [torch.zeros_like(x) if x.grad is None else x.grad for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("junk", [1000.0, -1000.0, "max", "-max"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_junk_under_the_mask_changes_nothing(name, junk, dtype):
    n, fn = CASES[name]
    xs, mask = _inputs(n, dtype)
    if isinstance(junk, str):
        junk = torch.finfo(dtype).max * (-1 if junk.startswith("-") else 1)
    # Alternate the sign across inputs so junk cannot cancel in a difference such as logprobs - old_logprobs.
    dirty = [torch.where(mask, x, torch.tensor(junk * (-1) ** i, dtype=dtype)) for i, x in enumerate(xs)]
    clean_out, clean_grads = _value_and_grads(fn, xs, mask)
    dirty_out, dirty_grads = _value_and_grads(fn, dirty, mask)
    assert torch.isfinite(dirty_out).all()
    assert torch.equal(dirty_out, clean_out)
    for clean, dirty_grad in zip(clean_grads, dirty_grads):
        assert torch.isfinite(dirty_grad).all()
        assert torch.equal(dirty_grad, clean)
        assert torch.all(dirty_grad[~mask] == 0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_int_and_float_masks_equal_bool(name):
    n, fn = CASES[name]
    xs, mask = _inputs(n, F64, seed=1)
    want = fn(xs, mask)
    for other in (mask.long(), mask.float(), mask.to(torch.uint8)):
        assert torch.equal(fn(xs, other), want)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_computed_in_fp32_and_float64_kept(name):
    n, fn = CASES[name]
    xs, mask = _inputs(n, torch.bfloat16, seed=2)
    out = fn(xs, mask)
    assert out.dtype == torch.float32
    assert torch.equal(out, fn([x.float() for x in xs], mask))
    xs64, _ = _inputs(n, F64, seed=2)
    assert fn(xs64, mask).dtype == F64


TOKEN_MEANS = {
    "sft_loss": (1, lambda x, m: sft_loss(x[0], m)[0]),
    "ppo_policy_loss": (3, lambda x, m: ppo_policy_loss(x[0], x[1], x[2], m, clip_coef=0.2)[0]),
    "ppo_value_loss": (3, lambda x, m: ppo_value_loss(x[0], x[1], x[2], m, clip_coef=0.2)[0]),
    "masked_mean": (1, lambda x, m: masked_mean(x[0], m)),
}


@pytest.mark.parametrize("splits", [[1, 1, 1, 1], [2, 2], [3, 1], [1, 3]])
@pytest.mark.parametrize("name", sorted(TOKEN_MEANS))
def test_token_weighted_means_are_unchanged_by_micro_batching(name, splits):
    """sum_k loss_k * n_k / n over micro-batches k equals the full-batch loss, value and gradient."""
    n, fn = TOKEN_MEANS[name]
    xs, mask = _inputs(n, F64, seed=3)
    full, full_grads = _value_and_grads(fn, xs, mask)
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    total = mask.sum()
    accumulated = torch.zeros((), dtype=F64)
    for rows in torch.split(torch.arange(B), splits):
        micro_loss = fn([x[rows] for x in leaves], mask[rows]) * mask[rows].sum() / total
        micro_loss.backward()
        accumulated = accumulated + micro_loss.detach()
    torch.testing.assert_close(accumulated, full, rtol=1e-12, atol=1e-15)
    for leaf, grad in zip(leaves, full_grads):
        torch.testing.assert_close(leaf.grad, grad, rtol=1e-12, atol=1e-15)
