"""LocalizedTuning (LocFT-BF): only the chosen module of the chosen layer trains; a step on a batch whose loss is below
`skip_below` changes neither the parameters nor the optimizer state; the epoch-average loss stops training; the
decision is taken on the accumulation-window mean and on the loss averaged over DDP ranks; composition, PEFT, plain
module, resume."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch

from lit_ft.callbacks import LocalizedTuning
from lit_ft.callbacks._param_plan import ParamPlanCallback, param_plans_for
from lit_ft.callbacks.tensor_selection.localized_tuning import default_layer_index
from lit_ft.core.optim import verify_optimizer
from lit_ft.core.params import ParamPatternError, ParamPlan, ParamPlanConflict
from lit_ft.modules import CausalLMModule

from helpers import (
    ListDataModule, PlainHFModule, assert_state_dicts_equal, fit_and_resume, moved_params, random_batch,
    snapshot_params, tiny_config,
)
from helpers import LoraModule

_snap = snapshot_params
_moved = moved_params

DOWN1 = "model.model.layers.1.mlp.down_proj.weight"


def _hf_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(tiny_config())
    cfg.pop("model_type")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **cfg))


class ScaledLossModule(pl.LightningModule):
    """A plain user module whose batch loss is the HF loss times ``batch["scale"]``, so a test can put a batch
    below or above the thresholds. AdamW with weight decay over *all* parameters."""

    def __init__(self, lr=1e-2, weight_decay=0.5):
        super().__init__()
        self.model = _hf_model()
        self.lr, self.wd = lr, weight_decay

    def hf_loss(self, batch):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    def training_step(self, batch, batch_idx):
        return self.hf_loss(batch) * batch["scale"]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.wd)


def _scaled_batches(scales, seeds=None):
    seeds = seeds if seeds is not None else range(len(scales))
    return [{**random_batch(4, 16, seed=s), "scale": torch.tensor(float(x))} for s, x in zip(seeds, scales)]


class _ScaledData(pl.LightningDataModule):
    def __init__(self, scales, seeds=None):
        super().__init__()
        self.batches = _scaled_batches(scales, seeds)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.batches, batch_size=None, shuffle=False)


def PeftModule():
    return LoraModule(seed=None, weight_decay=0.5)


class _Freezer(ParamPlanCallback):
    technique_name = "freezer"

    def __init__(self, patterns):
        self.patterns = patterns

    def build_plan(self, trainer, pl_module):
        return ParamPlan.freeze(pl_module, self.patterns, owner="Freezer")


def _trainer(callbacks, **kw):
    kw.setdefault("max_steps", 3)
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=callbacks, limit_val_batches=0, **kw)


def _fit(module, callbacks, steps=3, n_batches=3, **kw):
    trainer = _trainer(callbacks, max_steps=steps, **kw)
    trainer.fit(module, datamodule=ListDataModule(n_batches=n_batches))
    return trainer


def _adamw_module():
    return CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.5)


@pytest.mark.parametrize("num_layers, expected", [(32, 22), (30, 20), (28, 19), (4, 2), (2, 1), (1, 0)])
def test_default_layer_is_the_papers_relative_depth(num_layers, expected):
    """The paper edits layer 22 of Llama-3-8B's 32 (mid-to-upper), not the last layer."""
    assert default_layer_index(num_layers) == expected


def test_default_picks_a_mid_upper_layer_not_the_last():
    module = CausalLMModule(model_config=tiny_config(num_hidden_layers=4), learning_rate=1e-2, weight_decay=0.5)
    before = _snap(module)
    cb = LocalizedTuning()
    _fit(module, [cb], steps=1, n_batches=1)
    assert cb.layer_index == 2
    assert _moved(module, before) == {"model.model.layers.2.mlp.down_proj.weight"}


