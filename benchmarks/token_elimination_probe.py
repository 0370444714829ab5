"""Diagnosis of TokenElimination's loss gap on an untrained-for-it model: which part of the approximation costs the
loss? Real SmolLM2-135M-Instruct, news packed to T tokens, no training; held-out loss with, per decoder layer from
layer 2 on, a share ``1 - keep`` of the tokens not updated by the layer:

- ``eliminated``: TokenElimination as implemented (attention-received score; the dropped tokens are absent from the
  layer: neither updated nor keys/values);
- ``keys_kept``: the same selection, but the layer runs on every token and the dropped ones only keep their input
  (still keys/values for the others);
- ``update_norm`` / ``relative_update``: an oracle that keeps the tokens whose update ``||f(x) - x||`` (absolute, or
  relative to ``||x||``) is largest — the tokens a layer changes least are the ones skipped;
- ``random``: a random selection of the same size.

    python benchmarks/token_elimination_probe.py [--seq-len 1024] [--seqs 2]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.token_elimination import build_module, lm_batch, packed_news  # noqa: E402


def main() -> None:
    import lightning.pytorch as pl

    from lit_ft.callbacks import TokenElimination
    from lit_ft.callbacks.token_selection._token_elimination_parts import segment_topk
    from lit_ft.core.layer_hooks import ORDER_ELIMINATE, register_layer_hook, register_layer_pre_hook

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--seqs", type=int, default=2)
    p.add_argument("--keep-ratios", type=float, nargs="+", default=[0.9, 0.5])
    args = p.parse_args()
    data = packed_news(args.seq_len, args.seqs)
    module = build_module(False, "float32", None).eval()
    n = len(module.model.model.layers)
    gen = torch.Generator().manual_seed(0)

    def loss(cb=None) -> float:
        total = 0.0
        with torch.no_grad():
            for x in data:
                b = lm_batch(x[None])
                if cb is not None:
                    cb._arm(b, training=True, step=0)
                total += float(module.model(input_ids=b["input_ids"], labels=b["labels"], use_cache=False).loss)
        return total / len(data)

    print(f"| keep | selection | held-out loss (without elimination: {loss():.3f}) |\n|---|---|---|", flush=True)
    for r in args.keep_ratios:
        for mode in ("eliminated", "keys_kept"):
            cb = TokenElimination(keep_ratio=r, min_seq_len=1)
            trainer = pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
            cb.setup(trainer, module, "fit")
            if mode == "keys_kept":
                select = cb._before_layer

                def pre(index, layer, a, kw, select=select, cb=cb):
                    if select(index, layer, a, kw) is not None:
                        cb._open[index] = (*cb._open[index], "all tokens")
                    return None  # the layer runs on every token

                def post(index, layer, a, kw, output, cb=cb):
                    opened = cb._open.pop(index, None)
                    if opened is None:
                        return None
                    hidden, idx = opened[0], opened[1]
                    keep = torch.zeros(hidden.shape[:2], dtype=torch.bool).scatter_(1, idx, True)
                    return torch.where(keep[..., None], output, hidden)

                for h in cb._handles:
                    h.remove()
                layers = cb.eliminating_layers()
                cb._handles = [register_layer_pre_hook(module.model, pre, order=ORDER_ELIMINATE, layers=layers),
                               register_layer_hook(module.model, post, order=ORDER_ELIMINATE, layers=layers)]
            value = loss(cb)
            cb._active = False
            cb.teardown(trainer, module, "fit")
            print(f"| {r} | {mode} | {value:.3f} |", flush=True)
        for mode in ("update_norm", "relative_update", "random"):
            def post(index, layer, a, kw, output, mode=mode, r=r):
                hidden = a[0] if a else kw["hidden_states"]
                out = output[0] if isinstance(output, tuple) else output
                score = (out - hidden).norm(dim=-1)
                if mode == "relative_update":
                    score = score / hidden.norm(dim=-1).clamp_min(1e-6)
                elif mode == "random":
                    score = torch.rand(score.shape, generator=gen)
                keep = torch.zeros(score.shape, dtype=torch.bool).scatter_(1, segment_topk(score, r, 256), True)
                return torch.where(keep[..., None], out, hidden)

            handle = register_layer_hook(module.model, post, order=ORDER_ELIMINATE, layers=list(range(2, n)))
            value = loss()
            handle.remove()
            print(f"| {r} | {mode} | {value:.3f} |", flush=True)


if __name__ == "__main__":
    main()
