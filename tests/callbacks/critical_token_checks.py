"""Preference-pair pieces for CriticalTokenScoring's tests and contract case: hand-built pair batches (the
PreferenceDataModule contract), a DataModule of them and a plain user module that trains on the weights it finds."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from tests.helpers import VOCAB, tiny_hf_model


def pair_batch(seed: int, batch_size: int = 4, seq_len: int = 12, prompt_len: int = 3) -> dict:
    """Chosen / rejected rows of ragged right-padded lengths, labels -100 on the prompt and padding."""
    g = torch.Generator().manual_seed(100 + seed)
    out = {}
    for k, side in enumerate(("chosen", "rejected")):
        ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=g)
        ids[:, :prompt_len] = torch.randint(3, VOCAB, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
        mask = torch.ones_like(ids)
        labels = ids.clone()
        labels[:, :prompt_len] = -100
        for b in range(batch_size):
            cut = seq_len - ((b + k) % 4)
            ids[b, cut:], mask[b, cut:], labels[b, cut:] = 0, 0, -100
        out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    out["sample_idx"] = torch.arange(batch_size) + seed * batch_size
    return out


class PairData(pl.LightningDataModule):
    """``n_batches`` fixed pair batches (no shuffle)."""

    def __init__(self, n_batches: int = 2, batch_size: int = 4) -> None:
        super().__init__()
        self.batches = [pair_batch(i, batch_size) for i in range(n_batches)]

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None, shuffle=False)


def _side_logps(model, batch: dict, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=batch[f"{side}_input_ids"], attention_mask=batch[f"{side}_attention_mask"]).logits
    labels = batch[f"{side}_labels"][:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return logp * mask, mask


class WeightedPairModule(pl.LightningModule):
    """A user's own sequence-level DPO-style step (reference-free, for brevity) that multiplies each token's log-prob
    by ``batch[<side>_token_weights]`` when present; it keeps the weights it saw (``seen``)."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.model = tiny_hf_model(seed=0, train=True)
        self.lr = lr
        self.seen: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        terms = []
        for side in ("chosen", "rejected"):
            logp, mask = _side_logps(self.model, batch, side)
            w = batch.get(f"{side}_token_weights")
            if w is not None:
                logp = logp * w[:, 1:]
            terms.append(logp.sum(1))
        self.seen.append({k: batch[k].detach().clone() for k in ("chosen_token_weights", "rejected_token_weights")
                          if k in batch})
        return -F.logsigmoid(0.1 * (terms[0] - terms[1])).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=self.lr)


def save_tiny(path: Path, seed: int) -> str:
    """A tiny Llama (the tests' vocabulary) saved as an HF folder: a contrastive model to load."""
    tiny_hf_model(seed=seed).save_pretrained(str(path))
    return str(path)
