"""Constructor-argument checks shared by the callbacks.

Every helper returns the (normalised) value when it is acceptable and otherwise raises a :class:`ValueError` (or the
subclass given as ``error``) whose message names the owner, the argument in backticks, what is allowed and the value
given::

    PromptTuning: `num_virtual_tokens` must be an int >= 1, got 0

Bools are never accepted as numbers (``True`` is an ``int`` to Python, not to a YAML config's author).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["check_bool", "check_choice", "check_int", "check_number", "check_str", "check_str_list"]


def _num(x: float) -> str:
    """``1`` for an int, ``0.5`` / ``1e-08`` for a float (the bound as the reader would write it)."""
    return str(x) if isinstance(x, int) else f"{x:g}"


def _fail(owner: str, name: str, expected: str, value: Any, allow_none: bool, null_means: str | None,
          error: type[ValueError]) -> ValueError:
    if allow_none:
        expected += f" or null (= {null_means})" if null_means else " or null"
    return error(f"{owner}: `{name}` must be {expected}, got {value!r}")


def check_int(owner: str, name: str, value: Any, minimum: int | None = None, maximum: int | None = None,
              allow_none: bool = False, *, null_means: str | None = None,
              error: type[ValueError] = ValueError) -> int | None:
    """``value`` if it is an int (not a bool) with ``minimum <= value <= maximum`` (either bound optional).

    Args:
        owner: class name that starts the message.
        name: argument name (shown in backticks).
        value: what was given.
        minimum / maximum: inclusive bounds; ``None`` = unbounded on that side.
        allow_none: accept (and return) ``None``.
        null_means: what ``None`` stands for, added to the message (``"or null (= ...)"``).
        error: exception class raised (a :class:`ValueError` subclass).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) \
            or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if minimum is not None and maximum is not None:
            expected = f"an int in [{minimum}, {maximum}]"
        elif minimum is not None:
            expected = f"an int >= {minimum}"
        elif maximum is not None:
            expected = f"an int <= {maximum}"
        else:
            expected = "an int"
        raise _fail(owner, name, expected, value, allow_none, null_means, error)
    return value


def check_number(owner: str, name: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, allow_none: bool = False, *,
                 null_means: str | None = None, error: type[ValueError] = ValueError) -> float | None:
    """``float(value)`` if it is a finite int or float (not a bool) inside the range; ``None`` when allowed.

    Args:
        owner: class name that starts the message.
        name: argument name (shown in backticks).
        value: what was given.
        low / high: bounds; ``None`` = unbounded on that side (the value must still be finite).
        low_open / high_open: exclude that bound (``> low`` instead of ``>= low``; ``< high`` instead of ``<= high``).
        allow_none: accept (and return) ``None``.
        null_means: what ``None`` stands for, added to the message (``"or null (= ...)"``).
        error: exception class raised (a :class:`ValueError` subclass).
    """
    if value is None and allow_none:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            expected = (f"a number in {'(' if low_open else '['}{_num(low)}, {_num(high)}"
                        f"{')' if high_open else ']'}")
        elif low is not None:
            expected = f"a finite number {'>' if low_open else '>='} {_num(low)}"
        elif high is not None:
            expected = f"a finite number {'<' if high_open else '<='} {_num(high)}"
        else:
            expected = "a finite number"
        raise _fail(owner, name, expected, value, allow_none, null_means, error)
    return float(value)


def check_bool(owner: str, name: str, value: Any, *, error: type[ValueError] = ValueError) -> bool:
    """``value`` if it is ``True`` or ``False`` (not ``0`` / ``1`` / ``"yes"``)."""
    if not isinstance(value, bool):
        raise error(f"{owner}: `{name}` must be true or false, got {value!r}")
    return value


def check_choice(owner: str, name: str, value: Any, choices: Iterable[str], *,
                 error: type[ValueError] = ValueError) -> str:
    """``value`` if it is one of ``choices`` (the message lists them as a tuple)."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise error(f"{owner}: `{name}` must be one of {choices}, got {value!r}")
    return value


def check_str(owner: str, name: str, value: Any, allow_none: bool = False, *, null_means: str | None = None,
              error: type[ValueError] = ValueError) -> str | None:
    """``value`` if it is a string with a non-blank character (a path, a pattern, a name); ``None`` when allowed."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(owner, name, "a non-empty string", value, allow_none, null_means, error)
    return value


def check_str_list(owner: str, name: str, value: Any, allow_none: bool = False, *, allow_empty: bool = False,
                   null_means: str | None = None, error: type[ValueError] = ValueError) -> list[str] | None:
    """``list(value)`` if it is a list (or tuple) of non-empty strings; a single string is read as a one-item list
    (what a YAML author means by ``patterns: '*lm_head*'``). ``allow_empty``: accept ``[]``."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or (not value and not allow_empty) \
            or not all(isinstance(v, str) and v.strip() for v in value):
        expected = "a list of non-empty strings" if allow_empty else "a non-empty list of non-empty strings"
        raise _fail(owner, name, expected, value, allow_none, null_means, error)
    return list(value)


def check_layer_count(owner: str, name: str, value: int, n_layers: int, minimum: int) -> None:
    """At setup, once the model is known: ``value`` layers must exist in a model of ``n_layers``."""
    if value > n_layers:
        raise ValueError(f"{owner}: `{name}`={value} exceeds the model's {n_layers} layers; allowed: "
                         f"{minimum}..{n_layers}.")


def check_optional_lr(value: float | None, argname: str, owner: str) -> float | None:
    """``None`` or a finite number > 0 (a learning rate); raises naming the argument otherwise."""
    return check_number(owner, argname, value, low=0, low_open=True, allow_none=True, null_means="the optimizer's")


def check_optional_wd(value: float | None, argname: str, owner: str) -> float | None:
    """``None`` or a finite number >= 0 (a weight decay); raises naming the argument otherwise."""
    return check_number(owner, argname, value, low=0, allow_none=True, null_means="the optimizer's")
