"""A model node's side of the scheduler protocol: ask for memory, report what it did and holds."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from mofa_omni.models.memory import resident_bytes, snapshot
from mofa_omni.node.residency import LoadOutcome, ModelSlot
from mofa_omni.scheduler.messages import (
    ControlMessage,
    Delivery,
    LoadAsk,
    NodeReport,
    NodeState,
    SwapOutcome,
    Variant,
)

log = logging.getLogger("mofa_omni.node.admission")

# What a model process in a graph comes to hold besides its model and libraries once it serves:
# dora's shared-memory buffers of the inputs it reads, the requests being decoded. Measured on
# tests/dataflows/scheduled.yml: 25-105 MiB per node. Counted with the process's memory until
# the node's first report after loading replaces it with what it really holds.
SERVING_HEADROOM = 96 << 20


class SchedulerLink:
    """Sends a node's :class:`LoadAsk` and :class:`NodeReport` messages through ``publish``.

    ``state`` is what ``omni status`` shows for the node. ``queue_length`` tells
    how many requests wait, ``lost`` how many messages went missing on each input
    (see :mod:`mofa_omni.node.integrity`), and ``delivery`` what arrived and was answered,
    for the reports.
    """

    def __init__(self, node_id: str, slot: ModelSlot, publish: Callable[[ControlMessage], None],
                 queue_length: Callable[[], int] = lambda: 0,
                 lost: Callable[[], dict[str, int]] = dict,
                 delivery: Callable[[], Delivery] = Delivery):
        self.node_id, self.slot, self.publish, self.queue_length = node_id, slot, publish, queue_length
        self.lost = lost  # messages dora dropped before they reached this node, by input
        self.delivery = delivery
        self.state: NodeState = "starting"
        self.asked_at = 0.0  # when it last asked for memory (time.monotonic)
        self.detached = False  # the scheduler is gone: the node manages its model on its own
        self._stop = threading.Event()
        self._measuring: threading.Thread | None = None

    @property
    def asked(self) -> bool:
        return self.state in ("waiting", "loading")

    def ask(self) -> None:
        self.state, self.asked_at = "waiting", time.monotonic()
        ladder = [Variant(model, size) for model, size in self.slot.ladder()]
        memory = snapshot()
        self.publish(LoadAsk(self.node_id, ladder, overhead=resident_bytes() + SERVING_HEADROOM,
                             available=memory.system_available_bytes,
                             total=memory.system_total_bytes))

    def report(self, event: str, outcome: LoadOutcome | None = None, detail: str = "",
               swap: SwapOutcome | None = None) -> None:
        memory = snapshot()
        self.publish(NodeReport(
            self.node_id, event, self.state, self.slot.model, memory.rss_bytes,
            queue=self.queue_length(),
            model_bytes=outcome.bytes if outcome else 0,
            peak_bytes=outcome.peak if outcome else 0,
            load_seconds=outcome.seconds if outcome else 0.0,
            mlx_active=memory.mlx_active_bytes, mlx_peak=memory.mlx_peak_bytes, detail=detail,
            swap=swap, lost=self.lost(), available=memory.system_available_bytes,
            total=memory.system_total_bytes, delivery=self.delivery()))

    def start_measuring(self, interval_s: float) -> None:
        """Report resident memory every ``interval_s`` from a background thread."""
        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.report("measure")
                except Exception:  # dora gone while stopping: nothing left to report to
                    log.debug("could not report memory", exc_info=True)
                    return

        self._measuring = threading.Thread(target=loop, name="memory-report", daemon=True)
        self._measuring.start()

    def stop(self) -> None:
        """Stop reporting; returns once the reporting thread has ended (before dora shuts down)."""
        self._stop.set()
        if self._measuring:
            self._measuring.join()
