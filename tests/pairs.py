"""Random preference-pair batches (PreferenceDataModule's batch contract) and a list DataModule of them, for the
TokenDPO tests and its contract case."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from tests.helpers import VOCAB, tiny_config


def pair_batch(seed: int = 0, batch_size: int = 3, seq_len: int = 11, prompt_len: int = 4, vocab: int = VOCAB,
               weights: bool = False) -> dict:
    """One pair batch: a shared prompt, different random responses, ragged right padding on each side (both sides
    padded to ``seq_len``); with ``weights`` also random ``chosen_token_weights`` / ``rejected_token_weights``."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab, (batch_size, prompt_len), generator=g)
    out: dict = {}
    for side in ("chosen", "rejected"):
        ids = torch.cat([prompt, torch.randint(3, vocab, (batch_size, seq_len - prompt_len), generator=g)], 1)
        labels = ids.clone()
        labels[:, :prompt_len] = -100
        attn = torch.ones_like(ids)
        for b in range(batch_size):
            n = seq_len - int(torch.randint(0, 4, (1,), generator=g))
            ids[b, n:], attn[b, n:], labels[b, n:] = 2, 0, -100
        out[f"{side}_input_ids"], out[f"{side}_attention_mask"], out[f"{side}_labels"] = ids, attn, labels
        if weights:
            out[f"{side}_token_weights"] = torch.rand(ids.shape, generator=g) * 1.5
    out["sample_idx"] = torch.arange(batch_size) + seed * batch_size
    return out


class PairData(pl.LightningDataModule):
    """``n_batches`` pair batches per epoch, in order; validation on the first two."""

    def __init__(self, n_batches: int = 2, **kw) -> None:
        super().__init__()
        self.batches = [pair_batch(i, **kw) for i in range(n_batches)]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.batches[:2], batch_size=None, shuffle=False)


def preference_module(**kw) -> pl.LightningModule:
    from lit_ft.modules import PreferenceModule

    kw.setdefault("learning_rate", 1e-2)
    return PreferenceModule(model_config=tiny_config(), **kw)
