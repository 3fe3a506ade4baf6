"""printer: prints every contract message it receives, one timestamped line per message.

Configuration (env in the dataflow YAML):
    TRANSCRIPT   a file to append the same lines to (optional)

Inputs: any number, under any names (e.g. ``heard: asr/result``, ``reply: llm/result``,
``llm_error: llm/error``). The message type is recognised from its Arrow schema:
Transcript, TextChunk streams (joined per request, printed on the final chunk), AudioChunk
streams (their length, on the final chunk), TranscriptionRequest (an utterance), ErrorReport,
and events (GenericResult). Anything else is printed as unrecognised.

A line reads ``12:00:01.234 [input] request_id: ... (+0.42 s)``, the last figure being the
time since the request's origin_ns (its latency so far).
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

from mofa_omni.config import env_str, exit_on_bad_settings
from mofa_omni.contract.errors import ContractError
from mofa_omni.node.host import MessageMeta
from mofa_omni.node.integrity import CheckedNode
from mofa_omni.voice.events import MessageLog


def main() -> int:
    with exit_on_bad_settings("printer"):
        path = env_str("TRANSCRIPT", "")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    transcript = open(path, "a", encoding="utf-8") if path else None
    messages = MessageLog()
    node = CheckedNode()
    while (incoming := node.next()) is not None:
        if incoming["type"] != "INPUT":
            continue
        meta = MessageMeta.from_dora(incoming.get("metadata"), "-")
        try:
            text = messages.describe(incoming["id"], incoming["value"], meta.request_id)
        except ContractError as error:
            text = f"[{incoming['id']}] {meta.request_id}: malformed message: {error}"
        if text is None:
            continue
        now = time.time_ns()
        line = (f"{datetime.fromtimestamp(now / 1e9).strftime('%H:%M:%S.%f')[:-3]} {text}"
                f" ({(now - meta.origin_ns) / 1e9:+.2f} s)")
        print(line, flush=True)
        if transcript is not None:
            transcript.write(line + "\n")
            transcript.flush()
    if transcript is not None:
        transcript.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
