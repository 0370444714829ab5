"""Name-keyed parameter plans: what a technique trains, how plans compose, and optimizer-state surgery.

This module is the shared mechanism behind every technique that decides *which parameters (or which elements of a
parameter) may change*: GreenTrainer, Half Fine-Tuning, lottery-ticket sparse fine-tuning, FreezeLayers,
LayerwiseLRDecay, TrainOnly, prompt tuning. It holds no technique logic and does not import Lightning.

Contract (see ``docs/core/params.md`` and DESIGN.md §4 "Parameters"):

* A :class:`ParamPlan` maps a parameter name (as ``model.named_parameters()`` spells it) to an entry: *trainable*,
  *frozen*, or an element *mask* (a ``torch.bool`` tensor of the parameter's shape, ``True`` = this element may
  change). A name a plan does not list is *unconstrained*: the plan has no opinion about it.
* Plans compose by intersection (:func:`compose`): a tensor is trainable only if no plan freezes it, and masks are
  AND-ed. An entry may be *required* (the technique cannot work without it being trainable); freezing a required
  tensor, or masking all of its elements away, raises :class:`ParamPlanConflict` naming both owners.
* :func:`apply_plan` sets ``requires_grad``; :func:`mask_gradients` (in ``on_before_optimizer_step``) and
  :func:`reproject_masked` (after ``optimizer.step``) enforce element masks exactly, weight decay and momentum
  included.
* :func:`build_param_groups` / :func:`rebuild_param_groups` create and update optimizer param groups by name, so that
  trainability can change mid-run without stale, duplicated or missing optimizer entries.

Patterns
    Every ``patterns`` argument takes shell-style globs matched with :func:`fnmatch.fnmatchcase` against the *whole*
    parameter name (``*`` also matches dots: ``"model.layers.0.*"``, ``"*bias"``), or regular expressions written
    with a ``"re:"`` prefix and matched with :func:`re.fullmatch` (``"re:.*layers\\.[01]\\..*"``). A string with no
    glob characters is an exact name. A single string is accepted where a list of patterns is expected. Tied
    (shared) parameters are listed once by ``named_parameters()``; patterns also match their other names (aliases),
    and plans key them by the first (canonical) name.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

__all__ = [
    "DEFAULT_NO_DECAY_PATTERNS",
    "TRAINABLE",
    "FROZEN",
    "MASK",
    "ParamPatternError",
    "ParamPlanConflict",
    "PlanEntry",
    "ParamPlan",
    "TensorSummary",
    "PlanSummary",
    "RebuildReport",
    "select_param_names",
    "name_matcher",
    "compose",
    "apply_plan",
    "plan_summary",
    "mask_gradients",
    "snapshot_masked",
    "reproject_masked",
    "build_param_groups",
    "rebuild_param_groups",
    "param_group_id",
    "unwrap_optimizer",
    "verify_optimizer",
    "optimizer_layout",
    "apply_optimizer_layout",
    "reset_optimizer_state",
    "masked_state_reset",
    "pack_mask",
    "unpack_mask",
]

TRAINABLE = "trainable"
FROZEN = "frozen"
MASK = "mask"
_STATES = (TRAINABLE, FROZEN, MASK)

#: Default ``no_decay_patterns`` of :func:`build_param_groups`: biases and normalisation weights (HF-style names such
#: as ``input_layernorm.weight``, ``model.norm.weight``, ``LayerNorm.weight``). Embeddings are decayed, as in the
#: HF ``Trainer``; add ``"*embed_tokens*"`` to exclude them.
DEFAULT_NO_DECAY_PATTERNS: tuple[str, ...] = ("*bias", "*norm*", "*Norm*")

_GLOB_CHARS = set("*?[")
_STATE_DICT_FORMAT = "lit_ft.ParamPlan"
_STATE_DICT_VERSION = 1
_PACK_FORMAT = "packbits"


class ParamPatternError(ValueError):
    """A name pattern is malformed or matches no parameter of the model."""


class ParamPlanConflict(ValueError):
    """Two plans disagree about a tensor that one of them requires to be trainable.

    Attributes:
        name: the parameter name.
        required_by: owners that require the tensor to be trainable.
        restricted_by: owners that froze or masked it.
    """

    def __init__(self, message: str, name: str, required_by: Sequence[str], restricted_by: Sequence[str]):
        super().__init__(message)
        self.name = name
        self.required_by = tuple(required_by)
        self.restricted_by = tuple(restricted_by)


# --------------------------------------------------------------------------------------------------------------
# Name index and pattern matching
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _ParamIndex:
    params: dict[str, nn.Parameter]  # canonical name -> parameter, in named_parameters() order
    alias: dict[str, str]  # every name (canonical and tied aliases) -> canonical name
    by_id: dict[int, str]  # id(parameter) -> canonical name


def _index(model: nn.Module, argname: str = "model") -> _ParamIndex:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`{argname}` must be a torch.nn.Module, got {type(model).__name__}.")
    params: dict[str, nn.Parameter] = {}
    alias: dict[str, str] = {}
    by_id: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical = by_id.get(id(p))
        if canonical is None:
            by_id[id(p)] = name
            params[name] = p
            canonical = name
        alias[name] = canonical
    return _ParamIndex(params, alias, by_id)


def _as_pattern_list(patterns: Union[str, Iterable[str]], argname: str) -> list[str]:
    if isinstance(patterns, str):
        return [patterns]
    try:
        out = list(patterns)
    except TypeError:
        raise TypeError(
            f"`{argname}` must be a string or a sequence of strings (globs, or regexes prefixed 're:'), "
            f"got {type(patterns).__name__}."
        ) from None
    for p in out:
        if not isinstance(p, str) or not p:
            raise TypeError(f"`{argname}` entries must be non-empty strings, got {p!r}.")
    return out


def name_matcher(pattern: str, argname: str = "patterns"):  # noqa: ANN201
    """A predicate ``name -> bool`` for one pattern of the module's syntax (an fnmatch glob over the whole name, a
    ``"re:"``-prefixed regex with ``re.fullmatch``, or an exact name), for names other than the model's parameter
    names (e.g. names relative to a layer).

    Raises:
        ParamPatternError: an invalid regular expression (the message names ``argname``).
    """
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as e:
            raise ParamPatternError(f"`{argname}`: invalid regular expression {pattern!r}: {e}.") from None
        return lambda n: rx.fullmatch(n) is not None
    if not (_GLOB_CHARS & set(pattern)):
        return lambda n: n == pattern
    return lambda n: fnmatch.fnmatchcase(n, pattern)


_compile = name_matcher  # private alias


def _no_match_error(pattern: str, names: Sequence[str], owner: Optional[str], argname: str) -> ParamPatternError:
    who = f"{owner}: " if owner else ""
    hint = ""
    bare = pattern[3:] if pattern.startswith("re:") else pattern
    if any(n.startswith(bare + ".") for n in names):
        hint = f" Patterns match whole parameter names; to select a module's parameters use {bare + '.*'!r}."
    close = difflib.get_close_matches(bare, names, n=3, cutoff=0.5)
    if close:
        hint += f" Close names: {close}."
    sample = list(names[:6])
    more = f" ... ({len(names)} in total)" if len(names) > 6 else ""
    return ParamPatternError(
        f"{who}`{argname}` pattern {pattern!r} matched no parameter of the model.{hint} "
        f"Patterns are fnmatch globs over the full name (or regexes with a 're:' prefix, fullmatch); "
        f"available names include {sample}{more}."
    )


def _select(
    index: _ParamIndex,
    patterns: Union[str, Iterable[str]],
    *,
    owner: Optional[str] = None,
    argname: str = "patterns",
    allow_unmatched: bool = False,
) -> list[str]:
    """Canonical names matched by any pattern, in model order; raise for a pattern that matches nothing."""
    pats = _as_pattern_list(patterns, argname)
    all_names = list(index.alias)
    matched: set[str] = set()
    for pat in pats:
        pred = _compile(pat, argname)
        hits = {index.alias[n] for n in all_names if pred(n)}
        if not hits and not allow_unmatched:
            raise _no_match_error(pat, list(index.params), owner, argname)
        matched |= hits
    return [n for n in index.params if n in matched]


def select_param_names(
    model: nn.Module, patterns: Union[str, Sequence[str]], *, owner: Optional[str] = None
) -> list[str]:
    """Return the canonical parameter names of ``model`` matched by any of ``patterns``, in model order.

    Args:
        model: the module whose ``named_parameters()`` are searched.
        patterns: fnmatch globs over the full name, or regexes prefixed ``"re:"`` (``re.fullmatch``).
        owner: technique name used in error messages.

    Raises:
        ParamPatternError: a pattern matches no parameter (the message lists a few available names).
    """
    return _select(_index(model), patterns, owner=owner)


# --------------------------------------------------------------------------------------------------------------
# Plan entries and plans
# --------------------------------------------------------------------------------------------------------------


def _check_mask(mask: Any, argname: str, shape: Optional[torch.Size] = None) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"`{argname}` must be a torch.bool tensor, got {type(mask).__name__}.")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"`{argname}` must have dtype torch.bool (True = element may change), got {mask.dtype}; "
            f"convert with `mask.bool()` or `mask != 0`."
        )
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"`{argname}` has shape {tuple(mask.shape)} but the parameter has shape {tuple(shape)}.")
    return mask.detach()


@dataclass(frozen=True, eq=False)
class PlanEntry:
    """What a plan says about one parameter tensor.

    Attributes:
        state: ``"trainable"``, ``"frozen"`` or ``"mask"``.
        mask: for ``"mask"``: a ``torch.bool`` tensor of the parameter's shape, ``True`` = element may change,
            never all-True nor all-False (those are stored as ``"trainable"`` / ``"frozen"``); else ``None``.
        required_by: owners that need this tensor trainable (empty = not required).
        restricted_by: owners that froze or masked it (empty for ``"trainable"``).
    """

    state: str
    mask: Optional[torch.Tensor] = None
    required_by: tuple[str, ...] = ()
    restricted_by: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PlanEntry):
            return NotImplemented
        if (self.state, self.required_by, self.restricted_by) != (other.state, other.required_by, other.restricted_by):
            return False
        if self.mask is None or other.mask is None:
            return self.mask is None and other.mask is None
        return self.mask.shape == other.mask.shape and bool(torch.equal(self.mask.cpu(), other.mask.cpu()))

    __hash__ = None  # type: ignore[assignment]

    @property
    def required(self) -> bool:
        """Whether some owner requires this tensor to be trainable."""
        return bool(self.required_by)

    @property
    def trainable(self) -> bool:
        """Whether at least some elements of the tensor may change (``"trainable"`` or ``"mask"``)."""
        return self.state != FROZEN

    def trainable_count(self, numel: int) -> int:
        """Number of elements that may change, for a tensor with ``numel`` elements."""
        if self.state == TRAINABLE:
            return numel
        if self.state == FROZEN:
            return 0
        return int(self.mask.sum().item())  # type: ignore[union-attr]


def _uniq(*groups: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for g in groups:
        for o in g:
            if o not in out:
                out.append(o)
    return tuple(out)


def _normalise_mask_entry(
    mask: torch.Tensor, required_by: tuple[str, ...], restricted_by: tuple[str, ...]
) -> PlanEntry:
    if bool(mask.all()):
        return PlanEntry(TRAINABLE, None, required_by, ())
    if not bool(mask.any()):
        return PlanEntry(FROZEN, None, required_by, restricted_by)
    return PlanEntry(MASK, mask, required_by, restricted_by)


EntryLike = Union[PlanEntry, str, torch.Tensor]


class ParamPlan(Mapping[str, PlanEntry]):
    """A read-only mapping ``parameter name -> PlanEntry`` made by one technique (its ``owner``).

    Names not in the plan are unconstrained. Build plans with :meth:`trainable_only`, :meth:`freeze`,
    :meth:`from_masks`, :meth:`from_requires_grad`, or directly from a mapping; combine them with :func:`compose`.

    Args:
        entries: name -> ``PlanEntry``, ``"trainable"``, ``"frozen"``, or a ``torch.bool`` mask tensor
            (``True`` = element may change). All-True masks are stored as trainable, all-False as frozen.
        owner: the technique that made the plan, used in error messages (e.g. ``"HalfFineTuning"``).
        required: names (exact, not patterns) that ``owner`` requires to be trainable.
    """

    def __init__(self, entries: Mapping[str, EntryLike], owner: str, required: Iterable[str] = ()):
        if not isinstance(owner, str) or not owner:
            raise TypeError(f"`owner` must be a non-empty string naming the technique, got {owner!r}.")
        if not isinstance(entries, Mapping):
            raise TypeError(f"`entries` must be a mapping name -> entry, got {type(entries).__name__}.")
        self.owner = owner
        req = set(_as_pattern_list(required, "required")) if required else set()
        unknown = req - set(entries)
        if unknown:
            raise ValueError(f"{owner}: `required` names {sorted(unknown)} are not entries of the plan.")
        self._entries: dict[str, PlanEntry] = {}
        for name, value in entries.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"{owner}: plan keys must be parameter names (non-empty str), got {name!r}.")
            entry = self._coerce(name, value)
            if name in req and owner not in entry.required_by:
                entry = PlanEntry(entry.state, entry.mask, entry.required_by + (owner,), entry.restricted_by)
            if entry.required and entry.state == FROZEN:
                raise ParamPlanConflict(
                    f"{owner}: parameter {name!r} is marked required but the same plan freezes it "
                    f"(restricted by {list(entry.restricted_by)}).",
                    name, entry.required_by, entry.restricted_by,
                )
            self._entries[name] = entry
        self._device_cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def _coerce(self, name: str, value: EntryLike) -> PlanEntry:
        if isinstance(value, PlanEntry):
            if value.state not in _STATES:
                raise ValueError(f"{self.owner}: entry {name!r} has state {value.state!r}; allowed: {_STATES}.")
            if value.state == MASK:
                mask = _check_mask(value.mask, f"mask of {name!r}")
                restricted = value.restricted_by or (self.owner,)
                return _normalise_mask_entry(mask, value.required_by, restricted)
            if value.state == FROZEN and not value.restricted_by:
                return PlanEntry(FROZEN, None, value.required_by, (self.owner,))
            return PlanEntry(value.state, None, value.required_by, value.restricted_by if value.state == FROZEN else ())
        if isinstance(value, str):
            if value == TRAINABLE:
                return PlanEntry(TRAINABLE)
            if value == FROZEN:
                return PlanEntry(FROZEN, None, (), (self.owner,))
            raise ValueError(
                f"{self.owner}: entry {name!r} is {value!r}; allowed: 'trainable', 'frozen', a torch.bool mask tensor, "
                f"or a PlanEntry."
            )
        if isinstance(value, torch.Tensor):
            mask = _check_mask(value, f"mask of {name!r}")
            return _normalise_mask_entry(mask, (), (self.owner,))
        raise TypeError(
            f"{self.owner}: entry {name!r} must be 'trainable', 'frozen', a torch.bool tensor or a PlanEntry, "
            f"got {type(value).__name__}."
        )

    # ---- constructors -------------------------------------------------------------------------------------

    @classmethod
    def trainable_only(
        cls,
        model: nn.Module,
        patterns: Union[str, Sequence[str]],
        owner: str = "trainable_only",
        required: bool = False,
    ) -> "ParamPlan":
        """Plan in which only parameters matching ``patterns`` are trainable; every other parameter is frozen.

        Args:
            model: module whose ``named_parameters()`` names the plan covers (all of them).
            patterns: fnmatch globs or ``"re:"`` regexes; each must match at least one parameter.
            owner: technique name for error messages.
            required: mark the matched tensors as required (composition fails if another plan freezes them).

        Raises:
            ParamPatternError: a pattern matches nothing.
        """
        index = _index(model)
        keep = set(_select(index, patterns, owner=owner))
        entries = {n: (TRAINABLE if n in keep else FROZEN) for n in index.params}
        return cls(entries, owner, required=[n for n in index.params if n in keep] if required else ())

    @classmethod
    def freeze(cls, model: nn.Module, patterns: Union[str, Sequence[str]], owner: str = "freeze") -> "ParamPlan":
        """Plan that freezes the parameters matching ``patterns`` and leaves every other name unconstrained.

        Args:
            model: module whose parameter names are matched.
            patterns: fnmatch globs or ``"re:"`` regexes; each must match at least one parameter.
            owner: technique name for error messages.

        Raises:
            ParamPatternError: a pattern matches nothing.
        """
        names = _select(_index(model), patterns, owner=owner)
        return cls({n: FROZEN for n in names}, owner)

    @classmethod
    def from_masks(
        cls,
        masks: Mapping[str, torch.Tensor],
        owner: str = "from_masks",
        model: Optional[nn.Module] = None,
        required: bool = False,
    ) -> "ParamPlan":
        """Plan of element masks (``True`` = element may change); names not in ``masks`` are unconstrained.

        Args:
            masks: parameter name -> ``torch.bool`` tensor of that parameter's shape.
            owner: technique name for error messages.
            model: if given, names are checked (tied aliases resolved to canonical names) and shapes validated.
            required: mark every masked tensor as required (its mask may not be AND-ed down to empty).

        Raises:
            KeyError: a name is not a parameter of ``model``.
            TypeError, ValueError: a mask is not bool or has the wrong shape.
        """
        if not isinstance(masks, Mapping):
            raise TypeError(f"`masks` must be a mapping name -> bool tensor, got {type(masks).__name__}.")
        entries: dict[str, torch.Tensor] = {}
        if model is not None:
            index = _index(model)
            for name, mask in masks.items():
                canonical = _resolve(index, name, owner, "masks")
                entries[canonical] = _check_mask(mask, f"masks[{name!r}]", index.params[canonical].shape)
        else:
            entries = {n: _check_mask(m, f"masks[{n!r}]") for n, m in masks.items()}
        return cls(entries, owner, required=list(entries) if required else ())

    @classmethod
    def from_requires_grad(cls, model: nn.Module, owner: str = "model") -> "ParamPlan":
        """Plan that records the current ``requires_grad`` of every parameter (compose with it to respect what
        the user's module already froze).

        Args:
            model: the module to read.
            owner: name used in error messages.
        """
        index = _index(model)
        return cls({n: (TRAINABLE if p.requires_grad else FROZEN) for n, p in index.params.items()}, owner)

    # ---- mapping interface ------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> PlanEntry:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        counts = {s: sum(e.state == s for e in self._entries.values()) for s in _STATES}
        req = sum(e.required for e in self._entries.values())
        return (
            f"ParamPlan(owner={self.owner!r}, trainable={counts[TRAINABLE]}, frozen={counts[FROZEN]}, "
            f"mask={counts[MASK]}, required={req})"
        )

    def names(self, state: Optional[str] = None) -> list[str]:
        """Names in the plan, optionally only those with ``state`` (``"trainable"``, ``"frozen"`` or ``"mask"``)."""
        if state is None:
            return list(self._entries)
        if state not in _STATES:
            raise ValueError(f"`state` must be one of {_STATES} or None, got {state!r}.")
        return [n for n, e in self._entries.items() if e.state == state]

    def to(self, device: Union[str, torch.device]) -> "ParamPlan":
        """Move every mask to ``device`` in place (masks are also moved lazily to each parameter's device)."""
        dev = torch.device(device)
        self._entries = {
            n: (PlanEntry(e.state, e.mask.to(dev), e.required_by, e.restricted_by) if e.mask is not None else e)
            for n, e in self._entries.items()
        }
        self._device_cache.clear()
        return self

    def _masks_on(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask, ~mask)`` of entry ``name`` on ``device``, cached."""
        key = (name, str(device))
        hit = self._device_cache.get(key)
        if hit is None:
            mask = self._entries[name].mask.to(device)  # type: ignore[union-attr]
            hit = (mask, ~mask)
            self._device_cache[key] = hit
        return hit

    # ---- checkpointing -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Serialisable state: only str, int, bool, None, lists, dicts and CPU uint8 tensors (safe for
        ``torch.load(weights_only=True)``); masks are stored as packed bits (:func:`pack_mask`), 1 bit per element."""
        return {
            "format": _STATE_DICT_FORMAT,
            "version": _STATE_DICT_VERSION,
            "owner": self.owner,
            "entries": {
                n: {
                    "state": e.state,
                    "required_by": list(e.required_by),
                    "restricted_by": list(e.restricted_by),
                    "mask": pack_mask(e.mask) if e.mask is not None else None,
                }
                for n, e in self._entries.items()
            },
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace this plan's owner and entries with those saved by :meth:`state_dict` (masks unpacked on CPU).

        Raises:
            ValueError: ``state_dict`` is not a ParamPlan state dict of a supported version.
        """
        if not isinstance(state_dict, Mapping) or state_dict.get("format") != _STATE_DICT_FORMAT:
            raise ValueError(
                f"`state_dict` is not a ParamPlan state dict (expected format {_STATE_DICT_FORMAT!r}, got "
                f"{state_dict.get('format') if isinstance(state_dict, Mapping) else type(state_dict).__name__!r})."
            )
        if state_dict.get("version") != _STATE_DICT_VERSION:
            raise ValueError(
                f"ParamPlan state dict version {state_dict.get('version')!r} is not supported "
                f"(this lit_ft reads version {_STATE_DICT_VERSION})."
            )
        owner = state_dict["owner"]
        entries: dict[str, PlanEntry] = {}
        for name, d in state_dict["entries"].items():
            mask = unpack_mask(d["mask"]) if d.get("mask") is not None else None
            entries[name] = PlanEntry(d["state"], mask, tuple(d["required_by"]), tuple(d["restricted_by"]))
        fresh = ParamPlan(entries, owner)
        self.owner, self._entries = fresh.owner, fresh._entries
        self._device_cache = {}

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any]) -> "ParamPlan":
        """Build a plan from :meth:`state_dict` output."""
        plan = cls({}, "loading")
        plan.load_state_dict(state_dict)
        return plan


def _resolve(index: _ParamIndex, name: str, owner: Optional[str], argname: str) -> str:
    canonical = index.alias.get(name)
    if canonical is None:
        who = f"{owner}: " if owner else ""
        close = difflib.get_close_matches(name, list(index.params), n=3, cutoff=0.5)
        raise KeyError(
            f"{who}`{argname}` names {name!r}, which is not a parameter of the model"
            + (f"; close names: {close}" if close else f"; names include {list(index.params)[:6]}")
            + "."
        )
    return canonical


# --------------------------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------------------------


def compose(plans: Sequence[ParamPlan], owner: Optional[str] = None) -> ParamPlan:
    """Intersect plans: a tensor is trainable only if no plan freezes it; element masks are AND-ed.

    A name absent from a plan is unconstrained by it. ``required`` marks are kept (the union of requiring owners).
    A mask AND that leaves no element becomes ``"frozen"``; an AND that leaves every element becomes
    ``"trainable"``.

    Args:
        plans: the plans to intersect (at least one).
        owner: owner of the result; default ``"+".join`` of the input owners.

    Raises:
        ParamPlanConflict: a tensor required by one plan is frozen by another, or the AND of its masks is empty.
            The message names the tensor, the requiring owner(s) and the restricting owner(s).
    """
    if isinstance(plans, ParamPlan):
        plans = [plans]
    plans = list(plans)
    if not plans:
        raise ValueError("`plans` must contain at least one ParamPlan, got an empty sequence.")
    for i, p in enumerate(plans):
        if not isinstance(p, ParamPlan):
            raise TypeError(f"`plans[{i}]` must be a ParamPlan, got {type(p).__name__}.")
    owner = owner or "+".join(_uniq([p.owner for p in plans]))
    names: list[str] = []
    seen: set[str] = set()
    for p in plans:
        for n in p:
            if n not in seen:
                seen.add(n)
                names.append(n)
    out: dict[str, PlanEntry] = {}
    for name in names:
        entries = [p[name] for p in plans if name in p]
        required_by = _uniq(*(e.required_by for e in entries))
        frozen = [e for e in entries if e.state == FROZEN]
        masks = [e for e in entries if e.state == MASK]
        if frozen:
            restricted = _uniq(*(e.restricted_by for e in frozen))
            if required_by:
                raise ParamPlanConflict(
                    f"Parameter plans conflict on {name!r}: {' and '.join(required_by)} require(s) it trainable, "
                    f"but {' and '.join(restricted)} froze it. Change the patterns of one of these callbacks so "
                    f"that they do not overlap.",
                    name, required_by, restricted,
                )
            out[name] = PlanEntry(FROZEN, None, (), restricted)
        elif masks:
            restricted = _uniq(*(e.restricted_by for e in masks))
            m = masks[0].mask
            for e in masks[1:]:
                m = m & e.mask.to(m.device)  # type: ignore[union-attr, operator]
            if required_by and not bool(m.any()):  # type: ignore[union-attr]
                raise ParamPlanConflict(
                    f"Parameter plans conflict on {name!r}: {' and '.join(required_by)} require(s) it trainable, "
                    f"but the element masks of {' and '.join(restricted)} have an empty intersection "
                    f"(no element could change).",
                    name, required_by, restricted,
                )
            out[name] = _normalise_mask_entry(m, required_by, restricted)  # type: ignore[arg-type]
        else:
            out[name] = PlanEntry(TRAINABLE, None, required_by, ())
    return ParamPlan(out, owner)


# --------------------------------------------------------------------------------------------------------------
# Applying and enforcing
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSummary:
    """One tensor in a :class:`PlanSummary`: its state (``"unlisted"`` if the plan does not name it), the number
    of elements that may change, and its size."""

    state: str
    trainable: int
    numel: int


@dataclass(frozen=True)
class PlanSummary:
    """Result of :func:`apply_plan` / :func:`plan_summary`: elements that may change (mask ``True`` counts for masked tensors), all
    elements, their ratio, and the per-tensor breakdown (canonical names; tied tensors counted once)."""

    trainable: int
    total: int
    fraction: float
    by_tensor: dict[str, TensorSummary] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} / {self.total:,} elements ({100 * self.fraction:.3f}%)"


def _check_plan(plan: Any, argname: str = "plan") -> ParamPlan:
    if not isinstance(plan, ParamPlan):
        raise TypeError(f"`{argname}` must be a ParamPlan, got {type(plan).__name__}.")
    return plan


def _plan_on_model(index: _ParamIndex, plan: ParamPlan, strict: bool = True) -> dict[str, tuple[str, PlanEntry]]:
    """``canonical name -> (name used by the plan, entry)``; checks names and mask shapes."""
    out: dict[str, tuple[str, PlanEntry]] = {}
    for name, entry in plan.items():
        canonical = index.alias.get(name)
        if canonical is None:
            if strict:
                _resolve(index, name, plan.owner, "plan")
            continue
        if entry.mask is not None and tuple(entry.mask.shape) != tuple(index.params[canonical].shape):
            raise ValueError(
                f"{plan.owner}: mask for {name!r} has shape {tuple(entry.mask.shape)} but the parameter has shape "
                f"{tuple(index.params[canonical].shape)}."
            )
        out[canonical] = (name, entry)
    return out


def apply_plan(
    model: nn.Module,
    plan: ParamPlan,
    unlisted: Literal["keep", "trainable", "frozen"] = "keep",
    strict: bool = True,
) -> PlanSummary:
    """Set ``requires_grad`` from ``plan``: frozen -> False, trainable or mask -> True.

    Masks are *not* enforced by ``requires_grad``; call :func:`mask_gradients` before each optimizer step and
    :func:`reproject_masked` after it.

    Args:
        model: the module to edit.
        plan: the (composed) plan.
        unlisted: what to do with parameters the plan does not name: ``"keep"`` their current ``requires_grad``,
            or force them ``"trainable"`` / ``"frozen"``.
        strict: raise if the plan names a parameter the model does not have.

    Returns:
        A :class:`PlanSummary` over every parameter of ``model``.

    Raises:
        KeyError: (``strict``) a plan name is not a parameter of ``model``.
        ValueError: a mask's shape differs from its parameter's, or ``unlisted`` is not an allowed value.
    """
    _check_plan(plan)
    if unlisted not in ("keep", "trainable", "frozen"):
        raise ValueError(f"`unlisted` must be 'keep', 'trainable' or 'frozen', got {unlisted!r}.")
    index = _index(model)
    entries = _plan_on_model(index, plan, strict)
    for name, p in index.params.items():
        hit = entries.get(name)
        if hit is not None:
            p.requires_grad_(hit[1].trainable)
        elif unlisted != "keep":
            p.requires_grad_(unlisted == "trainable")
    return _summarize(index, entries)


def plan_summary(model: nn.Module, plan: Optional[ParamPlan] = None, strict: bool = True) -> PlanSummary:
    """What :func:`apply_plan` would report, without changing anything: elements of ``model`` that may change under
    ``plan`` (mask ``True`` counts for masked tensors; a tensor the plan does not name, or every tensor when ``plan``
    is ``None``, counts by its current ``requires_grad``).

    Raises:
        KeyError: (``strict``) a plan name is not a parameter of ``model``.
    """
    index = _index(model)
    entries = _plan_on_model(index, _check_plan(plan), strict) if plan is not None else {}
    return _summarize(index, entries)


def _summarize(index: _ParamIndex, entries: Mapping[str, tuple[str, PlanEntry]]) -> PlanSummary:
    by_tensor: dict[str, TensorSummary] = {}
    trainable = total = 0
    for name, p in index.params.items():
        hit = entries.get(name)
        if hit is None:
            count = p.numel() if p.requires_grad else 0
            by_tensor[name] = TensorSummary("unlisted", count, p.numel())
        else:
            count = hit[1].trainable_count(p.numel())
            by_tensor[name] = TensorSummary(hit[1].state, count, p.numel())
        trainable += count
        total += p.numel()
    return PlanSummary(trainable, total, trainable / total if total else 0.0, by_tensor)


def mask_gradients(model: nn.Module, plan: ParamPlan) -> None:
    """Zero the gradient of every masked-out element (``masked_fill``, so NaN/inf there are cleared too) and drop
    the ``.grad`` of frozen tensors (set to ``None``, so torch optimizers skip them: no weight decay, no momentum).

    Call in ``on_before_optimizer_step`` (after AMP unscale, before clipping). Zeroed gradients alone do not stop
    weight decay or momentum from moving masked-out elements: also call :func:`reproject_masked` after the step.
    """
    _check_plan(plan)
    index = _index(model)
    with torch.no_grad():
        for name, (key, entry) in _plan_on_model(index, plan).items():
            p = index.params[name]
            if p.grad is None:
                continue
            if entry.state == FROZEN:
                p.grad = None
            elif entry.state == MASK:
                _, inv = plan._masks_on(key, p.grad.device)
                p.grad.masked_fill_(inv, 0)


def snapshot_masked(
    model: nn.Module, plan: ParamPlan, compact: bool = False, device: Optional[Union[str, torch.device]] = None
) -> dict[str, torch.Tensor]:
    """Save the current values that :func:`reproject_masked` restores, for every masked tensor in ``plan``.

    Memory: with ``compact=False`` (default) a full copy of each masked tensor (``numel * element_size`` bytes per
    tensor); restoring is a sync-free ``torch.where``. With ``compact=True`` only the masked-out elements
    (``(numel - mask.sum()) * element_size`` bytes) as a 1-D tensor; restoring uses boolean indexing, which
    synchronises with the GPU once per tensor. Frozen and trainable tensors are not stored (a frozen tensor without
    ``.grad`` is never touched by torch optimizers).

    Args:
        model: the module whose parameters are read.
        plan: the plan whose ``"mask"`` entries are saved.
        compact: store only the masked-out elements (see Memory).
        device: where to keep the copies (e.g. ``"cpu"`` to spare accelerator memory); default: each parameter's
            device.

    Returns:
        canonical name -> saved values.
    """
    _check_plan(plan)
    index = _index(model)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, (key, entry) in _plan_on_model(index, plan).items():
            if entry.state != MASK:
                continue
            p = index.params[name].detach()
            if compact:
                _, inv = plan._masks_on(key, p.device)
                val = p[inv].clone()
            else:
                val = p.clone()
            out[name] = val.to(device) if device is not None else val
    return out


def reproject_masked(model: nn.Module, plan: ParamPlan, reference_values: Mapping[str, torch.Tensor]) -> None:
    """Copy the saved values back into every masked-out element (exact re-projection), leaving ``True`` elements as
    the optimizer left them. Call after ``optimizer.step()`` (``on_train_batch_end`` in Lightning).

    Args:
        model: the module whose parameters are edited in place.
        plan: the plan whose ``"mask"`` entries are enforced.
        reference_values: output of :func:`snapshot_masked` (full or compact) for the same plan.

    Raises:
        KeyError: a masked tensor has no saved values.
        ValueError: saved values have a size that fits neither the full tensor nor its masked-out elements.
    """
    _check_plan(plan)
    if not isinstance(reference_values, Mapping):
        raise TypeError(
            "`reference_values` must be the mapping returned by snapshot_masked, got "
            f"{type(reference_values).__name__}."
        )
    index = _index(model)
    with torch.no_grad():
        for name, (key, entry) in _plan_on_model(index, plan).items():
            if entry.state != MASK:
                continue
            ref = reference_values.get(name)
            if ref is None:
                raise KeyError(
                    f"{plan.owner}: `reference_values` has no entry for masked tensor {name!r}; take it with "
                    f"snapshot_masked(model, plan) after building the plan."
                )
            p = index.params[name]
            mask, inv = plan._masks_on(key, p.device)
            ref = ref.to(device=p.device, dtype=p.dtype)
            if ref.shape == p.shape:
                p.copy_(torch.where(mask, p, ref))
            elif ref.dim() == 1 and ref.numel() == inv.sum().item():
                p[inv] = ref
            else:
                raise ValueError(
                    f"{plan.owner}: saved values for {name!r} have shape {tuple(ref.shape)}, which is neither the "
                    f"parameter's shape {tuple(p.shape)} nor the number of its masked-out elements; re-take the "
                    f"snapshot after changing the plan."
                )


# --------------------------------------------------------------------------------------------------------------
# Optimizer param groups
# --------------------------------------------------------------------------------------------------------------


def _check_number(value: Any, argname: str, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{argname}` must be a number, got {value!r}.")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"`{argname}` must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}.")
    return v


def _lookup_table(
    index: _ParamIndex, table: Optional[Mapping[str, float]], argname: str
) -> list[tuple[Any, float, str]]:
    """Validate an lr table; return ``[(predicate over canonical names, value, key)]`` with exact names first."""
    if table is None:
        return []
    if not isinstance(table, Mapping):
        raise TypeError(f"`{argname}` must be a mapping name-or-pattern -> number, got {type(table).__name__}.")
    exact: list[tuple[Any, float, str]] = []
    pats: list[tuple[Any, float, str]] = []
    for key, value in table.items():
        v = _check_number(value, f"{argname}[{key!r}]")
        names = set(_select(index, [key], argname=argname))
        pred = (lambda n, s=names: n in s)
        (exact if (key in index.alias and not key.startswith("re:")) else pats).append((pred, v, key))
    return exact + pats


def _first(table: list[tuple[Any, float, str]], name: str) -> Optional[float]:
    for pred, v, _ in table:
        if pred(name):
            return v
    return None


def param_group_id(lr: float, wd: float) -> str:
    """The ``group_id`` of a param group of the (lr, weight decay) class, as :func:`build_param_groups` sets it and
    :func:`rebuild_param_groups` looks it up (set it on groups you split or make, so rebuilds find them again)."""
    return f"lr={lr!r},weight_decay={wd!r}"


_group_id = param_group_id  # private alias (older callers)


def _trainable_names(index: _ParamIndex, plan: Optional[ParamPlan]) -> list[str]:
    entries = _plan_on_model(index, plan) if plan is not None else {}
    out = []
    for name, p in index.params.items():
        e = entries[name][1] if name in entries else None
        if (e is not None and e.trainable) or (e is None and p.requires_grad):
            out.append(name)
    return out


def build_param_groups(
    model: nn.Module,
    plan: Optional[ParamPlan],
    base_lr: float,
    weight_decay: float,
    lr_overrides: Optional[Mapping[str, float]] = None,
    no_decay_patterns: Sequence[str] = DEFAULT_NO_DECAY_PATTERNS,
    lr_multipliers: Optional[Mapping[str, float]] = None,
) -> list[dict[str, Any]]:
    """Param groups for a ``torch.optim`` optimizer, containing only the trainable tensors, split by lr and by
    decay / no-decay.

    A tensor is included if ``plan`` marks it trainable or masked, or if the plan does not name it (or ``plan`` is
    ``None``) and it has ``requires_grad=True``. Its lr is ``base_lr``, replaced by the first matching
    ``lr_overrides`` value (absolute lr) and then multiplied by the first matching ``lr_multipliers`` value
    (layer-wise LR decay); in both tables exact names take precedence over patterns, and patterns are tried in
    insertion order. Its weight decay is 0 if its name matches ``no_decay_patterns``, else ``weight_decay``.

    Args:
        model: the module whose parameters are grouped.
        plan: the plan deciding trainability, or ``None`` to use ``requires_grad``.
        base_lr: default learning rate (>= 0).
        weight_decay: weight decay of decayed tensors (>= 0).
        lr_overrides: name or pattern -> absolute learning rate. Each key must match a parameter.
        no_decay_patterns: globs/regexes of tensors without weight decay (need not match anything).
        lr_multipliers: name or pattern -> factor applied to the tensor's lr. Each key must match a parameter.

    Returns:
        ``[{"params": [...], "param_names": [...], "lr": float, "weight_decay": float, "group_id": str}]`` ordered
        by first appearance in ``model.named_parameters()``; ``group_id`` identifies the (lr, weight decay) class so
        :func:`rebuild_param_groups` can find a group again.
    """
    base_lr = _check_number(base_lr, "base_lr")
    weight_decay = _check_number(weight_decay, "weight_decay")
    if plan is not None:
        _check_plan(plan)
    index = _index(model)
    over = _lookup_table(index, lr_overrides, "lr_overrides")
    mult = _lookup_table(index, lr_multipliers, "lr_multipliers")
    no_decay = set(_select(index, no_decay_patterns, argname="no_decay_patterns", allow_unmatched=True))
    groups: dict[str, dict[str, Any]] = {}
    for name in _trainable_names(index, plan):
        lr = _first(over, name)
        lr = base_lr if lr is None else lr
        m = _first(mult, name)
        lr = lr * m if m is not None else lr
        wd = 0.0 if name in no_decay else weight_decay
        gid = param_group_id(lr, wd)
        g = groups.setdefault(gid, {"params": [], "param_names": [], "lr": lr, "weight_decay": wd, "group_id": gid})
        g["params"].append(index.params[name])
        g["param_names"].append(name)
    return list(groups.values())


@dataclass(frozen=True)
class RebuildReport:
    """What :func:`rebuild_param_groups` changed (canonical names).

    Attributes:
        kept: tensors that stayed in the optimizer, with their group, hyperparameters and state.
        removed: tensors taken out (no longer trainable); their state was deleted.
        added: tensors newly put in the optimizer, with empty state.
        duplicates_removed: extra occurrences of a tensor found in more than one place and dropped.
        groups_added: indices of param groups appended (an LR scheduler built before the rebuild does not know
            them: rebuild the scheduler, or extend its ``base_lrs``).
    """

    kept: list[str]
    removed: list[str]
    added: list[str]
    duplicates_removed: list[str]
    groups_added: list[int]


def unwrap_optimizer(optimizer: Any, argname: str = "optimizer") -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` itself: a Lightning ``LightningOptimizer`` is unwrapped, a torch optimizer is
    returned as is.

    Raises:
        TypeError: ``optimizer`` is neither.
    """
    inner = getattr(optimizer, "_optimizer", None)  # lightning.pytorch.core.optimizer.LightningOptimizer
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`{argname}` must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    return optimizer


_unwrap = unwrap_optimizer  # private alias (older callers)


def _group_matches(group: Mapping[str, Any], gid: str, lr: float, wd: float) -> bool:
    if "group_id" in group:
        return group["group_id"] == gid
    glr = group.get("initial_lr", group.get("lr"))
    gwd = group.get("weight_decay", 0.0)
    return (
        isinstance(glr, (int, float))
        and math.isclose(float(glr), lr, rel_tol=1e-12, abs_tol=0.0)
        and math.isclose(float(gwd), wd, rel_tol=1e-12, abs_tol=0.0)
    )


def rebuild_param_groups(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    plan: Optional[ParamPlan],
    base_lr: float,
    weight_decay: float,
    lr_overrides: Optional[Mapping[str, float]] = None,
    no_decay_patterns: Sequence[str] = DEFAULT_NO_DECAY_PATTERNS,
    lr_multipliers: Optional[Mapping[str, float]] = None,
    apply: bool = True,
) -> RebuildReport:
    """Bring an existing optimizer's param groups in line with ``plan`` in place, when trainability changes mid-run.

    * Tensors that stay trainable keep their group, its hyperparameters (including a scheduled lr) and their state.
    * Tensors of ``model`` that are no longer trainable are removed from their group and their state is deleted.
      Emptied groups are kept (empty) so the group count an LR scheduler relies on does not shrink.
    * Newly trainable tensors get fresh (deleted) state and join the existing group of their (lr, weight decay)
      class, as computed by :func:`build_param_groups` (matched by ``group_id``, or for groups without one by
      ``initial_lr``/``lr`` and ``weight_decay``), else a new group is appended. If the optimizer has an LR scheduler
      (groups carry ``initial_lr``), a new group gets ``initial_lr`` = its lr and ``lr`` scaled by the current
      schedule factor of the first scheduled group.
    * A tensor never ends up in two groups; tensors of the optimizer that are not parameters of ``model`` are left
      alone. ``param_names`` are maintained if the optimizer's groups carry them (as torch requires all or none).

    Args:
        optimizer: the optimizer to edit (a Lightning ``LightningOptimizer`` is unwrapped).
        model: the module whose parameters the plan names.
        plan: the new plan (``None``: trainability from ``requires_grad``).
        base_lr: default learning rate of newly trainable tensors (as in :func:`build_param_groups`).
        weight_decay: weight decay of newly trainable decayed tensors.
        lr_overrides: name or pattern -> absolute learning rate (as in :func:`build_param_groups`).
        no_decay_patterns: globs/regexes of tensors without weight decay.
        lr_multipliers: name or pattern -> lr factor (as in :func:`build_param_groups`).
        apply: first call :func:`apply_plan` so ``requires_grad`` matches the plan (a tensor in the optimizer
            without ``requires_grad`` would never get a gradient).

    Returns:
        A :class:`RebuildReport`.

    Raises:
        RuntimeError: the result still misses a trainable tensor or holds a frozen one (see :func:`verify_optimizer`).
    """
    opt = unwrap_optimizer(optimizer)
    if plan is not None and apply:
        apply_plan(model, plan)
    index = _index(model)
    desired = build_param_groups(
        model, plan, base_lr, weight_decay, lr_overrides, no_decay_patterns, lr_multipliers
    )
    want: dict[int, tuple[str, dict[str, Any]]] = {}
    for g in desired:
        for name, p in zip(g["param_names"], g["params"]):
            want[id(p)] = (name, g)
    named = any("param_names" in g for g in opt.param_groups)

    kept: list[str] = []
    removed: list[str] = []
    dups: list[str] = []
    present: set[int] = set()
    for gi, group in enumerate(opt.param_groups):
        names = group.get("param_names")
        new_params, new_names = [], []
        for i, p in enumerate(group["params"]):
            label = index.by_id.get(id(p)) or (names[i] if names else f"<optimizer group {gi} param {i}>")
            if id(p) in present:
                dups.append(label)
                continue
            if id(p) in index.by_id and id(p) not in want:
                opt.state.pop(p, None)
                removed.append(label)
                continue
            present.add(id(p))
            if id(p) in want:
                kept.append(label)
            new_params.append(p)
            if names is not None:
                new_names.append(names[i])
        group["params"] = new_params
        if names is not None:
            group["param_names"] = new_names

    added: list[str] = []
    pending: dict[str, dict[str, Any]] = {}
    for g in desired:
        for name, p in zip(g["param_names"], g["params"]):
            if id(p) in present:
                continue
            opt.state.pop(p, None)
            target = next(
                (grp for grp in opt.param_groups if _group_matches(grp, g["group_id"], g["lr"], g["weight_decay"])),
                None,
            )
            if target is not None:
                target["params"].append(p)
                if "param_names" in target:
                    target["param_names"].append(name)
            else:
                pg = pending.setdefault(
                    g["group_id"],
                    {"params": [], "param_names": [], "lr": g["lr"], "weight_decay": g["weight_decay"],
                     "group_id": g["group_id"]},
                )
                pg["params"].append(p)
                pg["param_names"].append(name)
            present.add(id(p))
            added.append(name)

    scale = None
    for grp in opt.param_groups:
        if "initial_lr" in grp and grp["initial_lr"]:
            scale = grp["lr"] / grp["initial_lr"]
            break
    groups_added: list[int] = []
    for pg in pending.values():
        if scale is not None:
            pg["initial_lr"] = pg["lr"]
            pg["lr"] = pg["lr"] * scale
        if not named and opt.param_groups:
            pg.pop("param_names")
        opt.add_param_group(pg)
        groups_added.append(len(opt.param_groups) - 1)

    verify_optimizer(opt, model, plan)
    return RebuildReport(kept, removed, added, dups, groups_added)


def optimizer_layout(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[list[str]]:
    """The canonical names of each param group's tensors, group by group, in order: what an optimizer ``state_dict``
    (which keys state by position) needs to be loaded into the right tensors. Save it with the checkpoint and give it
    to :func:`apply_optimizer_layout` on resume.

    Raises:
        ValueError: a group holds a tensor that is not a parameter of ``model``.
    """
    opt = unwrap_optimizer(optimizer)
    by_id = _index(model).by_id
    layout: list[list[str]] = []
    for gi, g in enumerate(opt.param_groups):
        names = []
        for i, p in enumerate(g["params"]):
            name = by_id.get(id(p))
            if name is None:
                raise ValueError(
                    f"optimizer param group {gi} holds a tensor (index {i}, shape {tuple(p.shape)}) that is not a "
                    f"parameter of {type(model).__name__}; its position cannot be named."
                )
            names.append(name)
        layout.append(names)
    return layout


def apply_optimizer_layout(
    optimizer: torch.optim.Optimizer, model: nn.Module, layout: Sequence[Sequence[str]]
) -> Optional[list[int]]:
    """Arrange ``optimizer``'s param groups as ``layout`` (from :func:`optimizer_layout`): same groups, same tensors,
    same order, so that an optimizer state saved with that layout (restored by position, as Lightning does after
    ``on_fit_start``) lands on the right tensors after mid-run rebuilds moved tensors between or within groups.

    Each group keeps the hyperparameters of the current group that holds its first tensor (an empty group: those of
    the current group at its index, else of the last); loading the optimizer state overwrites them anyway. State is
    keyed by tensor and is not touched; ``param_names`` are kept in step if the groups carry them.

    Returns:
        ``None`` if the groups already had this layout, else for each new group the index of the old group its
        hyperparameters came from (to re-map LR schedulers when the group count changed).

    Raises:
        ValueError: ``layout`` names a tensor ``model`` does not have, or the optimizer does not hold exactly the
            tensors of ``layout``.
    """
    opt = unwrap_optimizer(optimizer)
    index = _index(model)
    current = optimizer_layout(opt, model)
    wanted = [list(g) for g in layout]
    if current == wanted:
        return None
    unknown = [n for g in wanted for n in g if n not in index.params]
    if unknown:
        raise ValueError(f"`layout` names tensors that are not parameters of {type(model).__name__}: {unknown[:8]}.")
    now, saved = sorted(n for g in current for n in g), sorted(n for g in wanted for n in g)
    if now != saved:
        missing, extra = sorted(set(saved) - set(now)), sorted(set(now) - set(saved))
        raise ValueError(
            f"the optimizer does not hold the tensors of `layout` ({len(now)} vs {len(saved)} entries; in the layout "
            f"only: {missing[:8]}; in the optimizer only: {extra[:8]}). Trainability differs from the run that saved "
            "the layout: was the model or a parameter callback changed between the runs?"
        )
    where = {n: gi for gi, g in enumerate(current) for n in g}
    named = any("param_names" in g for g in opt.param_groups)
    new_groups, origin = [], []
    for i, names in enumerate(wanted):
        src = where[names[0]] if names else min(i, len(opt.param_groups) - 1)
        g = {k: v for k, v in opt.param_groups[src].items() if k not in ("params", "param_names")}
        g["params"] = [index.params[n] for n in names]
        if named:
            g["param_names"] = list(names)
        new_groups.append(g)
        origin.append(src)
    opt.param_groups[:] = new_groups  # in place: a LightningOptimizer shares this list
    return origin


def verify_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, plan: Optional[ParamPlan] = None) -> None:
    """Check that ``optimizer`` holds every trainable tensor of ``model`` exactly once and no tensor the plan
    freezes (trainability as in :func:`build_param_groups`). Use at ``on_fit_start`` and after changes.

    Raises:
        RuntimeError: naming the missing, frozen-but-present and duplicated tensors.
    """
    opt = unwrap_optimizer(optimizer)
    if plan is not None:
        _check_plan(plan)
    index = _index(model)
    trainable = set(_trainable_names(index, plan))
    seen: dict[int, int] = {}
    for g in opt.param_groups:
        for p in g["params"]:
            seen[id(p)] = seen.get(id(p), 0) + 1
    missing = [n for n in trainable if id(index.params[n]) not in seen]
    extra = [n for n, p in index.params.items() if n not in trainable and id(p) in seen]
    dups = [index.by_id.get(i, f"<tensor id {i}>") for i, c in seen.items() if c > 1]
    if missing or extra or dups:
        parts = []
        if missing:
            parts.append(f"trainable tensors missing from the optimizer (they would never be updated): {missing[:8]}")
        if extra:
            parts.append(f"frozen tensors still in the optimizer: {extra[:8]}")
        if dups:
            parts.append(f"tensors in more than one place in the param groups: {dups[:8]}")
        raise RuntimeError(
            "Optimizer does not match the parameter plan: " + "; ".join(parts)
            + ". Use rebuild_param_groups(optimizer, model, plan, ...) after changing trainability."
        )


# --------------------------------------------------------------------------------------------------------------
# Optimizer state surgery
# --------------------------------------------------------------------------------------------------------------


def reset_optimizer_state(
    optimizer: torch.optim.Optimizer,
    params_or_names: Union[torch.Tensor, str, Iterable[Union[torch.Tensor, str]]],
    model: Optional[nn.Module] = None,
) -> int:
    """Delete the optimizer state (e.g. AdamW ``step``, ``exp_avg``, ``exp_avg_sq``) of the chosen tensors, so their
    next step starts fresh. Other tensors' state is untouched.

    Args:
        optimizer: the optimizer (a ``LightningOptimizer`` is unwrapped).
        params_or_names: tensors, names, or patterns (globs / ``"re:"`` regexes; each must match). Names are
            resolved against ``model`` if given, else against the optimizer groups' ``param_names``.
        model: module used to resolve names.

    Returns:
        The number of chosen tensors that had state.

    Raises:
        ValueError: a chosen tensor is not in the optimizer, or names are given with neither ``model`` nor
            ``param_names`` in the optimizer.
        ParamPatternError: a name/pattern matches nothing.
    """
    opt = unwrap_optimizer(optimizer)
    items: list[Union[torch.Tensor, str]]
    if isinstance(params_or_names, (torch.Tensor, str)):
        items = [params_or_names]
    else:
        items = list(params_or_names)
    in_opt = {id(p): p for g in opt.param_groups for p in g["params"]}
    chosen: list[torch.Tensor] = []
    names = [x for x in items if isinstance(x, str)]
    for x in items:
        if isinstance(x, torch.Tensor):
            chosen.append(x)
        elif not isinstance(x, str):
            raise TypeError(
                f"`params_or_names` entries must be tensors or parameter names, got {type(x).__name__}."
            )
    if names:
        if model is not None:
            index = _index(model)
            chosen += [index.params[n] for n in _select(index, names, argname="params_or_names")]
        else:
            opt_names: dict[str, torch.Tensor] = {}
            for g in opt.param_groups:
                for n, p in zip(g.get("param_names", ()), g["params"]):
                    opt_names[n] = p
            if not opt_names:
                raise ValueError(
                    "`params_or_names` contains names, but `model` is None and the optimizer's param groups carry "
                    "no 'param_names'; pass `model=` or the tensors themselves."
                )
            for pat in names:
                pred = _compile(pat, "params_or_names")
                hits = [p for n, p in opt_names.items() if pred(n)]
                if not hits:
                    raise _no_match_error(pat, list(opt_names), None, "params_or_names")
                chosen += hits
    count = 0
    for p in chosen:
        if id(p) not in in_opt:
            raise ValueError(
                f"`params_or_names`: a chosen tensor of shape {tuple(p.shape)} is not in the optimizer's param groups."
            )
        if opt.state.pop(p, None):
            count += 1
    return count


def masked_state_reset(optimizer: torch.optim.Optimizer, param: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Zero the optimizer's per-element state of ``param`` where ``mask`` is ``False`` (e.g. AdamW ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq``; SGD ``momentum_buffer``). State tensors whose shape differs from the
    parameter's (scalar ``step``, quantised 8-bit state) are left as they are; ``step`` is per tensor, so reset
    elements keep the tensor's bias correction.

    Args:
        optimizer: the optimizer (a ``LightningOptimizer`` is unwrapped).
        param: a parameter in the optimizer.
        mask: ``torch.bool`` of ``param``'s shape; ``True`` = keep the state, ``False`` = zero it.

    Returns:
        The state keys that were zeroed (empty if the tensor has no state yet).
    """
    opt = unwrap_optimizer(optimizer)
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"`param` must be a tensor in the optimizer, got {type(param).__name__}.")
    if not any(param is p for g in opt.param_groups for p in g["params"]):
        raise ValueError(f"`param` (shape {tuple(param.shape)}) is not in the optimizer's param groups.")
    mask = _check_mask(mask, "mask", param.shape)
    state = opt.state.get(param)
    done: list[str] = []
    if not state:
        return done
    with torch.no_grad():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value.masked_fill_(~mask.to(value.device), 0)
                done.append(key)
    return done


# --------------------------------------------------------------------------------------------------------------
# Packed masks
# --------------------------------------------------------------------------------------------------------------

_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # numpy.packbits bitorder="big"


def pack_mask(mask: torch.Tensor) -> dict[str, Any]:
    """Pack a ``torch.bool`` tensor into 1 bit per element (same bytes as ``numpy.packbits(bitorder="big")`` over
    the row-major flattening; padding bits are 0).

    Returns:
        ``{"format": "packbits", "shape": list[int], "bits": uint8 CPU tensor of ceil(numel / 8) bytes}``.
    """
    mask = _check_mask(mask, "mask")
    flat = mask.reshape(-1)
    n = flat.numel()
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    bits = (flat.view(-1, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.uint8)
    return {"format": _PACK_FORMAT, "shape": [int(s) for s in mask.shape], "bits": bits.cpu()}


def unpack_mask(packed: Mapping[str, Any], device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Inverse of :func:`pack_mask`.

    Args:
        packed: the dict returned by :func:`pack_mask`.
        device: device of the returned mask (default CPU).

    Raises:
        ValueError: ``packed`` is malformed (missing keys, wrong dtype, or a byte count that does not fit ``shape``).
    """
    if not isinstance(packed, Mapping) or packed.get("format") != _PACK_FORMAT or "shape" not in packed:
        raise ValueError(
            f"`packed` must be a dict made by pack_mask (keys 'format'={_PACK_FORMAT!r}, 'shape', 'bits'), "
            f"got {packed if not isinstance(packed, Mapping) else sorted(packed)!r}."
        )
    shape = packed["shape"]
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError(f"`packed['shape']` must be a list of non-negative ints, got {shape!r}.")
    bits = packed.get("bits")
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.dim() != 1:
        raise ValueError(
            f"`packed['bits']` must be a 1-D torch.uint8 tensor, got "
            f"{type(bits).__name__ if not isinstance(bits, torch.Tensor) else (bits.dtype, tuple(bits.shape))}."
        )
    n = math.prod(shape)
    if bits.numel() != (n + 7) // 8:
        raise ValueError(
            f"`packed['bits']` has {bits.numel()} bytes but shape {list(shape)} needs {(n + 7) // 8}."
        )
    bits = bits.to(device) if device is not None else bits
    shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8, device=bits.device)
    flat = ((bits.unsqueeze(1) >> shifts) & 1).reshape(-1)[:n].bool()
    return flat.reshape(shape)
