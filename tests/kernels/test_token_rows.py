"""Token-row ops (LeMo's gather of kept tokens / merge back into the residual stream): torch path vs the reference,
gradients, Triton under the interpreter, custom-op plumbing, what backward saves, dispatch and input errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lit_ft.kernels.token_rows import (_gather_rows, _merge_rows, _scatter_rows, _zero_rows, gather_rows,
                                       gather_rows_reference, merge_rows, merge_rows_reference)
from lit_ft.kernels.token_rows.selfcheck import make_index
from tests.helpers import run_interpreted

triton_missing = subprocess.run([sys.executable, "-c", "import triton"], capture_output=True).returncode != 0


def make_case(b=3, t=10, k=4, d=6, dtype=torch.float64, seed=0, sort=True):
    g = torch.Generator().manual_seed(seed)
    idx = make_index(b, t, k, g, sort)
    x = torch.randn(b, t, d, generator=g, dtype=torch.float64).to(dtype)
    rows = torch.randn(b, k, d, generator=g, dtype=torch.float64).to(dtype)
    return x, rows, idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("sort", [True, False], ids=["sorted", "unsorted"])
def test_matches_reference_outputs_and_gradients(dtype, sort):
    x, rows, idx = make_case(dtype=dtype, sort=sort)
    x, rows = x.requires_grad_(), rows.requires_grad_()
    got_g, ref_g = gather_rows(x, idx, impl="torch"), gather_rows_reference(x, idx)
    got_m, ref_m = merge_rows(x, rows, idx, impl="torch"), merge_rows_reference(x, rows, idx)
    assert got_g.dtype == dtype and got_g.shape == (3, 4, 6) and torch.equal(got_g, ref_g)
    assert got_m.dtype == dtype and got_m.shape == x.shape and torch.equal(got_m, ref_m)
    up_g, up_m = torch.randn_like(got_g), torch.randn_like(got_m)
    assert torch.equal(torch.autograd.grad(got_g, x, up_g)[0], torch.autograd.grad(ref_g, x, up_g)[0])
    for a, b in zip(torch.autograd.grad(got_m, (x, rows), up_m), torch.autograd.grad(ref_m, (x, rows), up_m)):
        assert torch.equal(a, b)


def test_semantics_by_hand():
    """Gather picks rows in index order; merge replaces exactly the indexed rows and passes the others through;
    merge's base gradient is zero exactly on the replaced rows."""
    x = torch.arange(2 * 5 * 2, dtype=torch.float32).view(2, 5, 2)
    idx = torch.tensor([[3, 0], [1, 4]])
    out = gather_rows(x, idx)
    assert torch.equal(out[0], x[0, [3, 0]]) and torch.equal(out[1], x[1, [1, 4]])
    base = x.clone().requires_grad_()
    merged = merge_rows(base, -out - 1, idx)
    replaced = torch.zeros(2, 5, dtype=torch.bool)
    replaced[0, [3, 0]] = replaced[1, [1, 4]] = True
    assert torch.equal(merged[replaced], -x[replaced] - 1) and torch.equal(merged[~replaced], x[~replaced])
    (gb,) = torch.autograd.grad(merged.sum(), base)
    assert torch.equal(gb[replaced], torch.zeros_like(gb[replaced])) and torch.equal(gb[~replaced],
                                                                                      torch.ones_like(gb[~replaced]))


def test_gradcheck_and_gradgradcheck_fp64():
    x, rows, idx = make_case(b=2, t=5, k=3, d=3, seed=1, sort=False)
    x, rows = x.requires_grad_(), rows.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: gather_rows(x, idx, impl="torch"), (x,))
    assert torch.autograd.gradcheck(lambda x, r: merge_rows(x, r, idx, impl="torch"), (x, rows))
    # every backward op is itself differentiable (its gradient is another of the four ops)
    assert torch.autograd.gradgradcheck(lambda x: gather_rows(x, idx, impl="torch"), (x,))
    assert torch.autograd.gradgradcheck(lambda x, r: merge_rows(x, r, idx, impl="torch"), (x, rows))


def test_partial_requires_grad_and_no_grad():
    x, rows, idx = make_case()
    r = rows.clone().requires_grad_()
    (gr,) = torch.autograd.grad((merge_rows(x, r, idx) * 2).sum(), (r,))  # base frozen: only rows' gradient
    assert torch.equal(gr, torch.full_like(gr, 2.0))
    with torch.no_grad():
        assert merge_rows(x.requires_grad_(), rows, idx).grad_fn is None


