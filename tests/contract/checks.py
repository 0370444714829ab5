"""The checks every registered technique must pass (DESIGN.md §4), as plain functions of a record and its case.

Each check raises ``AssertionError`` with a message that names the technique and what to fix. They are plain
functions (not tests) so that ``test_contract.py`` can also run them on deliberately broken techniques and show
that they fail.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch

from lit_ft.core.registry import TechniqueRecord
from tests.config_runs import run_config_two_steps
from tests.contract.cases import Case, Ctx
from tests.helpers import assert_state_dicts_equal, fit_and_resume, quiet_trainer

ROOT = Path(__file__).resolve().parents[2]
DROP_IN_STEPS = 3


def constructible_with_no_arguments(record: TechniqueRecord) -> None:
    try:
        record.cls()
    except Exception as e:  # noqa: BLE001  any failure is the finding
        raise AssertionError(f"{record.cls.__name__}() must work with no arguments (DESIGN.md §1: one callback "
                             f"added as is); it raised {type(e).__name__}: {e}") from e


def rejects_invalid_arguments(record: TechniqueRecord, case: Case) -> None:
    name = record.cls.__name__
    assert case.invalid, f"cases table: list at least one invalid argument for {record.name!r}"
    for arg, value in case.invalid:
        try:
            record.cls(**{arg: value})
        except (ValueError, TypeError) as e:
            assert re.search(rf"\b{re.escape(arg)}\b", str(e)), \
                f"{name}({arg}={value!r}) raised, but the message does not name `{arg}`: {e}"
        else:
            raise AssertionError(f"{name}({arg}={value!r}) was accepted; it must raise an error naming `{arg}`")


def is_module_technique(record: TechniqueRecord) -> bool:
    """A technique that is the LightningModule itself (it runs its own loop, e.g. BlackBoxPromptLearning), not a
    callback on the user's module: the checks build it as the module, with no callbacks."""
    return isinstance(record.cls, type) and issubclass(record.cls, pl.LightningModule)


def instances_coexist(record: TechniqueRecord, case: Case, ctx: Ctx) -> None:
    """Two instances with different arguments get distinct ``state_key``s and fit together in one Trainer; or, for
    a technique that is one per model (``case.single_instance``), the second is refused at setup, clearly. A module
    technique: two instances share no tensor (each trains its own state)."""
    name = record.cls.__name__
    if is_module_technique(record):
        a, b = record.cls(**case.build(case.kwargs, ctx)), record.cls(**case.build(case.alt_kwargs, ctx))
        ptrs = {t.data_ptr() for t in list(a.parameters()) + list(a.buffers()) if t.numel()}
        shared = [n for n, t in list(b.named_parameters()) + list(b.named_buffers()) if t.numel() and t.data_ptr() in ptrs]
        assert not shared, f"two {name} modules share tensors {shared[:3]}"
        return
    if case.single_instance is not None:
        first, second = record.cls(**case.build(case.kwargs, ctx)), record.cls(**case.build(case.kwargs, ctx))
        try:
            quiet_trainer([first, second], max_steps=1, limit_val_batches=0).fit(case.module(), datamodule=case.datamodule())
        except Exception as e:  # noqa: BLE001
            assert name in str(e) or "already" in str(e), f"a second {name} was refused, unclearly: {e}"
            return
        raise AssertionError(f"two {name} on one model trained; the case says {case.single_instance!r}: "
                             "drop `single_instance` from its case and give it distinct state keys")
    a, b = record.cls(**case.build(case.kwargs, ctx)), record.cls(**case.build(case.alt_kwargs, ctx))
    assert a.state_key != b.state_key, \
        f"two {name} with different arguments share state_key {a.state_key!r}; build it with _generate_state_key"
    quiet_trainer([a, b])  # Lightning refuses stateful callbacks with equal keys here


def resume_equals_uninterrupted(record: TechniqueRecord, case: Case, ctx: Ctx) -> None:
    """Checkpoint at step 2 and resume to step 4: weights and the callback's state equal the uninterrupted run's."""
    kwargs = case.build(case.kwargs, ctx)
    if is_module_technique(record):  # the technique is the module; its state is the module's state_dict
        r = fit_and_resume(lambda: record.cls(**kwargs), lambda: [], ctx.tmp_path / "resume",
                           make_datamodule=case.datamodule)
        try:
            assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
        except AssertionError as e:
            raise AssertionError(f"{record.cls.__name__}: the resumed run's state differs from the uninterrupted "
                                 f"run's: {e}") from e
        return
    r = fit_and_resume(case.module, lambda: [record.cls(**kwargs)], ctx.tmp_path / "resume",
                       make_datamodule=case.datamodule)
    try:
        assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
    except AssertionError as e:
        raise AssertionError(f"{record.cls.__name__}: the resumed run's weights differ from the uninterrupted "
                             f"run's: {e}") from e
    (cb_full,), (cb_resumed,) = r.callbacks_full, r.callbacks_resumed
    assert_same_state(cb_full.state_dict(), cb_resumed.state_dict(), f"{record.cls.__name__}.state_dict()")


