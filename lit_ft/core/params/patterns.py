"""Parameter names and the pattern syntax every ``patterns`` argument of lit_ft uses.

Patterns are shell-style globs matched with :func:`fnmatch.fnmatchcase` against the *whole* parameter name (``*`` also
matches dots: ``"model.layers.0.*"``, ``"*bias"``), or regular expressions written with a ``"re:"`` prefix and matched
with :func:`re.fullmatch` (``"re:.*layers\\.[01]\\..*"``). A string with no glob characters is an exact name. A single
string is accepted where a list of patterns is expected. Tied (shared) parameters are listed once by
``named_parameters()``; patterns also match their other names (aliases), and everything is keyed by the first
(canonical) name.

:class:`ParamIndex`, :func:`param_index`, :func:`select_in_index`, :func:`resolve_name` and :func:`no_match_error` are
the building blocks the rest of :mod:`lit_ft.core` (plans, optimizer groups) shares, so every error about a name reads
the same.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional, Union

from torch import nn

__all__ = ["ParamPatternError", "name_matcher", "select_param_names"]

_GLOB_CHARS = set("*?[")


class ParamPatternError(ValueError):
    """A name pattern is malformed or matches no parameter of the model."""


@dataclass
class ParamIndex:
    """The parameters of a model by canonical name, with every alias of a tied tensor and a lookup by identity."""

    params: dict[str, nn.Parameter]  # canonical name -> parameter, in named_parameters() order
    alias: dict[str, str]  # every name (canonical and tied aliases) -> canonical name
    by_id: dict[int, str]  # id(parameter) -> canonical name


def param_index(model: nn.Module, argname: str = "model") -> ParamIndex:
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
    return ParamIndex(params, alias, by_id)


def as_pattern_list(patterns: Union[str, Iterable[str]], argname: str) -> list[str]:
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




def no_match_error(pattern: str, names: Sequence[str], owner: Optional[str], argname: str) -> ParamPatternError:
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


def select_in_index(
    index: ParamIndex,
    patterns: Union[str, Iterable[str]],
    *,
    owner: Optional[str] = None,
    argname: str = "patterns",
    allow_unmatched: bool = False,
) -> list[str]:
    """Canonical names matched by any pattern, in model order; raise for a pattern that matches nothing."""
    pats = as_pattern_list(patterns, argname)
    all_names = list(index.alias)
    matched: set[str] = set()
    for pat in pats:
        pred = name_matcher(pat, argname)
        hits = {index.alias[n] for n in all_names if pred(n)}
        if not hits and not allow_unmatched:
            raise no_match_error(pat, list(index.params), owner, argname)
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
    return select_in_index(param_index(model), patterns, owner=owner)


def resolve_name(index: ParamIndex, name: str, owner: Optional[str], argname: str) -> str:
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

