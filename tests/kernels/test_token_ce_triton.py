"""Triton path of the fused token CE under the Triton interpreter (CPU), plus CUDA-only checks.

TRITON_INTERPRET must be set before triton is imported, so the interpreter runs in a subprocess: the main pytest
process never has it set.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import run_interpreted

triton_missing = subprocess.run([sys.executable, "-c", "import triton"], capture_output=True).returncode != 0


def _interp(args, timeout=120):
    return run_interpreted(["-m", "lit_ft.kernels.token_ce.selfcheck", "--device", "cpu", *args], timeout=timeout)


@pytest.mark.slow
@pytest.mark.skipif(triton_missing, reason="triton not installed")
def test_triton_path_under_interpreter_matches_reference():
    """fp32 and bf16 (upcast before tl.dot), weights, keep, bias, softcap, scale, every reduction, odd chunks,
    all-ignored: accuracy rule vs the fp64 reference, loss/nll/entropy/lse and all gradients."""
    proc = _interp([])
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL PASS" in proc.stdout
    assert proc.stdout.count("PASS ") >= 8


def test_main_process_has_no_interpreter_env():
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_path_on_cuda():
    from lit_ft.kernels.token_ce import selfcheck

    assert selfcheck.main(["--device", "cuda"]) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("gemm", ["cublas", "triton"])
def test_triton_op_compiles_and_opchecks_on_cuda(gemm, monkeypatch):
    """Both GEMM routes (the host-count cuBLAS one and the no-sync Triton one) under opcheck and compile."""
    monkeypatch.setenv("LIT_FT_TOKEN_CE_GEMM", gemm)
    from lit_ft.kernels import fused_linear_token_ce
    from lit_ft.kernels.token_ce import _token_ce

    h = torch.randn(64, 32, device="cuda", requires_grad=True)
    w = torch.randn(100, 32, device="cuda", requires_grad=True)
    y = torch.randint(0, 100, (64,), device="cuda")
    torch.library.opcheck(_token_ce, (h, w, y, None, None, None, None, -100, "mean", 0.0, 1.0, 0, "triton", 3,
                                      "fp32"))

    def fn(h, w):
        return fused_linear_token_ce(h, w, y, impl="triton")

    loss = torch.compile(fn, fullgraph=True)(h, w)
    loss.backward()
    ref = torch.nn.functional.cross_entropy((h.detach().double() @ w.detach().double().T), y)
    assert torch.allclose(loss.double(), ref, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(h.grad).all()