def test_all_kept_is_the_identity_and_none_kept_is_empty():
    x, _, _ = make_case(t=7, k=0, dtype=torch.float32)
    full = torch.arange(7).expand(3, 7)
    assert torch.equal(gather_rows(x, full), x)
    y = torch.randn_like(x)
    assert torch.equal(merge_rows(x, y, full), y)
    # k == 0: nothing kept, an empty gather, the stream passes through, and the gradients are zeros / pass-through
    empty = torch.zeros(3, 0, dtype=torch.long)
    xg = x.clone().requires_grad_()
    kept = gather_rows(xg, empty)
    assert kept.shape == (3, 0, x.shape[2])
    merged = merge_rows(xg, kept * 2, empty)
    assert torch.equal(merged, x) and merged.data_ptr() != x.data_ptr()  # a new tensor, never an alias
    (gx,) = torch.autograd.grad(merged.sum(), xg)
    assert torch.equal(gx, torch.ones_like(x))


def test_int32_index_and_non_contiguous_inputs():
    x, rows, idx = make_case(dtype=torch.float32)
    xt = x.transpose(0, 2).contiguous().transpose(0, 2)  # same values, D the slowest axis
    assert not xt.is_contiguous()
    assert torch.equal(gather_rows(xt, idx.int()), gather_rows_reference(x, idx))
    assert torch.equal(merge_rows(xt, rows.transpose(0, 1).contiguous().transpose(0, 1), idx.int()),
                       merge_rows_reference(x, rows, idx))


def test_backward_saves_only_the_index():
    """A LeMo layer step (gather, a layer on the kept rows, merge) keeps only the index for backward: no [B, T, D]
    or [B, k, D] tensor (the hooks do see the [B, k, D] tensor a square() saves, so they are not blind)."""
    b, t, k, d = 2, 16, 5, 32
    x, _, idx = make_case(b=b, t=t, k=k, d=d, dtype=torch.float32)
    x.requires_grad_()

    def saved_by(layer):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
            merge_rows(x, layer(gather_rows(x, idx)), idx).sum().backward()
        return saved

    ours = saved_by(lambda h: h * 3.0 + 1.0)  # a layer that saves nothing itself
    assert len(ours) == 2 and all(s.shape == (b, k) and s.data_ptr() == idx.data_ptr() for s in ours)
    hooked = saved_by(lambda h: h.square())
    assert any(s.shape == (b, k, d) for s in hooked) and sum(s.shape == (b, k) for s in hooked) == 2


@pytest.mark.slow
@pytest.mark.skipif(triton_missing, reason="triton not installed")
def test_triton_path_under_interpreter_matches_reference():
    """fp32 / bf16 / fp16 / fp64, sorted and unsorted int64 / int32 index, a strided x, D over one tile, all kept and
    none kept: outputs and the three gradients bit-exact vs the reference."""
    proc = run_interpreted(["-m", "lit_ft.kernels.token_rows.selfcheck", "--device", "cpu"])
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL PASS" in proc.stdout and proc.stdout.count("PASS ") == 5


@pytest.mark.slow
@pytest.mark.skipif(triton_missing, reason="triton not installed")
def test_triton_out_of_range_index_under_interpreter():
    """Unchecked on CUDA: an out-of-range gather gives a NaN row, an out-of-range merge writes nothing; never an
    out-of-bounds access."""
    code = (
        "import torch\n"
        "from lit_ft.kernels.token_rows import triton_impl as ti\n"
        "x = torch.randn(1, 4, 3); idx = torch.tensor([[1, 4, -1]])\n"
        "g = ti.gather_rows(x, idx)\n"
        "assert torch.equal(g[0, 0], x[0, 1]) and g[0, 1:].isnan().all(), g\n"
        "m = ti.merge_rows(x, torch.ones(1, 3, 3), idx)\n"
        "assert torch.equal(m[0, 1], torch.ones(3)) and torch.equal(m[0, [0, 2, 3]], x[0, [0, 2, 3]]), m\n"
    )
    proc = run_interpreted(["-c", code])
    assert proc.returncode == 0, proc.stderr


# --- custom op plumbing -------------------------------------------------------------------------------------------


def test_opcheck_custom_ops():
    x, rows, idx = make_case(dtype=torch.float32)
    x, rows = x.requires_grad_(), rows.requires_grad_()
    torch.library.opcheck(_gather_rows, (x, idx, "torch"))
    torch.library.opcheck(_merge_rows, (x, rows, idx, "torch"))
    torch.library.opcheck(_scatter_rows, (rows, idx, x.shape[1], "torch"))
    torch.library.opcheck(_zero_rows, (x, idx.int(), "torch"))


