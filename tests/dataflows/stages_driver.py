"""Drives tests/dataflows/stages.yml and writes what came back to $REPORT as JSON."""

from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np
from driving import Driver, record

from mofa_omni.contract.tasks import RerankRequest, RerankResult, Transcript, TranscriptionRequest

DEADLINE_S = float(os.environ.get("DEADLINE_S", "240"))
RESEND_AFTER_S = 20  # dora drops a message now and then: one unanswered this long is sent again
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
    driver = Driver(deadline_s=DEADLINE_S, resend_after_s=RESEND_AFTER_S)
    wavs = sorted(Path(os.environ["SAMPLES"]).glob("*.wav"))
    expected = {"asr_fused": len(wavs) + 1, "asr_split": len(wavs), "rank_fused": len(QUERIES),
                "rank_split": len(QUERIES), "tiny_pool_error": len(wavs) + 1}
    report: dict = {key: {} for key in expected} | {"errors": [], "wavs": [w.name for w in wavs],
                                                    "queries": QUERIES}
    queries = {query for query, _ in QUERIES}

    def all_paths_answered(request_id: str) -> bool:
        """Every stage path reading the request's output has answered it (the too-long audio
        the fused one and the tiny pool: the split path refuses it on its own input). One not
        answered is sent again (its answer may have been dropped)."""
        if request_id == "too-long":
            return all(request_id in report[key] for key in ("asr_fused", "tiny_pool_error"))
        return all(request_id in report[key] for key in expected
                   if (request_id in queries) == key.startswith("rank"))

    for event in driver.inputs():
        request_id = event.request_id
        if event.id == "tick" and not driver.sent:
            for wav in wavs:
                audio, rate = read_wav(wav)
                driver.send("speech", wav.name, TranscriptionRequest(audio, rate))
            long_audio = np.full(31 * 16_000, 0.01, np.float32)
            driver.send("speech", "too-long", TranscriptionRequest(long_audio, 16_000))
            for query, _ in QUERIES:
                driver.send("query", query, RerankRequest(query, DOCUMENTS))
        elif event.is_error:
            error = event.error()
            request_id = error.request_id
            report["errors"].append(record(error, input=event.id))
            if event.id == "tiny_pool_error":
                report[event.id][request_id] = error.kind
            if event.id == "asr_fused_error":
                report["asr_fused"][request_id] = {"error": error.kind}
        elif event.id.startswith("asr_"):
            report[event.id][request_id] = {"text": event.decode(Transcript).text,
                                            "model": event.metadata.get("model")}
        elif event.id.startswith("rank_"):
            report[event.id][request_id] = event.decode(RerankResult).scores.tolist()
        if request_id in driver.sent and all_paths_answered(request_id):
            driver.answered(request_id)
        if all(len(report[key]) >= n for key, n in expected.items()):
            break
    report["resent"] = driver.resent
    report["lost"] = driver.node.gaps.lost()
    report["seconds"] = driver.elapsed()
    driver.write(report)


if __name__ == "__main__":
    main()
