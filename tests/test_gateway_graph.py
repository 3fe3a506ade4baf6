"""The gateway's request bookkeeping without HTTP or dora: a request dora dropped on its way
to the model node is sent again when the node reports the gap, and answered."""

from __future__ import annotations

import asyncio

import numpy as np

from mofa_omni.contract import arrow
from mofa_omni.contract.tasks import EmbeddingRequest, Embeddings, Task
from mofa_omni.gateway.bridge import Graph, Replies, Reply
from mofa_omni.gateway.routes import Choice, Route, Router
from mofa_omni.gateway.settings import Settings

ROUTE = Route("embedder", "embed", "request", Task.EMBEDDING, "minilm-l6")


def test_a_dropped_request_is_sent_again_and_answered(catalog):
    sent: list[tuple[str, str, int]] = []

    def send(output, value, metadata) -> int:
        sent.append((output, metadata["request_id"], len(sent)))
        return len(sent) - 1  # the stream_seq of this output's message

    replies = Replies()
    graph = Graph(Router([ROUTE], catalog), replies, send, Settings(deadline_s=5))

    async def scenario():
        replies.loop = asyncio.get_running_loop()
        answer = graph.ask(Choice(ROUTE), EmbeddingRequest(["hello"]), Embeddings)

        async def results():
            return [result async for result in answer]

        waiting = asyncio.ensure_future(results())
        await asyncio.sleep(0.01)
        assert sent == [("embed", "gw-1", 0)]
        graph.resend_lost("embedder", "request", 0, 0)  # the node saw stream_seq 0 missing
        graph.resend_lost("embedder", "request", 0, 0)  # told twice: sent again once
        assert sent == [("embed", "gw-1", 0), ("embed", "gw-1", 1)] and graph.resent == 1
        vectors = Embeddings(np.ones((1, 3), np.float32))
        replies.deliver("gw-1", Reply("result", arrow.encode(vectors), {"request_id": "gw-1"}))
        [result] = await asyncio.wait_for(waiting, 2)
        assert result.vectors.shape == (1, 3)
        assert replies.in_flight == 0 and graph.resent == 1
        graph.resend_lost("embedder", "request", 1, 1)  # answered: nothing left to send again
        assert len(sent) == 2

    asyncio.run(scenario())
