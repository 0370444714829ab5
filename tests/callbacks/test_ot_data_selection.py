"""OTDataSelection (GOT-D): what it selects, its caches (a second run does no work, an interrupted embedding resumes
from its shards), the authors' calibration, and the errors on bad inputs. The OT solver itself is checked against
a dense float64 reference in tests/core/test_ot.py; resume and drop-in run in the contract suite."""

from __future__ import annotations

import json

import pytest
import torch

import lit_ft.data.ot_selection as ots
from lit_ft.callbacks.data_selection.ot_data_selection import OTDataSelection, calibrated_gradient, row_text
from lit_ft.core.text_embedding import TextEmbedder
from tests.callbacks.got_d_helpers import files, pool_datamodule, selection_kwargs
from tests.helpers import ListDataModule, PlainHFModule, quiet_trainer


def fit(cb, max_steps=2, datamodule=None):
    dm = datamodule or pool_datamodule()
    quiet_trainer([cb], max_steps=max_steps, limit_val_batches=0).fit(PlainHFModule(), datamodule=dm)
    return dm


def test_selects_the_rows_of_the_target_domain_and_trains_only_on_them(tmp_path):
    cb = OTDataSelection(**selection_kwargs(tmp_path))
    dm = fit(cb)
    # the pool: 8 arithmetic rows (the target's domain: rows 0-7) then 8 weather rows
    assert cb.selected == list(range(8)) and cb.pool_size == 16 and cb.ot["converged"]
    served = sorted(int(i) for b in dm.train_dataloader() for i in b["sample_idx"])
    assert served == list(range(8))


def test_a_second_run_with_the_same_inputs_does_no_work(tmp_path, monkeypatch):
    first = OTDataSelection(**selection_kwargs(tmp_path, k=5))
    fit(first)

    def no_solve(*a, **k):
        raise AssertionError("the OT was solved again")

    monkeypatch.setattr(ots, "sinkhorn_potentials", no_solve)
    monkeypatch.setattr(TextEmbedder, "encode_batch", lambda self, texts: pytest.fail("re-embedded"))
    again = OTDataSelection(**selection_kwargs(tmp_path, k=5))
    fit(again)
    assert again.selected == first.selected and again.ot == first.ot
    other_k = OTDataSelection(**selection_kwargs(tmp_path, k=3))  # another k reuses the potentials
    fit(other_k)
    assert set(other_k.selected) <= set(first.selected)