def drop_in_changes_training_and_logs(record: TechniqueRecord, case: Case, ctx: Ctx) -> None:
    """In a plain module whose ``training_step`` is ``return self.model(**batch).loss``, the technique changes the
    weights (against the same run without it) and logs at least one metric under ``lit_ft/<name>/``.

    The analysis family measures and never trains: there the weights must stay bit-identical to the run without it,
    and it must log under its prefix once the plain module validates (its ``validation_step`` is the same line)."""
    if record.family == "analysis":
        return _drop_in_observes_only(record, case, ctx)
    if is_module_technique(record):
        return _module_trains_and_logs(record, case, ctx)
    baseline, _ = _fit_plain(case, [])
    trained, trainer = _fit_plain(case, [record.cls(**case.build(case.kwargs, ctx))])
    common = baseline.keys() & trained.keys()
    assert common, "no parameter in common with the run without the technique"
    assert any(not torch.equal(baseline[n], trained[n]) for n in common), \
        f"{record.cls.__name__} in a plain module left every weight as the run without it"
    prefix = f"lit_ft/{record.name}/"
    logged = sorted(trainer.callback_metrics)
    assert any(k.startswith(prefix) for k in logged), f"nothing logged under {prefix!r}; logged: {logged}"


class _PlainValidatingModule(pl.LightningModule):
    """The drop-in user module with a validation step as plain as its training step."""

    def __init__(self, inner: pl.LightningModule) -> None:
        super().__init__()
        self.model = inner.model
        self._inner = [inner]  # not a submodule: its optimizer configuration is reused, its parameters are ours

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("val/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def _module_trains_and_logs(record: TechniqueRecord, case: Case, ctx: Ctx) -> None:
    """A module technique has no plain module to drop into (it is the module): training must move its trainable
    parameters and log under ``lit_ft/<name>/``."""
    torch.manual_seed(0)
    module = record.cls(**case.build(case.kwargs, ctx))
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    assert before, f"{record.cls.__name__} has no trainable parameter"
    trainer = quiet_trainer([], max_steps=DROP_IN_STEPS, limit_val_batches=0)
    trainer.fit(module, datamodule=case.datamodule())
    after = dict(module.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before), \
        f"{record.cls.__name__}: {DROP_IN_STEPS} training steps left every trainable parameter as it was"
    prefix = f"lit_ft/{record.name}/"
    logged = sorted(trainer.callback_metrics)
    assert any(k.startswith(prefix) for k in logged), f"nothing logged under {prefix!r}; logged: {logged}"


def _drop_in_observes_only(record: TechniqueRecord, case: Case, ctx: Ctx) -> None:
    def fit(callbacks: list) -> tuple[dict[str, torch.Tensor], pl.Trainer]:
        torch.manual_seed(0)
        module = _PlainValidatingModule(case.plain_module())
        trainer = quiet_trainer(callbacks, max_steps=DROP_IN_STEPS, limit_val_batches=1,
                                val_check_interval=DROP_IN_STEPS, check_val_every_n_epoch=None,
                                num_sanity_val_steps=0)
        trainer.fit(module, datamodule=case.datamodule())
        return {n: p.detach().clone() for n, p in module.named_parameters()}, trainer

    baseline, _ = fit([])
    observed, trainer = fit([record.cls(**case.build(case.kwargs, ctx))])
    assert baseline.keys() == observed.keys()
    changed = [n for n in baseline if not torch.equal(baseline[n], observed[n])]
    assert not changed, f"{record.cls.__name__} (analysis: it must only measure) changed the training of {changed[:3]}"
    prefix = f"lit_ft/{record.name}/"
    logged = sorted(trainer.callback_metrics)
    assert any(k.startswith(prefix) for k in logged), f"nothing logged under {prefix!r} at validation; logged: {logged}"


def config_runs(record: TechniqueRecord, ctx: Ctx) -> None:
    config = ROOT / record.config
    assert config.is_file(), f"{record.name}: no config at {record.config}"
    assert f"class_path: {record.class_path}" in config.read_text(), \
        f"{record.config} does not use class_path: {record.class_path}"
    run_config_two_steps(str(config), ctx.tmp_path / "cli", ctx.tokenizer)


def doc_names_the_paper(record: TechniqueRecord) -> None:
    doc = ROOT / record.doc
    assert doc.is_file(), f"{record.name}: no doc page at {record.doc}"
    text = _plain(doc.read_text())
    assert _plain(record.paper) in text, f"{record.doc} does not name the paper {record.paper!r}"
    if record.arxiv is not None:
        assert record.arxiv in text, f"{record.doc} does not give the arXiv id {record.arxiv}"


# -- helpers -------------------------------------------------------------------------------------------------------
def _plain(text: str) -> str:
    """Case-folded text without markdown emphasis and line breaks (titles wrap and are set in italics)."""
    return " ".join(re.sub(r"[*_`]", "", text).split()).lower()


_BASELINES: dict[tuple[Callable, Callable], dict[str, torch.Tensor]] = {}


def _fit_plain(case: Case, callbacks: list) -> tuple[dict[str, torch.Tensor], pl.Trainer]:
    """Weights after :data:`DROP_IN_STEPS` steps of ``case.plain_module()`` (seed 0); the run without callbacks is
    the same for every case with the same module and data, so it is computed once."""
    key = (case.plain_module, case.datamodule)
    if not callbacks and key in _BASELINES:
        return _BASELINES[key], None  # type: ignore[return-value]
    torch.manual_seed(0)
    module = case.plain_module()
    trainer = quiet_trainer(callbacks, max_steps=DROP_IN_STEPS, limit_val_batches=0)
    trainer.fit(module, datamodule=case.datamodule())
    weights = {n: p.detach().clone() for n, p in module.named_parameters()}
    if not callbacks:
        _BASELINES[key] = weights
    return weights, trainer


def assert_same_state(a: Any, b: Any, where: str) -> None:
    """Recursive bit-equality of two callback states (dicts, sequences, tensors, numbers, strings)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{where}: {type(a)} vs {type(b)}"
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), \
            f"{where}: keys differ: {sorted(map(str, a))} vs {sorted(map(str, b)) if isinstance(b, dict) else b}"
        for k in a:
            assert_same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} (uninterrupted) vs {b!r} (resumed)"
