"""TrainOnly (lightweight fine-tuning): presets resolve to the right tensors on lit_ft's module, a plain module and a
PEFT-wrapped model; everything else stays bit-identical under AdamW weight decay; composition, conflicts, resume,
DDP."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lit_ft.callbacks import TrainOnly
from lit_ft.callbacks._param_plan import ParamPlanCallback, param_plans_for
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

EMB, HEAD, NORM = "model.model.embed_tokens.weight", "model.lm_head.weight", "model.model.norm.weight"


def _fit(module, callbacks, steps=3, n_batches=3, **kw):
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, limit_val_batches=0, **kw)
    trainer.fit(module, datamodule=ListDataModule(n_batches=n_batches))
    return trainer


def _adamw_module(**cfg):
    # weight decay > 0: a frozen tensor that reached the optimizer would move even with a zero gradient
    return CausalLMModule(model_config=tiny_config(**cfg), learning_rate=1e-2, weight_decay=0.5)


class _Freezer(ParamPlanCallback):
    """Another parameter callback: freezes the tensors matching `patterns`."""

    technique_name = "freezer"

    def __init__(self, patterns):
        self.patterns = patterns

    def build_plan(self, trainer, pl_module):
        return ParamPlan.freeze(pl_module, self.patterns, owner="Freezer")


def PeftModule():
    return LoraModule(seed=None, weight_decay=0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(preset="patterns"), "patterns"),
        (dict(patterns=["*lm_head*"]), "only used with preset='patterns'"),
        (dict(preset="patterns", patterns=[""]), "patterns"),
    ],
)
def test_preset_and_patterns_go_together(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainOnly(**kwargs)


def test_embeddings_and_head_trains_exactly_those_and_optimizer_matches():
    module = _adamw_module()
    before = _snap(module)
    cb = TrainOnly()
    trainer = _fit(module, [cb])
    assert _moved(module, before) == {EMB, HEAD}
    assert cb.selected_names == [EMB, HEAD] and cb.tied_embeddings is False
    verify_optimizer(trainer.optimizers[0], module, param_plans_for(module).composed)  # only trainable tensors in it
    numel = {n: p.numel() for n, p in module.named_parameters()}
    expected = (numel[EMB] + numel[HEAD]) / sum(numel.values())
    assert cb.trainable_fraction() == pytest.approx(expected) and cb.selected_fraction == pytest.approx(expected)
    assert trainer.callback_metrics["lit_ft/train_only/trainable_fraction"].item() == pytest.approx(expected)


def test_tied_embeddings_are_one_tensor():
    module = _adamw_module(tie_word_embeddings=True)
    assert module.model.lm_head.weight is module.model.model.embed_tokens.weight
    before = _snap(module)
    cb = TrainOnly(preset="embeddings_and_head")
    _fit(module, [cb])
    assert cb.tied_embeddings is True and cb.selected_names == [EMB]
    assert _moved(module, before) == {EMB}


@pytest.mark.parametrize("include_head", [True, False])
def test_last_layers(include_head):
    module = _adamw_module()
    before = _snap(module)
    cb = TrainOnly(preset="last_layers", last_k=1, include_head=include_head)
    _fit(module, [cb])
    layer1 = {n for n in before if n.startswith("model.model.layers.1.")}
    assert layer1 and _moved(module, before) == layer1 | ({NORM, HEAD} if include_head else set())


def test_last_k_larger_than_the_model_raises():
    with pytest.raises(ValueError, match="last_k.*3.*2 decoder layers"):
        _fit(_adamw_module(), [TrainOnly(preset="last_layers", last_k=3)], steps=1)


def test_patterns_glob_and_regex_and_no_match_error():
    module = _adamw_module()
    before = _snap(module)
    _fit(module, [TrainOnly(preset="patterns", patterns=[r"re:.*layers\.0\.self_attn\..*", "*lm_head*"])])
    attn0 = {n for n in before if n.startswith("model.model.layers.0.self_attn.")}
    assert attn0 and _moved(module, before) == attn0 | {HEAD}
    with pytest.raises(ParamPatternError, match="matched no parameter"):
        _fit(_adamw_module(), [TrainOnly(preset="patterns", patterns=["*not_a_param*"])], steps=1)


def test_composes_by_intersection_and_required_conflict_raises():
    module = _adamw_module()
    before = _snap(module)
    _fit(module, [TrainOnly(preset="last_layers", last_k=1), _Freezer(["*layers.1.mlp.*"])])
    expected = {n for n in before if n.startswith("model.model.layers.1.") and ".mlp." not in n} | {NORM, HEAD}
    assert _moved(module, before) == expected
    with pytest.raises(ParamPlanConflict, match="(?s)(TrainOnly.*Freezer|Freezer.*TrainOnly)"):
        _fit(_adamw_module(), [TrainOnly(preset="last_layers", last_k=1, required=True), _Freezer(["*layers.1.mlp.*"])],
             steps=1)


def test_user_frozen_tensors_stay_frozen():
    module = _adamw_module()
    module.model.lm_head.weight.requires_grad_(False)  # the user's own choice wins over the preset
    before = _snap(module)
    _fit(module, [TrainOnly()])
    assert _moved(module, before) == {EMB}


def test_plain_module():
    module = PlainHFModule(lr=1e-1)  # SGD over *all* parameters: frozen ones are skipped through grad=None
    before = _snap(module)
    _fit(module, [TrainOnly(preset="last_layers", last_k=1, include_head=False)])
    layer1 = {n for n in before if n.startswith("model.model.layers.1.")}
    assert _moved(module, before) == layer1


def test_peft_model_patterns_on_peft_names_and_presets():
    module = PeftModule()
    before = _snap(module)
    _fit(module, [TrainOnly(preset="patterns", patterns=["*lora_B*"])])
    lora_b = {n for n in before if "lora_B" in n}
    assert len(lora_b) == 4 and _moved(module, before) == lora_b  # lora_A (weight decay!) and base untouched

    module = PeftModule()
    before = _snap(module)
    cb = TrainOnly(preset="last_layers", last_k=1)  # PEFT froze the base: only layer 1's LoRA tensors train
    _fit(module, [cb])
    lora1 = {n for n in before if ".layers.1." in n and "lora_" in n}
    assert set(cb.selected_names) == lora1 and _moved(module, before) == lora1

    with pytest.raises(ValueError, match="froze all of them"):
        _fit(PeftModule(), [TrainOnly()], steps=1)  # embeddings and head are frozen base weights under PEFT


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    torch.manual_seed(0)
    init = _snap(_adamw_module())
    r = fit_and_resume(_adamw_module, lambda: [TrainOnly(preset="last_layers", last_k=1)], tmp_path)
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
    assert _moved(r.resumed, init) == {n for n in init if n.startswith("model.model.layers.1.")} | {NORM, HEAD}


class _RankDump(pl.Callback):
    def __init__(self, path):
        self.path = str(path)

    def on_train_end(self, trainer, pl_module):
        torch.save({"trainable": sorted(n for n, p in pl_module.named_parameters() if p.requires_grad),
                    "params": _snap(pl_module)}, f"{self.path}/rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_two_ranks_same_selection(tmp_path):
    torch.manual_seed(0)
    module = _adamw_module()
    init = _snap(module)
    batches = [random_batch(4, 16, seed=i) for i in range(4)]
    trainer = pl.Trainer(accelerator="cpu", strategy="ddp_spawn", devices=2, max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[TrainOnly(preset="last_layers", last_k=1, include_head=False), _RankDump(tmp_path)])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    layer1 = sorted(n for n in init if n.startswith("model.model.layers.1."))
    assert r0["trainable"] == r1["trainable"] == layer1
    for n in init:
        assert torch.equal(r0["params"][n], r1["params"][n]), n
        assert torch.equal(r0["params"][n], init[n]) == (n not in layer1), n
