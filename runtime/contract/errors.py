"""The project's errors: one root, the caller-mistake / server-state split, and error kinds.

Every error this project raises on purpose derives from :class:`OmniError` and
carries the :class:`ErrorKind` a node answers it with. Two branches say whose
fault it is:

- :class:`ContractError` (also a ``ValueError``): the caller's mistake -- a
  request, a file, a name or a setting that cannot be served as given.
  Answered as ``bad_request`` (HTTP 4xx); retrying the same thing fails again.
- :class:`ServerError` (also a ``RuntimeError``): the server's own state -- a
  model that is not loaded or cannot load, a fetch that failed, a graph that
  cannot be reached. Answered as ``unavailable`` or ``internal`` (HTTP 5xx);
  the same request may succeed later.

An exception that is not an :class:`OmniError` is a bug or a library failing:
nodes answer it as ``internal`` and keep serving.
"""

from __future__ import annotations

import difflib
import enum
from typing import ClassVar


class ErrorKind(enum.StrEnum):
    """What went wrong with a request, as a node reports it (``ErrorReport.kind``)."""

    BAD_REQUEST = "bad_request"  # the request breaks the contract (the caller's mistake)
    TOO_LARGE = "too_large"  # a payload larger than the shared-memory pool or a limit
    UNAVAILABLE = "unavailable"  # the model cannot serve now (not loaded, no memory, broken)
    TIMEOUT = "timeout"  # no answer within the deadline
    CANCELLED = "cancelled"  # the caller (or a barge-in) stopped it
    LOST = "lost"  # dora dropped the request on its way to the node
    INTERNAL = "internal"  # the model or the node failed on this request

    @classmethod
    def parse(cls, text: str) -> ErrorKind:
        try:
            return cls(text)
        except ValueError:
            raise ContractError(unknown_name_message("error kind", text, [k.value for k in cls])) \
                from None

    @property
    def caller_mistake(self) -> bool:
        return self in (ErrorKind.BAD_REQUEST, ErrorKind.TOO_LARGE)


class OmniError(Exception):
    """Root of the errors mofa-omni raises on purpose."""

    kind: ClassVar[ErrorKind] = ErrorKind.INTERNAL


class ContractError(OmniError, ValueError):
    """The caller's mistake: a request, file, name or setting that cannot be served as given."""

    kind = ErrorKind.BAD_REQUEST


class ServerError(OmniError, RuntimeError):
    """The server's own state: the same request may succeed later (or on another machine)."""

    kind = ErrorKind.INTERNAL


# --- the caller's mistakes ----------------------------------------------------------------

class ConfigError(ContractError):
    """A setting (environment variable, catalog entry, option) with a value that cannot be used."""


class AdapterError(ContractError):
    """An adapter that cannot be found, or a model asked for something its adapter cannot do."""


# --- the server's state ---------------------------------------------------------------------

class ModelLoadError(ServerError):
    """Weights that cannot be loaded (missing, corrupt, wrong format)."""

    kind = ErrorKind.UNAVAILABLE


class ModelNotLoaded(ServerError):
    """A request reached an adapter whose model is not (or no longer) loaded."""

    kind = ErrorKind.UNAVAILABLE


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    """``unknown model 'smolm2'; did you mean smollm2-135m? (known: ...)``."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown {kind} {name!r}{hint} (known: {', '.join(sorted(known))})"
