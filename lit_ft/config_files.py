"""The configs shipped inside the package (``lit_ft/configs/``, package data) and how ``--config`` finds them.

``lit-ft fit --config quickstart`` runs the packaged ``quickstart.yaml`` from any working directory, installed wheel
included. A config's name is its path under ``lit_ft/configs/`` without ``.yaml`` (``quickstart``,
``excess_loss``, ``rho1/reference``); a registered technique's config name is the technique's name. A value that is
an existing file always wins, so a local ``my.yaml`` (or a local ``quickstart``) is never shadowed. The docs'
``configs/<name>.yaml`` paths work from any directory too: when no such file exists, the packaged one is used.

Paths written inside the configs (``runs/...``, ``artifacts/...``) are outputs and inputs of runs: LightningCLI keeps
them relative to the working directory, not to the config file, so they mean the same from a checkout or a wheel.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["CONFIG_DIR", "UnknownConfigError", "packaged_configs", "resolve_config", "resolve_config_args",
           "configs_table"]

#: where the packaged configs live (the repository's ``configs`` is a symlink to it)
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# A value that could be a config name or a path; anything else (an inline YAML/JSON string such as
# ``{"trainer": ...}``, which jsonargparse also accepts for --config) is passed through untouched.
_NAME_LIKE = re.compile(r"^[\w.\-/\\]+$")


class UnknownConfigError(ValueError):
    """``--config`` names neither an existing file nor a packaged config."""


def packaged_configs() -> dict[str, Path]:
    """Every packaged config: name (path under ``lit_ft/configs/`` without ``.yaml``, ``/``-separated) -> file."""
    return {p.relative_to(CONFIG_DIR).with_suffix("").as_posix(): p for p in sorted(CONFIG_DIR.rglob("*.yaml"))}


def resolve_config(value: str) -> str:
    """The file ``--config value`` means: ``value`` itself when it is an existing file (or not name-like: inline
    YAML), else the packaged config named ``value`` (``.yaml`` and a leading ``configs/`` optional).

    Raises:
        UnknownConfigError: ``value`` is name-like, not a file, and not a packaged config; the message lists the
            packaged names.
    """
    if Path(value).is_file() or not _NAME_LIKE.match(value):
        return value
    name = value.replace("\\", "/")
    name = name.removeprefix("./").removeprefix("configs/").removeprefix("lit_ft/configs/").removesuffix(".yaml")
    configs = packaged_configs()
    if name in configs:
        return str(configs[name])
    raise UnknownConfigError(
        f"--config {value!r}: no such file, and no packaged config named {name!r}. "
        f"Packaged configs (lit-ft configs lists their paths): {', '.join(configs)}"
    )


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with the value of every ``--config`` / ``-c`` (``--config X`` or ``--config=X``) passed through
    :func:`resolve_config`; every other argument is kept as it is."""
    out: list[str] = []
    take_next = False
    for arg in argv:
        if take_next:
            out.append(resolve_config(arg))
            take_next = False
        elif arg in ("--config", "-c"):
            out.append(arg)
            take_next = True
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out


def configs_table() -> str:
    """``lit-ft configs``: one line per packaged config, name then file."""
    configs = packaged_configs()
    width = max(map(len, configs))
    lines = [f"{name:<{width}}  {path}" for name, path in configs.items()]
    lines.append(f"{len(configs)} configs; run one with: lit-ft fit --config NAME")
    return "\n".join(lines)
