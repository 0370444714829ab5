"""Data as users hold it: ``datasets.Dataset`` / ``DatasetDict`` objects, Parquet files, ``load_dataset`` specs and
renamed columns give the same encoded examples as the JSONL path (the reference); bad sources are refused with the
argument named."""

from __future__ import annotations

import json
import sys

import pytest

from lit_ft.data import ClassificationDataModule, SFTDataModule
from lit_ft.testing import write_tiny_classification_jsonl, write_tiny_sft_jsonl

datasets = pytest.importorskip("datasets", reason="the optional `datasets` extra is not installed")


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    # load_dataset prepares an Arrow cache; keep it out of the user's ~/.cache
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def read(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def encoded(dm, split: str) -> list[tuple]:
    """What a split trains on: (sample_idx, input_ids, labels) of every example."""
    out = []
    for e in dm._examples(split):
        labels = e["labels"] if "labels" in e else e["label"]
        out.append((e["sample_idx"], list(e["input_ids"]), labels))
    return out


def sft(data, tok, **kw):
    kw.setdefault("max_length", 128)
    dm = SFTDataModule(data=data, tokenizer=tok, **kw)
    dm.setup()
    return dm


@pytest.fixture
def sft_files(tmp_path):
    return write_tiny_sft_jsonl(tmp_path / "train.jsonl", n=12), write_tiny_sft_jsonl(tmp_path / "val.jsonl", n=4, seed=1)


# --------------------------------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------------------------------


def test_sft_dataset_objects_encode_like_the_jsonl_files(tiny_tok, sft_files):
    train, val = sft_files
    ref = sft(train, tiny_tok, val_data=val)
    dm = sft(datasets.Dataset.from_list(read(train)), tiny_tok, val_data=datasets.Dataset.from_list(read(val)))
    assert encoded(dm, "train") == encoded(ref, "train") and encoded(dm, "val") == encoded(ref, "val")
    assert [e["answer"] for e in dm._examples("val")] == [r["answer"] for r in read(val)]  # exact-match answers kept
    assert "data_path" not in dm.data_info


@pytest.mark.parametrize("val_name", ["validation", "test"])
def test_sft_dataset_dict_brings_its_validation_split(tiny_tok, sft_files, val_name):
    train, val = sft_files
    ref = sft(train, tiny_tok, val_data=val)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(read(train)),
                               val_name: datasets.Dataset.from_list(read(val))})
    dm = sft(dd, tiny_tok)
    assert encoded(dm, "train") == encoded(ref, "train") and encoded(dm, "val") == encoded(ref, "val")
    assert "val_from_split" not in dm.data_info


def test_sft_dataset_dict_without_validation_split_falls_back_to_val_split(tiny_tok, sft_files):
    train, _ = sft_files
    ref = sft(train, tiny_tok, val_split=0.25, seed=3)
    dm = sft(datasets.DatasetDict({"train": datasets.Dataset.from_list(read(train))}), tiny_tok, val_split=0.25, seed=3)
    assert encoded(dm, "train") == encoded(ref, "train") and encoded(dm, "val") == encoded(ref, "val")
    assert dm.data_info["val_from_split"] == 3


def test_sft_parquet_file_and_load_dataset_spec(tiny_tok, sft_files, tmp_path):
    train, val = sft_files
    ref = sft(train, tiny_tok, val_data=val)
    for path, src in ((tmp_path / "train.parquet", train), (tmp_path / "val.parquet", val)):
        datasets.Dataset.from_list(read(src)).to_parquet(str(path))
    by_file = sft(str(tmp_path / "train.parquet"), tiny_tok, val_data=str(tmp_path / "val.parquet"))
    assert encoded(by_file, "train") == encoded(ref, "train") and encoded(by_file, "val") == encoded(ref, "val")
    spec = {"path": "parquet", "data_files": {"train": str(tmp_path / "train.parquet"),
                                              "validation": str(tmp_path / "val.parquet")}}
    by_spec = sft(spec, tiny_tok)
    assert encoded(by_spec, "train") == encoded(ref, "train") and encoded(by_spec, "val") == encoded(ref, "val")


def test_sft_parquet_with_mixed_row_forms_reads_null_cells_as_missing(tiny_tok, tmp_path):
    """A table holding prompt/completion rows and chat rows has nulls in the other form's columns."""
    plain = read(write_tiny_sft_jsonl(tmp_path / "p.jsonl", n=6))
    chat = read(write_tiny_sft_jsonl(tmp_path / "c.jsonl", n=6, seed=2, chat=True))
    rows = [r for pair in zip(plain, chat) for r in pair]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref = sft(str(tmp_path / "mixed.jsonl"), tiny_tok, val_split=0.0)
    columns = {k: [r.get(k) for r in rows] for k in ("prompt", "completion", "answer", "messages")}
    datasets.Dataset.from_dict(columns).to_parquet(str(tmp_path / "mixed.parquet"))
    dm = sft(str(tmp_path / "mixed.parquet"), tiny_tok, val_split=0.0)
    assert encoded(dm, "train") == encoded(ref, "train") and len(encoded(dm, "train")) == 12


