"""Continuous batching on MLX: mlx-lm's ``BatchGenerator`` decodes several requests at once.

:class:`MlxEngine` owns the generator and a thread that runs its steps
(:mod:`mofa_omni.adapters.stepped_engine`). A request's tokens
(:meth:`MlxEngine.tokens`) join the batch between two steps and leave it when they end, are
closed (cancelled, a stop sequence) or fail; each streams its own tokens through a queue,
sampled as it asked. Token scoring (structured output, tool calls, reranking) runs whole on the
same thread between two steps (:meth:`MlxEngine.submit`), so only that thread touches the model.

``parallel`` bounds the sequences decoded together (the generator's completion batch); more
wait in its queue and join as others leave. mlx-lm grows each sequence's KV cache as it
decodes, so the memory of a batch grows with the sequences in it, unlike llama.cpp's pool.

Batching need not change a reply: on the CPU, five greedy requests (and a structured one)
decoded together, joining at whatever step they came, each got the reply stream_generate gives
it alone (tests/test_serving.py). mlx-lm does not promise it as a rule (prompts left-padded to
one length, matrix products over several rows), as llama.cpp does not (see
mofa_omni.adapters.llama_engine). ``parallel = 1`` serves one request at a time through
mlx-lm's ``stream_generate`` instead.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator
from dataclasses import dataclass, field

from mofa_omni.adapters.engine_thread import END, read_until_end
from mofa_omni.adapters.stepped_engine import SteppedEngine
from mofa_omni.contract.errors import ServerError

log = logging.getLogger("mofa_omni.adapters.mlx_engine")


class MlxEngineError(ServerError):
    """A batch step failed, or the model unloaded while a request was decoding."""


@dataclass(eq=False)
class _Sequence:
    """A request's sequence in the batch: its tokens go to ``out`` as they are sampled."""

    uid: int = -1  # the generator's id for it, once inserted
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    closed: bool = False  # its reader stopped reading: leave the batch at the next step


class MlxEngine(SteppedEngine):
    """An mlx-lm model decoding up to ``parallel`` requests together (see the module)."""

    error = MlxEngineError

    def __init__(self, model, eos_token_ids: list[int], *, parallel: int, model_name: str):
        from mlx_lm.generate import BatchGenerator

        super().__init__(model_name, "mlx-engine")
        self.parallel = parallel
        self._generator = BatchGenerator(
            model, stop_tokens=[[token] for token in eos_token_ids],
            completion_batch_size=parallel, prefill_batch_size=parallel)
        self._live: dict[int, _Sequence] = {}  # uid -> sequence (engine thread only)
        self._reading = 0  # requests reading their tokens now (under _work)
        self.start()

    # --- requests' side -----------------------------------------------------------------

    def tokens(self, prompt: list[int], sampler, limit: int) -> Iterator[int]:
        """The tokens generated after ``prompt`` (EOS included, as the last) until ``limit``
        tokens, decoded in shared steps. Closing the iterator takes the sequence out of the
        batch at the next step."""
        sequence = _Sequence()

        def insert() -> None:
            (sequence.uid,) = self._generator.insert([prompt], max_tokens=[limit],
                                                     samplers=[sampler])
            self._live[sequence.uid] = sequence

        self.submit(insert)
        with self._work:
            self._reading += 1
        try:
            yield from read_until_end(sequence.out)
        finally:
            sequence.closed = True
            with self._work:
                self._reading -= 1
                self._work.notify()

    def busy(self) -> int:
        """Requests reading their tokens now (in the batch, or waiting to join it)."""
        with self._work:
            return self._reading

    def close(self) -> None:
        """Stop the thread (sequences still decoding end in an error)."""
        self.stop()
        self._generator.close()

    # --- the engine's thread ------------------------------------------------------------

    def _has_work(self) -> bool:
        self._leave([s for s in self._live.values() if s.closed])
        return bool(self._live)

    def _step(self) -> None:
        """One step of the generator: a token for each decoding sequence (prompts of those
        joining are processed alongside); each goes to its sequence's reader."""
        _, responses = self._generator.next()
        for response in responses:
            sequence = self._live.get(response.uid)
            if sequence is None:
                continue
            sequence.out.put(response.token)
            if response.finish_reason is not None:  # mlx-lm has taken it out of the batch
                sequence.out.put(END)
                del self._live[response.uid]

    def _leave(self, sequences: list[_Sequence]) -> None:
        if sequences:
            self._generator.remove([s.uid for s in sequences])
            for sequence in sequences:
                del self._live[sequence.uid]

    def _fail_all(self, error: Exception) -> None:
        failed = list(self._live.values())
        try:
            self._leave(failed)
        except Exception:  # noqa: BLE001 -- the generator's own state is what failed
            log.exception("could not take the failed sequences out of the batch")
            self._live.clear()
        for sequence in failed:
            sequence.out.put(error)
