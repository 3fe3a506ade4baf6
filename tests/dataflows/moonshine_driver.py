"""Drives tests/dataflows/moonshine.yml: the WAV at $SPEECH_WAV to transcribe, then two bad
requests; writes the transcript and the errors to $REPORT as JSON."""

from __future__ import annotations

import os

import numpy as np
from driving import Driver, record

from mofa_omni.contract.tasks import Transcript, TranscriptionRequest
from mofa_omni.media.audio import read_wav

DEADLINE_S = 120


def main() -> None:
    audio, rate = read_wav(os.environ["SPEECH_WAV"])
    driver = Driver(deadline_s=DEADLINE_S, resend_after_s=20)
    report: dict = {"heard": {}, "errors": {}}
    for event in driver.inputs():
        if event.id == "tick" and not driver.sent:
            driver.send("hear", "speech", TranscriptionRequest(audio, rate))
            driver.send("hear", "too-short", TranscriptionRequest(np.zeros(800, np.float32), 16000))
            driver.send("hear", "german", TranscriptionRequest(audio, rate, language="de"))
        elif event.id == "asr_lost":  # dora dropped one before a later one: sent again now
            driver.resend_lost(event.metadata, {"speech_recognition": "hear"})
        elif event.id == "transcript":
            transcript = event.decode(Transcript)
            report["heard"][event.request_id] = {"text": transcript.text,
                                                 "language": transcript.language}
            driver.answered(event.request_id)
        elif event.is_error:
            error = event.error()
            report["errors"][error.request_id] = record(error)
            driver.answered(error.request_id)
        if driver.all_answered():
            break
    report["resent"] = driver.resent
    driver.write(report)


if __name__ == "__main__":
    main()
