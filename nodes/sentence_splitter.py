"""sentence_splitter: turns an LLM's streamed reply into one TTS request per sentence.

Configuration (env in the dataflow YAML):
    MAX_CHARS   longest piece before a run-on sentence is cut at a comma (default 240)
    FIRST_CLAUSE_CHARS  the reply's first piece ends at its first comma, semicolon, colon or
                dash at least this many characters in, so the voice starts before the first
                sentence is written; later pieces are sentences (default 16; 0: sentences only)
    VOICE       voice name passed on to the TTS (default: the model's own)
    SPEED       speaking rate (default 1.0)

Inputs:
    text     TextChunk stream (an LLM node's `result`), one stream per request_id
    cancel   request ids whose pending text is dropped (barge-in)
Outputs:
    speech   SpeechRequest per sentence (the first may be a clause), with the reply's
             request_id; seq counts the pieces and only the reply's last one is `final`, so
             the TTS's audio for the whole reply forms one stream.
"""

from __future__ import annotations

import time

from mofa_omni.config import env_float, env_int, env_str, exit_on_bad_settings
from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import SpeechRequest, TextChunk
from mofa_omni.media.text import SentenceStream
from mofa_omni.node import trace
from mofa_omni.node.host import MessageMeta, dora_node_id
from mofa_omni.node.integrity import CheckedNode
from mofa_omni.node.serving import CANCEL_INPUT, cancelled_ids


def main() -> None:
    with exit_on_bad_settings("sentence_splitter"):  # fail fast, before joining the graph
        max_chars = env_int("MAX_CHARS", 240, minimum=1)
        first_clause_chars = env_int("FIRST_CLAUSE_CHARS", 16, minimum=0)
        voice, speed = env_str("VOICE", ""), env_float("SPEED", 1.0)
    node = CheckedNode()
    node_id = dora_node_id("splitter")
    streams: dict[str, SentenceStream] = {}
    sent: dict[str, int] = {}
    cancelled: set[str] = set()

    def send(meta: MessageMeta, sentence: str, final: bool) -> None:
        seq = sent.get(meta.request_id, 0)
        sent[meta.request_id] = seq + 1
        out = MessageMeta(meta.request_id, seq, final, meta.origin_ns, time.time_ns())
        node.send_output("speech", arrow.encode(SpeechRequest(sentence, voice, speed)),
                         out.to_dora())
        trace.record(node_id, "send", "speech", out, chars=len(sentence))

    for event in node:
        if event["type"] != "INPUT":
            continue
        if event["id"] == CANCEL_INPUT:
            for request_id in cancelled_ids(event["value"]):
                cancelled.add(request_id)
                streams.pop(request_id, None)
            continue
        meta = MessageMeta.from_dora(event.get("metadata"), "reply")
        trace.record(node_id, "recv", event["id"], event.get("metadata"))
        if meta.request_id in cancelled:
            continue
        try:
            chunk = arrow.decode(event["value"], TextChunk)
        except ContractError as error:
            node.log_error(f"request {meta.request_id}: {error}")
            continue
        stream = streams.setdefault(meta.request_id, SentenceStream(max_chars, first_clause_chars))
        for sentence in stream.feed(chunk.text):
            send(meta, sentence, False)
        if chunk.final:
            rest = streams.pop(meta.request_id).flush()
            for i, sentence in enumerate(rest):
                send(meta, sentence, i == len(rest) - 1)
            sent.pop(meta.request_id, None)


if __name__ == "__main__":
    main()
