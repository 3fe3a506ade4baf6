"""Serving a model node's requests on a worker thread: in order, cancellable, within a deadline.

The node's main thread keeps reading dora events (so a ``cancel`` is seen
while a reply streams) and hands requests to :class:`RequestWorker`, which starts
them in order on its own thread through :class:`~mofa_omni.node.host.ModelHost`
and sends what they produce: one at a time; or, for a task served in batches
(:mod:`mofa_omni.node.batching`), those queued together in one engine call; or, where
the model serves several requests at once (an LLM decoding sequences together), up to
that many alongside, each on a thread of its own; with a scheduler in the graph it also loads,
unloads and switches the model as granted, between two requests, and swaps it
for another when ``omni swap`` asks (see :mod:`mofa_omni.node.swapping`): the new
model's thread takes the queue over between two requests, so none is lost and
the order is kept. Every request ends in results or an explicit error:
``cancelled`` when asked, ``timeout`` past its deadline (queued or running). A request sent
as snapshots (speech recognition while the user speaks, see
:class:`~mofa_omni.contract.tasks.TranscriptionRequest`) is the exception that proves it: a
snapshot still queued when a newer message of its request arrives is skipped, since the newer
one answers for it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import pyarrow as pa

from mofa_omni.contract.errors import ErrorKind
from mofa_omni.models.compute import prepare_compute_thread
from mofa_omni.node import trace
from mofa_omni.node.admission import SchedulerLink
from mofa_omni.node.host import ModelHost, Outgoing
from mofa_omni.node.residency import ModelSlot
from mofa_omni.node.swapping import Swap, failure_reason, swap_warning
from mofa_omni.scheduler.messages import Command

log = logging.getLogger("mofa_omni.node.serving")

CANCEL_INPUT = "cancel"
ASK_AGAIN_S = 5.0  # no answer to a load request this long: ask again (dora may drop a message)
_REMEMBERED_CANCELS = 1024  # a cancelled id also drops requests of that id still to come
# The request ids whose reply ended this recently go in each of the node's reports (every
# MEMORY_REPORT_S), so that a gateway sees each in several, at any request rate: a reply whose
# end dora dropped is then found (mofa_omni.gateway.bridge, TAIL_GRACE_NS). A count would
# not do: at 200 requests/s the last 64 ids cover a third of a second.
ANSWERED_WINDOW_S = 5.0
ANSWERED_MAX = 16384  # at most this many ids kept
# Requests of a task served in batches (mofa_omni.node.batching) queued behind the one about to
# start join it, up to MAX_BATCH; a lone request waits BATCH_WINDOW_S at most for others to
# come (0: it waits for none; measured, a 2 ms window cost a lone 6 ms embedding request 40 %
# of its rate).
MAX_BATCH = 32
BATCH_WINDOW_S = 0.0
MAX_ALONGSIDE = 64  # threads serving requests alongside others (a model's parallel_requests)
_FOLLOWED_REQUESTS = 1024  # requests sent in snapshots whose newest message number is kept


@dataclass
class _Job:
    arrived: float
    deadline: float
    input_id: str
    value: pa.Array
    metadata: dict[str, Any]


def cancelled_ids(value: pa.Array) -> list[str]:
    """The request ids in a ``cancel`` message: a string array (or a struct with ``request_id``)."""
    if pa.types.is_struct(value.type):
        value = value.field("request_id")
    return [str(v) for v in value.to_pylist() if v is not None]


_WAKE = object()  # wakes the worker so that it applies a scheduler command between requests


class RequestWorker:
    """One worker thread that loads the slot's model and serves its requests in order.

    The model is loaded on the thread that runs it: MLX keeps lazily built arrays on
    the stream of the thread that made them. Requests that arrive while it loads wait
    in the queue (and their deadlines run).

    With a :class:`~mofa_omni.node.admission.SchedulerLink` the worker loads only what the
    scheduler grants: it asks at start and again when a request finds the model
    evicted, and applies the scheduler's commands (unload, switch to another variant)
    between two requests, so a switch loses none: requests wait during it.
    """

    def __init__(self, slot: ModelSlot, send: Callable[[Outgoing], None],
                 timeout_s: float = 120.0, link: SchedulerLink | None = None, *,
                 max_batch: int = MAX_BATCH, batch_window_s: float = BATCH_WINDOW_S,
                 parallel: int = 1, load_at_start: bool = True):
        self.slot, self.send, self.timeout_s, self.link = slot, send, timeout_s, link
        # False: the model loads for the first request (a node standing by, e.g. the cascade
        # of dataflows/voice.omni.yml), not when the node starts
        self.load_at_start = load_at_start
        self.max_batch, self.batch_window_s = max_batch, batch_window_s
        # requests served at once at most, where the model serves several (its own number caps
        # it): 1 by default, since a graph's other readers of a token stream must then read it
        # with backpressure (see dataflows/server.yml)
        self.parallel = parallel
        # at most this many, as the scheduler grants memory for them (0: ``parallel``)
        self.granted_parallel = 0
        if link:
            link.parallel = parallel  # what it asks the scheduler for
        self._jobs: queue.Queue[_Job | object | None] = queue.Queue()
        # taken from the queue while gathering a batch but not part of it: served next, in order
        self._held: collections.deque[_Job | object | None] = collections.deque()
        # Requests served alongside others (a model serving several at once), on a pool
        self._flight = threading.Condition()
        self._running = 0
        self._alongside: concurrent.futures.ThreadPoolExecutor | None = None
        self._commands: queue.Queue[Command | Swap] = queue.Queue()  # a Swap: ready to take over
        self._swaps: list[Swap] = []  # under way
        self._ending = False
        self._cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._drained = threading.Event()
        self._queued = 0
        self._answered: collections.deque[tuple[float, str]] = collections.deque(
            maxlen=ANSWERED_MAX)
        # the newest message number of each request sent in snapshots, by request id
        self._newest: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._thread = threading.Thread(target=self._run, name="request-worker", daemon=True)
        self._thread.start()

    @property
    def host(self) -> ModelHost:
        return self.slot.host

    def queue_length(self) -> int:
        """Requests waiting to start."""
        with self._lock:
            return self._queued

    def submit(self, input_id: str, value: pa.Array, metadata: dict[str, Any] | None) -> None:
        request_id = str((metadata or {}).get("request_id", ""))
        with self._lock:
            self._queued += 1
            if request_id and (request_id in self._newest or (
                    not (metadata or {}).get("final", True)
                    and self.host.takes_snapshots(input_id))):
                self._newest[request_id] = int((metadata or {}).get("seq", 0))
                self._newest.move_to_end(request_id)
                while len(self._newest) > _FOLLOWED_REQUESTS:
                    self._newest.popitem(last=False)
        now = time.monotonic()
        self._jobs.put(_Job(now, now + self.timeout_s, input_id, value, dict(metadata or {})))

    def command(self, command: Command) -> None:
        """A scheduler decision for this node: applied before the next request starts."""
        self._commands.put(command)
        self._jobs.put(_WAKE)

    def cancel(self, request_id: str) -> None:
        """Stop ``request_id`` if it runs, and drop it (and later requests of that id) if queued."""
        with self._lock:
            self._cancelled[request_id] = None
            while len(self._cancelled) > _REMEMBERED_CANCELS:
                self._cancelled.popitem(last=False)

    def answered(self) -> list[str]:
        """The request ids whose reply (or error) went out in full within the last
        ANSWERED_WINDOW_S, newest last."""
        since = time.monotonic() - ANSWERED_WINDOW_S
        with self._lock:
            while self._answered and self._answered[0][0] < since:
                self._answered.popleft()
            return [request_id for _, request_id in self._answered]

    def _ended(self, request_id: str) -> None:
        if request_id:
            with self._lock:
                self._answered.append((time.monotonic(), request_id))

    def is_cancelled(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._cancelled

    def drain(self) -> None:
        """Finish everything queued, then unload the model."""
        self._jobs.put(None)
        self._drained.wait()

    def _run(self) -> None:
        prepare_compute_thread()
        if not self.load_at_start:
            if self.link:
                self.link.state = "evicted"  # holds nothing; asks for memory when asked
        elif self.link:
            self.link.ask()
        else:
            self.slot.load()
        self._serve_then_retire()

    def _serve_then_retire(self) -> None:
        """Serve until drained or until a swap takes the queue over; then park this thread."""
        swap = self._serve_queue()
        if swap is None:
            self._ending = True
            for pending in self._swaps:
                pending.turn.set()  # they see _ending and stop
            if self.link:
                self.link.stop()
            self.slot.unload()
            self._drained.set()
        else:
            self._hand_over(swap)
        # Stay parked until the process exits: MLX aborts at exit (std::terminate) when the
        # thread that made a stream and freed arrays on it has ended (measured: 4 runs in 5).
        threading.Event().wait()

    def _serve_queue(self) -> Swap | None:
        """Serve requests in order; returns None once drained, or the swap ready to take over.
        Requests the model serves several at once start in order, up to that many running,
        each on a thread of its own; anything else (another task's request, a scheduler
        command, a swap) waits for them to end."""
        while True:
            if not self._commands.empty():
                self._wait_for_running(0)
            if (swap := self._apply_commands()) is not None:
                return swap
            job = self._held.popleft() if self._held else self._jobs.get()
            if job is None:
                self._wait_for_running(0)
                return None
            if job is _WAKE:
                continue
            with self._lock:
                self._queued -= 1
            if self._superseded(job):
                continue
            if self.link and not self._admitted(job):
                continue
            if not self.link and not self.load_at_start and not self.slot.loaded:
                self.load_at_start = True  # loads once: a failure leaves the node unavailable
                self.slot.load()
            parallel = min(self.host.parallel(job.input_id), self.parallel,
                           self.granted_parallel or self.parallel)
            if parallel > 1:
                self._wait_for_running(parallel - 1)
                self._start_alongside(job)
                continue
            self._wait_for_running(0)
            self._serve(self._gather(job))
            self._idle_if_done()

    def _superseded(self, job: _Job) -> bool:
        """A snapshot that a newer message of its request replaced before it started (see
        RequestHost.takes_snapshots): not worth serving; the newer one answers."""
        if job.metadata.get("final", True):
            return False
        request_id = str(job.metadata.get("request_id", ""))
        with self._lock:
            newest = self._newest.get(request_id, -1)
        if newest <= int(job.metadata.get("seq", 0)):
            return False
        log.debug("%s: snapshot %s skipped, %s came after it", request_id,
                  job.metadata.get("seq"), newest)
        trace.record(self.host.node_id, "superseded", job.input_id, job.metadata)
        return True

    def _wait_for_running(self, at_most: int) -> None:
        """Until at most ``at_most`` requests run alongside."""
        with self._flight:
            while self._running > at_most:
                self._flight.wait()

    def _start_alongside(self, job: _Job) -> None:
        if self._alongside is None:
            self._alongside = concurrent.futures.ThreadPoolExecutor(
                MAX_ALONGSIDE, thread_name_prefix="request", initializer=prepare_compute_thread)
        with self._flight:
            self._running += 1
        self._alongside.submit(self._serve_alongside, job)

    def _serve_alongside(self, job: _Job) -> None:
        try:
            self._serve([job])
        finally:
            with self._flight:
                self._running -= 1
                self._flight.notify_all()
            self._idle_if_done()

    def _idle_if_done(self) -> None:
        with self._flight:
            running = self._running
        if self.link and running == 0 and self.queue_length() == 0:
            self.link.activity(False, self.host.unavailable)

    def _gather(self, job: _Job) -> list[_Job]:
        """``job``, and the requests on the same input queued behind it (or arriving within
        ``batch_window_s``) when that input's task is served in batches; the first other item
        met is served next, so the order is kept."""
        if self.max_batch < 2 or self.host.batch_route(job.input_id) is None:
            return [job]
        batch, until = [job], time.monotonic() + self.batch_window_s
        while len(batch) < self.max_batch:
            try:
                item = self._held.popleft() if self._held else \
                    self._jobs.get(timeout=max(until - time.monotonic(), 0))
            except queue.Empty:
                break
            if not isinstance(item, _Job) or item.input_id != job.input_id:
                self._held.appendleft(item)
                break
            with self._lock:
                self._queued -= 1
            if not self._superseded(item):
                batch.append(item)
        return batch

    def _should_stop(self, job: _Job) -> Callable[[], ErrorKind | None]:
        request_id = str(job.metadata.get("request_id", ""))

        def should_stop() -> ErrorKind | None:
            if request_id and self.is_cancelled(request_id):
                return ErrorKind.CANCELLED
            if time.monotonic() > job.deadline:
                return ErrorKind.TIMEOUT
            return None

        return should_stop

    def _serve(self, jobs: list[_Job]) -> None:
        """Serve one request, or several of a batched task together."""
        if self.link:
            self.link.activity(True, self.host.unavailable)
        for job in jobs:
            trace.record(self.host.node_id, "start", job.input_id, job.metadata, batch=len(jobs))
        try:
            if len(jobs) == 1:
                (job,) = jobs
                outgoing = self.host.handle(job.input_id, job.value, job.metadata,
                                            self._should_stop(job))
            else:
                outgoing = self.host.handle_batch(jobs[0].input_id, [
                    (job.value, job.metadata, self._should_stop(job)) for job in jobs])
            for out in outgoing:
                self.send(out)
        except Exception:  # sending failed (dora gone?): log, keep the thread alive
            log.exception("could not send the replies to %s",
                          ", ".join(str(j.metadata.get("request_id") or j.input_id) for j in jobs))
        for job in jobs:
            self._ended(str(job.metadata.get("request_id", "")))

    def _admitted(self, job: _Job) -> bool:
        """Wait until the scheduler grants the model (asking if needed); False if the job was
        answered with an error instead (refused, or past its deadline)."""
        while not (self.slot.loaded or self.host.unavailable or self.link.detached):
            if not self.link.asked:
                self.link.ask()
            now = time.monotonic()
            ask_again_at = self.link.asked_at + ASK_AGAIN_S
            try:
                command = self._commands.get(timeout=max(min(job.deadline, ask_again_at) - now, 0))
                if isinstance(command, Swap):  # cannot happen: swaps start only when loaded
                    log.error("a swap was ready while no model was loaded: dropped")
                    continue
            except queue.Empty:
                if time.monotonic() < job.deadline:
                    # The grant (or the ask) may have been dropped on the way; asking again is
                    # harmless: the scheduler keeps the first ask's deadline.
                    log.warning("no grant %.0f s after asking for %s: asking again",
                                time.monotonic() - self.link.asked_at, self.slot.wanted.name)
                    self.link.ask()
                    continue
                self._reject(job, ErrorKind.TIMEOUT, "waited for memory to load "
                                             f"{self.slot.wanted.name} until the deadline")
                return False
            if command.action == "refuse":
                self.link.state = "evicted"
                self._reject(job, ErrorKind.UNAVAILABLE, f"the scheduler refused "
                                                 f"{self.slot.wanted.name}: {command.reason}")
                return False
            self._apply(command)
        if not self.slot.loaded and self.link.detached and not self.host.unavailable:
            self._load("load", self.slot.wanted.name)
        return True

    def _apply_commands(self) -> Swap | None:
        while True:
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return None
            if isinstance(item, Swap):
                return item
            self._apply(item)

    def _apply(self, command: Command) -> None:
        reason = f"({command.reason})" if command.reason else ""
        log.info("scheduler: %s", " ".join(filter(None, [command.action, command.model, reason])))
        loaded = self.slot.loaded
        if command.action == "load":  # a grant says how many together (0: as many as asked)
            self.granted_parallel = self.link.together = command.parallel
        elif command.action == "parallel":
            self._serve_together(command.parallel)
        if command.action == "load" and not loaded:
            self._load("loading", command.model)
        elif command.action == "switch" and loaded:
            self._load("switching", command.model)
        elif command.action == "switch" or (command.action == "unload" and not loaded):
            self.link.report("unloaded")  # it holds nothing: tell the scheduler so
        elif command.action == "unload":
            self.slot.unload()
            self._set_state("evicted", "unloaded")
        elif command.action == "wait":
            self.link.state = "waiting"
        elif command.action == "refuse" and not loaded:
            self.link.state = "evicted"  # the next request asks again
        elif command.action == "swap" and loaded:
            swap = Swap(command, self.host.node_id, self.slot.model)
            self._swaps.append(swap)
            threading.Thread(target=self._swap_thread, args=(swap,), name="swap",
                             daemon=True).start()
        elif command.action == "swap":
            self._retarget(command)

    def _serve_together(self, parallel: int) -> None:
        """Serve at most ``parallel`` requests together from now on (the next ones wait), and
        tell the scheduler once those above it have ended: their memory is back (its later
        reports say so too, should dora drop this one)."""
        self.granted_parallel = parallel
        self._wait_for_running(parallel)
        self.link.together = parallel
        self.link.report("parallel")

    # --- swapping (omni swap) -----------------------------------------------------------

    def _retarget(self, command: Command) -> None:
        """A swap while no model is loaded: check the new model's files, and want it; the
        next request loads it."""
        swap = Swap(command, self.host.node_id, self.slot.model)
        try:
            prepared = self.slot.prepare(command.model)
        except Exception as error:
            self._report_swap("unloaded", swap.failed(failure_reason(error)))
            return
        old = self.slot.wanted
        self.slot.install(prepared)
        swap.paused_at = swap.received
        swap.resume([])
        outcome = swap.succeeded(swap_warning(old, prepared.spec))
        self._report_swap("unloaded", msgspec.structs.replace(outcome, mode="not_loaded"))
        if self.link and self.link.asked:  # it waits for memory: for the new model now
            self.link.ask()

    def _swap_thread(self, swap: Swap) -> None:
        """Prepare (and, beside the old model, load) the new model; take the queue over when
        the old thread hands it over; then serve on this thread (the new model's)."""
        prepare_compute_thread()
        try:
            swap.prepared = self.slot.prepare(swap.command.model)
            if swap.command.beside:
                swap.loaded = self.slot.load_prepared(swap.prepared)
        except Exception as error:  # the old model keeps serving: nothing was handed over
            self._swaps.remove(swap)
            if swap.prepared and swap.prepared.adapter.loaded:
                swap.prepared.adapter.unload()
            self.slot.peak_from_now()  # the old model serves on: its peak counts afresh
            self._report_swap("swap_failed", swap.failed(failure_reason(error)))
            threading.Event().wait()  # parked, like every thread that made MLX arrays
        self._commands.put(swap)  # the old thread hands over between two requests
        self._jobs.put(_WAKE)
        swap.turn.wait()
        if self._ending:
            threading.Event().wait()
        old_spec = self.slot.wanted
        if not swap.command.beside:
            try:
                swap.loaded = self.slot.load_prepared(swap.prepared)
            except Exception as error:
                self._restore_after_failed_swap(swap, error)
                self._serve_then_retire()  # the old model serves again from this thread
                return
        self.slot.install(swap.prepared)
        self._swaps.remove(swap)
        swap.resume(self._waiting_since())
        if not swap.command.beside:  # beside: the old thread reports once the old model is gone
            self._report_swap("swapped", swap.succeeded(swap_warning(old_spec, swap.prepared.spec)),
                              swap.loaded)
        log.info("swapped %s for %s (%s) in %.2f s; requests paused %.3f s", swap.old_model,
                 swap.command.model, swap.mode, swap.resumed_at - swap.received,
                 swap.resumed_at - swap.paused_at)
        self._serve_then_retire()

    def _hand_over(self, swap: Swap) -> None:
        """On the old model's thread, between two requests: give the queue to the new one."""
        swap.paused_at = time.monotonic()
        old_adapter, old_spec = self.host.adapter, self.slot.wanted
        if not swap.command.beside:
            if self.link:
                self.link.state = "swapping"
            self.slot.unload()  # its memory goes before the new model loads
        swap.turn.set()
        if swap.command.beside:
            swap.resumed.wait()
            old_adapter.unload()
            self.slot.peak_from_now()  # the peak so far held both models
            self._report_swap("swapped", swap.succeeded(swap_warning(old_spec, swap.prepared.spec)),
                              swap.loaded)

    def _restore_after_failed_swap(self, swap: Swap, error: Exception) -> None:
        why = failure_reason(error)
        log.error("swap to %s failed (%s): loading %s again", swap.command.model, why,
                  swap.old_model)
        outcome = self.slot.load(swap.old_model)
        self._swaps.remove(swap)
        swap.resume(self._waiting_since())
        again = f"; {swap.old_model} serves again" if outcome else \
            f"; {swap.old_model} could not load again either: {self.host.unavailable}"
        self._report_swap("swap_failed", swap.failed(why + again), outcome)

    def _waiting_since(self) -> list[float]:
        with self._jobs.mutex:
            return [job.arrived for job in (*self._held, *self._jobs.queue)
                    if isinstance(job, _Job)]

    def _report_swap(self, event: str, outcome, loaded=None) -> None:
        if outcome.ok:
            log.info("swap %s: %s -> %s", outcome.swap_id, outcome.old_model, outcome.new_model)
        else:
            log.error("swap to %s failed: %s", outcome.new_model, outcome.detail)
        if outcome.warning:
            log.warning("%s", outcome.warning)
        if self.link:
            self.link.state = "ready" if self.slot.loaded else \
                ("unavailable" if self.host.unavailable else self.link.state)
            self.link.report(event, loaded, detail=self.host.unavailable, swap=outcome)

    def _load(self, state: str, model: str) -> None:
        if self.link:
            self.link.state = state
        outcome = self.slot.load(model)
        if self.link:
            self._set_state("ready" if outcome else "unavailable",
                            "loaded" if outcome else "load_failed", outcome)

    def _set_state(self, state: str, event: str, outcome=None) -> None:
        if self.link:
            self.link.state = state
            self.link.report(event, outcome, detail=self.host.unavailable)

    def _reject(self, job: _Job, kind: ErrorKind, message: str) -> None:
        self.send(self.host.reject(job.metadata, kind, message))
        self._ended(str(job.metadata.get("request_id", "")))
