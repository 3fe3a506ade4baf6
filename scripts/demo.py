"""The demo: a spoken question goes through speech recognition, the LLM and speech synthesis.

Every stage is a default catalog model run through its adapter:
Piper speaks the question, whisper transcribes it, SmolLM2 answers, Piper speaks
the answer, and MiniLM checks the answer is about the question. The WAVs land in
out/ (or $DEMO_OUTPUT).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from mofa_omni.platform import ensure_fast_blas

ensure_fast_blas()

import numpy as np  # noqa: E402

from mofa_omni.audio import write_wav  # noqa: E402
from mofa_omni.contract import (  # noqa: E402
    ChatMessage,
    ChatRequest,
    EmbeddingRequest,
    SpeechRequest,
    Task,
    TranscriptionRequest,
)
from mofa_omni.loading import open_model  # noqa: E402
from mofa_omni.store import tqdm_progress  # noqa: E402

QUESTION = os.environ.get("DEMO_QUESTION", "What is the capital of France?")


def speak(tts, text: str) -> tuple[np.ndarray, int]:
    chunks = list(tts.synthesize(SpeechRequest(text)))
    return np.concatenate([c.audio for c in chunks]), chunks[0].sample_rate


def main() -> int:
    out = Path(os.environ.get("DEMO_OUTPUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    models = {task: open_model(task=task, progress=tqdm_progress())
              for task in (Task.SPEECH_SYNTHESIS, Task.SPEECH_RECOGNITION, Task.TEXT_GENERATION,
                           Task.EMBEDDING)}
    tts, asr = models[Task.SPEECH_SYNTHESIS], models[Task.SPEECH_RECOGNITION]
    llm, embedder = models[Task.TEXT_GENERATION], models[Task.EMBEDDING]
    for adapter in models.values():
        print(f"loaded {adapter.spec.name:16} ({adapter.backend}) in {adapter.load_seconds:.2f} s")

    started = time.perf_counter()
    audio, rate = speak(tts, QUESTION)
    write_wav(out / "question.wav", audio, rate)
    print(f"\n[tts  {time.perf_counter() - started:5.2f} s] question.wav ({len(audio) / rate:.1f} s)")

    mark = time.perf_counter()
    heard = asr.transcribe(TranscriptionRequest(audio, rate)).text.strip()
    print(f"[asr  {time.perf_counter() - mark:5.2f} s] heard: {heard}")

    mark = time.perf_counter()
    request = ChatRequest([ChatMessage("system", "Answer in one short sentence."),
                           ChatMessage("user", heard)], max_tokens=64)
    print("[llm        ] answer: ", end="", flush=True)
    answer = ""
    for chunk in llm.generate(request):
        print(chunk.text, end="", flush=True)
        answer += chunk.text
    print(f"\n[llm  {time.perf_counter() - mark:5.2f} s]")

    mark = time.perf_counter()
    reply, rate = speak(tts, answer)
    write_wav(out / "answer.wav", reply, rate)
    print(f"[tts  {time.perf_counter() - mark:5.2f} s] answer.wav ({len(reply) / rate:.1f} s)")

    vectors = embedder.embed(EmbeddingRequest([QUESTION, answer])).vectors
    print(f"[emb       ] question/answer similarity {float(vectors[0] @ vectors[1]):.2f}")
    print(f"\nturn: {time.perf_counter() - started:.1f} s; WAVs in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
