"""Drives tests/dataflows/omni_sound.yml, one request after another: a question as sound only
(text back), a picture and sound to be answered aloud (text, then speech), a long spoken reply
cancelled at its first sound (barge-in), and a voice the model does not have; writes what came
back, told apart by each message's Arrow schema, to $REPORT."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from driving import Driver, record

from mofa_omni.contract import arrow
from mofa_omni.contract.tasks import AudioChunk, ChatMessage, OmniRequest, TextChunk

QUESTION = [ChatMessage("user", "What did you hear?")]


def tone(seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate), dtype=np.float32) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


REQUESTS = {
    "heard": OmniRequest(QUESTION, audio=[tone(1.0)], max_tokens=4),
    "looked": OmniRequest(QUESTION, images=[np.full((48, 64, 3), 90, np.uint8)],
                          audio=[tone(0.5, 44100)], sample_rate=44100, max_tokens=4, speak=True),
    "barged": OmniRequest(QUESTION, audio=[tone(1.0)], max_tokens=64, speak=True),
    "bad_voice": OmniRequest(QUESTION, audio=[tone(1.0)], speak=True, voice="nobody"),
}


def main() -> None:
    driver = Driver(deadline_s=240, resend_after_s=20)
    report = {rid: {"texts": [], "audio_chunks": 0, "text_final": False, "audio_final": False,
                    "order": []} for rid in REQUESTS}
    pending = list(REQUESTS)
    audio_type = arrow.schema_of(AudioChunk)
    for event in driver.inputs():
        rid = event.request_id
        if event.id == "tick" and pending and not driver.waiting():
            name = pending.pop(0)
            driver.send("ask", name, REQUESTS[name])
        elif event.id == "reply":
            seen = report[rid]
            if event.value.type == audio_type:
                chunk = event.decode(AudioChunk)
                seen["audio_chunks"] += 1
                seen["rate"], seen["audio_final"] = chunk.sample_rate, chunk.final
                seen["order"].append("audio")
                if rid == "barged" and seen["audio_chunks"] == 1:
                    driver.node.send_output("cancel", pa.array([rid]))
            else:
                chunk = event.decode(TextChunk)
                seen["texts"].append(chunk.text)
                seen["text_final"] = seen["text_final"] or chunk.final
                seen["order"].append("text")
            if event.metadata.get("final"):
                seen["ended"] = "completed"
                driver.answered(rid)
        elif event.id == "omni_error":
            error = event.error()
            report[error.request_id]["ended"] = f"error: {error.kind}"
            report[error.request_id]["error"] = record(error)["message"]
            driver.answered(error.request_id)
        if not pending and not driver.waiting():
            break
    driver.write(report)


if __name__ == "__main__":
    main()
