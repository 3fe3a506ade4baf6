"""The thread of an engine that decodes several requests in shared steps (continuous batching).

Only this thread touches the model: it runs the engine's steps while sequences are live and,
between two steps, the jobs handed to it (a sequence joining or leaving, token scoring). A
subclass (:class:`~mofa_omni.adapters.llama_engine.LlamaEngine`,
:class:`~mofa_omni.adapters.mlx_engine.MlxEngine`) says whether there is a step to run, runs
one, and ends every live sequence in an error when a step fails or the model unloads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, ClassVar

from mofa_omni.contract.errors import ServerError

log = logging.getLogger("mofa_omni.adapters.stepped_engine")


class SteppedEngine:
    """Steps while there is work, jobs between two steps, all on one thread (see the module).
    A subclass sets itself up, then calls :meth:`start`; its :meth:`close` calls
    :meth:`stop` before freeing what the thread used."""

    error: ClassVar[type[ServerError]] = ServerError  # what a request gets when a step fails

    def __init__(self, model_name: str, thread_name: str):
        self.model_name = model_name
        self._work = threading.Condition()
        self._jobs: list[tuple[Callable[[], Any], Future]] = []
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Callable[[], Any]) -> Any:
        """Run ``job`` on the engine's thread between two steps; its result (or exception)."""
        return self.submit_nowait(job).result()

    def submit_nowait(self, job: Callable[[], Any]) -> Future:
        future: Future = Future()
        with self._work:
            if self._closing:
                raise self.error(f"model {self.model_name!r} is unloading")
            self._jobs.append((job, future))
            self._work.notify()
        return future

    def wake(self) -> None:
        """Have the thread look again whether it has work (a sequence joined or was closed)."""
        with self._work:
            self._work.notify()

    def stop(self) -> None:
        """End the thread: the live sequences end in an error."""
        with self._work:
            self._closing = True
            self._work.notify()
        self._thread.join()

    # --- what a subclass supplies (called on the engine's thread) ------------------------

    def _has_work(self) -> bool:
        """Whether a step is to run (under the lock: sequences are live)."""
        raise NotImplementedError

    def _step(self) -> None:
        raise NotImplementedError

    def _fail_all(self, error: Exception) -> None:
        """End every live sequence with ``error``."""
        raise NotImplementedError

    # --- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._work:
                while not (self._jobs or self._has_work() or self._closing):
                    self._work.wait()
                jobs, self._jobs = self._jobs, []
                closing = self._closing
            for job, future in jobs:
                try:
                    future.set_result(job())
                except BaseException as error:  # noqa: BLE001 -- the caller gets it
                    future.set_exception(error)
            if closing:
                self._fail_all(self.error(f"model {self.model_name!r} unloaded"))
                return
            with self._work:
                stepping = self._has_work()
            if stepping:
                try:
                    self._step()
                except Exception as error:  # noqa: BLE001 -- each request gets it, none hangs
                    log.exception("model %r: a step failed", self.model_name)
                    self._fail_all(self.error(
                        f"model {self.model_name!r}: {type(error).__name__}: {error}"))
