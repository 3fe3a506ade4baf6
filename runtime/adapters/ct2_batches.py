"""Static batching on CTranslate2: the chat requests waiting when a batch starts decode together.

CTranslate2's generator has no continuous batching: a ``generate_batch`` call decodes its
prompts to the end, and a request cannot join it midway. :class:`Ct2Batches` runs one such
call at a time on its own thread, with every waiting request that samples the same way (up to
``parallel``); each request's tokens reach its reader through the step callback as they are
decoded. A request that reaches its own ``max_tokens``, or whose reader stopped (cancelled, a
stop sequence), is stopped alone: the callback returns True for its batch index. Requests that
come while a batch decodes wait for the next one, which starts as soon as it ends. A batch
about to start with room to spare waits :data:`GATHER_S` for requests arriving with it (clients
that ask at the same moment reach the engine milliseconds apart): a lone request loses that
much, a burst of them decodes together instead of one, then the rest.

In float32 each greedy reply is the one the request gets alone (tests/test_serving.py compares
them); in int8, CTranslate2 quantizes the activations of a batch together, and prompts of other
lengths beside a request may tip a near tie (the adapter's ``deterministic`` option computes in
float32).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mofa_omni.adapters.engine_thread import END, read_until_end
from mofa_omni.contract.errors import ServerError

log = logging.getLogger("mofa_omni.adapters.ct2_batches")

GATHER_S = 0.005  # how long a batch with room to spare waits for requests arriving with it


class Ct2BatchError(ServerError):
    """A batch failed, or the model unloaded while a request waited or decoded."""


@dataclass(frozen=True)
class Sampling:
    """How a request samples: requests decoded in one batch share it (CTranslate2 takes one
    setting per call)."""

    topk: int = 1  # 1: greedy
    temperature: float = 1.0
    topp: float = 1.0

    def options(self) -> dict[str, Any]:
        return {"sampling_topk": self.topk, "sampling_temperature": self.temperature,
                "sampling_topp": self.topp}


@dataclass(eq=False)
class _Request:
    prompt: list[str]
    sampling: Sampling
    limit: int
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    produced: int = 0
    closed: bool = False  # its reader stopped reading
    done: bool = False  # nothing more goes to ``out``


class Ct2Batches:
    """A CTranslate2 ``Generator`` decoding the waiting requests in batches (see the module)."""

    def __init__(self, generator, end_token: list[str], *, parallel: int, model_name: str):
        self.generator, self.end_token = generator, end_token
        self.parallel, self.model_name = parallel, model_name
        self._work = threading.Condition()
        self._waiting: list[_Request] = []
        self._decoding = 0
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="ct2-batches", daemon=True)
        self._thread.start()

    def tokens(self, prompt: list[str], sampling: Sampling, limit: int) -> Iterator[int]:
        """The token ids generated after ``prompt`` (without the end token), at most ``limit``,
        decoded in the next batch. Closing the iterator stops its decoding."""
        request = _Request(prompt, sampling, limit)
        with self._work:
            if self._closing:
                raise Ct2BatchError(f"model {self.model_name!r} is unloading")
            self._waiting.append(request)
            self._work.notify()
        try:
            yield from read_until_end(request.out)
        finally:
            request.closed = True
            with self._work:  # still waiting for a batch: it never starts
                if request in self._waiting:
                    self._waiting.remove(request)

    def busy(self) -> int:
        """Requests in the batch decoding now."""
        with self._work:
            return self._decoding

    def close(self) -> None:
        """Stop the thread once the batch decoding now ends; waiting requests end in an error."""
        with self._work:
            self._closing = True
            waiting, self._waiting = self._waiting, []
            self._work.notify()
        for request in waiting:
            request.out.put(Ct2BatchError(f"model {self.model_name!r} unloaded"))
        self._thread.join()

    # --- the batches' thread -------------------------------------------------------------

    def _next_batch(self) -> list[_Request] | None:
        """The waiting requests that sample as the first one does, in order, up to
        ``parallel`` (None: closing; empty: those waiting were closed meanwhile)."""
        with self._work:
            while not (self._waiting or self._closing):
                self._work.wait()
            deadline = time.monotonic() + GATHER_S
            while len(self._waiting) < self.parallel and not self._closing and \
                    (left := deadline - time.monotonic()) > 0:
                self._work.wait(left)
            if self._closing or not self._waiting:  # closing, or the one waiting was closed
                return None if self._closing else []
            sampling = self._waiting[0].sampling
            batch = [r for r in self._waiting if r.sampling == sampling][:self.parallel]
            self._waiting = [r for r in self._waiting if r not in batch]
            self._decoding = len(batch)
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            try:
                self._decode(batch)
                error = None
            except Exception as failure:  # noqa: BLE001 -- each request gets it, none hangs
                log.exception("model %r: a batch failed", self.model_name)
                error = Ct2BatchError(f"model {self.model_name!r}: {type(failure).__name__}: "
                                      f"{failure}")
            for request in batch:  # ended by the end token, or failed
                if not request.done:
                    request.done = True
                    request.out.put(error or END)
            with self._work:
                self._decoding = 0

    def _decode(self, batch: list[_Request]) -> None:
        def step(result) -> bool:
            request = batch[result.batch_id]
            if request.done:
                return True
            if request.closed:
                request.done = True
                request.out.put(END)
                return True
            request.out.put(result.token_id)
            request.produced += 1
            if request.produced >= request.limit:
                request.done = True
                request.out.put(END)
                return True  # this request is complete: the others decode on
            return False

        self.generator.generate_batch(
            [r.prompt for r in batch], max_length=max(r.limit for r in batch), beam_size=1,
            end_token=self.end_token, include_prompt_in_result=False, callback=step,
            **batch[0].sampling.options())
