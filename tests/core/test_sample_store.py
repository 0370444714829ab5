"""lit_ft.core.sample_store: per-sample ragged tensors on disk (the file of Rho-1's reference NLLs and of cDPO's
critical-token weights), keyed by sample_idx and checked against a digest of each sample's tokens."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from lit_ft.core import sample_store
from lit_ft.core.sample_store import (
    PerSampleStore,
    SampleMismatch,
    SampleNotStored,
    StoreFormatError,
    StoreLayout,
    StoreText,
    digest_tokens,
)

LAYOUT = StoreLayout("test.scores", 2, ragged={"a": "a_offsets", "b": "b_offsets"}, fields=("made_by",))
TEXT = StoreText(who="Tech", argument="scores_path", kind="score file", digest_of="token ids",
                 remedy="delete it to re-score", mismatch="or drop the callback that edits the batch",
                 make="Tech writes it on first use")


def _samples():
    """Samples 9, 2, 5, 0 (unsorted) with 3, 0, 5, 1 tokens; column a: one value per token, b: two per token."""
    g = torch.Generator().manual_seed(0)
    ids = {s: torch.randint(0, 100, (n,), generator=g) for s, n in ((9, 3), (2, 0), (5, 5), (0, 1))}
    a = {s: torch.rand(len(t), generator=g) for s, t in ids.items()}
    b = {s: torch.rand(2 * len(t), generator=g) for s, t in ids.items()}
    return ids, a, b


def _store(b_present: bool = True) -> tuple[PerSampleStore, dict, dict, dict]:
    ids, a, b = _samples()
    keys = list(ids)
    store = PerSampleStore.build(LAYOUT, keys, [digest_tokens(ids[s]) for s in keys],
                                 {"a": [a[s] for s in keys], "b": [b[s] for s in keys] if b_present else None},
                                 fields={"made_by": "model-x"}, meta={"beta": 0.5}, text=TEXT)
    return store, ids, a, b


def test_round_trip_keeps_every_entry_and_sorts_by_sample_idx(tmp_path):
    store, ids, a, b = _store()
    assert store.sample_idx.tolist() == [0, 2, 5, 9]
    path = store.save(tmp_path / "sub" / "s.pt")
    assert store.path == str(path)
    loaded = PerSampleStore.load(path, LAYOUT, TEXT)
    assert torch.equal(loaded.sample_idx, store.sample_idx) and torch.equal(loaded.digest, store.digest)
    for name in ("a", "b"):
        assert torch.equal(loaded.columns[name].offsets, store.columns[name].offsets)
        assert torch.equal(loaded.columns[name].values, store.columns[name].values)
    assert loaded.fields == {"made_by": "model-x"} and loaded.meta == {"beta": "0.5"}
    assert loaded.version == 2 and loaded.path == str(path) and len(loaded) == 4
    # the plain dict on disk: the layout's entry names, readable with weights_only=True
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"format", "version", "sample_idx", "digest", "a_offsets", "a", "b_offsets", "b", "made_by",
                        "meta"}
    assert raw["format"] == "test.scores" and raw["version"] == 2
    assert raw["a_offsets"].tolist() == [0, 1, 1, 6, 9]  # samples 0, 2, 5, 9 hold 1, 0, 5, 3 values


def test_an_absent_column_round_trips_as_absent(tmp_path):
    store, *_ = _store(b_present=False)
    loaded = PerSampleStore.load(store.save(tmp_path / "s.pt"), LAYOUT, TEXT)
    assert loaded.columns["a"].present and not loaded.columns["b"].present
    with pytest.raises(KeyError, match="holds no 'b' column"):
        loaded.values("b", 0)


def test_lookup_of_an_unsorted_batch_with_repeats_gives_each_samples_own_rows(tmp_path):
    store, ids, a, b = _store()
    loaded = PerSampleStore.load(store.save(tmp_path / "s.pt"), LAYOUT, TEXT)
    batch = [5, 9, 0, 2, 5]
    rows = loaded.rows(batch, [digest_tokens(ids[s]) for s in batch])
    for s, row in zip(batch, rows):
        assert torch.equal(loaded.values("a", row), a[s]) and torch.equal(loaded.values("b", row), b[s])
    assert loaded.values("a", rows[3]).numel() == 0  # sample 2 has no token: an empty row, not a neighbour's


def test_a_digest_mismatch_is_refused_naming_the_sample_file_and_remedy(tmp_path):
    store, ids, _, _ = _store()
    path = store.save(tmp_path / "s.pt")
    loaded = PerSampleStore.load(path, LAYOUT, TEXT)
    edited = ids[5].clone()
    edited[2] += 1
    with pytest.raises(SampleMismatch) as info:
        loaded.rows([9, 5], [digest_tokens(ids[9]), digest_tokens(edited)], context=" (made with tok-a)")
    msg = str(info.value)
    for part in ("Tech: sample_idx 5 has other token ids here than in the score file", str(path), "(made with tok-a)",
                 "delete it to re-score", "or drop the callback that edits the batch"):
        assert part in msg, (part, msg)
    assert isinstance(info.value, ValueError)


def test_a_missing_sample_is_refused_with_what_the_file_holds(tmp_path):
    store, ids, _, _ = _store()
    path = store.save(tmp_path / "s.pt")
    loaded = PerSampleStore.load(path, LAYOUT, TEXT)
    with pytest.raises(SampleNotStored) as info:
        loaded.rows([9, 7])
    msg = str(info.value)
    assert msg.startswith("Tech: sample_idx 7 is not in the score file")  # a sentence, not KeyError's quoted repr
    for part in (str(path), "holds 4 samples (sample_idx 0..9)", "made for other data", "delete it to re-score"):
        assert part in msg, (part, msg)
    assert isinstance(info.value, KeyError)


def test_a_missing_file_says_how_it_is_made(tmp_path):
    with pytest.raises(FileNotFoundError, match="Tech: scores_path='.*nope.pt' is not a file; Tech writes it"):
        PerSampleStore.load(tmp_path / "nope.pt", LAYOUT, TEXT)


def test_another_format_or_version_is_refused(tmp_path):
    store, *_ = _store()
    path = store.save(tmp_path / "s.pt")
    other = StoreLayout("test.other", 2, ragged={"a": "a_offsets", "b": "b_offsets"}, fields=("made_by",))
    with pytest.raises(StoreFormatError, match="is not a lit-ft score file \\(format 'test.other', found "
                                               "'test.scores'\\); delete it to re-score"):
        PerSampleStore.load(path, other, TEXT)
    torch.save({"x": 1}, tmp_path / "plain.pt")
    with pytest.raises(StoreFormatError, match="found None"):
        PerSampleStore.load(tmp_path / "plain.pt", LAYOUT, TEXT)
    newer = StoreLayout("test.scores", 3, ragged=LAYOUT.ragged, fields=LAYOUT.fields)
    with pytest.raises(StoreFormatError, match="has format version 2; this lit-ft reads version 3 of 'test.scores'"):
        PerSampleStore.load(path, newer, TEXT)
    # a layout that still reads the old version loads it (and records which version it read)
    both = StoreLayout("test.scores", 3, ragged=LAYOUT.ragged, fields=LAYOUT.fields, reads=(2,))
    assert PerSampleStore.load(path, both, TEXT).version == 2


def test_a_damaged_file_is_refused(tmp_path):
    store, *_ = _store()
    path = store.save(tmp_path / "s.pt")
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:200])
    with pytest.raises(StoreFormatError, match="cut.pt' cannot be read as a lit-ft score file"):
        PerSampleStore.load(tmp_path / "cut.pt", LAYOUT, TEXT)
    raw = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in raw.items() if k != "b_offsets"}, tmp_path / "lacks.pt")
    with pytest.raises(StoreFormatError, match="lacks the entries \\['b_offsets'\\]"):
        PerSampleStore.load(tmp_path / "lacks.pt", LAYOUT, TEXT)
    torch.save({**raw, "a_offsets": raw["a_offsets"] + 1}, tmp_path / "offsets.pt")
    with pytest.raises(StoreFormatError, match="column 'a''s offsets do not cut its 9 values"):
        PerSampleStore.load(tmp_path / "offsets.pt", LAYOUT, TEXT)
    torch.save({**raw, "sample_idx": raw["sample_idx"].flip(0)}, tmp_path / "order.pt")
    with pytest.raises(StoreFormatError, match="sample_idx is not strictly increasing"):
        PerSampleStore.load(tmp_path / "order.pt", LAYOUT, TEXT)


def test_build_refuses_duplicates_and_unknown_or_short_columns():
    one = [torch.zeros(1)] * 2
    with pytest.raises(ValueError, match="Tech: sample_idx \\[3\\] occur more than once"):
        PerSampleStore.build(LAYOUT, [3, 3], [1, 2], {"a": one}, text=TEXT)
    with pytest.raises(ValueError, match="columns \\['c'\\] are not in the 'test.scores' layout"):
        PerSampleStore.build(LAYOUT, [3, 4], [1, 2], {"c": one}, text=TEXT)
    with pytest.raises(ValueError, match="column 'a' has 1 rows for 2 samples"):
        PerSampleStore.build(LAYOUT, [3, 4], [1, 2], {"a": one[:1]}, text=TEXT)


def test_a_failed_write_leaves_the_previous_file_and_no_partial_file(tmp_path, monkeypatch):
    store, *_ = _store()
    path = store.save(tmp_path / "s.pt")
    before = path.read_bytes()
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(sample_store.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        store.save(path)
    with pytest.raises(OSError, match="disk full"):
        store.save(tmp_path / "new.pt")
    monkeypatch.setattr(sample_store.torch, "save", real_save)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["s.pt"]
    assert len(PerSampleStore.load(path, LAYOUT, TEXT)) == 4


def test_digest_tokens_is_blake2b_of_int64_bytes_and_separates_parts():
    def reference(*parts, sep=b""):
        h = hashlib.blake2b(digest_size=8)
        for p in parts:
            h.update(b"".join(int(v).to_bytes(8, "little", signed=True) for v in p) + sep)
        return int.from_bytes(h.digest(), "little", signed=True)

    ids = [5, -100, 49151, 0]
    assert digest_tokens(ids) == digest_tokens(torch.tensor(ids, dtype=torch.int32)) == reference(ids)
    assert digest_tokens(ids, [1, 2], separator=b"|") == reference(ids, [1, 2], sep=b"|")
    # without a separator, moving a value across parts does not change the hash; with one it does
    assert digest_tokens([1, 2], [3]) == digest_tokens([1], [2, 3])
    assert digest_tokens([1, 2], [3], separator=b"|") != digest_tokens([1], [2, 3], separator=b"|")
    assert digest_tokens(ids) != digest_tokens(ids[:-1])


def test_files_written_before_the_shared_store_still_load(tmp_path):
    """The dicts the reference-NLL cache (ExcessLossSelection) and the critical-token weights (CriticalTokenScoring)
    wrote before they shared this module, entry for entry, load through their classes and find their samples."""
    from lit_ft.callbacks.objectives._critical_cache import CriticalWeightsCache
    from lit_ft.callbacks.objectives._critical_data import Row, pair_digest
    from lit_ft.callbacks.token_selection.reference_cache import ReferenceLossCache

    def old_digest(*parts, sep=b""):  # the hash both files used, written out
        h = hashlib.blake2b(digest_size=8)
        for p in parts:
            h.update(torch.as_tensor(p, dtype=torch.int64).numpy().tobytes() + sep)
        return int.from_bytes(h.digest(), "little", signed=True)

    ids = torch.tensor([[4, 8, 15, 16], [23, 42, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    torch.save({"format": "lit_ft.reference_nll", "version": 1, "sample_idx": torch.tensor([3, 7]),
                "offsets": torch.tensor([0, 1, 4]), "nll": torch.tensor([0.5, 1.0, 2.0, 3.0]),
                "digest": torch.tensor([old_digest([23, 42]), old_digest([4, 8, 15, 16])]),
                "meta": {"data": "d"}}, tmp_path / "ref.pt")
    ref = ReferenceLossCache.load(tmp_path / "ref.pt")
    out = ref.lookup({"input_ids": ids, "attention_mask": mask, "sample_idx": torch.tensor([7, 3])})
    assert out.tolist() == [[1.0, 2.0, 3.0, 0.0], [0.5, 0.0, 0.0, 0.0]]

    chosen, rejected = Row(torch.tensor([1, 2, 3]), torch.tensor([-100, 2, 3])), Row(torch.tensor([1, 5]),
                                                                                      torch.tensor([-100, 5]))
    digest = old_digest(chosen.ids, chosen.labels, rejected.ids, rejected.labels, sep=b"|")
    assert pair_digest(chosen, rejected) == digest
    torch.save({"format": "lit_ft.critical_token_weights", "version": 1, "split": "train", "fingerprint": "f",
                "data": "d", "sample_idx": torch.tensor([4]), "digest": torch.tensor([digest]),
                "rejected_offsets": torch.tensor([0, 1]), "rejected_p": torch.tensor([0.25]),
                "chosen_offsets": torch.zeros(0, dtype=torch.long), "chosen_p": torch.zeros(0), "meta": {}},
               tmp_path / "crit.pt")
    crit = CriticalWeightsCache.load(tmp_path / "crit.pt")
    assert len(crit) == 1 and crit.split == "train" and not crit.has_chosen
    batch = {f"{side}_{k}": getattr(row, attr).unsqueeze(0) for side, row in (("chosen", chosen), ("rejected", rejected))
             for k, attr in (("input_ids", "ids"), ("labels", "labels"))}
    batch.update(chosen_attention_mask=torch.ones(1, 3), rejected_attention_mask=torch.ones(1, 2),
                 sample_idx=torch.tensor([4]))
    _, rejected_w = crit.lookup(batch, only_neg=True)
    assert rejected_w.tolist() == [[1.0, 0.75]]
