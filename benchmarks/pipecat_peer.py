"""Pipecat, the voice framework people pick, answering the same spoken questions: the peer of
benchmarks/voice_latency.py (which starts this script; it can also run alone).

    python benchmarks/pipecat_peer.py --wavs DIR --llm-url URL --whisper DIR --piper FILE.onnx
                                      [--silence-ms 600] [--max-tokens N] [--system-prompt TEXT]
                                      --json FILE

The pipeline is Pipecat's own, with the same models as the graph: its Silero VAD
(``VADProcessor``), faster-whisper (``WhisperSTTService``) on the same CTranslate2 whisper
folder, an OpenAI-compatible LLM service (``OpenAILLMService``) pointed at llama-cpp-python's
own server on the same GGUF, and Piper (``PiperTTSService``) on the same voice file. The turn
ends, as in the graph, once the user has been silent for ``--silence-ms``: Pipecat's VAD
stops after its ``stop_secs`` (0.2 s) and its speech-timeout turn strategy waits for the rest.

The WAVs are played in name order, in real time (20 ms frames), each followed by silence; the
next one starts once the reply would have been played (as the graph's source waits for each
reply). Taps between the stages stamp when the frames pass, and per turn the JSON has, from the
end of the user's speech (when the WAV's last sample louder than 2 % of its loudest was
pushed, as the graph's VAD ends speech at its last voiced sample, not at the WAV's end): ``vad_stop_s`` (the VAD says the
user stopped), ``transcript_s`` (the transcript leaves the STT), ``turn_end_s`` (the context
goes to the LLM), ``llm_first_s`` (its first text), ``ttfa_s`` (the TTS's first audio leaves the
pipeline), ``reply`` and ``heard``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import warnings
import wave
from pathlib import Path

import numpy as np
from loguru import logger
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InputAudioRawFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMTextFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.piper.tts import PiperTTSService
from pipecat.services.whisper.stt import WhisperSTTService
from pipecat.turns.user_stop.speech_timeout_user_turn_stop_strategy import (
    SpeechTimeoutUserTurnStopStrategy,
)
from pipecat.turns.user_turn_strategies import UserTurnStrategies

RATE = 16_000
FRAME_S = 0.02
VAD_STOP_S = 0.2  # Pipecat's default VAD stop_secs


class Turn:
    """The stamps of one question's turn (time.monotonic())."""

    def __init__(self, question: str):
        self.question, self.speech_end = question, 0.0
        self.stamps: dict[str, float] = {}
        self.heard, self.reply, self.audio_s = "", "", 0.0
        self.reply_done = asyncio.Event()

    def stamp(self, name: str) -> None:
        self.stamps.setdefault(name, time.monotonic())

    def row(self) -> dict:
        return {"question": self.question, "heard": self.heard, "reply": self.reply.strip(),
                "reply_audio_s": self.audio_s,
                **{f"{name}_s": at - self.speech_end for name, at in self.stamps.items()}}


class Tap(FrameProcessor):
    """Passes every frame on; stamps the current turn when one of ``watch`` passes."""

    def __init__(self, turns: list[Turn], watch: dict[type, str]):
        super().__init__()
        self.turns, self.watch = turns, watch

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if self.turns and direction == FrameDirection.DOWNSTREAM:
            turn = self.turns[-1]
            for kind, name in self.watch.items():
                if isinstance(frame, kind):
                    turn.stamp(name)
            if isinstance(frame, TranscriptionFrame):
                turn.heard += frame.text
            elif isinstance(frame, LLMTextFrame):
                turn.reply += frame.text
            elif isinstance(frame, TTSAudioRawFrame):
                turn.audio_s += len(frame.audio) / 2 / frame.sample_rate / frame.num_channels
            elif isinstance(frame, LLMFullResponseEndFrame):
                turn.reply_done.set()
        await self.push_frame(frame, direction)


class Source(FrameProcessor):
    """The pipeline's head: passes the pipeline's own frames on; audio is pushed from it."""

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)


def last_voiced_sample(pcm: bytes, floor: float = 0.02) -> int:
    """The index of the last sample louder than ``floor`` of the loudest: the end of speech (a
    WAV ends in some silence, which is not the user's speech)."""
    samples = np.abs(np.frombuffer(pcm, "<i2").astype(np.float32))
    loud = np.flatnonzero(samples > floor * samples.max()) if samples.size else []
    return int(loud[-1]) if len(loud) else len(samples) - 1


def read_pcm(path: Path) -> bytes:
    with wave.open(str(path)) as wav:
        if (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) != (RATE, 1, 2):
            raise SystemExit(f"{path}: expected 16 kHz mono 16-bit PCM")
        return wav.readframes(wav.getnframes())


