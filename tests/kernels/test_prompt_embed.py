"""Fused prompt embedding (DePT): torch path vs the fp64 reference, Triton under the interpreter, custom-op
plumbing, what backward saves, dispatch and input errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lit_ft.kernels import prompt_embed
from lit_ft.kernels.prompt_embed import _prompt_embed, _prompt_embed_backward
from lit_ft.kernels.prompt_embed.reference import prompt_embed_reference, prompt_embed_repeat_reference
from tests.helpers import run_interpreted

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
triton_missing = subprocess.run([sys.executable, "-c", "import triton"], capture_output=True).returncode != 0


def make_case(b=3, t=10, v=41, d=12, s=8, r=3, dtype=torch.float64, lora_dtype=None, seed=0, positions="odd"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, v, (b, t), generator=g)
    if positions == "arange":
        pos = torch.arange(t).expand(b, t).clone()
    else:  # negative (left padding), >= S (beyond max_length), repeated positions
        pos = torch.randint(-3, s + 3, (b, t), generator=g)
        pos.view(-1)[:3] = torch.tensor([-1, s, 0])[: pos.numel()]
    w = torch.randn(v, d, generator=g, dtype=torch.float64).to(dtype)
    a = torch.randn(s, r, generator=g, dtype=torch.float64).to(lora_dtype or dtype).requires_grad_()
    bb = torch.randn(r, d, generator=g, dtype=torch.float64).to(lora_dtype or dtype).requires_grad_()
    return ids, w, pos, a, bb


def grads(out, up, tensors):
    return torch.autograd.grad((out.to(up.dtype) * up).sum(), tensors)


@pytest.mark.parametrize("positions", ["arange", "odd"])
@pytest.mark.parametrize("shape", [dict(), dict(b=1, t=1, s=1, r=1), dict(b=5, t=4, s=3, r=7, d=33)],
                         ids=["small", "one-token", "t-beyond-s"])
def test_torch_path_matches_reference_fp64(positions, shape):
    ids, w, pos, a, bb = make_case(positions=positions, **shape)
    out = prompt_embed(ids, w, pos, a, bb, 0.37, impl="torch")
    ref = prompt_embed_reference(ids, w, pos, a, bb, 0.37)
    assert out.shape == (*ids.shape, w.shape[1]) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    up = torch.randn_like(out)
    for got, exp in zip(grads(out, up, (a, bb)), grads(ref, up, (a, bb))):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-12)


def test_positions_outside_range_get_no_update_and_no_gradient():
    ids, w, pos, a, bb = make_case(positions="arange", t=6, s=4)
    pos = pos.clone()
    pos[:, 0] = -2
    pos[:, 5] = 4  # == S: beyond DePT's max_length
    out = prompt_embed(ids, w, pos, a, bb, 1.5, impl="torch")
    plain = w[ids]
    assert torch.equal(out[:, 0], plain[:, 0]) and torch.equal(out[:, 5], plain[:, 5])
    assert not torch.allclose(out[:, 1:5], plain[:, 1:5])
    # gradient only from used rows: rows of A never indexed get exactly 0
    ga, gb = torch.autograd.grad(out.sum(), (a, bb))
    unused = torch.ones(a.shape[0], dtype=torch.bool)
    unused[pos[(pos >= 0) & (pos < 4)].unique()] = False
    assert torch.all(ga[unused] == 0) and torch.all(ga[~unused] != 0)


def test_equals_depts_repeat_formulation_and_broadcast_positions():
    ids, w, _, a, bb = make_case(positions="arange", t=7, s=9)
    pos1 = torch.arange(7)[None]  # [1, T] broadcasts over the batch
    out = prompt_embed(ids, w, pos1, a, bb, 0.8, impl="torch")
    ref = prompt_embed_repeat_reference(ids, w, a, bb, 0.8)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    up = torch.randn_like(out)
    for got, exp in zip(grads(out, up, (a, bb)), grads(ref, up, (a, bb))):
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_torch_path_token_chunks(monkeypatch, dtype):
    """Several token chunks (the in-place update and the chunked index_add_) give the unchunked result."""
    from lit_ft.kernels.prompt_embed import torch_impl

    ids, w, pos, a, bb = make_case(b=3, t=7, dtype=dtype, lora_dtype=torch.float64 if dtype == torch.float64
                                   else torch.float32)
    up = torch.randn(3, 7, w.shape[1], dtype=torch.float64).to(dtype)
    full = prompt_embed(ids, w, pos, a, bb, 0.4, impl="torch")
    g_full = grads(full, up, (a, bb))
    monkeypatch.setattr(torch_impl, "chunk_rows", lambda d: 4)  # 21 tokens -> 6 chunks
    chunked = prompt_embed(ids, w, pos, a, bb, 0.4, impl="torch")
    assert torch.equal(chunked, full)
    torch.testing.assert_close(chunked, prompt_embed_reference(ids, w, pos, a, bb, 0.4), rtol=1e-12, atol=1e-12)
    for x, y in zip(grads(chunked, up, (a, bb)), g_full):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_gradcheck_fp64():
    ids, w, pos, a, bb = make_case(b=2, t=7, v=9, d=5, s=5, r=2, seed=3)

    def fn(a, bb):
        return prompt_embed(ids, w, pos, a, bb, 0.9, impl="torch")

    assert torch.autograd.gradcheck(fn, (a, bb), eps=1e-6, atol=1e-8)


def test_low_precision_table_output_dtype_and_fp32_lowrank_term():
    ids, w, pos, a, bb = make_case(d=16, lora_dtype=torch.float32, dtype=torch.bfloat16)
    out = prompt_embed(ids, w, pos, a, bb, 0.5, impl="torch")
    assert out.dtype == torch.bfloat16
    # equals the fp32 computation cast once (not a bf16 low-rank product)
    assert torch.equal(out, prompt_embed_reference(ids, w, pos, a, bb, 0.5, compute_dtype=torch.float32))
    ga, gb = torch.autograd.grad(out.float().sum(), (a, bb))
    assert ga.dtype == gb.dtype == torch.float32
    # int32 ids/positions take the same path
    out32 = prompt_embed(ids.int(), w, pos.int(), a, bb, 0.5, impl="torch")
    assert torch.equal(out32, out)


def test_partial_requires_grad_and_no_grad():
    ids, w, pos, a, bb = make_case()
    a_frozen = a.detach()
    out = prompt_embed(ids, w, pos, a_frozen, bb, 0.3, impl="torch")
    (gb,) = torch.autograd.grad(out.sum(), (bb,))
    (gb_ref,) = torch.autograd.grad(prompt_embed_reference(ids, w, pos, a_frozen, bb, 0.3).sum(), (bb,))
    torch.testing.assert_close(gb, gb_ref)
    with torch.no_grad():
        out = prompt_embed(ids, w.requires_grad_(), pos, a, bb, 0.3, impl="torch")  # frozen check is grad-mode only
    assert out.grad_fn is None


def test_backward_saves_only_positions_and_lora_factors():
    """No [B, T, D] / [B, S, D] tensor is kept for backward: only positions, A and B (checked with the
    saved-tensor hooks, which do see the reference's [B, T, r] gather)."""
    b, t, d, s, r = 4, 16, 64, 16, 2
    ids, w, pos, a, bb = make_case(b=b, t=t, d=d, s=s, r=r, positions="arange", dtype=torch.float32)

    def saved_by(fn):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
            fn(ids, w, pos, a, bb, 0.5).sum().backward()
        return saved

    ours = saved_by(lambda *x: prompt_embed(*x, impl="torch"))
    assert sorted(tuple(x.shape) for x in ours) == sorted([(b, t), (s, r), (r, d)])
    assert sum(x.numel() for x in ours) == b * t + s * r + r * d < b * t * d
    assert any(x.data_ptr() == pos.data_ptr() for x in ours)  # positions saved as given, not copied
    ref = saved_by(prompt_embed_reference)
    assert max(x.numel() for x in ref) >= b * t * r  # the hooks do catch per-token intermediates


@pytest.mark.slow
@pytest.mark.skipif(triton_missing, reason="triton not installed")
def test_triton_path_under_interpreter_matches_reference():
    """fp32 and bf16 tables, fp32/bf16 LoRA factors, arange and odd (negative, >= S, repeated) positions, D not a
    multiple of the block: accuracy rule vs the fp64 reference for the output and dA, dB."""
    proc = run_interpreted(["-m", "lit_ft.kernels.prompt_embed.selfcheck", "--device", "cpu"])
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL PASS" in proc.stdout and proc.stdout.count("PASS ") == 4


@pytest.mark.slow
@pytest.mark.skipif(triton_missing, reason="triton not installed")
def test_triton_out_of_range_ids_give_nan_rows_under_interpreter():
    code = (
        "import torch\n"
        "from lit_ft.kernels.prompt_embed import triton_impl\n"
        "ids = torch.tensor([[0, 5, 2]]); w = torch.randn(5, 4); pos = torch.tensor([[0, 1, 2]])\n"
        "out = triton_impl.forward(ids, w, pos, torch.randn(3, 2), torch.randn(2, 4), 1.0)\n"
        "assert out[0, 1].isnan().all() and torch.isfinite(out[0, [0, 2]]).all(), out\n"
    )
    proc = run_interpreted(["-c", code])
    assert proc.returncode == 0, proc.stderr


# --- custom op plumbing -------------------------------------------------------------------------------------------


def test_torch_compile_fullgraph_aot_eager():
    torch._dynamo.reset()
    ids, w, pos, a, bb = make_case(dtype=torch.float32)

    def fn(a, bb):
        return prompt_embed(ids, w, pos, a, bb, 0.6, impl="auto").square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss_c = compiled(a, bb)
    g_c = torch.autograd.grad(loss_c, (a, bb))
    loss_e = fn(a, bb)
    g_e = torch.autograd.grad(loss_e, (a, bb))
    torch.testing.assert_close(loss_c, loss_e)
    for x, y in zip(g_c, g_e):
        torch.testing.assert_close(x, y)


def test_opcheck_custom_ops():
    ids, w, pos, a, bb = make_case(dtype=torch.float32)
    torch.library.opcheck(_prompt_embed, (ids, w, pos, a, bb, 0.5, "torch"))
    up = torch.randn(*ids.shape, w.shape[1])
    for need_a, need_b in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(_prompt_embed_backward, (up, pos, a.detach(), bb.detach(), 0.5, "torch", need_a,
                                                       need_b))


def test_public_names_and_import_without_triton():
    import lit_ft.kernels as kernels

    assert callable(kernels.prompt_embed) and kernels.prompt_embed is prompt_embed
    # importing the sub-package directly first must not shadow the function; and no triton import
    code = ("import sys, lit_ft.kernels.prompt_embed.reference, lit_ft.kernels.rational.reference\n"
            "from lit_ft.kernels import prompt_embed, rational\n"
            "assert callable(prompt_embed) and callable(rational)\n"
            "assert 'triton' not in sys.modules\n")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)