def test_torch_compile_fullgraph_aot_eager():
    """A LeMo-style layer step compiled as one graph (both ops), same loss and gradients as eager."""
    torch._dynamo.reset()
    x, _, idx = make_case(dtype=torch.float32)
    w = torch.randn(x.shape[2], x.shape[2], requires_grad=True)

    def fn(x, w):
        kept = gather_rows(x, idx, impl="auto")
        return merge_rows(x, torch.tanh(kept @ w), idx, impl="auto").square().sum()

    x = x.requires_grad_()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss_c = compiled(x, w)
    g_c = torch.autograd.grad(loss_c, (x, w))
    loss_e = fn(x, w)
    g_e = torch.autograd.grad(loss_e, (x, w))
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


def test_public_names_and_import_without_triton():
    import lit_ft.kernels as kernels

    assert kernels.gather_rows is gather_rows and kernels.merge_rows is merge_rows
    code = ("import sys\nfrom lit_ft.kernels import gather_rows, merge_rows\n"
            "assert callable(gather_rows) and callable(merge_rows) and 'triton' not in sys.modules\n")
    proc = run_interpreted(["-c", code])  # from the repo root (TRITON_INTERPRET is irrelevant: nothing imports it)
    assert proc.returncode == 0, proc.stderr


# --- dispatch and errors ------------------------------------------------------------------------------------------


def test_impl_triton_on_cpu_raises():
    x, rows, idx = make_case(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="impl='triton'"):
        gather_rows(x, idx, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        merge_rows(x, rows, idx, impl="cuda")


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(x=torch.zeros(3, 10)), ValueError, r"x must be 3-D"),
        (dict(x=torch.zeros(3, 10, 6, dtype=torch.int64)), TypeError, "x must have dtype"),
        (dict(index=torch.zeros(3, 4)), TypeError, "index must have dtype"),
        (dict(index=torch.zeros(12, dtype=torch.long)), ValueError, "index must be 2-D"),
        (dict(index=torch.zeros(2, 1, dtype=torch.long)), ValueError, r"index must be \[B, k\] with B=3"),
        (dict(index=torch.full((3, 1), 10)), ValueError, r"index must be in \[0, T\) = \[0, 10\).*got 10"),
        (dict(index=torch.full((3, 1), -1)), ValueError, r"index must be in \[0, T\) = \[0, 10\).*got -1"),
        (dict(index=torch.tensor([[0, 1], [2, 3], [5, 5]])), ValueError, "distinct.*got 5 twice in batch row 2"),
    ],
)
def test_gather_bad_input_errors(change, exc, match):
    x, _, idx = make_case(dtype=torch.float32)
    args = dict(x=x, index=idx)
    args.update(change)
    with pytest.raises(exc, match=match):
        gather_rows(**args, impl="torch")


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(base=torch.zeros(3, 10, 6, dtype=torch.int32)), TypeError, "base must have dtype"),
        (dict(rows=torch.zeros(3, 4)), ValueError, "rows must be 3-D"),
        (dict(rows=torch.zeros(3, 5, 6)), ValueError, r"rows must be \[B, k, D\] = \[3, 4, 6\].*\(3, 5, 6\)"),
        (dict(rows=torch.zeros(3, 4, 6, dtype=torch.float64)), TypeError, "rows dtype torch.float64 must equal"),
        (dict(index=torch.tensor([[0, 1, 2, 3]] * 2 + [[9, 1, 9, 2]])), ValueError, "got 9 twice in batch row 2"),
        (dict(index=torch.full((3, 4), 11)), ValueError, r"\[0, 10\) \(the token rows of base\), got 11"),
    ],
)
def test_merge_bad_input_errors(change, exc, match):
    x, rows, idx = make_case(dtype=torch.float32)
    args = dict(base=x, rows=rows, index=idx)
    args.update(change)
    with pytest.raises(exc, match=match):
        merge_rows(**args, impl="torch")


def test_device_mismatch_is_named():
    x, rows, idx = make_case(dtype=torch.float32)
    with pytest.raises(ValueError, match="index is on meta but x is on cpu"):
        gather_rows(x, idx.to("meta"))
    with pytest.raises(ValueError, match="rows is on meta but base is on cpu"):
        merge_rows(x, rows.to("meta"), idx)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_path_on_cuda():
    from lit_ft.kernels.token_rows import selfcheck

    assert selfcheck.main(["--device", "cuda"]) == 0
    x, rows, idx = (z.cuda() for z in make_case(dtype=torch.float32))
    x, rows = x.requires_grad_(), rows.requires_grad_()
    torch.library.opcheck(_gather_rows, (x, idx, "triton"))
    torch.library.opcheck(_merge_rows, (x, rows, idx, "triton"))
    fn = torch.compile(lambda x, r: merge_rows(x, gather_rows(x, idx, impl="triton") * r, idx, impl="triton"),
                       fullgraph=True)
    fn(x, rows).sum().backward()
    assert torch.equal(rows.grad, gather_rows_reference(x, idx).detach())
