"""Name-keyed parameter plans: what a technique lets train, and how the plans of several techniques compose.

A :class:`ParamPlan` maps a parameter name (as ``model.named_parameters()`` spells it) to an entry: *trainable*,
*frozen*, or an element *mask* (a ``torch.bool`` tensor of the parameter's shape, ``True`` = this element may change).
A name a plan does not list is *unconstrained*: the plan has no opinion about it. Plans compose by intersection
(:func:`compose`): a tensor is trainable only if no plan freezes it, and masks are AND-ed. An entry may be *required*
(the technique cannot work without it being trainable); freezing a required tensor, or masking all of its elements
away, raises :class:`ParamPlanConflict` naming both owners.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from lit_ft.core.params.masks import check_mask, pack_mask, unpack_mask
from lit_ft.core.params.patterns import ParamIndex, as_pattern_list, param_index, resolve_name, select_in_index

__all__ = ["TRAINABLE", "FROZEN", "MASK", "ParamPlanConflict", "PlanEntry", "ParamPlan", "compose"]

TRAINABLE = "trainable"
FROZEN = "frozen"
MASK = "mask"
_STATES = (TRAINABLE, FROZEN, MASK)

_STATE_DICT_FORMAT = "lit_ft.ParamPlan"
_STATE_DICT_VERSION = 1


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
        req = set(as_pattern_list(required, "required")) if required else set()
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
                mask = check_mask(value.mask, f"mask of {name!r}")
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
            mask = check_mask(value, f"mask of {name!r}")
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
        index = param_index(model)
        keep = set(select_in_index(index, patterns, owner=owner))
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
        names = select_in_index(param_index(model), patterns, owner=owner)
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
            index = param_index(model)
            for name, mask in masks.items():
                canonical = resolve_name(index, name, owner, "masks")
                entries[canonical] = check_mask(mask, f"masks[{name!r}]", index.params[canonical].shape)
        else:
            entries = {n: check_mask(m, f"masks[{n!r}]") for n, m in masks.items()}
        return cls(entries, owner, required=list(entries) if required else ())

    @classmethod
    def from_requires_grad(cls, model: nn.Module, owner: str = "model") -> "ParamPlan":
        """Plan that records the current ``requires_grad`` of every parameter (compose with it to respect what
        the user's module already froze).

        Args:
            model: the module to read.
            owner: name used in error messages.
        """
        index = param_index(model)
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


def check_plan(plan: Any, argname: str = "plan") -> ParamPlan:
    """``plan`` itself if it is a :class:`ParamPlan` (the argument check every plan consumer shares)."""
    if not isinstance(plan, ParamPlan):
        raise TypeError(f"`{argname}` must be a ParamPlan, got {type(plan).__name__}.")
    return plan


def plan_on_model(index: ParamIndex, plan: ParamPlan, strict: bool = True) -> dict[str, tuple[str, PlanEntry]]:
    """``canonical name -> (name used by the plan, entry)`` over ``index``; checks names (``strict``: a name the
    model does not have raises) and mask shapes."""
    out: dict[str, tuple[str, PlanEntry]] = {}
    for name, entry in plan.items():
        canonical = index.alias.get(name)
        if canonical is None:
            if strict:
                resolve_name(index, name, plan.owner, "plan")
            continue
        if entry.mask is not None and tuple(entry.mask.shape) != tuple(index.params[canonical].shape):
            raise ValueError(
                f"{plan.owner}: mask for {name!r} has shape {tuple(entry.mask.shape)} but the parameter has shape "
                f"{tuple(index.params[canonical].shape)}."
            )
        out[canonical] = (name, entry)
    return out


