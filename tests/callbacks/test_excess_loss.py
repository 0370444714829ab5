import lightning.pytorch as pl
import pytest
import torch

from lit_ft.callbacks import ExcessLossSelection
from lit_ft.core import BatchKeyError, ModelLayoutError, shift_targets
from lit_ft.core.loss import causal_lm_token_nll
from lit_ft.modules import CausalLMModule

from helpers import ListDataModule, PlainHFModule, assert_state_dicts_equal, fit_and_resume, random_batch, tiny_config


def _trainer(callbacks, max_steps=3, **kw):
    return pl.Trainer(
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, limit_val_batches=0, **kw,
    )


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, "x"])
def test_bad_keep_ratio_is_rejected(bad):
    with pytest.raises(ValueError, match="`keep_ratio` must be a number in \\(0, 1\\]"):
        ExcessLossSelection(keep_ratio=bad)


def test_defaults():
    cb = ExcessLossSelection()
    assert cb.keep_ratio == 0.6 and cb.reference is None and cb.reference_losses is None and cb.integration == "auto"


def test_selection_matches_hand_computed_rho1_loss():
    """The loss equals the mean NLL over the top-k tokens by (current NLL - reference NLL), computed by hand."""
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config())
    ref = CausalLMModule(model_config=tiny_config())  # a different random model as the reference
    cb = ExcessLossSelection(keep_ratio=0.4, reference="initial")
    trainer = _trainer([cb], max_steps=1)
    trainer.strategy.connect(module)
    module.trainer = trainer
    cb.setup(trainer, module, "fit")
    cb._ref_model = ref.model.eval()
    batch = random_batch(4, 16, seed=3)
    cb.on_train_batch_start(trainer, module, batch, 0)
    module.train()
    out = module.compute_token_loss(batch, module.model)

    targets = shift_targets(batch["labels"])
    valid = targets != -100
    with torch.no_grad():
        cur = causal_lm_token_nll(module.model, batch)
        refn = causal_lm_token_nll(ref.model, batch)
    excess = (cur - refn)[valid]
    k = int(torch.ceil(torch.tensor(0.4 * valid.sum().item())))
    top = torch.topk(excess, k).indices
    expected = cur[valid][top].mean()
    assert out.n_tokens.item() == k
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-6)
    # kept tokens are exactly the highest-excess ones
    assert out.keep.sum() == k and (cur - refn)[out.keep].min() >= (cur - refn)[valid & ~out.keep].max()


def test_dropped_tokens_get_exactly_zero_gradient():
    """Gradient w.r.t. the final hidden state is zero exactly at dropped positions."""
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config())
    cb = ExcessLossSelection(keep_ratio=0.5, reference="initial")
    trainer = _trainer([cb], max_steps=1)
    module.trainer = trainer
    cb.setup(trainer, module, "fit")
    batch = random_batch(2, 12, seed=5)
    cb.on_train_batch_start(trainer, module, batch, 0)
    captured = {}
    handle = module.model.model.norm.register_forward_hook(lambda m, i, o: captured.setdefault("h", o) and None)
    h_grad = {}
    def keep_grad(m, i, o):
        o.register_hook(lambda g: h_grad.setdefault("g", g))
    handle.remove()
    handle = module.model.model.norm.register_forward_hook(keep_grad)
    out = module.compute_token_loss(batch, module.model)
    out.loss.backward()
    handle.remove()
    g = h_grad["g"].abs().sum(-1)
    assert torch.all(g[~out.keep] == 0)
    assert torch.all(g[out.keep] > 0)


