"""Settings read from the environment, for every node: a bad value names the variable and what
it accepts (:class:`~mofa_omni.contract.errors.ConfigError`), never a traceback.

dora passes a node's settings as environment variables (``env:`` in the dataflow,
``--env`` on ``dora start``). Each reader takes ``env`` (default ``os.environ``) so
that nodes' pure parts are tested without touching the process environment.

A node reads its settings inside :func:`exit_on_bad_settings`, before it joins the graph:
a bad one ends it with one line on stderr and exit code 2.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from mofa_omni.contract.errors import ConfigError, ContractError


@contextmanager
def exit_on_bad_settings(node: str) -> Iterator[None]:
    """Around a node's reading of its settings: a :class:`ConfigError` -- or any other
    :class:`ContractError`, the caller's mistake (an unknown model, a voice input that does not
    exist) -- ends the process with exit code 2 and one line on stderr naming the node, e.g.
    ``vad: THRESHOLD='x' is not a number``, instead of a traceback::

        def main() -> int:
            with exit_on_bad_settings("vad"):
                config = config_from_env()
            node = CheckedNode()  # join the graph only with good settings
    """
    try:
        yield
    except ContractError as error:
        print(f"{node}: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


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


CHECKOUT = Path(__file__).resolve().parents[1]  # this project's folder, when run from one
# The dataflows, their samples and documents: dataflows/ of a checkout; installed, the wheel
# carries them as mofa_omni/dataflows.
PACKAGE = Path(__file__).resolve().parent
SHIPPED_DATAFLOWS = next((folder for folder in (CHECKOUT / "dataflows", PACKAGE / "dataflows")
                          if folder.is_dir()), PACKAGE / "dataflows")


def data_path(path: Path | str) -> Path:
    """A data file a dataflow names: absolute as given; relative, from where dora was started,
    else from this checkout, else from the installed package (so ``dataflows/documents`` works
    from anywhere)."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    if (CHECKOUT / path).exists():
        return CHECKOUT / path
    if path.parts[:1] == ("dataflows",) and (SHIPPED_DATAFLOWS.joinpath(*path.parts[1:])).exists():
        return SHIPPED_DATAFLOWS.joinpath(*path.parts[1:])
    return path


def output_path(path: Path | str) -> Path:
    """Where a dataflow writes what it makes by default: under this checkout when run from one
    (``out/voice`` beside the README), else under the folder dora was started in."""
    path = Path(path)
    if path.is_absolute() or not (CHECKOUT / "pyproject.toml").is_file():
        return path.absolute()
    return CHECKOUT / path


def env_float(name: str, default: float, env: Mapping[str, str] | None = None, *,
              minimum: float = 0.0, maximum: float = math.inf) -> float:
    """``$name`` as a number from ``minimum`` to ``maximum`` (``default`` when unset or empty)."""
    raw = env_str(name, "", env)
    if not raw:
        return default
    try:
        value = float(raw)
        if math.isnan(value):
            raise ValueError(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum:g}")
    if value > maximum:
        raise ConfigError(f"{name}={raw!r} must be at most {maximum:g}")
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


MAX_PORT = 65535


def listen_address(default_port: int, env: Mapping[str, str] | None = None) -> tuple[str, int]:
    """Where a node's server listens: ``$HOST`` and ``$PORT`` (default: loopback, on
    ``default_port``)."""
    port = env_int("PORT", default_port, env)
    if port > MAX_PORT:
        raise ConfigError(f"PORT={port} must be at most {MAX_PORT}")
    return env_str("HOST", "127.0.0.1", env), port


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
