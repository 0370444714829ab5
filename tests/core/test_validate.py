"""lit_ft.core.validate: the shared constructor-argument checks."""

import math
import re

import pytest

from lit_ft.core.prompts import PromptError
from lit_ft.core.validate import check_bool, check_choice, check_int, check_number, check_str, check_str_list


def test_check_int_accepts():
    assert check_int("X", "n", 3, minimum=1) == 3
    assert check_int("X", "n", 1, minimum=1, maximum=1) == 1
    assert check_int("X", "n", -5) == -5
    assert check_int("X", "n", None, minimum=1, allow_none=True) is None


@pytest.mark.parametrize("kwargs, value, match", [
    ({"minimum": 1}, 0, r"^X: `n` must be an int >= 1, got 0$"),
    ({"minimum": 1}, True, r"^X: `n` must be an int >= 1, got True$"),
    ({"minimum": 1}, 2.0, r"^X: `n` must be an int >= 1, got 2.0$"),
    ({"minimum": 1}, None, r"^X: `n` must be an int >= 1, got None$"),
    ({"minimum": 1, "allow_none": True}, "3", r"^X: `n` must be an int >= 1 or null, got '3'$"),
    ({"minimum": 1, "maximum": 4}, 5, r"^X: `n` must be an int in \[1, 4\], got 5$"),
    ({"maximum": 4}, 5, r"^X: `n` must be an int <= 4, got 5$"),
    ({}, "a", r"^X: `n` must be an int, got 'a'$"),
])
def test_check_int_rejects(kwargs, value, match):
    with pytest.raises(ValueError, match=match):
        check_int("X", "n", value, **kwargs)


def test_check_number_accepts():
    assert check_number("X", "lr", 1, low=0, low_open=True) == 1.0
    assert isinstance(check_number("X", "lr", 1, low=0, low_open=True), float)
    assert check_number("X", "wd", 0, low=0) == 0.0
    assert check_number("X", "d", 1.0, low=0, high=1, low_open=True) == 1.0
    assert check_number("X", "x", -2.5) == -2.5
    assert check_number("X", "lr", None, allow_none=True) is None


@pytest.mark.parametrize("kwargs, value, match", [
    ({"low": 0, "low_open": True}, 0, r"^X: `v` must be a finite number > 0, got 0$"),
    ({"low": 0}, -0.1, r"^X: `v` must be a finite number >= 0, got -0.1$"),
    ({"low": 0}, True, r"^X: `v` must be a finite number >= 0, got True$"),
    ({"low": 0}, "1", r"^X: `v` must be a finite number >= 0, got '1'$"),
    ({"low": 0}, math.inf, r"^X: `v` must be a finite number >= 0, got inf$"),
    ({}, math.nan, r"^X: `v` must be a finite number, got nan$"),
    ({"high": 1, "high_open": True}, 1, r"^X: `v` must be a finite number < 1, got 1$"),
    ({"low": 0, "high": 1, "low_open": True}, 1.5, r"^X: `v` must be a number in \(0, 1\], got 1.5$"),
    ({"low": 0, "high": 1, "low_open": True}, 0, r"^X: `v` must be a number in \(0, 1\], got 0$"),
    ({"low": 0.5, "high": 2, "high_open": True}, 2, r"^X: `v` must be a number in \[0.5, 2\), got 2$"),
    ({"low": 0, "low_open": True, "allow_none": True, "null_means": "the optimizer's"}, -1.0,
     r"^X: `v` must be a finite number > 0 or null \(= the optimizer's\), got -1.0$"),
])
def test_check_number_rejects(kwargs, value, match):
    with pytest.raises(ValueError, match=match):
        check_number("X", "v", value, **kwargs)


def test_check_bool():
    assert check_bool("X", "flag", True) is True
    assert check_bool("X", "flag", False) is False
    for bad in (1, 0, "yes", None):
        with pytest.raises(ValueError, match=rf"^X: `flag` must be true or false, got {bad!r}$"):
            check_bool("X", "flag", bad)


def test_check_choice():
    assert check_choice("X", "mode", "b", ("a", "b")) == "b"
    assert check_choice("X", "mode", "a", ["a", "b"]) == "a"
    for bad in ("c", None, 1, ["a"]):
        with pytest.raises(ValueError, match=r"^X: `mode` must be one of \('a', 'b'\), got "):
            check_choice("X", "mode", bad, ("a", "b"))


def test_error_class():
    with pytest.raises(PromptError, match="`n` must be an int >= 1"):
        check_int("X", "n", 0, minimum=1, error=PromptError)
    with pytest.raises(PromptError):
        check_number("X", "v", -1, low=0, error=PromptError)
    with pytest.raises(PromptError):
        check_bool("X", "b", 1, error=PromptError)
    with pytest.raises(PromptError):
        check_choice("X", "c", "z", ("a",), error=PromptError)


def test_check_str():
    assert check_str("X", "path", "a/b") == "a/b"
    assert check_str("X", "path", None, allow_none=True) is None
    for bad in ("", "  ", None, 3, ["a"]):
        with pytest.raises(ValueError, match=rf"^X: `path` must be a non-empty string, got {re.escape(repr(bad))}$"):
            check_str("X", "path", bad)
    with pytest.raises(ValueError, match=r"^X: `path` must be a non-empty string or null \(= no export\), got ''$"):
        check_str("X", "path", "", allow_none=True, null_means="no export")


def test_check_str_list():
    assert check_str_list("X", "p", ["a", "b"]) == ["a", "b"]
    assert check_str_list("X", "p", ("a",)) == ["a"]
    assert check_str_list("X", "p", "a") == ["a"]  # one pattern given as a string
    assert check_str_list("X", "p", None, allow_none=True) is None
    assert check_str_list("X", "p", [], allow_empty=True) == []
    for bad in ([], [""], ["a", 1], 3, None):
        with pytest.raises(ValueError, match=r"^X: `p` must be a non-empty list of non-empty strings, got "):
            check_str_list("X", "p", bad)
    with pytest.raises(ValueError, match=r"^X: `p` must be a list of non-empty strings or null, got \[''\]$"):
        check_str_list("X", "p", [""], allow_none=True, allow_empty=True)
