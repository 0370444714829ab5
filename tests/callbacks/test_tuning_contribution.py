"""TuningContribution callback: the logged TuCo equals an independent evaluation against the initial weights, no hook
and no extra forward during training, PEFT without a copy, pictures (files and plotted data), the initial-weights
copy survives resume (and a checkpoint without it is refused), validate() alone, argument errors."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import lit_ft.callbacks.analysis.tuning_contribution as tc_module
from lit_ft.callbacks.analysis.tuning_contribution import TuningContribution, distribution_bars, per_layer_bars
from lit_ft.core.introspect import find_decoder_layers, find_hf_model
from lit_ft.core.layer_hooks import layer_hooks_for
from lit_ft.core.resume import ResumeArgumentError
from lit_ft.metrics.tuning_contribution import evaluate_tuning_contribution
from lit_ft.modules import CausalLMModule

from helpers import ListDataModule, LoraModule, fit_and_resume, tiny_config


def _module() -> CausalLMModule:
    return CausalLMModule(model_config=tiny_config(), learning_rate=5e-2)


def _trainer(tmp_path: Path, callbacks: list, max_steps: int = 3, **kw) -> pl.Trainer:
    return pl.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                      default_root_dir=str(tmp_path), num_sanity_val_steps=1, **kw)


class _TrainingProbe(pl.Callback):
    """Records, at every training batch, whether any hook sits on the decoder layers and whether TuCo ran."""

    def __init__(self) -> None:
        self.in_training = False
        self.hooked_steps = 0
        self.steps = 0

    def _check(self, pl_module) -> None:
        hf = find_hf_model(pl_module)
        layers = find_decoder_layers(hf)
        if layer_hooks_for(hf, create=False) is not None or any(
                l._forward_hooks or l._forward_pre_hooks for l in layers):
            self.hooked_steps += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.in_training = True
        self.steps += 1
        self._check(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._check(pl_module)
        self.in_training = False


def test_logged_tuco_equals_an_independent_evaluation_and_training_costs_nothing(tmp_path, monkeypatch):
    calls = {"train": 0, "val": 0}
    probe = _TrainingProbe()
    real = tc_module.tuning_components

    def counting(*args, **kwargs):
        calls["train" if probe.in_training else "val"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(tc_module, "tuning_components", counting)
    torch.manual_seed(0)
    module = _module()
    initial = copy.deepcopy(module.model)
    cb = TuningContribution(max_batches=2, log_per_layer=True)
    dm = ListDataModule(n_batches=3)
    trainer = _trainer(tmp_path, [probe, cb])
    trainer.fit(module, datamodule=dm)
    assert probe.steps == 3 and probe.hooked_steps == 0 and calls["train"] == 0
    assert calls["val"] == 2  # one validation (epoch end) x max_batches; the sanity check is not measured
    logged = trainer.callback_metrics
    module.model.eval()
    ref = evaluate_tuning_contribution(initial, module.model, dm.val_dataloader())
    assert ref["prompts"] == 8 and 0.0 < ref["tuco"] < 1.0
    assert logged["lit_ft/tuning_contribution/tuco"].item() == pytest.approx(ref["tuco"], rel=1e-4)
    assert logged["lit_ft/tuning_contribution/prompts"].item() == 8
    for i in range(2):
        assert logged[f"lit_ft/tuning_contribution/ftc_layer{i}"].item() == pytest.approx(ref["ftc_layer"][i],
                                                                                           rel=1e-4)
    assert cb.last_results["histogram"] == pytest.approx(ref["histogram"])
    # the copy is the initial weights, not the trained ones
    for (name, p0), p1 in zip(initial.state_dict().items(), cb._copy.model.state_dict().values()):
        torch.testing.assert_close(p1, p0, rtol=0, atol=0, msg=name)
    # the pictures exist under the log dir, named by technique and step
    for name in ("per_layer", "distribution"):
        path = Path(cb.last_pictures[name])
        assert path.is_file() and path.stat().st_size > 0
        assert path.parent.name == "tuning_contribution" and path.name == f"{name}_step3.png"


def test_pictures_plot_the_numbers():
    ptc, ftc = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.25, 4.0])
    fig = per_layer_bars(ptc, ftc)
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx(ptc.tolist() + ftc.tolist())
    assert ax.get_xlabel() == "decoder layer"
    share = fig.axes[1].lines[0].get_ydata()
    assert list(share) == pytest.approx((ftc / (ptc + ftc)).tolist())
    hist = torch.tensor([0.0, 3.0, 1.0, 0.0])
    fig = distribution_bars(hist, 0.4)
    ax = fig.axes[0]
    assert [p.get_height() for p in ax.patches] == pytest.approx(hist.tolist())
    assert [p.get_x() for p in ax.patches] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert ax.lines[0].get_xdata()[0] == pytest.approx(0.4)


class _ValLora(LoraModule):
    def validation_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)


def test_peft_uses_the_adapters_off_and_keeps_no_copy(tmp_path):
    module = _ValLora(lr=5e-2)
    cb = TuningContribution(max_batches=1, pictures=False)
    trainer = _trainer(tmp_path, [cb], max_steps=3)
    trainer.fit(module, datamodule=ListDataModule(n_batches=3))
    assert cb._resolved == "adapters" and cb._copy.model is None
    assert "initial_state" not in cb.state_dict()
    tuco = trainer.callback_metrics["lit_ft/tuning_contribution/tuco"].item()
    ref = evaluate_tuning_contribution(None, module.model.eval(), ListDataModule(n_batches=3).val_dataloader(),
                                       max_batches=1)
    assert 0.0 < tuco < 1.0 and tuco == pytest.approx(ref["tuco"], rel=1e-4)


def _fit_and_resume(tmp_path, before_resume=None):
    return fit_and_resume(_module, lambda: [TuningContribution(max_batches=1, pictures=False)], tmp_path / "ckpt",
                          before_resume=before_resume, limit_val_batches=1, val_check_interval=2,
                          num_sanity_val_steps=0, default_root_dir=str(tmp_path))


def test_the_initial_weights_copy_survives_resume(tmp_path):
    torch.manual_seed(0)
    initial = _module().model.state_dict()
    r = _fit_and_resume(tmp_path)
    (full,), (resumed,) = r.callbacks_full, r.callbacks_resumed
    saved = torch.load(r.ckpt, weights_only=False)["callbacks"][full.state_key]
    assert "initial_state" in saved
    for name, w in initial.items():
        torch.testing.assert_close(resumed._copy.model.state_dict()[name], w, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(saved["initial_state"][name], w, rtol=0, atol=0, msg=name)
    # both runs measure at step 4 with the same weights against the same initial weights
    assert r.trainer_resumed.callback_metrics["lit_ft/tuning_contribution/tuco"].item() == pytest.approx(
        r.trainer_full.callback_metrics["lit_ft/tuning_contribution/tuco"].item(), rel=1e-5)


def test_a_checkpoint_without_the_copy_is_refused(tmp_path):
    def strip(ckpt: Path) -> None:
        state = torch.load(ckpt, weights_only=False)
        for key in [k for k in state["callbacks"] if k.startswith("TuningContribution")]:
            del state["callbacks"][key]
        torch.save(state, ckpt)

    with pytest.raises(ResumeArgumentError, match="pre_trained"):
        _fit_and_resume(tmp_path, before_resume=strip)


def test_validate_alone_needs_a_pre_trained_model(tmp_path):
    module = _module()
    cb = TuningContribution(max_batches=1, pictures=False)
    with pytest.warns(UserWarning, match="pre_trained"):
        _trainer(tmp_path, [cb]).validate(module, datamodule=ListDataModule(n_batches=2))
    assert cb.last_results == {}
    # with the pre-trained model from a folder: measured against it
    pre = tmp_path / "pre"
    torch.manual_seed(3)
    _module().model.save_pretrained(pre)
    cb = TuningContribution(max_batches=1, pictures=False, pre_trained=str(pre))
    trainer = _trainer(tmp_path, [cb])
    trainer.validate(module, datamodule=ListDataModule(n_batches=2))
    assert cb._resolved == "copy" and 0.0 < cb.last_results["tuco"] < 1.0
    assert "lit_ft/tuning_contribution/tuco" in trainer.callback_metrics


@pytest.mark.parametrize("arg, value", [
    ("max_batches", 0), ("every_n_validations", 0), ("token", "first"), ("norm", 0.5), ("branch", "lora"),
    ("pre_trained_dtype", "int8"), ("bins", 0), ("log_per_layer", "yes"), ("pictures", 1.5),
])
def test_invalid_arguments_name_the_argument(arg, value):
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        TuningContribution(**{arg: value})


def test_adapters_branch_without_adapters_is_refused(tmp_path):
    with pytest.raises(ValueError, match="branch='adapters'"):
        _trainer(tmp_path, [TuningContribution(branch="adapters")]).fit(_module(),
                                                                        datamodule=ListDataModule(n_batches=2))