async def play(task: PipelineTask, source: FrameProcessor, wavs: list[Path],
               turns: list[Turn], silence_s: float, reply_timeout: float) -> None:
    """Each WAV in real time, then silence until the reply is over and would have played."""
    step = round(RATE * FRAME_S) * 2
    silence = bytes(step)
    clock = time.monotonic()

    async def push(chunk: bytes) -> None:
        nonlocal clock
        await source.push_frame(InputAudioRawFrame(audio=chunk, sample_rate=RATE,
                                                   num_channels=1))
        clock += FRAME_S
        await asyncio.sleep(max(0.0, clock - time.monotonic()))

    for _ in range(25):  # half a second of silence to start
        await push(silence)
    for wav in wavs:
        pcm = read_pcm(wav)
        turn = Turn(wav.stem)
        turns.append(turn)
        voiced_end = 2 * last_voiced_sample(pcm)  # as a byte offset
        for start in range(0, len(pcm), step):
            if start <= voiced_end < start + step:  # when that sample is played
                turn.speech_end = clock + (voiced_end - start) / 2 / RATE
            await push(pcm[start:start + step].ljust(step, b"\0"))
        deadline = time.monotonic() + reply_timeout
        while not turn.reply_done.is_set() and time.monotonic() < deadline:
            await push(silence)
        started = turn.stamps.get("ttfa", time.monotonic())
        while time.monotonic() < max(started + turn.audio_s, turn.speech_end + silence_s) + 0.3:
            await push(silence)  # the reply plays; the user waits
        clock = time.monotonic()
    await task.queue_frame(EndFrame())


async def run(args: argparse.Namespace) -> list[dict]:
    wavs = sorted(args.wavs.glob("*.wav"))
    turns: list[Turn] = []
    source = Source()
    vad = VADProcessor(vad_analyzer=SileroVADAnalyzer(
        sample_rate=RATE, params=VADParams(stop_secs=VAD_STOP_S)))
    stt = WhisperSTTService(device="cpu", compute_type="int8",  # as the graph's whisper
                            settings=WhisperSTTService.Settings(model=str(args.whisper)))
    context = LLMContext([{"role": "system", "content": args.system_prompt}])
    pair = LLMContextAggregatorPair(context, user_params=LLMUserAggregatorParams(
        user_turn_strategies=UserTurnStrategies(stop=[SpeechTimeoutUserTurnStopStrategy(
            user_speech_timeout=max(0.0, args.silence_ms / 1000 - VAD_STOP_S))])))
    llm = OpenAILLMService(api_key="unused", base_url=args.llm_url, settings=OpenAILLMService
                           .Settings(model="local", max_tokens=args.max_tokens, temperature=0.0))
    tts = PiperTTSService(download_dir=args.piper.parent,
                          settings=PiperTTSService.Settings(voice=args.piper.stem))
    pipeline = Pipeline([
        source, vad, Tap(turns, {VADUserStoppedSpeakingFrame: "vad_stop"}), stt,
        Tap(turns, {TranscriptionFrame: "transcript"}), pair.user(),
        Tap(turns, {LLMContextFrame: "turn_end"}), llm,
        Tap(turns, {LLMTextFrame: "llm_first"}), tts,
        Tap(turns, {TTSAudioRawFrame: "ttfa"}), pair.assistant()])
    task = PipelineTask(pipeline, params=PipelineParams(audio_in_sample_rate=RATE),
                        enable_rtvi=False)
    runner = PipelineRunner(handle_sigint=False)
    player = asyncio.create_task(asyncio.sleep(0))

    async def start_playing() -> None:
        nonlocal player
        await asyncio.sleep(1.0)  # the models load when the pipeline starts
        player = asyncio.create_task(play(task, source, wavs, turns, args.silence_ms / 1000,
                                          args.reply_timeout))

    await asyncio.gather(runner.run(task), start_playing())
    await player
    return [turn.row() for turn in turns]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wavs", type=Path, required=True, help="16 kHz WAVs, one per turn")
    parser.add_argument("--llm-url", required=True, help="the OpenAI-compatible server's /v1")
    parser.add_argument("--whisper", type=Path, required=True, help="CTranslate2 whisper folder")
    parser.add_argument("--piper", type=Path, required=True, help="Piper voice .onnx (its "
                                                                  ".onnx.json beside it)")
    parser.add_argument("--silence-ms", type=float, default=600)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--system-prompt", default="You are a helpful voice assistant. "
                                                   "Answer in one short sentence.")
    parser.add_argument("--reply-timeout", type=float, default=60)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    warnings.simplefilter("ignore", DeprecationWarning)  # PipelineTask: 1.14 still runs it
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    rows = asyncio.run(run(args))
    args.json.write_text(json.dumps(rows, indent=1))
    for row in rows:
        print(f"{row['question']}: ttfa {row.get('ttfa_s', float('nan')):.2f} s, heard "
              f"{row['heard']!r}, replied {row['reply']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