def test_an_interrupted_embedding_resumes_from_its_shards(tmp_path, monkeypatch):
    texts = [f"row {i}: {'apples ' * (i % 5)}and {i} pears" for i in range(11)]
    whole = TextEmbedder(files()["encoder"], tmp_path / "a", shard_size=3, batch_size=2).embed(texts)

    calls = {"n": 0}
    real = TextEmbedder.encode_batch

    def dies_in_the_third_shard(self, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # shards of 3 rows in batches of 2: calls 1-4 finish shards 0 and 1
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(TextEmbedder, "encode_batch", dies_in_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        TextEmbedder(files()["encoder"], tmp_path / "b", shard_size=3, batch_size=2).embed(texts)
    monkeypatch.setattr(TextEmbedder, "encode_batch", real)
    resumed = TextEmbedder(files()["encoder"], tmp_path / "b", shard_size=3, batch_size=2)
    out = resumed.embed(texts)
    assert resumed.encoded == 11 - 6  # the two finished shards were read back, not recomputed
    torch.testing.assert_close(out, whole, rtol=0, atol=1e-6)
    assert not list((tmp_path / "b").rglob("*.tmp.npy"))


def test_embedding_is_masked_mean_pooling(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    emb = TextEmbedder(files()["encoder"], tmp_path, batch_size=4)
    texts = ["Tom has 3 apples.", "Paris is sunny today with 20 degrees and a light wind."]
    got = emb.embed(texts)
    tok, model = AutoTokenizer.from_pretrained(files()["encoder"]), AutoModel.from_pretrained(files()["encoder"])
    for i, t in enumerate(texts):  # one text alone: no padding, the plain mean over its tokens
        with torch.no_grad():
            h = model(**tok(t, return_tensors="pt")).last_hidden_state[0]
        torch.testing.assert_close(got[i], h.mean(0), rtol=1e-5, atol=1e-5)
    normed = TextEmbedder(files()["encoder"], tmp_path, batch_size=4, normalize=True).embed(texts)
    torch.testing.assert_close(normed, torch.nn.functional.normalize(got, dim=1), rtol=1e-5, atol=1e-6)


def test_calibration_is_the_authors_formula_and_keeps_the_order_of_g():
    g = torch.tensor([0.3, -1.2, 0.05, 2.0, -0.4], dtype=torch.float64)
    n = len(g)
    expected = torch.tensor([gi - (g.sum() / n - gi / n) for gi in g.tolist()], dtype=torch.float64)
    torch.testing.assert_close(calibrated_gradient(g), expected)
    assert torch.equal(torch.argsort(calibrated_gradient(g)), torch.argsort(g))


def test_row_text_fields():
    assert row_text({"text": "a b"}, None, "row") == "a b"
    assert row_text({"prompt": "q?", "completion": "a."}, None, "row") == "q?\na."
    assert row_text({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                    None, "row") == "hi\nyo"
    assert row_text({"headline": "h", "body": "b"}, ["headline", "body"], "row") == "h\nb"
    with pytest.raises(ValueError, match="text_fields"):
        row_text({"label": 1}, None, "target row 3")
    with pytest.raises(ValueError, match="'body'.*text_fields"):
        row_text({"headline": "h"}, ["headline", "body"], "target row 0")


# -- bad inputs ------------------------------------------------------------------------------------------------------
def test_k_larger_than_the_pool_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`k`=17 is larger than the pool.*16 training rows"):
        fit(OTDataSelection(**selection_kwargs(tmp_path, k=17)))


def test_an_empty_target_is_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="OTDataSelection: target=.*holds no rows"):
        fit(OTDataSelection(**{**selection_kwargs(tmp_path), "target": str(empty)}))
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"text": " "}) + "\n")
    with pytest.raises(ValueError, match="`target` rows hold no text"):
        fit(OTDataSelection(**{**selection_kwargs(tmp_path), "target": str(blank)}))


def test_an_empty_pool_is_refused(tmp_path):
    dm = pool_datamodule()
    dm.setup("fit")
    dm._splits["train"] = []
    with pytest.raises(ValueError, match="the pool is empty"):
        fit(OTDataSelection(**selection_kwargs(tmp_path)), datamodule=dm)


def test_a_datamodule_without_rows_is_refused_naming_the_one_to_use(tmp_path):
    with pytest.raises(TypeError, match="SFTDataModule"):
        fit(OTDataSelection(**selection_kwargs(tmp_path)), datamodule=ListDataModule(n_batches=2))


def test_resuming_on_another_selection_is_refused(tmp_path):
    cb = OTDataSelection(**selection_kwargs(tmp_path, k=5))
    fit(cb, max_steps=1)
    state = cb.state_dict()
    cb.load_state_dict(state)  # the same selection: fine
    with pytest.raises(RuntimeError, match="another selection"):
        cb.load_state_dict({**state, "selected": state["selected"][:-1] + [15]})


@pytest.mark.parametrize("arg,value", [("k", 0), ("epsilon", 0.0), ("momentum", 2.0), ("threshold", -1.0),
                                       ("max_iterations", 0), ("text_fields", []), ("target", []),
                                       ("max_length", 1), ("normalize", 1)])
def test_invalid_arguments_name_the_argument(arg, value):
    with pytest.raises(ValueError, match=rf"`?{arg}`?"):
        OTDataSelection(**{arg: value})
