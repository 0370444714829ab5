"""TokenElimination (LeMo) vs the same model without elimination: activation memory, peak memory, step time, and the
loss it costs, side by side in one run.

    python benchmarks/token_elimination.py memory                       # CPU, SmolLM2-135M, T = 4096 and 8192
    python benchmarks/token_elimination.py memory --device cuda --dtype bf16 --seq-lens 4096 8192 16384 --random-init
    python benchmarks/token_elimination.py quality                      # CPU: loss gap at init + held-out after N steps

``memory``: each (sequence length, arm) runs in a fresh process: one warm-up training step, then ``--repeats`` measured
steps of ``CausalLMModule`` (fused loss) at batch 1 (memory read on the first, time = their median). Measured: the bytes autograd saves for backward in the measured step
(``torch.autograd.graph.saved_tensors_hooks``: unique storages, parameters excluded — the activation memory), the
peak memory above the start of the step (CPU: RSS high-water mark; CUDA: ``max_memory_allocated``) and the step
time. Arms: ``base`` (no callback) and ``keep=<r>`` (``TokenElimination(keep_ratio=r)`` with its other defaults,
selecting with the predictors, i.e. the steady state after calibration; the exact score's cost appears only on
calibration / check steps and is reported separately as ``exact=<r>``).

``gap`` (real weights, no training): held-out loss with elimination active (exact score) for several layer patterns
over the loss without — where the approximation costs what.

``quality`` (real weights and text only): news articles (the ``bbcnews`` asset) packed into sequences of ``T`` tokens.
(1) The approximation at initialisation: held-out loss of the model with elimination active (exact score) over the
loss without. (2) Fine-tune ``--steps`` steps with and without elimination (same data, order and seed; the
elimination arm calibrates for ``--calibration-steps`` and then selects with its predictors), then the held-out loss
of both models evaluated without elimination, and the predictors' agreement with the exact selection on the
held-out sequences.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._rss import fmt_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402

MODEL = "smollm2-135m-instruct"


# -- data -----------------------------------------------------------------------------------------------------------
def packed_news(seq_len: int, n: int) -> torch.Tensor:
    """``n`` sequences of ``seq_len`` tokens: BBC news articles tokenized with SmolLM2's tokenizer, joined with EOS."""
    from transformers import AutoTokenizer

    from lit_ft import assets

    tok = AutoTokenizer.from_pretrained(assets.get(MODEL))
    ids: list[int] = []
    with open(assets.get("bbcnews")) as f:
        for line in f:
            ids += tok(json.loads(line)["text"])["input_ids"] + [tok.eos_token_id]
            if len(ids) >= seq_len * n:
                break
    if len(ids) < seq_len * n:
        raise SystemExit(f"bbcnews has {len(ids)} tokens, fewer than {seq_len} x {n}")
    return torch.tensor(ids[: seq_len * n]).view(n, seq_len)


def lm_batch(ids: torch.Tensor) -> dict:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "sample_idx": torch.arange(ids.shape[0])}


# -- memory / time (one fresh process per cell) ---------------------------------------------------------------------
def build_module(random_init: bool, dtype: str, layers: int | None):
    from lit_ft.modules import CausalLMModule

    torch.manual_seed(0)
    if random_init:  # the model's shapes, random weights (the GPU machine has no model hub nor asset cache)
        from transformers import AutoConfig

        from lit_ft import assets

        if assets.is_cached(MODEL):
            cfg = AutoConfig.from_pretrained(assets.get(MODEL)).to_dict()
        else:  # no cache (and maybe no network): SmolLM2-135M's shapes
            cfg = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                       rms_norm_eps=1e-5, rope_theta=100000.0)
        keep = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "tie_word_embeddings", "rms_norm_eps", "rope_theta")
        cfg = {k: cfg[k] for k in keep if k in cfg}
        cfg["max_position_embeddings"] = 65536
        module = CausalLMModule(model_config=cfg, num_hidden_layers=layers, torch_dtype=dtype)
    else:
        module = CausalLMModule(model=MODEL, num_hidden_layers=layers, torch_dtype=dtype)
    module.model.config._attn_implementation = "sdpa"
    return module


