"""TL-Training's PKT marks (``SFTDataModule(key_spans="tl_training")``) as character spans of a completion.

TL-Training (Ye et al., arXiv 2412.15495; code ``Junjie-Ye/TL-Training``, ``code/pkt/utils.py``) weights two kinds of
tokens differently from the rest of the answer:

- **key ("pre") tokens**, up-weighted: the first token of the called tool's name, and every token where the name stops
  sharing a prefix with another candidate tool name of the prompt (the longest-common-prefix position, taken only
  when the common prefix is not empty);
- **parameter boundaries ("para")**, their own class: weight 1, but left out of ``N_other`` (the count the key
  weight is derived from). The authors' code marks the token before each ``',`` / ``')`` of a ``func(k='v')`` call,
  i.e. the last token of each argument value.

Here tool calls are JSON objects ``{"name": ..., "arguments": {...}}`` (the format lit-ft's ``tool_call`` preset
reads). The marks are character positions, mapped to tokens by the fast tokenizer's offsets: a token holding a marked
character is marked. Divergence is found on characters: the token holding the first character that differs is the
first token that differs, as long as both names tokenise their common prefix alike.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator

_DECODER = json.JSONDecoder()
_WS = re.compile(r"\s*")
_OBJECT_START = re.compile(r'\{\s*"')

Span = tuple[int, int]


def _members(text: str, i: int) -> Iterator[tuple[str, int, int]]:
    """``(key, value_start, value_end)`` of each member of the JSON object starting at ``text[i] == "{"`` (already
    known to be valid JSON)."""
    j = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
    if text[j] == "}":
        return
    while True:
        key, j = _DECODER.raw_decode(text, j)
        j = _WS.match(text, j).end() + 1  # type: ignore[union-attr]  # past ":"
        j = _WS.match(text, j).end()  # type: ignore[union-attr]
        _, end = _DECODER.raw_decode(text, j)
        yield key, j, end
        j = _WS.match(text, end).end()  # type: ignore[union-attr]
        if text[j] != ",":
            return
        j = _WS.match(text, j + 1).end()  # type: ignore[union-attr]


def _last_value_char(text: str, start: int, end: int) -> int:
    """The last character of a JSON value ``text[start:end]``: a string's last content character (its closing quote
    when empty, so the boundary is not the ``",`` that tokenizers often merge), else the value's last character."""
    if text[start] == '"' and end - start > 2:
        return end - 2
    return end - 1


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def tool_names_in(text: str) -> list[str]:
    """The string ``"name"`` of every JSON object in ``text`` that looks like a tool definition or call (it has a
    ``"name"`` and one of ``"arguments"``, ``"parameters"``, ``"description"``): the candidate tools of a row."""
    names: list[str] = []
    pos = 0
    for m in _OBJECT_START.finditer(text):
        if m.start() < pos:
            continue
        try:
            obj, end = _DECODER.raw_decode(text, m.start())
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("name"), str) and (
                {"arguments", "parameters", "description"} & set(obj)):
            names.append(obj["name"])
            pos = end
    return names


def pkt_spans(text: str, candidates: Iterable[str] = ()) -> tuple[list[Span], list[Span]]:
    """TL-Training's marks in the JSON tool calls of ``text``: ``(key spans, boundary spans)``, one character each.

    Key: the first character of each call's tool name, and, for every candidate name other than the called one whose
    common prefix with it is ``0 < lcp < len(name)``, the character at ``lcp`` (where the two names part). A candidate
    the called name is a prefix of parts after the name ends: nothing inside the name marks it. Boundary: the last
    character of every top-level argument value, when ``"arguments"`` is a JSON object.
    """
    cands = [c for c in dict.fromkeys(candidates) if c]
    keys: list[Span] = []
    bounds: list[Span] = []
    pos = 0
    for m in _OBJECT_START.finditer(text):
        i = m.start()
        if i < pos:
            continue
        try:
            obj, end = _DECODER.raw_decode(text, i)
        except ValueError:
            continue
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and "arguments" in obj):
            continue
        pos = end
        for key, a, b in _members(text, i):
            if key == "name" and b - a > 2:
                name = text[a + 1 : b - 1]  # as written (escapes kept): character positions stay right
                marks = {0}
                for c in cands:
                    lcp = _common_prefix(name, c)
                    if c != name and 0 < lcp < len(name):
                        marks.add(lcp)
                keys += [(a + 1 + k, a + 2 + k) for k in sorted(marks)]
            elif key == "arguments" and text[a] == "{":
                for _, va, vb in _members(text, a):
                    c = _last_value_char(text, va, vb)
                    bounds.append((c, c + 1))
    return keys, bounds
