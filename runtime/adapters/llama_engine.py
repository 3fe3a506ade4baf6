"""Continuous batching on llama.cpp: one context decodes the tokens of several requests at once.

A model on two cores decodes ~120 tokens/s for one sequence and ~220 for four together (SmolLM2
135M, measured with this module's batches): a step costs little more for four rows than for one.
:class:`LlamaEngine` owns a llama.cpp context (through llama-cpp-python's C bindings) and a
thread that runs its steps; each request holds a :class:`Slot` (a sequence id of that context),
on which it either generates (:meth:`Slot.tokens`: its tokens are decoded in the shared steps,
joining and leaving between two steps, sampled from its own row of logits) or scores
(:meth:`Slot.logits_after`: structured output, tool calls and reranking read token
probabilities; such a call runs whole between two steps).

Memory: the context's KV cache holds ``pool`` tokens (the catalog's ``context``, what the
scheduler counts for the model), shared by all sequences. A request takes a slot only with
room for its prompt and ``max_tokens``; otherwise it waits for others to end. A slot keeps its
last request's tokens when that ends, so a next request starting the same way (the next turn
of a conversation) decodes only what is new; those kept tokens are dropped, oldest slot first,
when a request needs their room.

Only the engine's thread touches the context: the slots ask it through a queue.

llama.cpp's arithmetic is not the same for a sequence decoded alone and beside others (its
issues #6583, #7052: greedy replies then differ after some tokens, as llama-server's do with
several slots). Measured here on the CPU: with flash attention a prompt's logits moved by up
to 1.0 when another prompt shared its batch; without it, with a float16 KV cache, a decode
step's moved by 0.45; without flash attention and with a float32 KV cache, not at all, in
prefill and decode, as long as each sequence has its own part of the cache (in a shared one,
where its tokens land changes the order of the sums) and its prompt is decoded whole (a start
kept from a previous request, decoded in other chunks, moved a first token's logits by 0.19).
``deterministic`` asks for all of that: a greedy reply is then the same whatever runs beside
it, for ~10 % of the speed per token, twice the KV cache's memory, no reuse of a previous
request's tokens (a request's own calls still reuse each other's), and each request limited
to its sequence's share of the context (``pool`` / ``parallel``). As vLLM's and SGLang's deterministic modes, it is a choice, off by default.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mofa_omni.adapters.engine_thread import END, read_until_end
from mofa_omni.adapters.stepped_engine import SteppedEngine
from mofa_omni.adapters.structured import common_prefix
from mofa_omni.contract.errors import ModelLoadError, ServerError

ADMIT_WAIT_S = 120.0  # a request finding no room for its tokens this long gets an error


class EngineError(ServerError):
    """llama.cpp failed a step, or no room for a request came in time."""


@dataclass(frozen=True, slots=True)
class Sampling:
    """How a sequence picks its next token: greedy at temperature 0, else nucleus sampling."""

    temperature: float = 0.0
    top_p: float = 1.0

    def pick(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        if self.temperature <= 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / self.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if self.top_p < 1.0:
            order = np.argsort(-probs)
            kept = order[:int(np.searchsorted(np.cumsum(probs[order]), self.top_p)) + 1]
            return int(kept[rng.choice(len(kept), p=probs[kept] / probs[kept].sum())])
        return int(rng.choice(len(probs), p=probs))


@dataclass(eq=False)
class _Generation:
    """A sequence being generated: its pending tokens are decoded in the shared steps."""

    slot: Slot
    pending: list[int]  # to decode next: the prompt not yet in the cache, or the last token
    sampling: Sampling
    limit: int  # tokens to produce at most
    stop_tokens: frozenset[int]
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    produced: int = 0
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    closed: bool = False  # its consumer stopped reading (cancelled, or a stop sequence)


class Slot:
    """One sequence of the context, held by one request at a time (see
    :meth:`LlamaEngine.slot`)."""

    def __init__(self, engine: LlamaEngine, seq_id: int):
        self.engine, self.seq_id = engine, seq_id
        self.cached: list[int] = []  # the tokens whose KV this sequence holds, in order
        self.reserved = 0  # tokens of room its request holds (0: idle)
        self.last_used = 0.0

    def tokens(self, prompt: list[int], sampling: Sampling, limit: int,
               stop_tokens: frozenset[int]) -> Iterator[int]:
        """The tokens generated after ``prompt``, decoded with the other slots' in shared steps,
        until one of ``stop_tokens`` (yielded) or ``limit`` tokens. Closing the iterator takes
        the sequence out of the next step."""
        keep = min(common_prefix(self.cached, prompt), len(prompt) - 1)  # the last: for logits
        self.engine.submit(lambda: self.engine.drop_after(self, keep))
        generation = _Generation(self, list(prompt[keep:]), sampling, limit, stop_tokens)
        self.engine.join(generation)
        try:
            yield from read_until_end(generation.out)
        finally:
            generation.closed = True
            self.engine.wake()

    def logits_after(self, tokens: list[int], *, every_position: bool = False,
                     kept: int = 0) -> np.ndarray:
        """Logits after ``tokens``: the last position's (1, vocab), or, with
        ``every_position``, every position's from ``kept`` on (len - kept, vocab). Decodes
        only what differs from what this slot holds, between two shared steps."""
        return self.engine.submit(lambda: self.engine.score(self, tokens, every_position, kept))


class LlamaEngine(SteppedEngine):
    """A llama.cpp context serving ``parallel`` sequences, its KV cache ``pool`` tokens."""

    error = EngineError

    def __init__(self, weights: Path, *, pool: int, parallel: int, threads: int, model: str,
                 deterministic: bool = False):
        import llama_cpp
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # llama.cpp's errors only, as Llama(verbose=False): not every tensor
        super().__init__(model, "llama-engine")
        self.lib = llama_cpp
        self.pool, self.parallel, self.deterministic = pool, parallel, deterministic
        # the most tokens one request may hold: the whole cache, or its sequence's part
        self.request_limit = pool // parallel if deterministic else pool
        llama_cpp.llama_backend_init()
        self._model = llama_cpp.llama_model_load_from_file(
            str(weights).encode(), llama_cpp.llama_model_default_params())
        if not self._model:
            raise ModelLoadError(f"model {model!r}: llama.cpp cannot load {weights} (corrupt, "
                                 "or an architecture this llama.cpp does not know)")
        params = llama_cpp.llama_context_default_params()
        # deterministic: each sequence its own part of the cache (see the module's docstring)
        params.n_ctx, params.n_seq_max, params.kv_unified = pool, parallel, not deterministic
        params.n_batch = params.n_ubatch = min(512, pool)
        params.n_threads = params.n_threads_batch = threads
        if deterministic:  # see the module's docstring
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            params.type_k = params.type_v = llama_cpp.GGML_TYPE_F32
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise ModelLoadError(f"model {model!r}: llama.cpp could not make a context of "
                                 f"{pool} tokens for {parallel} sequences")
        self.n_batch = params.n_batch
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.slots = [Slot(self, seq_id) for seq_id in range(parallel)]
        self._room = threading.Condition()
        self._running: list[_Generation] = []
        self.start()

    # --- requests' side -----------------------------------------------------------------

    @contextlib.contextmanager
    def slot(self, need: int, prompt: list[int]) -> Iterator[Slot]:
        """A slot with room for ``need`` tokens, for the time of one request: the idle one
        holding the longest start of ``prompt`` (the least recently used among equals); other
        idle slots' kept tokens are dropped, oldest first, if the room is needed. Waits for a
        request to end when no slot or no room is free (EngineError after ADMIT_WAIT_S)."""
        if need > self.request_limit:
            raise EngineError(f"model {self.model_name!r}: {need} tokens do not fit the "
                              f"{self.request_limit} one request may hold")
        deadline = time.monotonic() + ADMIT_WAIT_S
        with self._room:
            while (chosen := self._admit(need, prompt)) is None:
                if not self._room.wait(deadline - time.monotonic()):
                    raise EngineError(f"model {self.model_name!r}: no room for {need} tokens "
                                      f"within {ADMIT_WAIT_S:.0f} s (all {self.parallel} "
                                      "sequences busy with others' tokens)")
        try:
            yield chosen
        finally:
            with self._room:
                chosen.reserved, chosen.last_used = 0, time.monotonic()
                self._room.notify_all()

    def busy(self) -> int:
        """Slots held by requests now."""
        with self._room:
            return sum(1 for s in self.slots if s.reserved)

    def _admit(self, need: int, prompt: list[int]) -> Slot | None:
        """The slot for a request of ``need`` tokens, its room reserved, or None (lock held)."""
        idle = [s for s in self.slots if not s.reserved]
        if not idle:
            return None
        chosen = max(idle, key=lambda s: (common_prefix(s.cached, prompt), -s.last_used))
        held = sum(s.reserved for s in self.slots) + sum(
            len(s.cached) for s in idle if s is not chosen)
        for other in sorted((s for s in idle if s is not chosen and s.cached),
                            key=lambda s: s.last_used):
            if held + need <= self.pool:
                break
            held -= len(other.cached)
            self.submit_nowait(lambda other=other: self.drop_after(other, 0))
            other.cached = []
        if held + need > self.pool:
            return None
        chosen.reserved = need
        if self.deterministic and chosen.cached:  # its request starts from nothing, as alone
            self.submit_nowait(lambda: self.drop_after(chosen, 0))
            chosen.cached = []
        return chosen

    def join(self, generation: _Generation) -> None:
        with self._work:
            self._running.append(generation)
            self._work.notify()

    def close(self) -> None:
        """Stop the thread (running sequences end in an error) and free the context."""
        self.stop()
        self.lib.llama_batch_free(self._batch)
        self.lib.llama_free(self._ctx)
        self.lib.llama_model_free(self._model)

    # --- the engine's thread ------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._live())

    def _fail_all(self, error: Exception) -> None:
        with self._work:
            failed, self._running = self._running, []
        for generation in failed:
            generation.out.put(error)
            self.drop_after(generation.slot, 0)

    def _live(self) -> list[_Generation]:
        """The sequences still read (lock held, or on the engine's thread)."""
        self._running = [g for g in self._running if not g.closed]
        return self._running

    def _step(self) -> None:
        """One decode: the next token of each generating sequence, then prompt tokens of those
        joining, up to the batch's size; then each sequence whose last position was decoded
        gets its next token sampled."""
        with self._work:
            running = list(self._live())
        batch, rows = self._batch, []
        batch.n_tokens = 0
        room = self.n_batch
        for generation in sorted(running, key=lambda g: len(g.pending) > 1):  # decoding first
            if room == 0:
                break
            take = generation.pending[:room]
            start = len(generation.slot.cached)
            for i, token in enumerate(take):
                self._add(token, start + i, generation.slot.seq_id,
                          logits=i == len(generation.pending) - 1)
            if len(take) == len(generation.pending):
                rows.append((generation, batch.n_tokens - 1))
            generation.slot.cached.extend(take)
            generation.pending = generation.pending[len(take):]
            room -= len(take)
        if batch.n_tokens == 0:
            return
        if (status := self.lib.llama_decode(self._ctx, batch)) != 0:
            error = EngineError(f"model {self.model_name!r}: llama.cpp failed a step of "
                                f"{batch.n_tokens} tokens (status {status})")
            for generation in running:
                self.drop_after(generation.slot, 0)
                generation.out.put(error)
                generation.closed = True
            return
        for generation, row in rows:
            logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self._ctx, row),
                                           shape=(self.vocab_size,))
            token = generation.sampling.pick(logits, generation.rng)
            generation.produced += 1
            generation.out.put(token)
            if token in generation.stop_tokens or generation.produced >= generation.limit:
                generation.out.put(END)
                generation.closed = True
            else:
                generation.pending = [token]

    def _add(self, token: int, position: int, seq_id: int, *, logits: bool) -> None:
        batch, i = self._batch, self._batch.n_tokens
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
        batch.seq_id[i][0], batch.logits[i] = seq_id, logits
        batch.n_tokens = i + 1

    def drop_after(self, slot: Slot, keep: int) -> None:
        """Drop ``slot``'s cached tokens from position ``keep`` on (engine thread)."""
        self.lib.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1)
        del slot.cached[keep:]

    def score(self, slot: Slot, tokens: list[int], every_position: bool,
              kept: int) -> np.ndarray:
        """See :meth:`Slot.logits_after` (engine thread)."""
        if len(tokens) > self.request_limit:
            raise EngineError(f"model {self.model_name!r}: {len(tokens)} tokens do not fit the "
                              f"{self.request_limit} one request may hold")
        same = common_prefix(slot.cached, tokens)
        keep = min(same, kept) if every_position else min(same, len(tokens) - 1)
        self.drop_after(slot, keep)
        rows = []
        for start in range(keep, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            self._batch.n_tokens = 0
            for i, token in enumerate(chunk):
                last = start + i == len(tokens) - 1
                self._add(token, start + i, slot.seq_id,
                          logits=last or (every_position and start + i >= kept))
            if (status := self.lib.llama_decode(self._ctx, self._batch)) != 0:
                self.drop_after(slot, 0)
                raise EngineError(f"model {self.model_name!r}: llama.cpp failed to decode "
                                  f"{len(chunk)} tokens (status {status})")
            slot.cached.extend(chunk)
            for i in range(len(chunk)):
                if self._batch.logits[i]:
                    rows.append(np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self._ctx, i),
                                                      shape=(self.vocab_size,)).copy())
        return np.stack(rows) if rows else np.zeros((0, self.vocab_size), np.float32)