def saved_activation_bytes(params: set[int]):
    """A saved-tensors hook pair counting unique storages that are not parameters."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in params:
                seen[ptr] = st.nbytes()
        except Exception:  # noqa: BLE001 - e.g. a tensor subclass without storage
            pass
        return t

    return seen, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def child_memory(args: argparse.Namespace) -> dict:
    import lightning.pytorch as pl

    from lit_ft.callbacks import TokenElimination

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cuda = args.device == "cuda"
    module = build_module(args.random_init, args.dtype, args.layers)
    T = args.seq_len
    g = torch.Generator().manual_seed(1)
    vocab = module.model.config.vocab_size
    batches = [lm_batch(torch.randint(0, vocab, (1, T), generator=g)) for _ in range(2)] if args.random_init \
        else [lm_batch(x[None]) for x in packed_news(T, 2)]
    arm = args.arm
    callbacks = []
    if arm != "base":
        kind, ratio = arm.split("=")
        exact = kind == "exact"
        callbacks.append(TokenElimination(keep_ratio=float(ratio), calibration_steps=2 if exact else 0,
                                          check_every_n_steps=0, predictor=not exact))
    result: dict = {"arm": arm, "seq_len": T}
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}

    step_fn = module.training_step

    def training_step(batch, batch_idx):
        if batch_idx >= 2:  # further timed steps (memory is read on the first measured step only)
            if cuda:
                torch.cuda.synchronize()
            result["_t0"] = time.perf_counter()
            return step_fn(batch, batch_idx)
        if batch_idx == 0:
            return step_fn(batch, batch_idx)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            base = rss_bytes()
        seen, hooks = saved_activation_bytes(params)
        t0 = time.perf_counter()
        with hooks:
            loss = step_fn(batch, batch_idx)
        result["saved_bytes"] = sum(seen.values())
        result["_t0"], result["_base"] = t0, base
        return loss

    def on_after_backward():
        if "_t0" not in result:
            return
        if cuda:
            torch.cuda.synchronize()
        result.setdefault("times_s", []).append(time.perf_counter() - result.pop("_t0"))
        if "_base" in result:
            peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
            result["peak_bytes"] = peak - result.pop("_base")

    module.training_step = training_step
    module.on_after_backward = on_after_backward
    precision = "bf16-true" if args.dtype == "bfloat16" and cuda else "32-true"
    trainer = pl.Trainer(accelerator="cuda" if cuda else "cpu", devices=1, max_steps=1 + args.repeats,
                         precision=precision,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, limit_val_batches=0)
    from torch.utils.data import DataLoader

    trainer.fit(module, train_dataloaders=DataLoader(batches * (1 + args.repeats), batch_size=None))
    times = sorted(result.pop("times_s"))
    result["time_s"] = times[len(times) // 2]  # the median of the measured steps
    if callbacks:
        result["kept_fraction"] = callbacks[0].last_metrics.get("lit_ft/token_elimination/kept_fraction")
    return result


def run_memory(args: argparse.Namespace) -> list[dict]:
    arms = ["base"] + [f"keep={r:g}" for r in args.keep_ratios] + ([f"exact={args.keep_ratios[0]:g}"] if args.exact else [])
    rows = []
    for T in args.seq_lens:
        for arm in arms:
            cmd = [sys.executable, os.path.abspath(__file__), "_child", "--seq-len", str(T), "--arm", arm,
                   "--device", args.device, "--dtype", args.dtype, "--repeats", str(args.repeats)] + (["--random-init"] if args.random_init else []) \
                + (["--layers", str(args.layers)] if args.layers else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"T={T} {arm}: failed\n{proc.stderr[-3000:]}", flush=True)
                continue
            row = json.loads(line[7:])
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| T | arm | saved activations | ratio | peak memory | ratio | step time | ratio | kept share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["seq_len"] == row["seq_len"] and r["arm"] == "base")
        kept = "" if row.get("kept_fraction") is None else f"{row['kept_fraction']:.3f}"
        print(f"| {row['seq_len']} | {row['arm']} | {fmt_bytes(row['saved_bytes'])} | "
              f"{row['saved_bytes'] / base['saved_bytes']:.3f} | {fmt_bytes(row['peak_bytes'])} | "
              f"{row['peak_bytes'] / base['peak_bytes']:.3f} | {row['time_s']:.2f} s | "
              f"{row['time_s'] / base['time_s']:.3f} | {kept} |")
    return rows


# -- quality (real weights, CPU) ------------------------------------------------------------------------------------
def heldout_loss(module, data: torch.Tensor) -> float:
    module.eval()
    total = 0.0
    with torch.no_grad():
        for x in data:
            total += float(module.model(input_ids=x[None], labels=x[None], use_cache=False).loss)
    module.train()
    return total / data.shape[0]


def run_quality(args: argparse.Namespace) -> dict:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lit_ft.callbacks import TokenElimination

    T, n_train, n_eval = args.seq_lens[0], args.steps, args.eval_seqs
    data = packed_news(T, n_train + n_eval)
    train, held = data[:n_train], data[n_train:]
    out: dict = {"seq_len": T, "steps": n_train, "eval_seqs": n_eval, "keep_ratio": args.keep_ratios[0],
                 "learning_rate": args.lr}

    # (1) the approximation at initialisation: the same weights, elimination on (exact score) vs off
    module = build_module(False, "float32", args.layers)
    base0 = heldout_loss(module, held)
    cb = TokenElimination(keep_ratio=args.keep_ratios[0])
    trainer = pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    cb.setup(trainer, module, "fit")
    cb._step = 0
    losses = []
    with torch.no_grad():
        for x in held:
            b = lm_batch(x[None])
            cb._arm(b, training=True, step=0)
            losses.append(float(module.model(input_ids=b["input_ids"], labels=b["labels"], use_cache=False).loss))
    cb._active = False
    cb.teardown(trainer, module, "fit")
    out["init_loss_full"] = base0
    out["init_loss_eliminated"] = sum(losses) / len(losses)
    print(json.dumps(out), flush=True)

    # (2) fine-tune with and without elimination, evaluate both without it
    for arm in ("base", "eliminate"):
        module = build_module(False, "float32", args.layers)
        module.learning_rate = args.lr
        callbacks = []
        if arm == "eliminate":
            callbacks.append(TokenElimination(keep_ratio=args.keep_ratios[0], calibration_steps=args.calibration_steps,
                                              check_every_n_steps=args.check_every))
        agreement = []

        class Spy(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if callbacks and "lit_ft/token_elimination/predictor_agreement" in callbacks[0].last_metrics:
                    agreement.append(callbacks[0].last_metrics["lit_ft/token_elimination/predictor_agreement"])

        t0 = time.perf_counter()
        pl.Trainer(max_steps=n_train, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=callbacks + [Spy()], limit_val_batches=0).fit(
            module, train_dataloaders=DataLoader([lm_batch(x[None]) for x in train], batch_size=None))
        out[f"{arm}_train_s"] = time.perf_counter() - t0
        out[f"{arm}_heldout_loss"] = heldout_loss(module, held)
        if agreement:
            out["predictor_agreement"] = agreement
        print(json.dumps(out), flush=True)
    print()
    print(f"held-out loss at init: full {out['init_loss_full']:.4f}, with elimination (exact, keep "
          f"{out['keep_ratio']}) {out['init_loss_eliminated']:.4f} ({out['init_loss_eliminated'] / base0:.3f}x)")
    print(f"after {n_train} steps at T={T}: without elimination {out['base_heldout_loss']:.4f}, trained with "
          f"elimination {out['eliminate_heldout_loss']:.4f} "
          f"({out['eliminate_heldout_loss'] / out['base_heldout_loss']:.4f}x)")
    return out


GAP_CONFIGS = {  # name -> (keep ratio of the eliminating layers, first layer, last layer + 1); the rest dense
    "keep 1.0 from layer 2 (the path only)": (1.0, 2, None),
    "keep 0.9 from layer 2": (0.9, 2, None),
    "keep 0.75 from layer 2": (0.75, 2, None),
    "keep 0.5 from layer 2 (default)": (0.5, 2, None),
    "keep 0.5, layers 15-29": (0.5, 15, None),
    "keep 0.5, layers 2-19 (last 10 dense)": (0.5, 2, -10),
    "keep 0.5, layers 2-21 (last 8 dense)": (0.5, 2, -8),
    "keep 0.5, layer 10 only": (0.5, 10, 11),
    "keep 0.5, last layer only": (0.5, -1, None),
}


def run_gap(args: argparse.Namespace) -> dict:
    """Held-out loss of the real model (no training) with elimination active (exact score) per layer pattern,
    against the loss without: where the approximation costs what."""
    import lightning.pytorch as pl

    from lit_ft.callbacks import TokenElimination

    T = args.seq_lens[0]
    data = packed_news(T, args.eval_seqs)
    module = build_module(False, "float32", args.layers).eval()
    n = len(module.model.model.layers)

    def loss(cb) -> float:
        total = 0.0
        with torch.no_grad():
            for x in data:
                b = lm_batch(x[None])
                if cb is not None:
                    cb._arm(b, training=True, step=0)  # a training batch's selection, exact score
                total += float(module.model(input_ids=b["input_ids"], labels=b["labels"], use_cache=False).loss)
        return total / len(data)

    out = {"seq_len": T, "eval_seqs": args.eval_seqs, "full": loss(None), "configs": {}}
    print(f"without elimination: {out['full']:.3f}", flush=True)
    for name, (ratio, first, last) in GAP_CONFIGS.items():
        first %= n
        last = n if last is None else last % n
        ratios = [ratio if first <= i < last else 1.0 for i in range(n)]
        cb = TokenElimination(layer_keep_ratios=ratios, min_seq_len=1)
        trainer = pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
        cb.setup(trainer, module, "fit")
        value = loss(cb)
        cb._active = False
        cb.teardown(trainer, module, "fit")
        out["configs"][name] = value
        print(f"{name}: {value:.3f} ({value / out['full']:.2f}x)", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("memory", "quality", "gap", "_child"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--keep-ratios", type=float, nargs="+", default=[0.5, 0.4])
    p.add_argument("--exact", action="store_true", help="also time a step that selects with the exact score")
    p.add_argument("--random-init", action="store_true", help="SmolLM2-135M's shapes, random weights")
    p.add_argument("--layers", type=int, default=None, help="truncate the trunk to this many decoder layers")
    p.add_argument("--arm", default="base")
    p.add_argument("--repeats", type=int, default=1, help="measured steps after the warm-up (time: their median)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--eval-seqs", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--calibration-steps", type=int, default=4)
    p.add_argument("--check-every", type=int, default=4)
    p.add_argument("--json", default=None, help="write the rows / result here")
    args = p.parse_args(argv)
    if args.mode == "_child":
        print("RESULT " + json.dumps(child_memory(args)), flush=True)
        return
    result = {"memory": run_memory, "quality": run_quality, "gap": run_gap}[args.mode](args)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "result": result}, f, indent=1)


if __name__ == "__main__":
    main()