class _TopExcessProbe(pl.Callback):
    """Listed after ExcessLossSelection: before each step, the Rho-1 loss computed independently — the mean current
    NLL over the ceil(ratio * N) tokens of largest (current NLL - NLL of a fresh copy of the initial weights) — and,
    after the step, the loss the step returned."""

    def __init__(self, initial_model, ratio):
        self.initial, self.ratio, self.expected, self.returned, self.gap = initial_model, ratio, [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        valid = shift_targets(batch["labels"]) != -100
        with torch.no_grad():
            cur = causal_lm_token_nll(pl_module.model, batch)[valid]
            ref = causal_lm_token_nll(self.initial, batch)[valid]
        k = int(torch.ceil(torch.tensor(self.ratio * int(valid.sum()))))
        order = torch.sort(cur - ref, descending=True)
        self.gap.append(float(order.values[k - 1] - order.values[k]))  # margin of the k-th token over the next
        self.expected.append(float(cur[order.indices[:k]].mean()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.returned.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


def test_effect_in_a_trainer_and_metrics_logged():
    """In a real Trainer every step trains on exactly the top-50% excess-loss tokens: the loss each step returns is
    the mean NLL over the tokens an independent computation picks (step 0 is skipped: the model still equals the
    reference there, every excess is 0 and any half is a valid pick)."""
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2)
    initial = CausalLMModule(model_config=tiny_config())
    initial.load_state_dict(module.state_dict())
    cb = ExcessLossSelection(keep_ratio=0.5, reference="initial")
    probe = _TopExcessProbe(initial.model.eval(), 0.5)
    trainer = _trainer([cb, probe], max_steps=4)
    trainer.fit(module, datamodule=ListDataModule())
    m = trainer.callback_metrics
    assert cb.level == "mixin"
    assert abs(float(m["lit_ft/excess_loss/kept_fraction"]) - 0.5) < 0.05
    assert len(probe.returned) == 4
    for step in range(1, 4):
        assert probe.gap[step] > 1e-6  # the top half is well defined at this step
        assert probe.returned[step] == pytest.approx(probe.expected[step], rel=1e-5, abs=1e-6), step


def _first_step_loss(module, cb, batch):
    trainer = _trainer([cb], max_steps=1)
    module.trainer = trainer
    cb.setup(trainer, module, "fit")
    cb.on_train_batch_start(trainer, module, batch, 0)
    module.train()
    return module


def test_same_loss_at_all_three_integration_levels():
    """Mixin (fused op), HF loss hook in a plain module, and batch-level label editing select the same tokens and
    give the same loss on the same weights."""
    torch.manual_seed(0)
    plain = PlainHFModule()
    state = plain.model.state_dict()
    batch = random_batch(4, 16, seed=7)

    mixin = CausalLMModule(model_config=tiny_config())
    mixin.model.load_state_dict(state)
    cb = ExcessLossSelection(keep_ratio=0.5, reference="initial")
    _first_step_loss(mixin, cb, dict(batch))
    cb._ref_model = PlainHFModule().model.eval()  # same (different-from-trained) reference everywhere
    ref_state = cb._ref_model.state_dict()
    cb.on_train_batch_start(cb and mixin.trainer, mixin, dict(batch), 0)
    loss_mixin = mixin.compute_token_loss(dict(batch), mixin.model).loss.detach()

    cb2 = ExcessLossSelection(keep_ratio=0.5, reference="initial", integration="hook")
    _first_step_loss(plain, cb2, dict(batch))
    cb2._ref_model.load_state_dict(ref_state)
    b2 = dict(batch)
    cb2.on_train_batch_start(plain.trainer, plain, b2, 0)
    loss_hook = plain.training_step(b2, 0).detach()
    assert cb2.level == "hook"

    plain3 = PlainHFModule()
    plain3.model.load_state_dict(state)
    cb3 = ExcessLossSelection(keep_ratio=0.5, reference="initial", integration="batch")
    _first_step_loss(plain3, cb3, dict(batch))
    cb3._ref_model.load_state_dict(ref_state)
    b3 = dict(batch)
    cb3.on_train_batch_start(plain3.trainer, plain3, b3, 0)
    loss_batch = plain3.training_step(b3, 0).detach()
    assert (b3["labels"] == -100).sum() > (batch["labels"] == -100).sum()  # labels were edited

    torch.testing.assert_close(loss_hook, loss_mixin, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_batch, loss_mixin, rtol=1e-5, atol=1e-5)


def test_plain_module_drop_in_trains_and_hook_is_removed():
    module = PlainHFModule()
    cb = ExcessLossSelection(keep_ratio=0.5, reference="initial")
    trainer = _trainer([cb], max_steps=3)
    trainer.fit(module, datamodule=ListDataModule())
    assert cb.level == "hook"
    assert abs(float(trainer.callback_metrics["lit_ft/excess_loss/kept_fraction"]) - 0.5) < 0.05
    assert "_loss_function" not in module.model.__dict__  # teardown restored HF's own loss


def test_missing_labels_key_names_it():
    module = PlainHFModule()
    cb = ExcessLossSelection(reference="initial")
    trainer = _trainer([cb], max_steps=1)
    batch = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    module.trainer = trainer
    cb.setup(trainer, module, "fit")
    with pytest.raises(BatchKeyError, match="'labels'"):
        cb.on_train_batch_start(trainer, module, batch, 0)


def test_non_hf_module_gets_clear_error():
    class NotHF(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(2, 2)

    cb = ExcessLossSelection(reference="initial")
    with pytest.raises(ModelLayoutError, match="PreTrainedModel"):
        cb.setup(_trainer([cb]), NotHF(), "fit")


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    r = fit_and_resume(lambda: CausalLMModule(model_config=tiny_config(), learning_rate=1e-2),
                       lambda: [ExcessLossSelection(keep_ratio=0.5, reference="initial")], tmp_path)
    (cb_full,), (cb_res,) = r.callbacks_full, r.callbacks_resumed
    saved = torch.load(r.ckpt, weights_only=False)
    assert "reference_state" in saved["callbacks"][cb_full.state_key]
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
    # the reference stayed the *initial* weights, not the weights at the checkpoint
    torch.manual_seed(0)
    init = CausalLMModule(model_config=tiny_config())
    assert_state_dicts_equal(init.model.state_dict(), cb_res._ref_model.state_dict())
    assert not torch.equal(init.model.lm_head.weight, r.resumed.model.lm_head.weight)


# -- where the reference comes from (issue: "faithful by default", item 1) ------------------------------------------
def test_no_reference_is_refused_at_setup_listing_the_ways():
    """ExcessLossSelection() constructs (configs set the reference later) but refuses to train without a reference,
    naming the three ways; the self-reference mode is named and said not to be Rho-1."""
    cb = ExcessLossSelection()
    with pytest.raises(ValueError) as info:
        _trainer([cb], max_steps=1).fit(CausalLMModule(model_config=tiny_config()), datamodule=ListDataModule())
    msg = str(info.value)
    for way in ("reference=<path or name>", ".ckpt", "reference_losses=<file>", "reference='initial'", "NOT Rho-1"):
        assert way in msg, way


@pytest.mark.parametrize("bad", ["", 3])
def test_bad_reference_arguments_name_the_argument(bad):
    with pytest.raises(ValueError, match="`reference`"):
        ExcessLossSelection(reference=bad)
    with pytest.raises(ValueError, match="`reference_losses`"):
        ExcessLossSelection(reference_losses=bad)


def _saved_reference(tmp_path, seed=1):
    """A tiny HF model (other weights than the trained one) saved as a local folder."""
    torch.manual_seed(seed)
    ref = CausalLMModule(model_config=tiny_config()).model
    folder = tmp_path / f"reference{seed}"
    ref.save_pretrained(str(folder))
    return folder, ref.state_dict()


def _reference_after_setup(cb):
    module = CausalLMModule(model_config=tiny_config())
    trainer = _trainer([cb], max_steps=1)
    module.trainer = trainer
    cb.setup(trainer, module, "fit")
    return module


def test_reference_from_a_local_folder_and_from_an_asset_name(tmp_path, monkeypatch):
    import lit_ft.assets as assets

    folder, state = _saved_reference(tmp_path)
    cb = ExcessLossSelection(reference=str(folder))
    _reference_after_setup(cb)
    assert_state_dicts_equal(state, cb.reference_model.state_dict())
    assert not any(p.requires_grad for p in cb.reference_model.parameters())
    assert "reference_state" not in cb.state_dict()  # a loaded reference is reloaded, not stored

    # a lit_ft.assets name goes through assets.resolve -> assets.get (here: a registered fake asset)
    fake = assets.Asset("tiny-reference", "model", "smollm2-135m-instruct", "-", ".", "test", "-")
    monkeypatch.setitem(assets.ASSETS, "tiny-reference", fake)
    monkeypatch.setattr(assets, "get", lambda name, verbose=False: folder if name == "tiny-reference" else None)
    cb2 = ExcessLossSelection(reference="tiny-reference")
    _reference_after_setup(cb2)
    assert_state_dicts_equal(state, cb2.reference_model.state_dict())


def test_unknown_reference_name_lists_the_assets():
    cb = ExcessLossSelection(reference="no-such-model")
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct"):
        _reference_after_setup(cb)


def test_reference_from_a_lightning_checkpoint(tmp_path):
    """A .ckpt (the Rho-1 recipe's first stage) gives its weights to a copy of the trained architecture."""
    torch.manual_seed(2)
    trained_ref = CausalLMModule(model_config=tiny_config())
    ckpt = tmp_path / "reference.ckpt"
    torch.save({"state_dict": trained_ref.state_dict()}, ckpt)
    cb = ExcessLossSelection(reference=str(ckpt), reference_dtype="bfloat16")
    module = _reference_after_setup(cb)
    ref = cb.reference_model
    assert ref is not module.model and next(ref.parameters()).dtype == torch.bfloat16
    expected = {k: v.to(torch.bfloat16) for k, v in trained_ref.model.state_dict().items()}
    assert_state_dicts_equal(expected, ref.state_dict())
    torch.save({"state_dict": {"other.weight": torch.zeros(2)}}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="does not hold the trained model's weights"):
        _reference_after_setup(ExcessLossSelection(reference=str(tmp_path / "bad.ckpt")))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        _reference_after_setup(ExcessLossSelection(reference=str(tmp_path / "missing.ckpt")))


# -- offline reference losses ---------------------------------------------------------------------------------------
class _StepRecorder(pl.Callback):
    """The loss each step returned and the tokens the scorer kept."""

    def __init__(self, cb):
        self.cb, self.losses, self.kept = cb, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
        self.kept.append(float(trainer.callback_metrics["lit_ft/excess_loss/excess_kept_mean"]))


def _fit_with(cb, steps=4):
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2)
    rec = _StepRecorder(cb)
    trainer = _trainer([cb, rec], max_steps=steps, log_every_n_steps=1)
    trainer.fit(module, datamodule=ListDataModule())
    return module, rec


def test_cached_reference_losses_train_exactly_like_the_live_reference(tmp_path):
    """Scoring the training set once (reference_cache) and training from the file gives the same selection, the same
    losses and the same weights as running the reference forward every step — and builds no reference model."""
    from lit_ft.callbacks.token_selection.reference_cache import ReferenceLossCache, score_batches
    from lit_ft.core.frozen import freeze

    folder, _ = _saved_reference(tmp_path)
    from transformers import AutoModelForCausalLM

    reference = freeze(AutoModelForCausalLM.from_pretrained(str(folder)))
    dm = ListDataModule()
    cache = score_batches(reference, dm.train_dataloader(), {"reference": str(folder)})
    path = cache.save(tmp_path / "ref_nll.pt")
    loaded = ReferenceLossCache.load(path)
    assert len(loaded) == 6 * 4 and loaded.meta == {"reference": str(folder)}
    # the file holds what a live forward gives, at every supervised target
    batch = dm.batches[2]
    valid = shift_targets(batch["labels"]) != -100
    torch.testing.assert_close(loaded.lookup(batch)[valid], causal_lm_token_nll(reference, batch)[valid],
                               rtol=0, atol=0)

    live_module, live = _fit_with(ExcessLossSelection(keep_ratio=0.5, reference=str(folder)))
    cached_cb = ExcessLossSelection(keep_ratio=0.5, reference_losses=str(path))
    cached_module, cached = _fit_with(cached_cb)
    assert cached_cb.reference_model is None  # no reference model was loaded
    assert cached.losses == live.losses and cached.kept == live.kept
    assert_state_dicts_equal(live_module.state_dict(), cached_module.state_dict())
    # with reference given too, it must be the model the file was made with
    same_module, same = _fit_with(ExcessLossSelection(keep_ratio=0.5, reference=str(folder),
                                                      reference_losses=str(path)), steps=2)
    assert same.losses == live.losses[:2]
    with pytest.raises(ValueError, match="was scored with reference"):
        _fit_with(ExcessLossSelection(keep_ratio=0.5, reference="other", reference_losses=str(path)), steps=1)


def test_cached_reference_losses_refuse_mismatches(tmp_path):
    from lit_ft.callbacks.token_selection.reference_cache import ReferenceLossCache, score_batches

    dm = ListDataModule(n_batches=2)
    path = score_batches(CausalLMModule(model_config=tiny_config()).model, dm.train_dataloader(),
                         {"tokenizer": "tok-a", "max_length": "16"}).save(tmp_path / "c.pt")
    cache = ReferenceLossCache.load(path)
    batch = dm.batches[1]
    with pytest.raises(KeyError, match="sample_idx 99 is not in the reference-loss cache"):
        cache.lookup({**batch, "sample_idx": torch.tensor([4, 5, 6, 99])})
    other = batch["input_ids"].clone()
    other[1, 3] = (other[1, 3] + 1) % 384
    with pytest.raises(ValueError, match="sample_idx 5 has other token ids"):
        cache.lookup({**batch, "input_ids": other})
    shorter = batch["attention_mask"].clone()
    shorter[1, -3:] = 0
    with pytest.raises(ValueError, match=r"sample_idx 5 has 13 tokens here but 16 in the cache"):
        cache.lookup({**batch, "attention_mask": shorter})
    with pytest.raises(KeyError, match="needs 'sample_idx'"):
        cache.lookup({k: v for k, v in batch.items() if k != "sample_idx"})
    with pytest.raises(FileNotFoundError, match="reference_losses='nope.pt' is not a file"):
        ReferenceLossCache.load("nope.pt")
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a lit-ft reference-loss cache"):
        ReferenceLossCache.load(tmp_path / "other.pt")

    # at setup: the DataModule's tokenizer / max_length must be the cache's
    class Tokenized(ListDataModule):
        tokenizer_name, max_length = "tok-b", 16

    cb = ExcessLossSelection(reference_losses=str(path))
    with pytest.raises(ValueError, match="made with tokenizer 'tok-a', but the DataModule has tokenizer_name='tok-b'"):
        _trainer([cb], max_steps=1).fit(CausalLMModule(model_config=tiny_config()), datamodule=Tokenized(n_batches=2))


def test_reference_cache_cli_scores_a_configs_training_set(tmp_path, tiny_tokenizer_path):
    """`python -m lit_ft.callbacks.token_selection.reference_cache --config ...` covers every training sample of the
    config's DataModule, with the NLL a live reference forward gives on its batches."""
    import yaml

    from lit_ft.callbacks.token_selection.reference_cache import ReferenceLossCache, main
    from lit_ft.data import SFTDataModule
    from lit_ft.testing import tiny_llama_config, write_tiny_sft_jsonl

    torch.manual_seed(3)
    reference = CausalLMModule(model_config=tiny_llama_config(vocab_size=384)).model.eval()
    reference.save_pretrained(str(tmp_path / "ref"))
    data = {"data": write_tiny_sft_jsonl(tmp_path / "train.jsonl", n=24),
            "val_data": write_tiny_sft_jsonl(tmp_path / "val.jsonl", n=8, seed=1),
            "tokenizer": tiny_tokenizer_path, "max_length": 128, "batch_size": 4}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"class_path": "lit_ft.data.SFTDataModule", "init_args": data}}))
    assert main(["--config", str(config), "--reference", str(tmp_path / "ref"), "--out", str(tmp_path / "n.pt")]) == 0
    cache = ReferenceLossCache.load(tmp_path / "n.pt")
    assert cache.meta["tokenizer"] == tiny_tokenizer_path and cache.meta["max_length"] == "128"
    dm = SFTDataModule(**data)
    dm.setup("fit")
    seen = set()
    for batch in dm.train_dataloader():
        valid = shift_targets(batch["labels"]) != -100
        with torch.no_grad():
            live = causal_lm_token_nll(reference, batch)
        torch.testing.assert_close(cache.lookup(batch)[valid], live[valid], rtol=1e-5, atol=1e-5)
        seen.update(batch["sample_idx"].tolist())
    assert set(cache.sample_idx.tolist()) == seen and len(seen) > 0


