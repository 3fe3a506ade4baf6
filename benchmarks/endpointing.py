"""Ending the user's turn: time saved on complete questions vs. mid-sentence pauses cut off.

    python benchmarks/endpointing.py [--complete-ms MS ...] [--pauses MS ...] [--json FILE]
                                     [--png FILE]

Policies compared in the same run, with the real models of dataflows/voice.yml in this one
process (Silero VAD, whisper tiny.en on its default backend, Smart Turn v3):

- ``silence``: the utterance ends after MIN_SILENCE_MS (600 ms) of silence, whatever was said;
- ``smart-turn, N ms``: once a pause lasts the VAD's 100 ms padding, Smart Turn v3 (Pipecat's
  turn-end classifier, which hears intonation and words) judges the speech so far; if it says
  the turn is over (probability > 0.5) the pause ends the utterance after N ms
  (COMPLETE_SILENCE_MS), else after 600 ms;
- ``words, N ms``: the same, judged from whisper's transcript of that pause snapshot instead
  (mofa_omni.voice.endpointing.looks_complete: a finished sentence not ending on "of", "the",
  ...);
- ``both, N ms``: the pause ends the turn sooner only when the two agree.

Speech is made by Piper: complete questions (the time from the end of speech to the end of
the turn, median) and sentences with a pause of 300-900 ms inside them (the share cut into two
turns). A paused sentence is the whole sentence synthesized at once with silence inserted
after one of its words (where whisper's word timestamps say the word ends), so the voice
before the pause is that of a sentence going on. The judgments arrive as they would in the
graph: each takes the time the model takes here, measured per call, and the VAD hears it that
much later in the stream.

Prints a table, writes benchmarks/results/endpointing.json (or --json FILE) and a chart,
benchmarks/results/endpointing.png (or --png FILE).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
from common import (
    add_output_flags,
    make_parser,
    print_header,
    pyplot,
    run_stamp,
    save_figure,
    write_json,
)

from mofa_omni.adapters.loading import open_model
from mofa_omni.contract.tasks import SpeechRequest, Task, TranscriptionRequest
from mofa_omni.media.audio import resample
from mofa_omni.voice.endpointing import looks_complete
from mofa_omni.voice.vad import FRAME_SAMPLES, VAD_RATE, StreamingVad, Utterance, VadConfig

COMPLETE = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Why is the sky blue?",
    "Who wrote Romeo and Juliet?",
    "Turn on the lights in the kitchen.",
    "What time is it in Tokyo?",
    "Play some relaxing music.",
    "How far away is the moon?",
]
SPLIT = [  # (before the pause, after it): where a speaker may hesitate
    ("What is the capital", "of France?"),
    ("How many legs", "does a spider have?"),
    ("I would like to know", "why the sky is blue."),
    ("Can you tell me", "who wrote Romeo and Juliet?"),
    ("What is the weather", "like in Paris today?"),
    ("My favourite colour is", "green."),
    ("Please set a timer", "for ten minutes."),
    ("When did the first man", "walk on the moon?"),
    ("Which planet is", "closest to the sun?"),
    ("Tell me a story", "about a dragon."),
]
MIN_SILENCE_MS = 600.0
TRAILING_S = 1.5


@dataclass(frozen=True)
class Policy:
    name: str
    judge: str  # "silence", "smart-turn", "words", or "both" (the two agreeing)
    complete_silence_ms: float | None  # None: silence alone


@dataclass
class Outcome:
    turns: int  # utterances the VAD made of the audio
    end_wait_s: float  # end of the speech -> the last utterance sent (stream time)
    words: list[str]  # what the pause snapshots were heard to say


def judged(policy: Policy, snapshot: Utterance, asr, turn) -> tuple[bool, float, str]:
    """Whether the speech of a pause snapshot looks like a finished turn (every judge of the
    policy agreeing), when the verdict is in (seconds: the judges run side by side in the
    graph, the slowest decides), and what was heard."""
    verdicts, took, heard = [], [], []
    if policy.judge in ("smart-turn", "both"):
        began = time.perf_counter()
        probability = turn.turn_end_probability(snapshot.audio)
        took.append(time.perf_counter() - began)
        verdicts.append(probability > 0.5)
        heard.append(f"p={probability:.2f}")
    if policy.judge in ("words", "both"):
        began = time.perf_counter()
        text = asr.transcribe(TranscriptionRequest(snapshot.audio, VAD_RATE)).text
        took.append(time.perf_counter() - began)
        verdicts.append(looks_complete(text))
        heard.append(text)
    return all(verdicts), max(took), " / ".join(heard)


def run_vad(audio: np.ndarray, speech_end_s: float, policy: Policy, vad_model, asr,
            turn) -> Outcome:
    """The audio through the VAD frame by frame; each pause snapshot's judgment arrives (and
    ends the pause sooner if the turn looks over) after the time the judge takes."""
    config = VadConfig(transcribe_on_pause=policy.judge != "silence",
                       complete_silence_ms=policy.complete_silence_ms,
                       min_silence_ms=MIN_SILENCE_MS)
    vad_model.reset()
    vad = StreamingVad(vad_model.speech_probabilities, config)
    pending: list[tuple[float, float, bool]] = []  # (arrival sample, pause end_s, complete)
    utterances, words = [], []
    for start in range(0, len(audio), FRAME_SAMPLES):
        position = start
        due = [p for p in pending if p[0] <= position]
        pending = [p for p in pending if p[0] > position]
        heard = [(position, e) for _, end_s, complete in due
                 for e in vad.segmenter.pause_heard(end_s, complete)]
        pushed = vad.push(audio[start:start + FRAME_SAMPLES], VAD_RATE)
        for at, event in heard + [(position + FRAME_SAMPLES, e) for e in pushed]:
            if not isinstance(event, Utterance):
                continue
            if not event.partial:
                utterances.append(at)
            elif event.pause:
                complete, took, heard_as = judged(policy, event, asr, turn)
                words.append(heard_as)
                pending.append((at + took * VAD_RATE, event.end_s, complete))
    utterances += [len(audio) for e in vad.flush() if isinstance(e, Utterance) and not e.partial]
    last = utterances[-1] / VAD_RATE if utterances else float("nan")
    return Outcome(len(utterances), last - speech_end_s, words)


def split_after(audio: np.ndarray, words: int, aligner) -> tuple[np.ndarray, np.ndarray]:
    """``audio`` cut where its ``words``-th word ends (whisper's word timestamps)."""
    times = aligner.word_times(TranscriptionRequest(audio, VAD_RATE))
    cut = round(times[words - 1].end * VAD_RATE)
    return audio[:cut], audio[cut:]


def main() -> int:
    parser = make_parser(__doc__)
    add_output_flags(parser, "endpointing.json", "endpointing.png")
    parser.add_argument("--complete-ms", type=float, nargs="+", default=[200, 300],
                        help="COMPLETE_SILENCE_MS values to try (default 200 300)")
    parser.add_argument("--pauses", type=float, nargs="+", default=[300, 450, 600, 900],
                        help="mid-sentence pauses, ms (default 300 450 600 900)")
    args = parser.parse_args()
    print("speaking the sentences, loading the models ...", file=sys.stderr, flush=True)
    tts, vad_model = open_model("piper-joe"), open_model("silero-vad")
    asr, turn = open_model(task=Task.SPEECH_RECOGNITION), open_model("smart-turn-v3")
    aligner = open_model("whisper-tiny.en", backend="mlx")  # word timestamps

    def spoken(text: str) -> np.ndarray:
        chunks = list(tts.synthesize(SpeechRequest(text)))
        return resample(np.concatenate([c.audio for c in chunks]), chunks[0].sample_rate,
                        VAD_RATE)

    def silence(seconds: float) -> np.ndarray:
        return np.zeros(round(seconds * VAD_RATE), np.float32)

    complete = [(text, np.concatenate([silence(0.5), spoken(text), silence(TRAILING_S)]))
                for text in COMPLETE]
    paused = [(first, second, *split_after(spoken(f"{first} {second}"),
                                           len(first.split()), aligner))
              for first, second in SPLIT]
    aligner.unload()
    policies = [Policy("silence", "silence", None),
                *(Policy(f"{judge}, {ms:g} ms", judge, ms)
                  for judge in ("smart-turn", "words", "both") for ms in args.complete_ms)]
    rows = []
    for policy in policies:
        print(f"policy: {policy.name} ...", file=sys.stderr, flush=True)
        waits, complete_runs = [], []
        for text, audio in complete:
            outcome = run_vad(audio, (len(audio) - TRAILING_S * VAD_RATE) / VAD_RATE, policy,
                              vad_model, asr, turn)
            waits.append(outcome.end_wait_s)
            complete_runs.append({"text": text, "turns": outcome.turns,
                                  "end_wait_s": outcome.end_wait_s, "heard": outcome.words})
        cut, split_runs = {}, []
        for pause_ms in args.pauses:
            cuts = 0
            for first, second, a, b in paused:
                audio = np.concatenate([silence(0.5), a, silence(pause_ms / 1000), b,
                                        silence(TRAILING_S)])
                outcome = run_vad(audio, (len(audio) - TRAILING_S * VAD_RATE) / VAD_RATE,
                                  policy, vad_model, asr, turn)
                cuts += outcome.turns > 1
                split_runs.append({"text": f"{first} ... {second}", "pause_ms": pause_ms,
                                   "turns": outcome.turns, "heard": outcome.words})
            cut[pause_ms] = cuts / len(paused)
        rows.append({"policy": policy.name, "complete_silence_ms": policy.complete_silence_ms,
                     "end_wait_median_s": statistics.median(waits),
                     "complete_split": sum(r["turns"] != 1 for r in complete_runs),
                     "cut_off": cut, "cut_off_all": statistics.mean(cut.values()),
                     "complete_runs": complete_runs, "split_runs": split_runs})
    for model in (tts, vad_model, asr, turn):
        model.unload()

    print_header(f"Ending the turn: {len(COMPLETE)} complete questions, {len(SPLIT)} sentences "
                 f"paused inside (whisper: {asr.spec.name} on {asr.backend})")
    pauses = " ".join(f"{f'{ms:g} ms':>8}" for ms in args.pauses)
    print(f"{'policy':18} {'end wait':>9} {pauses} {'all':>6}")
    for row in rows:
        cells = " ".join(f"{row['cut_off'][ms]:8.0%}" for ms in args.pauses)
        print(f"{row['policy']:18} {row['end_wait_median_s']:8.2f}s {cells} "
              f"{row['cut_off_all']:6.0%}")
    print("(end wait: end of a complete question's speech -> its utterance sent, median; "
          "then the share of sentences cut in two by a pause of that length)")

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["policy"] for r in rows]
    left.bar(names, [r["end_wait_median_s"] for r in rows], color="tab:blue")
    left.set_ylabel("end of speech -> turn ends (s, median)")
    left.set_title("complete questions")
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        right.bar(np.arange(len(args.pauses)) + i * width,
                  [100 * row["cut_off"][ms] for ms in args.pauses], width, label=row["policy"])
    right.set_xticks(np.arange(len(args.pauses)) + 0.4 - width / 2,
                     [f"{ms:g} ms" for ms in args.pauses])
    right.set_ylabel("sentences cut in two (%)")
    right.set_title("a pause in the middle of a sentence")
    right.legend(fontsize=8)
    left.tick_params(axis="x", labelsize=8, labelrotation=30)
    right.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    save_figure(fig, args.png)
    write_json(args.json, {**run_stamp(), "asr": asr.spec.name, "backend": asr.backend,
                           "min_silence_ms": MIN_SILENCE_MS, "policies": rows})
    print(f"\nwrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
