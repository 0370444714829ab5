"""Resuming a callback whose constructor arguments changed since the checkpoint was written.

Lightning stores a callback's state under its ``state_key``, and lit_ft's keys include the arguments that tell two
instances apart (``SSToken{'keep_ratio': 0.6, ...}``), so a run resumed with a changed argument used to find *no*
state for the callback: it silently started over (a fresh history model, ``θ₀`` taken from trained weights, a new
random selection), with only Lightning's generic "Please add the following callbacks" warning. The rule here, one
place for every stateful technique: **a changed argument either keeps the saved state (when the state is still valid
under the new value) or refuses to resume with an error that names the argument, the saved and the new value and
what to do — never a silent reset.**

How (called from the callbacks' ``on_save_checkpoint`` / ``on_load_checkpoint``, which Lightning runs before any
``load_state_dict``):

- :func:`record_resume_args` writes the callback's current arguments (``ARGS_KEY``) into its saved state.
- :func:`adopt_saved_state` finds the callback's saved state — under its own key, or, when the key changed, the one
  unclaimed state of the same class (moved under the new key, so Lightning's ``load_state_dict`` delivers it) —
  and :func:`reconcile_resume_args` decides each changed argument with the callback's ``resume_decisions``:
  ``RESTORE`` (the state stays valid), a reason string (refuse), or a callable ``(saved, new, state) -> reason or
  None`` (decided by the state, e.g. before/after a phase switch). An argument without a decision is refused.
  A callback that declares no decisions (``None``) refuses every change of its key's arguments.

Lightning itself still warns "Please add the following callbacks: [<the old key>]" before any callback sees the
checkpoint; for a lit_ft callback whose state was found here that warning is stale (the decision above is what
happened: the state was restored, or the resume refused).

Arguments a technique re-reads from the trainer every time (an export path, a device for a frozen copy) are
``RESTORE``; arguments that the saved state was computed from (a selection ratio after the selection was made, the
kind of history model) are refused with the value to resume with.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Callable, Mapping
from typing import Any, Union

__all__ = [
    "ARGS_KEY", "RESTORE", "ResumeArgumentError", "adopt_saved_state", "current_resume_args", "reconcile_resume_args",
    "record_resume_args", "ResumeRecorded",
]

log = logging.getLogger(__name__)

#: key of the recorded constructor arguments inside a callback's saved state
ARGS_KEY = "lit_ft_resume_args"
#: decision: the saved state stays valid under the new value (it is restored; the new value applies from now on)
RESTORE = "restore"

Decision = Union[str, Callable[[Any, Any, Mapping[str, Any]], Union[str, None]]]


class ResumeArgumentError(ValueError):
    """A callback was resumed with a changed argument that its saved state depends on."""


def record_resume_args(callback: Any, checkpoint: dict[str, Any], names: Any = None) -> None:
    """Write ``callback``'s current values of ``names`` (default: the keys of its ``resume_decisions``) into its
    saved state inside ``checkpoint`` (a no-op when the callback saved no state or declares no decisions)."""
    if names is None:
        decisions = getattr(callback, "resume_decisions", None)
        names = list(decisions) if decisions else []
    states = checkpoint.get("callbacks")
    if not names or not isinstance(states, dict):
        return
    state = states.get(callback.state_key)
    if isinstance(state, dict):
        state[ARGS_KEY] = {n: _plain(v) for n, v in current_resume_args(callback, names).items()}


def current_resume_args(callback: Any, names: Any) -> dict[str, Any]:
    """The callback's current values of ``names``: from its ``resume_args()`` when it has one (a technique that
    resolves an argument in place, e.g. a ``None`` seed at setup, returns what the user passed), else its
    attributes of the same name (names it has neither for are left out)."""
    fn = getattr(callback, "resume_args", None)
    given = fn() if callable(fn) else {}
    return {n: given[n] if n in given else getattr(callback, n) for n in names if n in given or hasattr(callback, n)}


def _plain(value: Any) -> Any:
    """A copy of an argument value that later changes to the callback cannot alter (lists are copied)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _args_of_key(key: str, prefix: str) -> dict[str, Any] | None:
    """The arguments encoded in a ``_generate_state_key`` key (``Class{'a': 1}``), ``None`` if not readable."""
    try:
        args = ast.literal_eval(key[len(prefix) - 1:])
    except (ValueError, SyntaxError):
        return None
    return args if isinstance(args, dict) else None


def _fmt(name: str, value: Any) -> str:
    return f"{name}={value!r}"


