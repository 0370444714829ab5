"""The technique registry: every technique declares once, next to its class, what it is and where its parts live.

A technique class is registered with the :func:`technique` class decorator::

    @technique(name="excess_loss", family="token_selection",
               paper="Rho-1: Not All Tokens Are What You Need", arxiv="2404.07965")
    class ExcessLossSelection(TokenScorerCallback): ...

``name`` is the technique's log prefix (``lit_ft/<name>/<metric>``) and, by convention, the stem of its config
(``configs/<name>.yaml``) and doc page (``docs/techniques/<name>.md``); pass ``config=`` / ``doc=`` only where a
technique departs from the convention. :func:`techniques` lists the records (``lit-ft techniques`` prints them, the
contract suite in ``tests/contract/`` runs its checks over them, ``lit_ft.callbacks.__all__`` is built from them).

Registration errors (duplicate name, unknown family, malformed arXiv id, a log prefix that disagrees with the class's
own ``technique_name`` / ``scorer_name``) raise :class:`TechniqueRegistrationError` at import time, so a mistake
never reaches a training run.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["FAMILIES", "REGISTRY", "TechniqueRecord", "TechniqueRegistrationError", "TechniqueRegistry", "technique",
           "techniques"]

#: the families, in the order ``lit-ft techniques`` lists them (one folder per family under lit_ft/callbacks)
FAMILIES: tuple[str, ...] = (
    "token_selection", "tensor_selection", "param_reset", "prompt",
    "objectives", "adapters", "analysis", "data_selection",
)

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_ARXIV = re.compile(r"^\d{4}\.\d{4,5}$")  # new-style identifiers, without version suffix

T = TypeVar("T", bound=type)


class TechniqueRegistrationError(ValueError):
    """A ``@technique(...)`` declaration that cannot be registered (the message names the argument and the fix)."""


@dataclass(frozen=True)
class TechniqueRecord:
    """What one technique declares. Paths are relative to the repository root.

    Attributes:
        name: log prefix (``lit_ft/<name>/...``) and the stem of the config and doc page.
        cls: the technique's public class.
        family: one of :data:`FAMILIES`.
        paper: the paper's title.
        arxiv: its arXiv identifier (``"2404.07965"``); ``None`` where none was confirmed.
        config: ``configs/<name>.yaml`` unless declared otherwise.
        doc: ``docs/techniques/<name>.md`` unless declared otherwise.
    """

    name: str
    cls: type
    family: str
    paper: str
    arxiv: str | None
    config: str
    doc: str

    @property
    def class_path(self) -> str:
        """How a LightningCLI config addresses the class (``lit_ft.callbacks.<Class>``)."""
        return f"lit_ft.callbacks.{self.cls.__name__}"

    @property
    def arxiv_url(self) -> str | None:
        return None if self.arxiv is None else f"https://arxiv.org/abs/{self.arxiv}"

    def sort_key(self) -> tuple[int, str]:
        return FAMILIES.index(self.family), self.name


class TechniqueRegistry:
    """A set of :class:`TechniqueRecord` keyed by name. The package uses :data:`REGISTRY`; tests build their own
    (``TechniqueRegistry()``) to register deliberately broken techniques without touching the real one."""

    def __init__(self) -> None:
        self._records: dict[str, TechniqueRecord] = {}

    def register(self, record: TechniqueRecord) -> TechniqueRecord:
        """Add ``record``; re-registering the same class (a module reload) replaces its record."""
        known = self._records.get(record.name)
        if known is not None and not _same_class(known.cls, record.cls):
            raise TechniqueRegistrationError(
                f"technique name {record.name!r} is already registered by {_qualname(known.cls)}; "
                f"{_qualname(record.cls)} needs another `name`")
        for other in self._records.values():
            if other.name != record.name and _same_class(other.cls, record.cls):
                raise TechniqueRegistrationError(
                    f"{_qualname(record.cls)} is already registered as {other.name!r}; one class, one technique")
        self._records[record.name] = record
        return record

    def technique(self, *, name: str, family: str, paper: str, arxiv: str | None, config: str | None = None,
                  doc: str | None = None) -> Callable[[T], T]:
        """Class decorator registering the decorated class in this registry (arguments as :func:`technique`)."""

        def decorate(cls: T) -> T:
            self.register(make_record(cls, name=name, family=family, paper=paper, arxiv=arxiv, config=config,
                                      doc=doc))
            return cls

        return decorate

    def records(self) -> list[TechniqueRecord]:
        """All records, sorted by family (in :data:`FAMILIES` order) then name."""
        return sorted(self._records.values(), key=TechniqueRecord.sort_key)

    def get(self, name: str) -> TechniqueRecord:
        try:
            return self._records[name]
        except KeyError:
            raise KeyError(f"no technique named {name!r}; registered: {sorted(self._records)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._records

    def __len__(self) -> int:
        return len(self._records)


def make_record(cls: type, *, name: str, family: str, paper: str, arxiv: str | None, config: str | None = None,
                doc: str | None = None) -> TechniqueRecord:
    """Validate a declaration and fill the conventional paths."""
    where = f"@technique on {_qualname(cls)}"
    if not isinstance(cls, type):
        raise TechniqueRegistrationError(f"{where}: decorates classes only, got {cls!r}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise TechniqueRegistrationError(
            f"{where}: `name` must be a snake_case identifier (the lit_ft/<name>/ log prefix), got {name!r}")
    if family not in FAMILIES:
        raise TechniqueRegistrationError(f"{where}: `family` must be one of {FAMILIES}, got {family!r}")
    if not isinstance(paper, str) or not paper.strip():
        raise TechniqueRegistrationError(f"{where}: `paper` must be the paper's title, got {paper!r}")
    if arxiv is not None and (not isinstance(arxiv, str) or not _ARXIV.match(arxiv)):
        raise TechniqueRegistrationError(
            f"{where}: `arxiv` must be an arXiv id like '2404.07965' (no 'v2' suffix) or None, got {arxiv!r}")
    # the class's own log prefix, where it keeps one, must be the registered name (one name everywhere)
    for attr in ("technique_name", "scorer_name"):
        own = cls.__dict__.get(attr)
        if isinstance(own, str) and own != name:
            raise TechniqueRegistrationError(
                f"{where}: `name`={name!r} but the class logs under {attr}={own!r}; use the same name")
    return TechniqueRecord(
        name=name, cls=cls, family=family, paper=" ".join(paper.split()), arxiv=arxiv,
        config=config if config is not None else f"configs/{name}.yaml",
        doc=doc if doc is not None else f"docs/techniques/{name}.md",
    )


#: the package's registry (filled as ``lit_ft.callbacks`` imports the technique modules; ``lit_ft.techniques()``
#: imports them and lists it — core never imports a technique)
REGISTRY = TechniqueRegistry()


def technique(*, name: str, family: str, paper: str, arxiv: str | None, config: str | None = None,
              doc: str | None = None, registry: TechniqueRegistry | None = None) -> Callable[[T], T]:
    """Register the decorated class as a technique.

    Args:
        name: snake_case log prefix (``lit_ft/<name>/``); also names ``configs/<name>.yaml`` and
            ``docs/techniques/<name>.md``.
        family: one of :data:`FAMILIES`.
        paper: the paper's title.
        arxiv: arXiv id (``"2404.07965"``), or ``None`` when none could be confirmed.
        config: path of the config relative to the repository root, only where it departs from the convention.
        doc: path of the doc page relative to the repository root, only where it departs from the convention.
        registry: where to register (default :data:`REGISTRY`; tests pass their own).
    """
    # `registry or REGISTRY` would pick REGISTRY for an empty registry (len 0 is falsy)
    target = REGISTRY if registry is None else registry
    return target.technique(name=name, family=family, paper=paper, arxiv=arxiv, config=config, doc=doc)


def _qualname(cls: object) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"


def _same_class(a: type, b: type) -> bool:
    # a reloaded module defines a new class object with the same module and qualified name
    return a is b or _qualname(a) == _qualname(b)
