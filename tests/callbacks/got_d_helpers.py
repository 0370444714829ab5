"""Tiny, hub-free inputs for OTDataSelection tests: a random 1-layer BERT encoder on the tiny tokenizer, a two-domain
candidate pool (arithmetic word problems like the target, and weather reports) and an arithmetic target."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import torch

from lit_ft.testing import make_tiny_tokenizer, write_tiny_sft_jsonl

CITIES = ["Paris", "Oslo", "Lima", "Cairo", "Tokyo", "Quito"]
SKIES = ["sunny", "rainy", "cloudy", "windy", "foggy"]


def tiny_encoder(path: str | Path) -> str:
    """A seeded random BERT (1 layer, hidden 32) saved with the tiny tokenizer in ``path``."""
    from transformers import BertConfig, BertModel

    path = Path(path)
    if (path / "config.json").exists():
        return str(path)
    make_tiny_tokenizer(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=384, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(str(path))
    return str(path)


def write_pool(path: str | Path, n_math: int = 8, n_weather: int = 8, seed: int = 3) -> str:
    """Rows ``{"prompt", "completion", "domain"}``: arithmetic rows first, then weather rows."""
    rng = random.Random(seed)
    rows = []
    tmp = Path(path).with_suffix(".math.jsonl")
    for line in Path(write_tiny_sft_jsonl(tmp, n=n_math, seed=seed)).read_text().splitlines():
        rows.append({**json.loads(line), "domain": "math"})
    for _ in range(n_weather):
        city, sky = rng.choice(CITIES), rng.choice(SKIES)
        rows.append({"prompt": f"What is the weather in {city} today?",
                     "completion": f"Today {city} is {sky} with {rng.randint(5, 30)} degrees.", "domain": "weather"})
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


_FILES: dict[str, str] = {}


def files() -> dict[str, str]:
    """Tokenizer, encoder, pool, validation and target files, made once per process in a temporary folder (the
    contract suite's datamodule factory takes no arguments)."""
    if not _FILES:
        root = Path(tempfile.mkdtemp(prefix="lit_ft_got_d_"))
        _FILES.update(tokenizer=make_tiny_tokenizer(root / "tok"), encoder=tiny_encoder(root / "enc"),
                      pool=write_pool(root / "pool.jsonl"), val=write_tiny_sft_jsonl(root / "val.jsonl", n=4, seed=9),
                      target=write_tiny_sft_jsonl(root / "target.jsonl", n=12, seed=11))
    return _FILES


def pool_datamodule(batch_size: int = 4):
    from lit_ft.data import SFTDataModule

    f = files()
    return SFTDataModule(data=f["pool"], val_data=f["val"], tokenizer=f["tokenizer"], max_length=64,
                         batch_size=batch_size, use_chat_template=False, bucket_by_length=False)


def selection_kwargs(cache_dir: str | Path, k: int = 8) -> dict:
    f = files()
    return {"target": f["target"], "k": k, "encoder": f["encoder"], "cache_dir": str(cache_dir), "device": "cpu",
            "tile_size": 5, "max_length": 64}