def test_rho1_recipe_configs_run_both_stages(tmp_path, tiny_tokenizer_path):
    """configs/rho1/: stage 1 trains and saves the reference .ckpt, stage 2 selects against it (live, then from the
    offline cache made by the reference_cache CLI from the same config) — on the tiny model and data."""
    import contextlib
    import io
    from pathlib import Path

    import yaml

    from lit_ft.callbacks.token_selection.reference_cache import ReferenceLossCache, main
    from lit_ft.cli import run as cli_run
    from tests.config_runs import tiny_overrides

    root = Path(__file__).resolve().parents[2] / "configs" / "rho1"
    args = [a for a in tiny_overrides(tmp_path, tiny_tokenizer_path) if "enable_checkpointing" not in a]
    with contextlib.redirect_stdout(io.StringIO()):
        cli_run(["fit", f"--config={root / 'reference.yaml'}", *args, "--data.init_args.max_train_samples=null",
                 f"--trainer.callbacks.init_args.dirpath={tmp_path / 'rho1'}"])
    ckpt = tmp_path / "rho1" / "reference.ckpt"
    assert ckpt.is_file()

    stage2 = [*tiny_overrides(tmp_path, tiny_tokenizer_path), f"--trainer.callbacks.init_args.reference={ckpt}"]
    with contextlib.redirect_stdout(io.StringIO()):
        live = cli_run(["fit", f"--config={root / 'excess_loss.yaml'}", *stage2])
    cb = next(c for c in live.trainer.callbacks if isinstance(c, ExcessLossSelection))
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert all(torch.equal(v, saved["model." + k]) for k, v in cb.reference_model.state_dict().items())

    # the cache CLI scores stage 2's data (the config as the overrides leave it) with the stage-1 reference
    config = yaml.safe_load((root / "excess_loss.yaml").read_text())
    config["data"]["init_args"].update(data=str(tmp_path / "train.jsonl"), val_data=str(tmp_path / "val.jsonl"),
                                       tokenizer=tiny_tokenizer_path, batch_size=4)
    config["model"]["init_args"] = {"model_config": live.model.model.config.to_dict()}
    (tmp_path / "stage2.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "rho1" / "reference_nll.pt"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--config", str(tmp_path / "stage2.yaml"), "--reference", str(ckpt), "--out", str(out)]) == 0
    assert ReferenceLossCache.load(out).meta["reference"] == str(ckpt)
    with contextlib.redirect_stdout(io.StringIO()):
        cached = cli_run(["fit", f"--config={root / 'excess_loss.yaml'}", *stage2,
                          f"--trainer.callbacks.init_args.reference_losses={out}"])
    cb2 = next(c for c in cached.trainer.callbacks if isinstance(c, ExcessLossSelection))
    assert cb2.reference_model is None and cb2._cache is not None and len(cb2._cache) == 24
    assert "lit_ft/excess_loss/kept_fraction" in cached.trainer.callback_metrics


