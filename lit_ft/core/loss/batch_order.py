"""The order of callbacks that edit or read the training batch at ``on_train_batch_start``: one check, at attach time.

Lightning calls callbacks in list order. A *batch editor* changes the batch before the forward (Q-Tuning with
``scoring="separate"`` removes rows and sets pruned tokens' labels to -100); a *batch reader* computes per-row work
from the batch at batch start and uses it in the forward (ExcessLossSelection's reference NLL, SSToken's history NLL
and its prompt/response split). A reader listed before an editor holds work for rows the editor then removes (an
error deep in the loss); a reader that needs what the editor changes *unedited* (SSToken reads the prompt/response
split from the labels, which Q-Tuning's pruning rewrites) cannot combine with it in either order.

Callbacks declare what they do (optional attributes or properties, read with ``getattr``):

- ``batch_start_edits``: a subset of :data:`BATCH_PARTS` the callback changes at batch start;
- ``batch_start_reads``: the parts it reads at batch start and keeps for the forward. Undeclared: a token scorer
  that overrides ``prepare_batch`` (its per-batch work before the forward) is taken to read every part, one that
  does not to read nothing;
- ``batch_start_needs_unedited``: the subset of its reads that must reach it as the data loader made them;
- ``batch_start_alternative``: for an editor, the configuration that does not edit (named in the error);
- ``batch_start_runs_step``: the callback runs the module's ``training_step`` at batch start (GreenTrainer's
  probes), so every editor and reader must come before it (their per-batch work must exist when it probes).

:func:`check_batch_order` (called by :func:`lit_ft.core.loss.attach`) raises a ``ValueError`` that names the pair and
the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["BATCH_PARTS", "check_batch_order", "batch_start_reads", "batch_start_edits"]

#: what a batch-start edit can touch: which rows the batch has, the labels, the input tokens
BATCH_PARTS = frozenset({"rows", "labels", "input_ids"})


def _describe(cb: Any) -> str:
    name = getattr(cb, "batch_order_name", None)
    return str(name) if name else type(cb).__name__


def batch_start_edits(cb: Any) -> frozenset[str]:
    """The batch parts ``cb`` changes at ``on_train_batch_start`` (declared; default none)."""
    return frozenset(getattr(cb, "batch_start_edits", None) or ())


def _overrides_prepare_batch(cb: Any) -> bool:
    """Whether ``cb``'s class overrides a ``prepare_batch`` it inherits (the token-scorer base defines a no-op)."""
    definers = [k for k in type(cb).__mro__ if "prepare_batch" in k.__dict__]
    return len(definers) > 1


def batch_start_reads(cb: Any) -> frozenset[str]:
    """The batch parts ``cb`` reads at batch start and keeps for the forward (declared, else inferred)."""
    declared = getattr(cb, "batch_start_reads", None)
    if declared is not None:
        return frozenset(declared)
    return BATCH_PARTS if _overrides_prepare_batch(cb) else frozenset()


def check_batch_order(callbacks: Sequence[Any]) -> None:
    """Raise ``ValueError`` when a batch reader and a batch editor in ``callbacks`` (the Trainer's list, in order)
    cannot work as listed: the reader needs a part unedited that the editor changes (in any order: the pair does
    not combine), or the reader comes first and the editor changes a part it read (list the editor first)."""
    cbs = list(callbacks)
    for i, runner in enumerate(cbs):
        if not getattr(runner, "batch_start_runs_step", False):
            continue
        for later in cbs[i + 1:]:
            did = sorted(batch_start_edits(later) | batch_start_reads(later))
            if did:
                n, r = _describe(later), _describe(runner)
                raise ValueError(
                    f"{n} is listed after {r} in the Trainer's callbacks: {r} runs training_step at "
                    f"on_train_batch_start (a probe), before {n} has prepared the batch ({', '.join(did)}), so the "
                    f"probe's loss would fail or differ from the step's. Fix: list {n} before {r}."
                )
    for i, reader in enumerate(cbs):
        reads = batch_start_reads(reader)
        if not reads:
            continue
        raw = frozenset(getattr(reader, "batch_start_needs_unedited", None) or ()) & reads
        for j, editor in enumerate(cbs):
            if editor is reader:
                continue
            clash = batch_start_edits(editor) & reads
            if not clash:
                continue
            r, e = _describe(reader), _describe(editor)
            alternative = getattr(editor, "batch_start_alternative", None)
            if clash & raw:
                fix = f"use {alternative} together with {r}" if alternative else f"use {r} or {e}, not both"
                raise ValueError(
                    f"{e} and {r} do not combine: {e} edits the batch's {', '.join(sorted(clash & raw))} at "
                    f"on_train_batch_start and {r} needs them as the data loader made them, so in either order one "
                    f"of them sees the other's edit. Fix: {fix}."
                )
            if i < j:
                raise ValueError(
                    f"{r} is listed before {e} in the Trainer's callbacks: {r} reads the batch's "
                    f"{', '.join(sorted(clash))} at on_train_batch_start and {e} then changes them, so {r}'s per-batch "
                    f"work would not match the batch that is trained on. Fix: list {e} before {r}."
                )
