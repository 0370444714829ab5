"""``patch_fused_loss`` (lit_ft.callbacks.FusedLoss) vs the model's own loss: peak memory and step time of one
training step of a plain ``model(**batch).loss``.

    python benchmarks/fused_patch.py                   # CPU, fp32, B=4 T=2048, SmolLM2-135M head, 2 decoder layers
    python benchmarks/fused_patch.py --device cuda --dtype bf16

The model is a Llama config with SmolLM2-135M's shapes (hidden 576, intermediate 1536, 9 heads / 3 KV heads, vocab
49152, tied embeddings) cut to ``--layers`` decoder layers, so the lm_head and the loss dominate the step. One step =
``model(input_ids, labels=...).loss.backward()``; "hf" is the unpatched model (it builds the ``[B, T, V]`` logits,
HF's ``ForCausalLMLoss`` upcasts them and autograd keeps their gradient), "fused" the model patched with
:func:`lit_ft.core.loss.fused_forward.patch_fused_loss` (one position's logits, the loss from hidden states in token
chunks). Each method runs in a fresh subprocess; memory is the peak increase over the first full-size step (CPU: RSS
high-water mark, CUDA: ``max_memory_allocated``), after a tiny warm-up step that allocates the parameter gradients;
time is the best of ``--repeats`` further steps. Prints a markdown table; ratios < 1 mean the fused path is better.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._rss import first_peak_then_times, fmt_bytes, run_worker  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS = ("hf", "fused")


def build_model(layers: int, dtype: torch.dtype, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True,
        rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(device=device, dtype=dtype).train()


def measure(method: str, b: int, t: int, layers: int, dtype: torch.dtype, device: str, repeats: int) -> dict:
    model = build_model(layers, dtype, device)
    if method == "fused":
        from lit_ft.core.loss.fused_forward import patch_fused_loss

        patch_fused_loss(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 49152, (b, t), generator=g).to(device)
    labels = ids.clone()
    labels[:, : t // 8] = -100  # a prompt
    tiny = ids[:1, :16]
    model(input_ids=tiny, labels=tiny).loss.backward()  # warm-up: imports, op registration, parameter gradients
    cuda = device == "cuda"

    def step():
        model.zero_grad(set_to_none=False)  # the gradients stay allocated: the peak is the step's own memory
        model(input_ids=ids, labels=labels).loss.backward()

    peak, times = first_peak_then_times(step, cuda, repeats)
    return {"time_s": min(times), "peak_bytes": peak}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--b", type=int, default=4)
    p.add_argument("--t", type=int, default=2048)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="timed steps after the memory step (best-of)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        res = measure(args.method, args.b, args.t, args.layers, DTYPES[args.dtype], args.device, args.repeats)
        print("RESULT " + json.dumps(res))
        return 0
    results = {}
    for method in METHODS:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--method", method, "--device", args.device,
               "--dtype", args.dtype, "--b", str(args.b), "--t", str(args.t), "--layers", str(args.layers),
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
        results[method] = run_worker(cmd, method)
    hf, fused = results["hf"], results["fused"]
    print(f"device={args.device} dtype={args.dtype} B={args.b} T={args.t} D=576 V=49152 layers={args.layers} "
          f"threads={args.threads or torch.get_num_threads()} repeats={args.repeats} (first-step peak, best-of time)\n")
    print("| method | step time | peak memory increase |")
    print("|---|---|---|")
    for name, r in (("HF loss (unpatched)", hf), ("patch_fused_loss", fused)):
        print(f"| {name} | {r['time_s']:.2f} s | {fmt_bytes(r['peak_bytes'])} |")
    print(f"| **ratio fused / HF** | **{fused['time_s'] / hf['time_s']:.2f}** | "
          f"**{fused['peak_bytes'] / max(hf['peak_bytes'], 1):.2f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
