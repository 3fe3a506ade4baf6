"""A model's own thread, for an engine that reports progress through a callback.

A streamed task is a generator the node's worker thread pulls results from, and checks
between them whether to stop. An engine call that runs for minutes and only calls back
(mlx-gen's video pipeline) cannot yield from inside its callback; so it runs on the model's
own thread, which hands its progress and results to the generator through a queue, and
stops at the next callback once the generator is closed (a cancel, a deadline).

The thread loads the model too (MLX ties arrays to the stream of the thread that built
them) and lives as long as the process: a thread that made MLX arrays must not end before
the process does (MLX aborts at exit otherwise).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

from mofa_omni.contract.errors import ErrorKind, OmniError
from mofa_omni.models.compute import prepare_compute_thread

T = TypeVar("T")
END = object()  # the last item an engine's thread hands a reader: nothing more comes


def read_until_end(items: queue.Queue | queue.SimpleQueue) -> Iterator[Any]:
    """The items an engine's thread puts in ``items`` for one reader, as they come, until
    :data:`END`; an exception put there instead is raised here, in the reader."""
    while (item := items.get()) is not END:
        if isinstance(item, BaseException):
            raise item
        yield item


class Stopped(OmniError):
    """Raised inside the engine's callback once the caller stopped reading: ends the run (the
    caller has already answered the request as cancelled or timed out)."""

    kind = ErrorKind.CANCELLED


class EngineThread:
    """One daemon thread that runs the calls given to it in order."""

    def __init__(self, name: str):
        self._calls: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        prepare_compute_thread()
        while True:
            call, future = self._calls.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as error:  # handed to the caller, the thread goes on
                future.set_exception(error)

    def call(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the thread and return what it returns (or raise what it raises)."""
        future: Future = Future()
        self._calls.put((function, future))
        return future.result()

    def stream(self, work: Callable[[Callable[[Any], None], threading.Event], None]
               ) -> Iterator[Any]:
        """Run ``work(emit, stop)`` on the thread and yield what it emits, as it emits it.

        ``work`` calls ``emit(item)`` for each result and should check ``stop`` (or call
        ``emit``, which raises :class:`Stopped` once ``stop`` is set) often. When the consumer
        closes the generator, ``stop`` is set and the generator waits for ``work`` to end, so
        that the next call finds the model idle and its memory given back."""
        items: queue.Queue[Any] = queue.Queue()
        stop = threading.Event()

        def emit(item: Any) -> None:
            if stop.is_set():
                raise Stopped
            items.put(item)

        def run() -> None:
            try:
                work(emit, stop)
            except Stopped:
                pass
            except BaseException as error:
                items.put(error)
                return
            items.put(END)

        future: Future = Future()
        self._calls.put((run, future))
        try:
            yield from read_until_end(items)
        finally:
            stop.set()
            future.result()
