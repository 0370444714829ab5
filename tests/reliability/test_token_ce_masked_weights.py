"""Issue 18 item 11a: a token weight at a position that is not kept (ignored label, dropped token) must not reach the
fused op's loss: an inf / NaN weight there gave a NaN loss (0 · inf) although the gradients were finite."""

from __future__ import annotations

import pytest
import torch

from lit_ft.kernels import fused_linear_token_ce
from lit_ft.kernels.token_ce import token_ce_reference

N, D, V = 12, 8, 20


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[1, 4]] = -100  # ignored
    keep = torch.ones(N, dtype=torch.bool)
    keep[[2, 7]] = False  # dropped
    weights = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    return hidden, weight, labels, keep, weights


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_bad_weight_where_nothing_is_kept_does_not_reach_the_loss(bad, reduction):
    """issue 18 item 11a: inf / NaN weights at an ignored and at a dropped position; the loss and gradients equal
    the fp64 reference with those weights set to 1 (the reference masks before multiplying)."""
    hidden, weight, labels, keep, weights = _inputs()
    poisoned = weights.clone()
    poisoned[[1, 2]] = bad  # 1: ignored label, 2: dropped by keep
    clean = weights.clone()
    clean[[1, 2]] = 1.0

    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = fused_linear_token_ce(h, w, labels, token_weights=poisoned, keep=keep, reduction=reduction, impl="torch")
    up = torch.linspace(0.5, 1.5, N, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0,
                                                                                                  dtype=torch.float64)
    (loss * up).sum().backward()

    hr = hidden.clone().requires_grad_()
    wr = weight.clone().requires_grad_()
    ref = token_ce_reference(hr, wr, labels, token_weights=clean, keep=keep, reduction=reduction)
    (ref.loss * up).sum().backward()

    assert torch.isfinite(loss).all(), f"loss {loss}"
    torch.testing.assert_close(loss, ref.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h.grad, hr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-10, atol=1e-12)


def test_the_level2_hook_keeps_a_bad_weight_where_nothing_is_kept_out():
    """issue 18 item 11a, level 2 (HF hook): batch token weights that are inf at ignored positions give a finite
    loss and finite gradients equal to those with weight 1 there. (A guard: this path already held before the fix —
    its per-token NLL is masked with torch.where, which drops the 0 · inf of the product's backward.)"""
    from lit_ft.core.loss.hf_hook import TokenWeightedLoss
    from lit_ft.core.loss.pipeline import TokenPipeline

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (2, 6), generator=g)
    labels[0, :3] = -100
    tw = torch.rand(2, 6, generator=g, dtype=torch.float64) + 0.5
    losses, grads = [], []
    for fill in (float("inf"), 1.0):
        weights = tw.clone()
        weights[0, :3] = fill  # positions whose labels are ignored (target space: shifted by one, see below)
        weights[0, 0] = 1.0  # position 0 is never a target (the shift drops it)
        pipe = TokenPipeline()
        pipe.current_batch = {"labels": labels, "token_weights": weights}
        hook = TokenWeightedLoss(pipe, None)
        z = logits.clone().requires_grad_()
        loss = hook(z, labels)
        loss.backward()
        losses.append(loss.detach())
        grads.append(z.grad)
    assert torch.isfinite(losses[0]) and torch.isfinite(grads[0]).all()
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])
