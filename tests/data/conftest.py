from __future__ import annotations

import json

import pytest

from lit_ft.testing import make_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory) -> str:
    """Path of the hub-free tiny tokenizer (chat template, pad = eos = <|im_end|>)."""
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny")


@pytest.fixture(scope="session")
def tiny_tok_no_template(tmp_path_factory, tiny_tok) -> str:
    """The tiny tokenizer without a chat template and without a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tok)
    tok.chat_template = None
    tok.pad_token = None
    path = tmp_path_factory.mktemp("tok") / "plain"
    tok.save_pretrained(str(path))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    cfg.pop("pad_token", None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in path.glob("chat_template.*"):
        f.unlink()
    return str(path)


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(name, rows) -> path of a JSONL file under tmp_path."""

    def write(name: str, rows: list) -> str:
        path = tmp_path / name
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        return str(path)

    return write