def test_sft_renamed_columns(tiny_tok, sft_files):
    train, _ = sft_files
    ref = sft(train, tiny_tok, val_split=0.25)
    # other datasets' column names; a stray "prompt" column must not be read once prompt_key points elsewhere
    renamed = [{"question": r["prompt"], "response": r["completion"], "gold": r["answer"], "prompt": "ignored"}
               for r in read(train)]
    dm = sft(datasets.Dataset.from_list(renamed), tiny_tok, val_split=0.25,
             prompt_key="question", completion_key="response", answer_key="gold")
    assert encoded(dm, "train") == encoded(ref, "train") and encoded(dm, "val") == encoded(ref, "val")
    assert [e["answer"] for e in dm._examples("val")] == [e["answer"] for e in ref._examples("val")]
    chat_file = write_tiny_sft_jsonl(train + ".chat.jsonl", n=12, chat=True)
    chat = [{"conversations": r["messages"]} for r in read(chat_file)]
    ref_chat = sft(chat_file, tiny_tok, val_split=0.0)
    dm_chat = sft(datasets.Dataset.from_list(chat), tiny_tok, val_split=0.0, messages_key="conversations")
    assert encoded(dm_chat, "train") == encoded(ref_chat, "train")


# --------------------------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------------------------


def test_classification_dataset_with_class_label_names(tiny_tok, tmp_path):
    train = write_tiny_classification_jsonl(tmp_path / "train.jsonl", n=20)
    val = write_tiny_classification_jsonl(tmp_path / "val.jsonl", n=6, seed=1)
    ref = ClassificationDataModule(data=train, val_data=val, tokenizer=tiny_tok, max_length=32)
    ref.setup()
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "y": datasets.ClassLabel(names=["other", "apples"])})

    def as_dataset(path):
        return datasets.Dataset.from_list([{"sentence": r["text"], "y": r["label"]} for r in read(path)],
                                          features=features)

    dd = datasets.DatasetDict({"train": as_dataset(train), "validation": as_dataset(val)})
    dm = ClassificationDataModule(data=dd, tokenizer=tiny_tok, max_length=32, text_key="sentence", label_key="y")
    dm.setup()
    assert encoded(dm, "train") == encoded(ref, "train") and encoded(dm, "val") == encoded(ref, "val")
    assert dm.label_names == ["other", "apples"] and ref.label_names == ["0", "1"]


def test_classification_parquet_file(tiny_tok, tmp_path):
    train = write_tiny_classification_jsonl(tmp_path / "train.jsonl", n=20)
    ref = ClassificationDataModule(data=train, tokenizer=tiny_tok, max_length=32, val_split=0.2)
    ref.setup()
    datasets.Dataset.from_list(read(train)).to_parquet(str(tmp_path / "train.parquet"))
    dm = ClassificationDataModule(data=str(tmp_path / "train.parquet"), tokenizer=tiny_tok, max_length=32,
                                  val_split=0.2)
    dm.setup()
    assert encoded(dm, "train") == encoded(ref, "train") and encoded(dm, "val") == encoded(ref, "val")


# --------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------


def test_bad_sources_name_the_argument(tiny_tok, sft_files):
    train, _ = sft_files
    with pytest.raises(ValueError, match=r"data must be a \.jsonl/\.json/\.parquet path.*got int 3"):
        SFTDataModule(data=3)
    with pytest.raises(ValueError, match=r"val_data: a dict is a datasets.load_dataset spec and needs a non-empty 'path'"):
        SFTDataModule(data=train, val_data={"data_files": "x.parquet"})
    with pytest.raises(ValueError, match=r"prompt_key must be a non-empty string, got ''"):
        SFTDataModule(data=train, prompt_key="")
    with pytest.raises(ValueError, match=r"must differ"):
        SFTDataModule(data=train, prompt_key="completion")
    rows = read(train)
    two = datasets.DatasetDict({"a": datasets.Dataset.from_list(rows), "b": datasets.Dataset.from_list(rows)})
    with pytest.raises(ValueError, match=r"data: the DatasetDict has no 'train' split \(splits: \['a', 'b'\]\)"):
        sft(two, tiny_tok)
    with pytest.raises(ValueError, match=r"data=Dataset\(0 rows.*holds no rows"):
        sft(datasets.Dataset.from_list(rows).select([]), tiny_tok)
    wrong = datasets.Dataset.from_list([{"q": r["prompt"], "a": r["completion"]} for r in rows])
    with pytest.raises(ValueError, match=r"unknown row format, keys found: \['a', 'q'\].*set prompt_key"):
        sft(wrong, tiny_tok)


def test_parquet_without_datasets_names_the_extra(tiny_tok, sft_files, tmp_path, monkeypatch):
    datasets.Dataset.from_list(read(sft_files[0])).to_parquet(str(tmp_path / "train.parquet"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(ImportError, match=r"data='.*train.parquet': reading a .parquet file needs the Hugging Face "
                                          r"`datasets` library; install the optional extra: pip install 'lit-ft\[datasets\]'"):
        sft(str(tmp_path / "train.parquet"), tiny_tok)
    with pytest.raises(ImportError, match=r"data: a datasets.load_dataset spec needs .*lit-ft\[datasets\]"):
        sft({"path": "parquet", "data_files": str(tmp_path / "train.parquet")}, tiny_tok)
    ref = sft(sft_files[0], tiny_tok, val_data=sft_files[1])  # JSONL needs no datasets
    assert ref.stats["train_samples"] == 12
