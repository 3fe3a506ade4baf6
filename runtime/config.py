"""Settings read from the environment, for every node: a bad value names the variable and what
it accepts (:class:`~mofa_omni.contract.errors.ConfigError`), never a traceback.

dora passes a node's settings as environment variables (``env:`` in the dataflow,
``--env`` on ``dora start``). Each reader takes ``env`` (default ``os.environ``) so
that nodes' pure parts are tested without touching the process environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from mofa_omni.contract.errors import ConfigError


def env_str(name: str, default: str, env: Mapping[str, str] | None = None) -> str:
    value = (os.environ if env is None else env).get(name, "")
    return value.strip() or default


def env_path(name: str, default: Path, env: Mapping[str, str] | None = None) -> Path:
    """``$name`` as a path. A relative path means relative to where the user ran dora ($PWD),
    not to the dataflow's folder that dora starts nodes in."""
    environ = os.environ if env is None else env
    raw = env_str(name, "", environ)
    if not raw:
        return default
    path = Path(raw).expanduser()
    return path if path.is_absolute() else Path(environ.get("PWD") or os.getcwd()) / path


def env_float(name: str, default: float, env: Mapping[str, str] | None = None, *,
              minimum: float = 0.0) -> float:
    """``$name`` as a number >= ``minimum`` (``default`` when unset or empty)."""
    raw = env_str(name, "", env)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum:g}")
    return value


def env_choice(name: str, default: str, choices: tuple[str, ...],
               env: Mapping[str, str] | None = None) -> str:
    value = env_str(name, default, env).lower()
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: choose one of {', '.join(choices)}")
    return value


def env_pace(name: str, default: str = "realtime", env: Mapping[str, str] | None = None) -> float:
    """How many times faster than real time to send audio: ``realtime`` (1), a factor such
    as ``10``, or ``fast`` (inf: no waiting at all)."""
    raw = env_str(name, default, env).lower()
    if raw in ("realtime", "fast"):
        return 1.0 if raw == "realtime" else float("inf")
    try:
        factor = float(raw)
    except ValueError:
        factor = 0.0
    if not factor > 0:
        raise ConfigError(f"{name}={raw!r}: use realtime, fast, or a speed-up factor like 10")
    return factor


def env_int(name: str, default: int, env: Mapping[str, str] | None = None, *,
            minimum: int = 0) -> int:
    """``$name`` as a whole number >= ``minimum`` (``default`` when unset or empty)."""
    raw = env_str(name, "", env)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum}")
    return value
