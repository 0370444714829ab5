"""The contrastive log-probability kernel (cDPO's scoring) against a dense fp64 softmax reference."""

from __future__ import annotations

import pytest
import torch

from lit_ft.kernels.contrastive_logprob import contrastive_logprob, contrastive_logprob_reference


def _inputs(n=37, d_pos=11, d_neg=11, v=101, seed=0, ignored=0.25, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hp, hn = torch.randn(n, d_pos, generator=g, dtype=dtype), torch.randn(n, d_neg, generator=g, dtype=dtype)
    wp, wn = torch.randn(v, d_pos, generator=g, dtype=dtype), torch.randn(v, d_neg, generator=g, dtype=dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignored] = -100
    return hp, wp, hn, wn, y


@pytest.mark.parametrize("row_chunk,vocab_chunk", [(None, None), (1, 1), (5, 7), (64, 100), (3, 101), (37, 1000)])
@pytest.mark.parametrize("beta", [0.0, 1.0, 2.5])
def test_matches_the_dense_fp64_reference_on_odd_sizes(row_chunk, vocab_chunk, beta):
    hp, wp, hn, wn, y = _inputs()
    got = contrastive_logprob(hp, wp, hn, wn, y, beta=beta, row_chunk=row_chunk, vocab_chunk=vocab_chunk)
    ref = contrastive_logprob_reference(hp, wp, hn, wn, y, beta=beta)
    assert got.dtype == torch.float32 and got.shape == (37,)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.all(got[y == -100] == 0) and torch.all(got[y != -100] < 0)


def test_fp64_is_exact_and_different_widths_biases_and_transforms():
    hp, wp, hn, wn, y = _inputs(n=23, d_pos=9, d_neg=5, v=61, seed=3, dtype=torch.float64)
    g = torch.Generator().manual_seed(9)
    bp, bn = torch.randn(61, generator=g, dtype=torch.float64), torch.randn(61, generator=g, dtype=torch.float64)
    kw = dict(beta=1.0, bias_pos=bp, bias_neg=bn, logit_scale=0.7, logit_softcap=5.0)
    got = contrastive_logprob(hp, wp, hn, wn, y, vocab_chunk=13, row_chunk=4, **kw)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, contrastive_logprob_reference(hp, wp, hn, wn, y, **kw), rtol=1e-12, atol=1e-12)


def test_a_shared_head_takes_the_one_gemm_path_with_the_same_result():
    hp, wp, hn, _, y = _inputs(n=19, v=77, seed=5)
    ref = contrastive_logprob_reference(hp, wp, hn, wp.clone(), y, beta=1.0)
    torch.testing.assert_close(contrastive_logprob(hp, wp, hn, wp, y, vocab_chunk=10).double(), ref,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(contrastive_logprob(hp, wp, hn, wp, y, logit_scale=0.5, vocab_chunk=10).double(),
                               contrastive_logprob_reference(hp, wp, hn, wp, y, logit_scale=0.5),
                               rtol=1e-5, atol=1e-5)


def test_bf16_inputs_stay_close_to_fp64_and_all_ignored_is_zero():
    hp, wp, hn, wn, y = _inputs(n=16, v=50, seed=2)
    got = contrastive_logprob(hp.bfloat16(), wp.bfloat16(), hn.bfloat16(), wn.bfloat16(), y, vocab_chunk=7)
    torch.testing.assert_close(got.double(), contrastive_logprob_reference(hp, wp, hn, wn, y), rtol=0.05, atol=0.3)
    none = torch.full_like(y, -100)
    assert torch.equal(contrastive_logprob(hp, wp, hn, wn, none), torch.zeros(16))


def test_hand_made_two_token_example():
    # V = 2, D = 1, W = identity-like: z_pos = [2, 0], z_neg = [1, 1] -> z_ce = 2 z_pos - z_neg = [3, -1]
    w = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    hp = torch.tensor([[2.0]], dtype=torch.float64)
    wn = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    hn = torch.tensor([[1.0]], dtype=torch.float64)
    p0 = contrastive_logprob(hp, w, hn, wn, torch.tensor([0]), beta=1.0).exp()
    p1 = contrastive_logprob(hp, w, hn, wn, torch.tensor([1]), beta=1.0).exp()
    e = torch.exp(torch.tensor(4.0, dtype=torch.float64))
    torch.testing.assert_close(p0, (e / (e + 1)).reshape(1))  # e^3 / (e^3 + e^-1)
    torch.testing.assert_close(p1, (1 / (e + 1)).reshape(1))


@pytest.mark.parametrize("bad,match", [
    (dict(beta=-1.0), "beta"), (dict(vocab_chunk=0), "vocab_chunk"), (dict(row_chunk=1.5), "row_chunk"),
    (dict(targets=torch.tensor([500] * 37)), "targets"), (dict(targets=torch.zeros(36, dtype=torch.long)), "targets"),
    (dict(hidden_neg=torch.zeros(36, 11)), "hidden_neg"), (dict(weight_neg=torch.zeros(100, 11)), "weight_neg"),
    (dict(weight_pos=torch.zeros(101, 11, dtype=torch.float64)), "weight_pos"),
])
def test_bad_inputs_name_the_argument(bad, match):
    hp, wp, hn, wn, y = _inputs()
    args = dict(hidden_pos=hp, weight_pos=wp, hidden_neg=hn, weight_neg=wn, targets=y)
    kw = {k: v for k, v in bad.items() if k in ("beta", "vocab_chunk", "row_chunk")}
    args.update({k: v for k, v in bad.items() if k not in kw})
    with pytest.raises((ValueError, TypeError), match=match):
        contrastive_logprob(**args, **kw)
