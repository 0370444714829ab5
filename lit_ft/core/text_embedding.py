"""Sentence embeddings of many texts with a BERT-style encoder, cached on disk in shards so that an interrupted run
resumes where it stopped and a repeated one does no work.

Embedding: the encoder's last hidden states averaged over the non-padding tokens (the sentence-transformers
``mean pooling`` convention), optionally L2-normalised. Texts are truncated to ``max_length`` tokens.

Cache layout: ``<cache_dir>/embeddings/<key>/<shard>.npy`` (float32, ``shard_size`` rows each) next to a
``meta.json``; ``key`` hashes the texts, the encoder folder's files, ``max_length`` and ``normalize``, so any change
of those lands in a new folder. A shard is written to a temporary name and renamed, so a killed run never leaves
a half-written shard behind.

Used by GOT-D's selection (lit_ft/data/ot_selection.py), which both ``OTDataSelection`` and
``OTSelectedDataModule`` run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lit_ft.core.progress import progress

__all__ = ["TextEmbedder", "folder_hash", "texts_hash"]

_FOLDER_HASHES: dict[tuple, str] = {}


def folder_hash(folder: str | os.PathLike) -> str:
    """sha256 of a folder's files (relative names and contents, sorted); memoised per (path, sizes, mtimes)."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts[-1:]))
    stamp = (str(root.resolve()), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    known = _FOLDER_HASHES.get(stamp)
    if known is not None:
        return known
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    _FOLDER_HASHES[stamp] = h.hexdigest()
    return _FOLDER_HASHES[stamp]


def texts_hash(texts: Sequence[str], *extra: Any) -> str:
    """sha256 of a list of texts (length-prefixed, so boundaries count) and any extra settings."""
    h = hashlib.sha256(json.dumps([str(e) for e in extra]).encode())
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


class TextEmbedder:
    """Embeds texts with an HF encoder folder (mean pooling), through a sharded on-disk cache.

    Args:
        encoder: an HF encoder folder or a model asset name (``minilm-l6-v2``).
        cache_dir: root of the cache (shards go to ``<cache_dir>/embeddings/<key>/``).
        max_length: tokens per text (longer texts are truncated), >= 2.
        batch_size: texts per encoder forward, >= 1.
        normalize: L2-normalise each embedding (sentence-transformers' ``Normalize`` module); False = the raw mean.
        shard_size: rows per cache shard (the unit of resume), >= 1.
        device: where the encoder runs ("cpu", "cuda", ...).
    """

    def __init__(self, encoder: str, cache_dir: str | os.PathLike, max_length: int = 256, batch_size: int = 64,
                 normalize: bool = False, shard_size: int = 1024, device: str | torch.device = "cpu") -> None:
        from lit_ft import assets

        try:
            self.folder = assets.resolve(encoder)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"encoder={encoder!r}: {e}") from None
        if not os.path.isdir(self.folder):
            raise ValueError(f"encoder={encoder!r} is not a folder (an HF encoder folder or a model asset name)")
        self.encoder_name = encoder
        self.cache_dir = Path(cache_dir)
        self.max_length, self.batch_size, self.normalize = max_length, batch_size, normalize
        self.shard_size, self.device = shard_size, torch.device(device)
        self.encoder_hash = folder_hash(self.folder)
        self._model: Any = None
        self._tokenizer: Any = None
        #: texts encoded by this instance (not read from the cache): what a test counts to see the cache work
        self.encoded = 0

    def key(self, texts: Sequence[str]) -> str:
        return texts_hash(texts, self.encoder_hash, self.max_length, self.normalize, self.shard_size)

    def embed(self, texts: Sequence[str], desc: str = "embedding") -> torch.Tensor:
        """Embeddings [len(texts), dim] (float32), from the cache where present; missing shards are computed and
        written one by one (each is final once written)."""
        if len(texts) == 0:
            raise ValueError(f"{desc}: no texts to embed")
        folder = self.cache_dir / "embeddings" / self.key(texts)
        folder.mkdir(parents=True, exist_ok=True)
        n_shards = (len(texts) + self.shard_size - 1) // self.shard_size
        shard_path = [folder / f"{i:05d}.npy" for i in range(n_shards)]
        missing = [i for i in range(n_shards) if not shard_path[i].is_file()]
        if missing:
            spans = [(i, i * self.shard_size, min((i + 1) * self.shard_size, len(texts))) for i in missing]
            batches = sum((e - s + self.batch_size - 1) // self.batch_size for _, s, e in spans)
            bar = iter(progress(range(batches), desc=f"{desc} ({len(texts)} texts, {len(missing)}/{n_shards} "
                                f"shards to do)", total=batches))
            for i, s, e in spans:
                arr = self._encode(list(texts[s:e]), bar)
                tmp = shard_path[i].with_suffix(".tmp.npy")
                np.save(tmp, arr)
                os.replace(tmp, shard_path[i])
            for _ in bar:  # close the bar
                pass
            (folder / "meta.json").write_text(json.dumps({
                "texts": len(texts), "encoder": self.encoder_name, "encoder_hash": self.encoder_hash,
                "max_length": self.max_length, "normalize": self.normalize, "shard_size": self.shard_size}))
        return torch.from_numpy(np.concatenate([np.load(p) for p in shard_path], axis=0))

    # ------------------------------------------------------------------------------------------------------------
    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModel, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self._model = AutoModel.from_pretrained(self.folder).to(self.device).eval()

    def _encode(self, texts: list[str], bar: Any) -> np.ndarray:
        """One shard: texts sorted by length into batches (less padding), results back in the given order."""
        self._load()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        rows: list[np.ndarray] = []
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            rows.append(self.encode_batch([texts[i] for i in idx]))
            next(bar, None)
        out = np.zeros((len(texts), rows[0].shape[1]), dtype=np.float32)
        out[order] = np.concatenate(rows, axis=0)
        return out

    @torch.no_grad()
    def encode_batch(self, texts: list[str]) -> np.ndarray:
        """Mean-pooled (optionally normalised) embeddings of one batch, float32 [len(texts), dim]."""
        self._load()
        enc = self._tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = self._model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        if self.normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        self.encoded += len(texts)
        return emb.cpu().numpy().astype(np.float32)
