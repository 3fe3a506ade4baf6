"""One model swap inside a running node (``omni swap``): its state, timings and outcome.

The node's worker (:mod:`mofa_omni.node.serving`) carries a swap out on a second
thread: it prepares the new model's files and, when the scheduler put it
``beside`` the old one, loads it while the old one keeps serving; then, between
two requests, the old thread hands the queue over. In place, the old model is
unloaded at that point and the new one loads while requests wait. This module
holds what both threads share and turns it into the :class:`SwapOutcome`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from mofa_omni.contract.errors import ContractError, ModelLoadError
from mofa_omni.contract.tasks import Task
from mofa_omni.models.catalog import ModelSpec
from mofa_omni.models.fetching import FetchError
from mofa_omni.node.residency import LoadOutcome, PreparedModel
from mofa_omni.scheduler.messages import Command, SwapOutcome


@dataclass
class Swap:
    """A swap under way: the command, when it came, and what each thread has done so far."""

    command: Command
    node: str
    old_model: str
    received: float = field(default_factory=time.monotonic)
    turn: threading.Event = field(default_factory=threading.Event)  # the old thread handed over
    resumed: threading.Event = field(default_factory=threading.Event)  # the new model serves
    prepared: PreparedModel | None = None
    loaded: LoadOutcome | None = None
    paused_at: float = 0.0  # when the old thread stopped serving
    resumed_at: float = 0.0
    waited: int = 0
    longest_wait: float = 0.0

    @property
    def mode(self) -> str:
        return "beside" if self.command.beside else "in_place"

    def resume(self, waiting_since: Iterable[float]) -> None:
        """The new model serves now; ``waiting_since``: arrival times of the queued requests."""
        self.resumed_at = time.monotonic()
        waits = [self.resumed_at - max(arrived, self.paused_at) for arrived in waiting_since]
        self.waited, self.longest_wait = len(waits), max(waits, default=0.0)
        self.resumed.set()

    def succeeded(self, warning: str = "") -> SwapOutcome:
        return SwapOutcome(
            self.command.swap_id, self.node, True, self.old_model, self.command.model, self.mode,
            load_seconds=round(self.loaded.seconds if self.loaded else 0.0, 4),
            total_seconds=round(self.resumed_at - self.received, 4),
            paused_seconds=round(self.resumed_at - self.paused_at, 4),
            waited=self.waited, longest_wait=round(self.longest_wait, 4),
            detail=self.command.reason, warning=warning)

    def failed(self, why: str) -> SwapOutcome:
        return SwapOutcome(self.command.swap_id, self.node, False, self.old_model,
                           self.command.model, self.mode,
                           total_seconds=round(time.monotonic() - self.received, 4),
                           paused_seconds=round(self.resumed_at - self.paused_at, 4)
                           if self.paused_at and self.resumed_at else 0.0,
                           waited=self.waited, longest_wait=round(self.longest_wait, 4),
                           detail=why)


def swap_warning(old: ModelSpec | None, new: ModelSpec) -> str:
    """What a user must know after this swap, if anything."""
    if old is not None and Task.EMBEDDING in new.tasks and old.name != new.name:
        return (f"embeddings from {new.name} are not comparable with those from {old.name}: "
                f"embed stored documents again")
    return ""


def failure_reason(error: BaseException) -> str:
    """A load failure in words: our own errors already say what is wrong; others get a name."""
    if isinstance(error, (ContractError, ModelLoadError, FetchError)):
        return str(error)
    return f"{type(error).__name__}: {error}"