# --- dispatch and errors ------------------------------------------------------------------------------------------


def test_impl_triton_on_cpu_raises():
    ids, w, pos, a, bb = make_case(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="impl='triton'"):
        prompt_embed(ids, w, pos, a, bb, 1.0, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        prompt_embed(ids, w, pos, a, bb, 1.0, impl="cuda")


def test_trainable_table_is_rejected():
    ids, w, pos, a, bb = make_case()
    with pytest.raises(ValueError, match="frozen.*weight.requires_grad"):
        prompt_embed(ids, w.requires_grad_(), pos, a, bb, 1.0)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(input_ids=torch.zeros(3, 10)), TypeError, "input_ids must have dtype"),
        (dict(input_ids=torch.zeros(30, dtype=torch.long)), ValueError, "input_ids must be 2-D"),
        (dict(input_ids=torch.full((3, 10), 41)), ValueError, r"input_ids must be in \[0, V\) = \[0, 41\).*41"),
        (dict(input_ids=torch.full((3, 10), -1)), ValueError, r"input_ids must be in \[0, V\).*-1"),
        (dict(weight=torch.ones(41, 12, dtype=torch.int64)), TypeError, "weight must have dtype"),
        (dict(weight=torch.randn(41, 11)), ValueError, r"lora_b must be \[r, D\] = \[3, 11\]"),
        (dict(position_ids=torch.zeros(3, 9, dtype=torch.long)), ValueError, "position_ids must be"),
        (dict(position_ids=torch.zeros(2, 10, dtype=torch.long)), ValueError, "position_ids must be"),
        (dict(position_ids=torch.zeros(3, 10)), TypeError, "position_ids must have dtype"),
        (dict(lora_a=torch.randn(8)), ValueError, "lora_a must be 2-D"),
        (dict(lora_a=torch.randn(0, 3)), ValueError, "S >= 1 and r >= 1"),
        (dict(lora_b=torch.randn(4, 12)), ValueError, r"lora_b must be \[r, D\]"),
        (dict(lora_b=torch.randn(3, 12, dtype=torch.float64)), TypeError, "same dtype"),
        (dict(scale="1"), TypeError, "scale must be a float"),
    ],
)
def test_bad_input_errors(change, exc, match):
    ids, w, pos, a, bb = make_case(dtype=torch.float32)
    args = dict(input_ids=ids, weight=w, position_ids=pos, lora_a=a, lora_b=bb, scale=1.0)
    args.update(change)
    with pytest.raises(exc, match=match):
        prompt_embed(**args, impl="torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_path_on_cuda():
    from lit_ft.kernels.prompt_embed import selfcheck

    assert selfcheck.main(["--device", "cuda"]) == 0
    ids, w, pos, a, bb = (x.cuda() for x in make_case(dtype=torch.float32))
    a, bb = a.detach().requires_grad_(), bb.detach().requires_grad_()
    torch.library.opcheck(_prompt_embed, (ids, w, pos, a, bb, 0.5, "triton"))
    out = torch.compile(lambda a, bb: prompt_embed(ids, w, pos, a, bb, 0.5, impl="triton"), fullgraph=True)(a, bb)
    out.sum().backward()
    assert torch.isfinite(a.grad).all()
