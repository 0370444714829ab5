"""The parallel adapter's fused FFN path (``ParallelAdapters(fused=True)``) against the hooked one, side by side.

    OMP_NUM_THREADS=1 python benchmarks/adapters_fused_ffn.py            # CPU, fp32, writes the JSON below
    python benchmarks/adapters_fused_ffn.py --tokens 512 --repeats 5 --out /tmp/x.json

One FFN block with a parallel adapter, alone (no attention, no model): "hooked" is the block's own forward plus the
adapter in a forward hook (four GEMMs for a non-gated MLP, five for a gated one), "fused" the replacement forward of
:class:`lit_ft.core.parallel_adapter.FusedParallelAdapterSet` (two GEMMs over concatenated weights). Shapes:

* ``smollm2_gated``: SmolLM2-135M's Llama MLP (hidden 576, intermediate 1536, SiLU-gated): one GEMM over
  ``[W_gate | W_up | W_down_adapter]``, one over ``[W_down ; s·W_up_adapter]``;
* ``gpt2_nongated``: GPT-2 small's MLP (hidden 768, intermediate 3072, GELU, Conv1D layers): ``[W_fc1 | W_down]``
  and ``[W_fc2 ; s·W_up]``;

each with the paper's FFN adapter (r = 512) and its GLUE one (r = 16). Three modes: ``train`` (forward + backward,
gradients reach the adapter; the fused weights are concatenated in every call), ``no_grad`` (inference: the fused
path builds the concatenated weights once and reuses them) and ``no_grad_first`` (inference paying the
concatenation every call, as the first call after a weight change does). Both paths run in the same process,
interleaved, ``--repeats`` times each after a warm-up; time is the median. The outputs are checked equal (1e-4 on
these sizes) before timing. Ratio = fused / hooked: < 1 means the fused path is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lit_ft.core.adapters import AdapterSet, AdapterTarget  # noqa: E402
from lit_ft.core.parallel_adapter import FusedParallelAdapterSet, ParallelAdapter  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "adapters_fused_ffn.json")


def build_model(shape: str) -> tuple[nn.Module, nn.Module, int]:
    """A one-layer HF model of the shape's widths (tiny vocabulary), its FFN block and the hidden size."""
    torch.manual_seed(0)
    if shape == "smollm2_gated":
        from transformers import LlamaConfig, LlamaForCausalLM

        m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                                         num_attention_heads=9, num_key_value_heads=3, hidden_act="silu"))
        return m, m.model.layers[0].mlp, 576
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=768, n_layer=1, n_head=12, resid_pdrop=0.0))
    return m, m.transformer.h[0].mlp, 768


def make_sets(block: nn.Module, hidden: int, r: int) -> tuple[AdapterSet, AdapterSet]:
    g = torch.Generator().manual_seed(1)
    a = ParallelAdapter(hidden, hidden, r, 4.0)
    with torch.no_grad():
        for p in a.parameters():  # non-zero everywhere (the LoRA init's zero up-projection would test nothing)
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    t = AdapterTarget(0, "mlp")
    b = ParallelAdapter(hidden, hidden, r, 4.0)
    b.load_state_dict(a.state_dict())
    return AdapterSet({t: a}), FusedParallelAdapterSet({t: b})


def time_one(fn, repeats: int) -> list[float]:  # noqa: ANN001
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def run_case(shape: str, r: int, tokens: int, repeats: int) -> list[dict]:
    model, block, hidden = build_model(shape)
    hooked, fused = make_sets(block, hidden, r)
    x = torch.randn(1, tokens, hidden, generator=torch.Generator().manual_seed(2))
    xg = x.clone().requires_grad_(True)

    def train_step(s: AdapterSet) -> None:
        for p in s.adapters.parameters():
            p.grad = None
        block(xg).sum().backward()

    def infer(s: AdapterSet) -> None:
        with torch.no_grad():
            block(x)

    def infer_first(s: AdapterSet) -> None:
        with torch.no_grad():
            if isinstance(s, FusedParallelAdapterSet):
                for h in s._handles:
                    h._cache = None  # as after an optimizer step: the concatenated weights are rebuilt
            block(x)

    # equal outputs first
    with torch.no_grad():
        hooked.attach(model)
        want = block(x)
        hooked.detach()
        fused.attach(model)
        got = block(x)
        fused.detach()
    err = float((got - want).abs().max())
    assert err < 1e-4, f"{shape} r={r}: fused differs from hooked by {err}"
    rows = []
    for mode, fn in (("train", train_step), ("no_grad", infer), ("no_grad_first", infer_first)):
        times: dict[str, list[float]] = {"hooked": [], "fused": []}
        for s in (hooked, fused):  # warm-up
            s.attach(model)
            fn(s)
            fn(s)
            s.detach()
        for _ in range(repeats):  # interleaved: drift in the machine's load hits both paths alike
            for name, s in (("hooked", hooked), ("fused", fused)):
                s.attach(model)
                times[name] += time_one(lambda: fn(s), 1)
                s.detach()
        h, f = statistics.median(times["hooked"]), statistics.median(times["fused"])
        rows.append({"shape": shape, "bottleneck": r, "tokens": tokens, "mode": mode, "hooked_ms": 1e3 * h,
                     "fused_ms": 1e3 * f, "ratio_fused_over_hooked": f / h, "max_abs_diff": err})
        print(f"{shape:14s} r={r:<4d} {mode:14s} hooked {1e3 * h:8.2f} ms  fused {1e3 * f:8.2f} ms  "
              f"ratio {f / h:.3f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per call (batch x sequence), default 2048")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--bottlenecks", type=int, nargs="+", default=[512, 16])
    ap.add_argument("--shapes", nargs="+", default=["smollm2_gated", "gpt2_nongated"])
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    rows = []
    for shape in args.shapes:
        for r in args.bottlenecks:
            rows += run_case(shape, r, args.tokens, args.repeats)
    result = {
        "what": "FFN block + parallel adapter (s=4): fused two-GEMM forward vs forward + hook, CPU fp32, median ms",
        "command": "OMP_NUM_THREADS=1 python benchmarks/adapters_fused_ffn.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "processor": platform.processor(), "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
