"""Drives tests/dataflows/stages.yml and writes what came back to $REPORT as JSON."""

from __future__ import annotations

import json
import os
import time
import wave
from pathlib import Path

import numpy as np
from resending import Outbox

from mofa_omni.contract import arrow
from mofa_omni.contract.tasks import (
    ErrorReport,
    RerankRequest,
    RerankResult,
    Transcript,
    TranscriptionRequest,
)
from mofa_omni.node.integrity import CheckedNode

DEADLINE_S = float(os.environ.get("DEADLINE_S", "240"))
RESEND_AFTER_S = 60  # dora drops a message now and then: one unanswered this long is sent again
QUERIES = [("What is the capital of France?", 1), ("When does the train leave?", 2),
           ("Which fruit is yellow?", 0)]
DOCUMENTS = ["Bananas are yellow and rich in potassium.",
             "Paris is the capital and largest city of France.",
             "The next train to the airport leaves at noon."]


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        samples = np.frombuffer(w.readframes(w.getnframes()), np.int16)
        return (samples / 32768).astype(np.float32), w.getframerate()


def main() -> None:
    node = CheckedNode()
    wavs = sorted(Path(os.environ["SAMPLES"]).glob("*.wav"))
    expected = {"asr_fused": len(wavs) + 1, "asr_split": len(wavs), "rank_fused": len(QUERIES),
                "rank_split": len(QUERIES), "tiny_pool_error": len(wavs) + 1}
    report: dict = {key: {} for key in expected} | {"errors": [], "wavs": [w.name for w in wavs],
                                                    "queries": QUERIES}
    started, sent = time.monotonic(), False
    outbox = Outbox(node, after_s=RESEND_AFTER_S)
    outputs: dict[str, str] = {}  # request id -> the output it went out on

    def send(output: str, request_id: str, message) -> None:
        outputs[request_id] = output
        outbox.send(output, request_id, message)

    def answered(request_id: str) -> bool:
        """Every stage path reading the request's output has answered it (the too-long audio
        only the fused one: the others refuse it on their own inputs)."""
        if request_id == "too-long":
            return request_id in report["asr_fused"]
        return all(request_id in report[key] for key in expected
                   if (outputs[request_id] == "query") == key.startswith("rank"))

    for event in node:
        if event["type"] != "INPUT":
            continue
        if time.monotonic() - started > DEADLINE_S:
            report["timeout"] = True
            break
        kind, value, meta = event["id"], event["value"], event.get("metadata") or {}
        if kind == "tick" and not sent:
            sent = True
            for wav in wavs:
                audio, rate = read_wav(wav)
                send("speech", wav.name, arrow.encode(TranscriptionRequest(audio, rate)))
            long_audio = np.full(31 * 16_000, 0.01, np.float32)
            send("speech", "too-long", arrow.encode(TranscriptionRequest(long_audio, 16_000)))
            for query, _ in QUERIES:
                send("query", query, arrow.encode(RerankRequest(query, DOCUMENTS)))
        elif kind == "tick":
            for request_id in outputs:
                if answered(request_id):
                    outbox.answered(request_id)
            outbox.resend_stale()
        elif kind.startswith("asr_"):
            text = arrow.decode(value, Transcript).text if not kind.endswith("error") else None
            if text is not None:
                report[kind][meta["request_id"]] = {"text": text, "model": meta.get("model")}
        elif kind.startswith("rank_") and not kind.endswith("error"):
            report[kind][meta["request_id"]] = arrow.decode(value, RerankResult).scores.tolist()
        if kind.endswith("error"):
            error = arrow.decode(value, ErrorReport)
            report["errors"].append({"input": kind, "request_id": error.request_id,
                                     "kind": error.kind, "message": error.message,
                                     "node": error.node})
            if kind == "tiny_pool_error":
                report[kind][error.request_id] = error.kind
            if kind == "asr_fused_error":
                report["asr_fused"][error.request_id] = {"error": error.kind}
        if all(len(report[key]) >= n for key, n in expected.items()):
            break
    report["resent"] = outbox.resent
    report["lost"] = node.gaps.lost()
    report["seconds"] = time.monotonic() - started
    Path(os.environ["REPORT"]).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
