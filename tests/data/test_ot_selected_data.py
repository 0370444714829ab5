"""OTSelectedDataModule: GOT-D's selection as a DataModule wrapper. It keeps the rows the OTDataSelection callback keeps
(one shared function), serves only them for training and the wrapped module's validation untouched, delegates
everything else, resumes from a checkpoint without embedding or solving again, refuses bad inputs like the
callback, runs from a LightningCLI YAML with the pool as a nested class_path, and an interrupted Sinkhorn solve
inside the selection resumes to the same selection. The solver's own resume is tested in tests/core/test_ot.py."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
import yaml

import lit_ft.data.ot_selection as ots
from lit_ft.callbacks import OTDataSelection
from lit_ft.core.text_embedding import TextEmbedder
from lit_ft.data import OTSelectedDataModule
from tests.callbacks.got_d_helpers import files, pool_datamodule, selection_kwargs
from tests.helpers import ListDataModule, PlainHFModule, assert_state_dicts_equal, fit_and_resume, quiet_trainer

CONFIG = Path(__file__).resolve().parents[2] / "lit_ft" / "configs" / "ot_data_selection" / "datamodule.yaml"


def served(loader) -> list[int]:
    return sorted(int(i) for b in loader for i in b["sample_idx"])


def fit(dm, callbacks=(), max_steps=2):
    quiet_trainer(list(callbacks), max_steps=max_steps, limit_val_batches=0).fit(PlainHFModule(), datamodule=dm)
    return dm


def test_keeps_the_rows_the_callback_keeps(tmp_path):
    for k in (8, 5):
        cb = OTDataSelection(**selection_kwargs(tmp_path / f"callback{k}", k=k))
        fit(pool_datamodule(), [cb])
        dm = fit(OTSelectedDataModule(pool_datamodule(), **selection_kwargs(tmp_path / f"wrapper{k}", k=k)))
        assert dm.selected == cb.selected and dm.pool_size == cb.pool_size == 16 and dm.ot == cb.ot
    assert set(dm.selected) < set(range(8))  # arithmetic rows (the target's domain), never weather (rows 8-15)


def test_serves_only_the_selected_rows_and_the_wrapped_validation_untouched(tmp_path):
    dm = OTSelectedDataModule(pool_datamodule(batch_size=3), **selection_kwargs(tmp_path, k=5))
    assert dm.selected is None and dm.ot == {}
    plain = pool_datamodule(batch_size=3)
    plain.setup("fit")
    dm.setup("fit")
    assert len(dm.selected) == 5 and dm.selection.target_size == 12 and dm.ot["converged"]
    assert served(dm.train_dataloader()) == dm.selected
    assert served(dm.val_dataloader()) == served(plain.val_dataloader()) and served(plain.val_dataloader())
    # everything else is the wrapped DataModule's
    assert dm.tokenizer is dm.datamodule.tokenizer and dm.stats == plain.stats and dm.batch_size == 3
    with pytest.raises(AttributeError):
        dm.no_such_attribute


def test_trains_on_the_selection_and_the_wrapped_module_sees_the_trainer(tmp_path):
    dm = OTSelectedDataModule(pool_datamodule(), **selection_kwargs(tmp_path, k=8))
    trainer = quiet_trainer([], max_steps=3, limit_val_batches=1)
    trainer.fit(PlainHFModule(), datamodule=dm)
    assert dm.datamodule.trainer is trainer and dm.trainer is trainer
    assert dm.state_dict()["datamodule"]["train_sampler"] and dm.state_dict()["selected"] == dm.selected


def test_resume_restores_the_sampler_and_neither_embeds_nor_solves_again(tmp_path, monkeypatch):
    kwargs = selection_kwargs(tmp_path / "cache", k=8)

    def no_work(ckpt):  # the resumed run finds embeddings and potentials in the cache
        monkeypatch.setattr(ots, "sinkhorn_potentials", lambda *a, **k: pytest.fail("the OT was solved again"))
        monkeypatch.setattr(TextEmbedder, "encode_batch", lambda self, texts: pytest.fail("re-embedded"))
        state = torch.load(ckpt, weights_only=False)["OTSelectedDataModule"]
        assert state["selected"] and state["datamodule"]["train_sampler"]

    # batch 2: 4 batches an epoch, so the step-2 checkpoint is mid-epoch and the sampler position matters
    r = fit_and_resume(PlainHFModule, lambda: [], tmp_path / "ckpt", max_steps=5,
                       make_datamodule=lambda: OTSelectedDataModule(pool_datamodule(batch_size=2), **kwargs),
                       before_resume=no_work)
    assert r.trainer_resumed.datamodule.selected == r.trainer_full.datamodule.selected
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())


def test_resuming_on_another_selection_is_refused(tmp_path):
    dm = OTSelectedDataModule(pool_datamodule(), **selection_kwargs(tmp_path, k=5))
    dm.setup("fit")
    state = dm.state_dict()
    sampler = {"epoch": 1, "seed": 5, "batches_done": 2}
    dm.load_state_dict({**state, "datamodule": {"train_sampler": sampler}})  # the same selection: fine
    assert dm.datamodule._pending_sampler_state == sampler  # handed to the wrapped DataModule
    with pytest.raises(RuntimeError, match="OTSelectedDataModule: the checkpoint was trained on another selection"):
        dm.load_state_dict({**state, "selected": state["selected"][:-1] + [15]})


def test_an_interrupted_sinkhorn_solve_resumes_to_the_same_selection(tmp_path, monkeypatch):
    kwargs = dict(selection_kwargs(tmp_path / "a", k=5), threshold=1e-6)  # a tight threshold: many iterations
    whole = OTSelectedDataModule(pool_datamodule(), **kwargs)
    whole.setup("fit")
    assert whole.ot["iterations"] > 6

    monkeypatch.setattr(ots, "SINKHORN_CHECKPOINT_EVERY", 2)
    real = ots.progress

    def dies_in_the_sinkhorn(it, desc="", **kw):
        if "Sinkhorn" not in desc:
            return real(it, desc=desc, **kw)

        def gen():
            for i, p in enumerate(it):
                if i == 5:
                    raise KeyboardInterrupt
                yield p
        return gen()

    kwargs["cache_dir"] = str(tmp_path / "b")
    monkeypatch.setattr(ots, "progress", dies_in_the_sinkhorn)
    with pytest.raises(KeyboardInterrupt):
        OTSelectedDataModule(pool_datamodule(), **kwargs).setup("fit")
    partial = list((tmp_path / "b" / "ot").glob("*.sinkhorn.pt"))
    assert len(partial) == 1 and int(torch.load(partial[0], weights_only=True)["iterations"]) == 4
    starts: list[int] = []

    def records(it, desc="", **kw):
        if "Sinkhorn" in desc:
            starts.append(it[0])
        return real(it, desc=desc, **kw)

    monkeypatch.setattr(ots, "progress", records)
    resumed = OTSelectedDataModule(pool_datamodule(), **kwargs)
    resumed.setup("fit")
    assert starts == [4]  # continued at iteration 4, not from zero
    assert resumed.selected == whole.selected and resumed.ot == whole.ot
    assert not list((tmp_path / "b" / "ot").glob("*.sinkhorn.pt"))  # the final potentials replace the iterate


# -- bad inputs: the callback's errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("pool", [ListDataModule(n_batches=2), "pool.jsonl", None], ids=["list_dm", "path", "none"])
def test_a_datamodule_without_rows_is_refused_naming_the_one_to_use(tmp_path, pool):
    with pytest.raises(TypeError, match="OTSelectedDataModule selects rows of a lit-ft text DataModule: use "
                                        "lit_ft.data.SFTDataModule or ClassificationDataModule"):
        OTSelectedDataModule(pool, **selection_kwargs(tmp_path))


def test_the_callback_refuses_the_wrapper_rather_than_selecting_twice(tmp_path):
    dm = OTSelectedDataModule(pool_datamodule(), **selection_kwargs(tmp_path / "a"))
    with pytest.raises(TypeError, match="OTDataSelection selects rows of a lit-ft text DataModule.*got "
                                        "OTSelectedDataModule"):
        fit(dm, [OTDataSelection(**selection_kwargs(tmp_path / "b"))])


def test_k_larger_than_the_pool_is_refused(tmp_path):
    dm = OTSelectedDataModule(pool_datamodule(), **selection_kwargs(tmp_path, k=17))
    with pytest.raises(ValueError, match=r"OTSelectedDataModule: `k`=17 is larger than the pool.*16 training rows"):
        dm.setup("fit")


@pytest.mark.parametrize("arg,value", [("k", 0), ("epsilon", 0.0), ("momentum", 2.0), ("threshold", -1.0),
                                       ("max_iterations", 0), ("text_fields", []), ("target", []), ("tile_size", 0)])
def test_invalid_arguments_name_the_argument(arg, value):
    with pytest.raises(ValueError, match=rf"OTSelectedDataModule: `{arg}`"):
        OTSelectedDataModule(pool_datamodule(), **{arg: value})


# -- LightningCLI: the pool as a nested class_path -----------------------------------------------------------------
def test_the_packaged_config_parses_and_round_trips(tmp_path, capsys):
    from lit_ft.cli import run

    with pytest.raises(SystemExit):
        run(["fit", "--config=ot_data_selection/datamodule", "--print_config"])
    first = capsys.readouterr().out
    data = yaml.safe_load(first)["data"]
    assert data["class_path"] == "lit_ft.data.OTSelectedDataModule" and data["init_args"]["k"] == 200
    assert data["init_args"]["datamodule"]["class_path"] == "lit_ft.data.SFTDataModule"
    assert data["init_args"]["datamodule"]["init_args"]["data"] == "alpaca-en-demo"
    (tmp_path / "dumped.yaml").write_text(first)
    with pytest.raises(SystemExit):
        run(["fit", f"--config={tmp_path / 'dumped.yaml'}", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(first)


def test_the_packaged_config_fits_two_steps_on_a_tiny_model(tmp_path):
    from lit_ft.cli import run
    from tests.config_runs import tiny_overrides

    f = files()
    # the data overrides go to the wrapped DataModule (its max_val_samples is already null: jsonargparse reads a
    # nested `=null` override as the string "None")
    args = [a.replace("--data.init_args.", "--data.init_args.datamodule.init_args.")
            for a in tiny_overrides(tmp_path, f["tokenizer"], str(CONFIG)) if "max_val_samples" not in a]
    args += [f"--data.init_args.target={f['target']}", f"--data.init_args.encoder={f['encoder']}",
             "--data.init_args.k=12", "--data.init_args.max_length=64", f"--data.init_args.cache_dir={tmp_path / 'c'}"]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        cli = run(["fit", f"--config={CONFIG}", *args])
    assert "lit-ft fit finished" in out.getvalue()
    dm = cli.datamodule
    assert isinstance(dm, OTSelectedDataModule) and len(dm.selected) == 12 and dm.pool_size == 24
    assert cli.trainer.global_step == 2