def reconcile_resume_args(
    owner: str,
    state: Mapping[str, Any],
    current: Mapping[str, Any],
    decisions: Mapping[str, Decision] | None,
) -> dict[str, tuple[Any, Any]]:
    """Decide every argument whose recorded value in ``state`` (under ``ARGS_KEY``) differs from ``current``.

    Args:
        owner: the callback's class name (starts the messages).
        state: the callback's saved state (arguments recorded by :func:`record_resume_args` or read from its key).
        current: the arguments of this run, name -> value.
        decisions: name -> ``RESTORE``, a reason (refuse) or a callable ``(saved, new, state) -> reason | None``.
            ``None`` or a missing name: the change is refused.

    Returns:
        The changed arguments that were accepted, name -> ``(saved, new)``.

    Raises:
        ResumeArgumentError: some changed argument was refused; the message names each one with its saved and new
            values, why, and how to proceed.
    """
    saved = state.get(ARGS_KEY)
    if not isinstance(saved, Mapping):
        return {}
    changed = {n: (saved[n], _plain(current[n])) for n in current if n in saved and saved[n] != _plain(current[n])}
    accepted: dict[str, tuple[Any, Any]] = {}
    refused: list[str] = []
    for name, (old, new) in changed.items():
        d = (decisions or {}).get(name)
        if d == RESTORE:
            reason = None
        elif callable(d):
            reason = d(old, new, state)
        else:
            reason = d or "its saved state depends on this argument"
        if reason:
            refused.append(f"{_fmt(name, new)} (the checkpoint was made with {_fmt(name, old)}): {reason}")
        else:
            accepted[name] = (old, new)
    if refused:
        keep = ", ".join(_fmt(n, changed[n][0]) for n in changed if n not in accepted)
        raise ResumeArgumentError(
            f"{owner}: cannot resume with a changed argument that its saved state depends on — "
            + "; ".join(refused)
            + f". Resume with {keep} (the checkpoint's values), or start a new run (fit without `ckpt_path`) to use "
            "the new values."
        )
    if accepted:
        log.info("%s: resumed with changed arguments (the saved state stays valid): %s", owner,
                 ", ".join(f"{n}: {o!r} -> {v!r}" for n, (o, v) in accepted.items()))
    return accepted


def adopt_saved_state(callback: Any, trainer: Any, checkpoint: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Find ``callback``'s saved state in ``checkpoint`` and decide its changed arguments (from ``on_load_checkpoint``).

    When no state is stored under ``callback.state_key`` but exactly one state of the same class is stored under a
    key no callback of this run claims, that state is moved under ``callback.state_key`` (Lightning then hands it
    to ``load_state_dict``). Its arguments (recorded, or read from the old key) are then reconciled with the
    callback's current ones by :func:`reconcile_resume_args` using ``callback.resume_decisions`` (``None``: any
    change refused).

    Returns:
        The accepted changed arguments, name -> ``(saved, new)`` (empty when nothing changed or nothing was saved).

    Raises:
        ResumeArgumentError: a refused change, or several saved states of this class that could be this callback's.
    """
    states = checkpoint.get("callbacks")
    if not isinstance(states, dict):
        return {}
    owner = type(callback).__name__
    decisions: Mapping[str, Decision] | None = getattr(callback, "resume_decisions", None)
    key = callback.state_key
    state = states.get(key)
    if state is None:
        prefix = type(callback).__qualname__ + "{"
        claimed = {getattr(c, "state_key", None) for c in getattr(trainer, "callbacks", [])}
        candidates = [k for k in states if isinstance(k, str) and k.startswith(prefix) and k not in claimed]
        if not candidates:
            return {}
        if len(candidates) > 1:
            raise ResumeArgumentError(
                f"{owner}: this run's instance ({key}) has no saved state in the checkpoint, and {len(candidates)} "
                f"saved states of {owner} could be its: {candidates}. Give each instance the arguments it was "
                "saved with, so that its state can be found."
            )
        old_key = candidates[0]
        if decisions is None:  # no per-argument decisions: any change of the key's arguments is refused
            saved_args, new_args = _args_of_key(old_key, prefix) or {}, _args_of_key(key, prefix) or {}
            diff = [n for n in {**saved_args, **new_args} if saved_args.get(n, "?") != new_args.get(n, "?")]
            raise ResumeArgumentError(
                f"{owner}: the checkpoint holds this callback's state under {old_key!r}, this run's callback is "
                f"{key!r}: " + "; ".join(
                    f"{_fmt(n, new_args.get(n))} (the checkpoint was made with {_fmt(n, saved_args.get(n))})"
                    for n in diff)
                + ". Resume with the checkpoint's values, or start a new run (fit without `ckpt_path`) to use the "
                "new values."
            )
        state = states.pop(old_key)
        if isinstance(state, dict):
            state = dict(state)
            if ARGS_KEY not in state:  # a checkpoint written before the arguments were recorded: read its key
                parsed = _args_of_key(old_key, prefix)
                if parsed is not None:
                    state[ARGS_KEY] = parsed
        states[key] = state
        if not isinstance(state, Mapping) or not isinstance(state.get(ARGS_KEY), Mapping):
            raise ResumeArgumentError(
                f"{owner}: the checkpoint's state of this callback was saved under {old_key!r}, this run's is {key!r}, "
                "and the saved arguments cannot be read; resume with the arguments of the checkpoint's run."
            )
    if not isinstance(state, Mapping):
        return {}
    saved = state.get(ARGS_KEY)
    if not isinstance(saved, Mapping):
        return {}
    return reconcile_resume_args(owner, state, current_resume_args(callback, list(saved)), decisions)


class ResumeRecorded:
    """Mixin for a Lightning callback that follows the rule above: its ``on_save_checkpoint`` records its arguments
    and its ``on_load_checkpoint`` adopts its saved state (put it before ``Callback`` in the bases). A subclass that
    checks more on load calls ``super().on_load_checkpoint(...)`` first and reads its state with
    :meth:`saved_state`."""

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        record_resume_args(self, checkpoint)

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        adopt_saved_state(self, trainer, checkpoint)

    def saved_state(self, checkpoint: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """This callback's state in ``checkpoint`` (after :func:`adopt_saved_state` moved it under the current key)."""
        state = (checkpoint.get("callbacks") or {}).get(getattr(self, "state_key", None))
        return state if isinstance(state, Mapping) else None