def _fit_saving(cb, tmp_path, max_steps=2, ckpt_path=None, seed=0):
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(seed)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="last", enable_version_counter=False)
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[cb, saver])
    trainer.fit(module, datamodule=ListDataModule(n_batches=2), ckpt_path=ckpt_path)
    return module, str(tmp_path / "last.ckpt")


def test_resume_into_initial_mode_needs_saved_initial_weights(tmp_path):
    """A run whose reference was a loaded model cannot resume as reference='initial' (the initial weights were never
    saved: the reference would silently be the trained weights); a checkpoint written before 'initial' was named
    (reference None + saved weights) resumes as reference='initial' with those weights."""
    from lit_ft.core.resume import ARGS_KEY

    folder, _ = _saved_reference(tmp_path)
    _, ckpt = _fit_saving(ExcessLossSelection(keep_ratio=0.5, reference=str(folder)), tmp_path / "a")
    with pytest.raises(ValueError, match="holds no initial weights"):
        _fit_saving(ExcessLossSelection(keep_ratio=0.5, reference="initial"), tmp_path / "b", 4, ckpt)

    _, ckpt = _fit_saving(ExcessLossSelection(keep_ratio=0.5, reference="initial"), tmp_path / "c")
    old = torch.load(ckpt, weights_only=False)
    (key,) = [k for k in old["callbacks"] if k.startswith("ExcessLossSelection")]
    state = old["callbacks"].pop(key)
    state["reference"] = None
    state[ARGS_KEY]["reference"] = None
    old["callbacks"]["ExcessLossSelection{'keep_ratio': 0.5, 'reference': None}"] = state
    torch.save(old, ckpt)
    cb = ExcessLossSelection(keep_ratio=0.5, reference="initial")
    # the resumed module starts from other weights (the checkpoint replaces them): a reference copied from the module
    # at setup, as when the saved state is dropped, would be those
    _fit_saving(cb, tmp_path / "d", 4, ckpt, seed=1)
    torch.manual_seed(0)
    initial = CausalLMModule(model_config=tiny_config()).model.state_dict()
    assert_state_dicts_equal(initial, cb.reference_model.state_dict())
