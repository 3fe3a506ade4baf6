"""A model node's side of the scheduler protocol: ask for memory, report what it did and holds."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from mofa_omni.models.memory import peak_resident_bytes, resident_bytes, snapshot
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
# A node idle for less than this is not reported idle (nor busy again when the next request
# comes): a node serving back to back sent two reports per request, each a memory snapshot and
# a dora message (measured: 1.5 ms of a 6 ms embedding request) and a journal line at the
# scheduler. The scheduler counts a node used within its active_seconds as active anyway.
IDLE_REPORT_AFTER_S = 0.05


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
        # requests the worker would serve together (it sets this), and may now (the scheduler's
        # grant: 0 until it limits them)
        self.parallel, self.together = 1, 0
        self.state: NodeState = "starting"
        self.asked_at = 0.0  # when it last asked for memory (time.monotonic)
        self.detached = False  # the scheduler is gone: the node manages its model on its own
        self._stop = threading.Event()
        self._measuring: threading.Thread | None = None
        # What the worker is doing, and what the scheduler was last told (see activity()).
        self._wake = threading.Condition()
        self._busy = self._reported_busy = False
        self._idle_since = 0.0
        self._activity_detail = ""

    @property
    def asked(self) -> bool:
        return self.state in ("waiting", "loading")

    def ask(self) -> None:
        self.state, self.asked_at = "waiting", time.monotonic()
        ladder = [Variant(model, size) for model, size in self.slot.ladder()]
        most, sequence = self.slot.sequences()
        parallel = min(self.parallel, most)
        memory = snapshot()
        self.publish(LoadAsk(self.node_id, ladder, overhead=resident_bytes() + SERVING_HEADROOM,
                             available=memory.system_available_bytes,
                             total=memory.system_total_bytes, parallel=parallel,
                             sequence_bytes=sequence if parallel > 1 else 0))

    def activity(self, busy: bool, detail: str = "") -> None:
        """The worker began serving (``busy``) or has no request left: ``state`` says so at
        once; the "busy" / "idle" report is sent by the reporting thread, off the request's
        path, and an idle spell shorter than :data:`IDLE_REPORT_AFTER_S` is never reported.
        Without the reporting thread (:meth:`start_measuring`) it is reported here."""
        with self._wake:
            self.state = "busy" if busy else "ready"
            self._busy, self._activity_detail = busy, detail
            if not busy:
                self._idle_since = time.monotonic()
            if self._measuring is not None:
                self._wake.notify()
                return
            if busy == self._reported_busy:
                return
            self._reported_busy = busy
        self.report("busy" if busy else "idle", detail=detail)

    def _activity_due(self, now: float) -> str | None:
        """The activity report to send now, if any (the lock held)."""
        if self._busy and not self._reported_busy:
            return "busy"
        if not self._busy and self._reported_busy and now - self._idle_since >= IDLE_REPORT_AFTER_S:
            return "idle"
        return None

    def report(self, event: str, outcome: LoadOutcome | None = None, detail: str = "",
               swap: SwapOutcome | None = None) -> None:
        if event not in ("busy", "idle", "measure"):  # a load, unload or swap: the scheduler
            with self._wake:                           # counts the node idle after it
                self._reported_busy = False
        memory = snapshot()
        serving_peak = peak_resident_bytes() if self.slot.peak_since_load and self.slot.loaded \
            else 0
        self.publish(NodeReport(
            self.node_id, event, self.state, self.slot.model, memory.rss_bytes,
            queue=self.queue_length(),
            model_bytes=outcome.bytes if outcome else 0,
            peak_bytes=outcome.peak if outcome else 0,
            load_seconds=outcome.seconds if outcome else 0.0,
            mlx_active=memory.mlx_active_bytes, mlx_peak=memory.mlx_peak_bytes, detail=detail,
            swap=swap, lost=self.lost(), available=memory.system_available_bytes,
            total=memory.system_total_bytes, delivery=self.delivery(), parallel=self.together,
            peak_rss=serving_peak))

    def start_measuring(self, interval_s: float) -> None:
        """Report resident memory every ``interval_s``, and the worker's activity as it
        changes, from a background thread."""
        self._measuring = threading.Thread(target=self._report_loop, args=(interval_s,),
                                           name="memory-report", daemon=True)
        self._measuring.start()

    def _report_loop(self, interval_s: float) -> None:
        next_measure = time.monotonic() + interval_s
        while True:
            with self._wake:
                while True:
                    if self._stop.is_set():
                        return
                    now = time.monotonic()
                    event = self._activity_due(now)
                    if event or now >= next_measure:
                        break
                    wake_at = next_measure
                    if self._busy != self._reported_busy:  # idle, not for long enough yet
                        wake_at = min(wake_at, self._idle_since + IDLE_REPORT_AFTER_S)
                    self._wake.wait(wake_at - now)
                if event:
                    self._reported_busy = event == "busy"
                detail = self._activity_detail
            try:
                if event:
                    self.report(event, detail=detail)
                else:
                    self.report("measure")
                    next_measure = time.monotonic() + interval_s
            except Exception:  # dora gone while stopping: nothing left to report to
                log.debug("could not report to the scheduler", exc_info=True)
                return

    def stop(self) -> None:
        """Stop reporting; returns once the reporting thread has ended (before dora shuts down)."""
        with self._wake:
            self._stop.set()
            self._wake.notify()
        if self._measuring:
            self._measuring.join()