def test_default_trains_only_last_layer_down_proj():
    """On the 2-layer test model the paper's depth (floor(22/32 * 2) = 1) is the last layer."""
    module = _adamw_module()
    before = _snap(module)
    cb = LocalizedTuning()
    trainer = _fit(module, [cb])
    assert cb.layer_index == 1 and cb.selected_names == [DOWN1]
    assert _moved(module, before) == {DOWN1}  # everything else bit-identical despite weight decay 0.5
    verify_optimizer(trainer.optimizers[0], module, param_plans_for(module).composed)
    assert cb.skipped_steps == 0 and cb.optimizer_steps == 3
    assert trainer.callback_metrics["lit_ft/localized_tuning/trainable_fraction"].item() == pytest.approx(
        before[DOWN1].numel() / sum(p.numel() for p in before.values()))
    assert "lit_ft/localized_tuning/skipped_steps" in trainer.callback_metrics


@pytest.mark.parametrize(
    "layer, pattern, expected",
    [
        (0, "mlp.*", {"mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}),
        (-2, r"re:self_attn\.(q|k)_proj", {"self_attn.q_proj.weight", "self_attn.k_proj.weight"}),
        (0, "*", None),  # the whole layer (the card's Mistral-7B setting)
    ],
)
def test_layer_and_pattern_selection(layer, pattern, expected):
    module = CausalLMModule(model_config=tiny_config())
    cb = LocalizedTuning(layer=layer, module_pattern=pattern)
    _trainer([cb], max_steps=0).fit(module, datamodule=ListDataModule(n_batches=1))
    prefix = "model.model.layers.0."
    if expected is None:
        expected = {n[len(prefix):] for n, _ in module.named_parameters() if n.startswith(prefix)}
    assert {n[len(prefix):] for n in cb.selected_names} == expected
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {prefix + e for e in expected}


def test_bad_layer_and_unmatched_pattern_raise_at_setup():
    with pytest.raises(ValueError, match=r"layer`=2.*2 decoder layers.*-2\.\.1"):
        _fit(_adamw_module(), [LocalizedTuning(layer=2)], steps=1)
    with pytest.raises(ParamPatternError, match="(?s)mlp.down_projection.*mlp.down_proj"):
        _fit(_adamw_module(), [LocalizedTuning(module_pattern="mlp.down_projection")], steps=1)


class _StepRecorder(pl.Callback):
    """Did this batch's optimizer step change the parameters / the optimizer state?"""

    def __init__(self):
        self.param_changed, self.state_changed = [], []

    @staticmethod
    def _state(trainer):
        return copy.deepcopy(trainer.optimizers[0].state_dict()["state"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._p, self._s = _snap(pl_module), self._state(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.param_changed.append(bool(_moved(pl_module, self._p)))
        s = self._state(trainer)
        same = s.keys() == self._s.keys() and all(
            s[i].keys() == self._s[i].keys() and all(torch.equal(s[i][k], self._s[i][k]) for k in s[i]) for i in s)
        self.state_changed.append(not same)


def test_step_below_threshold_leaves_params_and_adamw_state_bit_identical():
    torch.manual_seed(0)
    module = ScaledLossModule()
    rec = _StepRecorder()
    cb = LocalizedTuning(skip_below=0.01, stop_below=None)
    # batch losses ~6 (step) and ~0.006 (< 0.01: skip), alternating
    trainer = _trainer([cb, rec], max_steps=4)
    trainer.fit(module, datamodule=_ScaledData([1.0, 1e-3, 1.0, 1e-3]))
    assert rec.param_changed == [True, False, True, False]
    assert rec.state_changed == [True, False, True, False]  # exp_avg, exp_avg_sq and step untouched when skipped
    state = trainer.optimizers[0].state
    assert len(state) == 1 and [int(s["step"]) for s in state.values()] == [2]
    assert cb.skipped_steps == 2 and cb.optimizer_steps == 4 and trainer.global_step == 4
    assert trainer.callback_metrics["lit_ft/localized_tuning/skipped_steps"].item() == 2


def test_skip_on_lit_ft_module_reads_its_token_mean_loss():
    module = _adamw_module()  # CausalLMModule: TokenLossMixin path, gradients finalised after the callbacks' hook
    before = _snap(module)
    cb = LocalizedTuning(skip_below=100.0, stop_below=None)
    trainer = _fit(module, [cb], steps=2, n_batches=1)
    assert cb.skipped_steps == 2 and not _moved(module, before) and not trainer.optimizers[0].state
    assert cb.last_loss == pytest.approx(trainer.callback_metrics["train/loss"].item(), rel=1e-5)


def test_skip_disabled_steps_every_batch():
    module = ScaledLossModule()
    rec = _StepRecorder()
    cb = LocalizedTuning(skip_below=0.0, stop_below=None)
    _trainer([cb, rec], max_steps=4).fit(module, datamodule=_ScaledData([1.0, 1e-3, 1.0, 1e-3]))
    assert rec.param_changed == rec.state_changed == [True] * 4 and cb.skipped_steps == 0


@pytest.mark.parametrize("offset, skipped", [(+0.5, 2), (-0.5, 0)])
def test_accumulation_decides_on_the_window_mean(offset, skipped):
    torch.manual_seed(0)
    module = ScaledLossModule()
    data = _ScaledData([1.0, 1e-3, 1.0, 1e-3], seeds=[0, 1, 0, 1])  # two identical windows of two micro-batches
    with torch.no_grad():
        window_mean = sum(float(module.hf_loss(b) * b["scale"]) for b in data.batches[:2]) / 2  # ~3.0
    cb = LocalizedTuning(skip_below=window_mean + offset, stop_below=None)
    before = _snap(module)
    trainer = _trainer([cb], max_steps=2, accumulate_grad_batches=2)
    trainer.fit(module, datamodule=data)
    # the first micro-batch alone (~6) is above, the last alone (~0.006) below both thresholds: only the mean decides
    assert cb.skipped_steps == skipped and cb.optimizer_steps == 2
    assert bool(_moved(module, before)) == (skipped == 0)
    if skipped:  # parameters never moved: every window saw the initial weights
        assert cb.last_loss == pytest.approx(window_mean, rel=1e-5)


@pytest.mark.parametrize("stop_below, stops", [(4.0, True), (2.0, False)])
def test_early_stop_on_epoch_average_loss(stop_below, stops):
    torch.manual_seed(0)
    module = ScaledLossModule()
    data = _ScaledData([1.0, 0.02])  # per-batch losses ~6 then ~0.12: epoch average ~3.0, last batch < 2
    with torch.no_grad():
        epoch_avg = sum(float(module.hf_loss(b) * b["scale"]) for b in data.batches) / 2
    assert 2.0 < epoch_avg < 4.0
    cb = LocalizedTuning(skip_below=100.0, stop_below=stop_below)  # every step skipped: the weights stay initial
    trainer = _trainer([cb], max_steps=-1, max_epochs=3)
    trainer.fit(module, datamodule=data)
    assert cb.stopped_early is stops
    assert trainer.global_step == (2 if stops else 6)
    assert trainer.callback_metrics["lit_ft/localized_tuning/epoch_loss"].item() == pytest.approx(epoch_avg, rel=1e-5)


def test_composes_by_intersection_and_required_conflict_raises():
    module = _adamw_module()
    before = _snap(module)
    _fit(module, [LocalizedTuning(module_pattern="mlp.*"), _Freezer(["*down_proj*"])])
    assert _moved(module, before) == {"model.model.layers.1.mlp.gate_proj.weight", "model.model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ParamPlanConflict, match="(?s)(LocalizedTuning.*Freezer|Freezer.*LocalizedTuning)"):
        _fit(_adamw_module(), [LocalizedTuning(required=True), _Freezer(["*down_proj*"])], steps=1)


def test_plain_module():
    module = PlainHFModule(lr=1e-1)  # SGD over all parameters
    before = _snap(module)
    _fit(module, [LocalizedTuning()])
    assert _moved(module, before) == {DOWN1}


def test_peft_trains_the_lora_params_of_the_chosen_module_or_raises():
    module = PeftModule()
    before = _snap(module)
    cb = LocalizedTuning(module_pattern="self_attn.q_proj")
    _fit(module, [cb])
    lora_q1 = {n for n in before if ".layers.1.self_attn.q_proj.lora_" in n}
    assert len(lora_q1) == 2 and set(cb.selected_names) == lora_q1
    assert _moved(module, before) == lora_q1  # the q_proj base weight stays frozen (PEFT froze it)
    with pytest.raises(ValueError, match="(?s)froze all of them.*carries an adapter"):
        _fit(PeftModule(), [LocalizedTuning()], steps=1)  # mlp.down_proj has no LoRA: nothing would train


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    # 2 batches per epoch (the second is always skipped); the step-2 checkpoint falls on an epoch boundary
    r = fit_and_resume(ScaledLossModule, lambda: [LocalizedTuning()], tmp_path,
                       make_datamodule=lambda: _ScaledData([1.0, 1e-3]))
    (cb_full,), (cb_res,) = r.callbacks_full, r.callbacks_resumed
    saved = torch.load(r.ckpt, weights_only=False)["callbacks"][cb_full.state_key]
    assert saved["skipped_steps"] == 1 and saved["optimizer_steps"] == 2
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
    assert cb_res.skipped_steps == cb_full.skipped_steps == 2 and cb_res.optimizer_steps == 4
    assert cb_res.last_loss == cb_full.last_loss
    s_full, s_res = r.trainer_full.optimizers[0].state, r.trainer_resumed.optimizers[0].state
    assert [int(s["step"]) for s in s_res.values()] == [int(s["step"]) for s in s_full.values()] == [2]


def test_resume_from_the_stopping_epoch_stops_like_the_uninterrupted_run(tmp_path):
    # the step-2 checkpoint is written after epoch 0's last step, before its epoch-end hooks
    r = fit_and_resume(
        ScaledLossModule,
        lambda: [LocalizedTuning(skip_below=100.0, stop_below=4.0)],  # epoch-0 average ~3.0: stop after epoch 0
        tmp_path, make_datamodule=lambda: _ScaledData([1.0, 0.02]),
        max_steps=-1, max_epochs=3, limit_val_batches=None,  # bounded by the epochs alone; validation at the default
    )
    (cb_full,), (cb_res,) = r.callbacks_full, r.callbacks_resumed
    assert cb_full.stopped_early and cb_res.stopped_early
    assert r.trainer_full.global_step == r.trainer_resumed.global_step == 2 and cb_res.optimizer_steps == 2


def test_state_dict_round_trip():
    a = LocalizedTuning()
    a.skipped_steps, a.optimizer_steps, a.last_loss, a.stopped_early = 3, 7, 0.5, True
    a._epoch, a._epoch_loss_sum, a._epoch_steps, a._window_sum, a._window_count = 2, 1.5, 3, torch.tensor(0.25), 1
    b = LocalizedTuning()
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    assert LocalizedTuning(layer=3).state_key != LocalizedTuning(layer=2).state_key


class _RankRecorder(pl.Callback):
    """Writes each rank's skip decisions, decision losses and final weights to a file (ddp_spawn runs in workers)."""

    def __init__(self, path, cb):
        self.path, self.cb, self.decisions = str(path), cb, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        cb = next(c for c in trainer.callbacks if isinstance(c, LocalizedTuning))
        self.decisions.append((cb.last_skipped, cb.last_loss))

    def on_train_end(self, trainer, pl_module):
        torch.save({"decisions": self.decisions, "params": _snap(pl_module)}, f"{self.path}/rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_skip_decision_is_global(tmp_path):
    torch.manual_seed(0)
    module = ScaledLossModule(lr=1e-3)
    init = _snap(module)
    # rank r gets batches r and r + 2. Step 1: local losses ~3 and ~12, mean ~7.4 > 6 -> both ranks step (a local
    # rule would skip on rank 0). Step 2: ~0.6 and ~8.9, mean ~4.8 < 6 -> both skip (rank 1 alone would step).
    batches = _scaled_batches([0.5, 2.0, 0.1, 1.5])
    cb = LocalizedTuning(skip_below=6.0, stop_below=None)
    trainer = pl.Trainer(accelerator="cpu", strategy="ddp_spawn", devices=2, max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[cb, _RankRecorder(tmp_path, cb)])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert [d[0] for d in r0["decisions"]] == [d[0] for d in r1["decisions"]] == [False, True]
    assert [d[1] for d in r0["decisions"]] == [d[1] for d in r1["decisions"]]  # the all-reduced loss
    assert 6.0 < r0["decisions"][0][1] and r0["decisions"][1][1] < 6.0
    for n in init:
        assert torch.equal(r0["params"][n], r1["params"][n]), n
        assert torch.equal(r0["params"][n], init[n]) == (n != DOWN1), n
