"""CriticalTokenScoring's contrastive models: trained (LoRA-SFT of the base on one side of the pairs) or loaded, their
fingerprints (what a weights cache is checked against) and the no-grad scoring pass through the chunked kernel."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lit_ft.callbacks.objectives._critical_data import Row, length_batches, pad
from lit_ft.core.frozen import freeze, frozen_copy, load_frozen_causal_lm
from lit_ft.core.introspect import causal_lm_parts
from lit_ft.core.loss.primitives import final_hidden_states, shift_targets
from lit_ft.core.progress import progress
from lit_ft.kernels.contrastive_logprob import contrastive_logprob

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class ContrastiveTraining:
    """How the positive / negative models are trained (the authors' SFT stage: LoRA r 8, alpha 16, dropout 0.1 on
    the MLP projections, AdamW lr 3e-4, cosine schedule after a linear warm-up, 1 epoch, batch 6)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    learning_rate: float = 3e-4
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 6
    warmup_steps: int = 100
    seed: int = 0

    def steps(self, n_rows: int) -> int:
        total = math.ceil(n_rows / self.batch_size) * self.epochs
        return total if self.max_steps is None else min(total, self.max_steps)

    def describe(self) -> str:
        return repr(sorted(asdict(self).items()))


# -- fingerprints ----------------------------------------------------------------------------------------------------
def tensors_fingerprint(model: nn.Module) -> str:
    """A hex digest of a model's parameters and buffers (names, shapes, dtypes, bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def files_fingerprint(path: str) -> str:
    """A hex digest of a model folder's (or file's) contents: every file's relative name and bytes."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    h = hashlib.blake2b(digest_size=16)
    for q in files:
        h.update(f"{q.relative_to(p) if q != p else q.name}:{q.stat().st_size};".encode())
        with open(q, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


# -- the base and its contrastive copies ---------------------------------------------------------------------------
def _strip_peft_layers(model: nn.Module) -> nn.Module:
    """``model`` with any PEFT LoRA layer replaced by its base layer, merged first (at fit start a LoRA update is
    zero, so this is the base the trained model starts from)."""
    for name, module in list(model.named_modules()):
        base = getattr(module, "base_layer", None)
        if base is None or not type(module).__module__.startswith("peft"):
            continue
        if hasattr(module, "merge"):
            module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    return model


def base_copy(trained: nn.Module) -> nn.Module:
    """A trainable-later fp32 copy of the trained HF model as it starts (hooks and PEFT layers removed)."""
    model = _strip_peft_layers(frozen_copy(trained, "float32"))
    return model


def _lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress_))


def train_contrastive(base: nn.Module, rows: Sequence[Row], cfg: ContrastiveTraining, device: torch.device,
                      desc: str, save_dir: str | os.PathLike | None = None, dtype: str = "float32") -> nn.Module:
    """LoRA-SFT ``base`` (modified in place) on ``rows`` (their labels: completion-only) and return the merged,
    frozen model. The random state of the caller is left untouched (LoRA's initialisation and the shuffle use
    ``cfg.seed``). With ``save_dir`` the adapter is also saved there (PEFT layout: ``positive_model`` /
    ``negative_model`` accept the folder)."""
    from peft import LoraConfig, get_peft_model

    from lit_ft.kernels import fused_linear_token_ce

    total = cfg.steps(len(rows))
    # the authors' 100 warm-up steps, capped at a tenth of a short run (else it would be all warm-up)
    warmup = min(cfg.warmup_steps, max(1, total // 10))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        for p in base.parameters():
            p.requires_grad_(False)
        model = get_peft_model(base.to(device), LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
            bias="none", task_type="CAUSAL_LM"))
        model.train()
        inner = model.get_base_model()
        parts = causal_lm_parts(inner)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
        g = torch.Generator().manual_seed(cfg.seed)
        order: list[int] = []
        for _ in range(cfg.epochs):
            order += torch.randperm(len(rows), generator=g).tolist()
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)][:total]
        for step, idx in enumerate(progress(batches, desc, total=len(batches), unit="step")):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, warmup, cfg.learning_rate)
            batch = {k: v.to(device) for k, v in pad([rows[i] for i in idx]).items()}
            hidden = final_hidden_states(parts, batch)
            targets = shift_targets(batch["labels"]).reshape(-1)
            loss = fused_linear_token_ce(hidden.reshape(-1, hidden.shape[-1]), parts.weight, targets,
                                         bias=parts.bias, logit_scale=parts.logit_scale,
                                         logit_softcap=parts.logit_softcap)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if save_dir is not None:
            model.save_pretrained(str(save_dir))
        merged = model.merge_and_unload()
    return freeze(merged, dtype)


def load_contrastive(source: str, trained: nn.Module, who: str, dtype: str = "float32") -> nn.Module:
    """A frozen contrastive model from ``source``: a PEFT adapter folder (applied to a copy of the trained model as
    it starts, then merged), or a full causal LM (local HF folder or ``lit_ft.assets`` name) sharing the trained
    model's vocabulary."""
    from lit_ft.assets import resolve

    path = resolve(source)
    if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        from peft import PeftModel

        model = PeftModel.from_pretrained(base_copy(trained), path).merge_and_unload()
        return freeze(model, dtype)
    return load_frozen_causal_lm(path, trained, who, dtype)


# -- scoring -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def score_rows(positive: nn.Module, negative: nn.Module, rows: Sequence[Row], beta: float, batch_size: int,
               device: torch.device, desc: str, vocab_chunk: int | None = None) -> list[torch.Tensor]:
    """Per row, ``p_t = softmax((1 + β) z_pos − β z_neg)[y_t]`` at its supervised label positions ``t >= 1`` (in
    order; float32, CPU). ``z`` at position ``t - 1`` predicts label ``t``."""
    positive.to(device).eval()
    negative.to(device).eval()
    pp, pn = causal_lm_parts(positive), causal_lm_parts(negative)
    if (pp.logit_scale, pp.logit_softcap) != (pn.logit_scale, pn.logit_softcap):
        raise ValueError("CriticalTokenScoring: the positive and negative models transform their logits differently "
                         f"(scale, softcap {pp.logit_scale, pp.logit_softcap} vs {pn.logit_scale, pn.logit_softcap});"
                         " they must be the same architecture")
    out: list[torch.Tensor | None] = [None] * len(rows)
    batches = length_batches(rows, batch_size)
    for idx in progress(batches, desc, total=len(batches)):
        batch = {k: v.to(device) for k, v in pad([rows[i] for i in idx]).items()}
        hp = final_hidden_states(pp, batch)
        hn = final_hidden_states(pn, batch)
        targets = shift_targets(batch["labels"])  # [B, T]: position t predicts label t + 1
        b, t = targets.shape
        logp = contrastive_logprob(hp.reshape(b * t, -1), pp.weight, hn.reshape(b * t, -1), pn.weight,
                                   targets.reshape(-1), beta=beta, bias_pos=pp.bias, bias_neg=pn.bias,
                                   logit_scale=pp.logit_scale, logit_softcap=pp.logit_softcap,
                                   vocab_chunk=vocab_chunk).reshape(b, t)
        for j, i in enumerate(idx):
            keep = targets[j] != -100
            out[i] = logp[j][keep].exp().float().cpu()
    return out  # type: ignore[return-value]
