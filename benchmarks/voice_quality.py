"""How often the voice agent answers right: spoken multi-turn sessions, scored per choice.

    python benchmarks/voice_quality.py [--quick] [--llm-backend NAME] [--json FILE] [--png FILE]

Eight short sessions (42 turns, 37 of them questions with a known answer: facts, arithmetic,
and what the user said earlier in the session) are spoken by espeak-ng and by Piper, then
answered the way dataflows/voice.yml answers them: whisper transcribes each utterance, the
dialogue (:class:`mofa_omni.voice.dialogue.Dialogue`: system prompt, kept history, max tokens)
asks the LLM, greedy, with the whole conversation so far. A reply is right when it names the
answer (any of the accepted words) in English: "Le Grand Paris is the capital of France" names
Paris but is not counted right, a reply in French is what a listener would hear as wrong.

Choices compared, on the same recordings: the system prompt (the former default, others, none:
the chat template's own), how many earlier messages the LLM sees, and the ASR model (whisper
tiny.en, the default, or base). Every prompt x history pair runs on whisper tiny.en's
transcripts; the best of them then runs on whisper base's too. Reported per choice: accuracy,
replies in English, the ASR's word error rate on the questions, and the median seconds of the
ASR per utterance and of the LLM per reply. The LLM runs on this machine's backend for it, or on
``--llm-backend`` (llama.cpp, ctranslate2, mlx): a 135M model's greedy replies depend on how the
backend computes, so a prompt is only known to be good on the backends it was measured on. This
is a benchmark, not a test: the figures are for choosing the defaults (README, "Does it answer
right?").
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common import add_output_flags, make_parser, pyplot, run_stamp, save_figure, write_json

from mofa_omni.models.compute import ensure_fast_blas

ensure_fast_blas()

import numpy as np  # noqa: E402

from mofa_omni.adapters.loading import open_model  # noqa: E402
from mofa_omni.contract.tasks import SpeechRequest, Task, TranscriptionRequest  # noqa: E402
from mofa_omni.media.audio import read_wav, resample  # noqa: E402
from mofa_omni.media.text import normalize_words, word_error_rate  # noqa: E402
from mofa_omni.voice.dialogue import Ask, Dialogue  # noqa: E402

# Each turn: what the user says, and the words of which one makes the reply right (None: the
# turn tells the agent something and is not scored).
Session = list[tuple[str, tuple[str, ...] | None]]
SESSIONS: list[Session] = [
    [("What is the capital of France?", ("paris",)),
     ("How many legs does a spider have?", ("eight", "8")),
     ("What is the opposite of hot?", ("cold",)),
     ("How many days are in a week?", ("seven", "7")),
     ("What color is the sky on a clear day?", ("blue",))],
    [("My name is Anna.", None),
     ("What is my name?", ("anna",)),
     ("I live in London.", None),
     ("Which city do I live in?", ("london",)),
     ("What is two plus two?", ("four", "4"))],
    [("What is the capital of Italy?", ("rome",)),
     ("Who wrote Romeo and Juliet?", ("shakespeare",)),
     ("What is the largest planet in our solar system?", ("jupiter",)),
     ("How many hours are in a day?", ("24", "twenty")),
     ("What do bees make?", ("honey",))],
    [("Hello, can you hear me?", ("yes", "hear", "hello", "hi")),
     ("I have a dog called Max.", None),
     ("What is my dog called?", ("max",)),
     ("What kind of animal is Max?", ("dog",)),
     ("Thank you!", ("welcome", "glad", "pleasure", "happy"))],
    [("What is the capital of Japan?", ("tokyo",)),
     ("What is frozen water called?", ("ice",)),
     ("How many minutes are in an hour?", ("sixty", "60")),
     ("What color are ripe bananas?", ("yellow",)),
     ("What is the opposite of up?", ("down",))],
    [("My favourite colour is green.", None),
     ("What is my favourite colour?", ("green",)),
     ("What is the capital of Germany?", ("berlin",)),
     ("How many legs does a cat have?", ("four", "4")),
     ("Which season comes after winter?", ("spring",))],
    [("At what temperature in Celsius does water boil?", ("100", "hundred")),
     ("Which planet do we live on?", ("earth",)),
     ("What gas do we need to breathe?", ("oxygen",)),
     ("What is three times three?", ("nine", "9")),
     ("Who painted the Mona Lisa?", ("leonardo", "vinci")),
     ("I am learning to play the guitar.", None),
     ("Which instrument am I learning?", ("guitar",))],
    # the questions of benchmarks/voice_latency.py, after its warm-up greeting: with the former
    # prompt SmolLM2 went on in French after greeting ("Le Grand Paris is the capital ...")
    [("Hello, can you hear me?", ("yes", "hear", "hello", "hi")),
     ("What is the capital of France?", ("paris",)),
     ("How many legs does a spider have?", ("eight", "8")),
     ("Who wrote Romeo and Juliet?", ("shakespeare",)),
     ("What is the capital of Italy?", ("rome",))],
]

PROMPTS = {
    "voice assistant, one short sentence (former default)":
        "You are a helpful voice assistant. Answer in one short sentence.",
    "assistant, one short sentence": "You are a helpful assistant. Answer in one short sentence.",
    "SmolLM, keep answers short": "You are SmolLM, a helpful assistant. Keep answers short.",
    "none (the chat template's own)": "",
}
HISTORIES = (16, 6)
ASR_MODELS = ("whisper-tiny.en", "whisper-base")
VOICES = ("espeak-ng", "piper")
# Words that mark a reply as French, Italian, Spanish or German rather than English.
FOREIGN = {"le", "la", "les", "est", "une", "il", "de", "des", "du", "au", "et", "el", "di",
           "della", "ist", "der", "die", "das", "un", "una", "che", "qui", "sont", "avec", "pour",
           "femme", "sur"}


@dataclass
class Choice:
    prompt: str  # a key of PROMPTS
    history: int  # earlier messages the LLM sees
    asr: str

    @property
    def label(self) -> str:
        return f"{self.prompt} | history {self.history} | {self.asr}"


def english(reply: str) -> bool:
    return sum(word in FOREIGN for word in normalize_words(reply)) < 2


def right(reply: str, accepted: tuple[str, ...]) -> bool:
    words = set(normalize_words(reply))
    return english(reply) and any(answer in words for answer in accepted)


def speak_all(folder: Path) -> dict[str, list[list[tuple[np.ndarray, int]]]]:
    """Every turn of every session spoken by each voice, as (audio, rate)."""
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is not installed (apt-get install espeak-ng)")
    piper = open_model(task=Task.SPEECH_SYNTHESIS)
    spoken: dict[str, list[list[tuple[np.ndarray, int]]]] = {voice: [] for voice in VOICES}
    for s, session in enumerate(SESSIONS):
        for voice in VOICES:
            spoken[voice].append([])
        for t, (text, _) in enumerate(session):
            path = folder / f"{s}-{t}.wav"
            subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
            spoken["espeak-ng"][s].append(read_wav(path))
            chunks = list(piper.synthesize(SpeechRequest(text)))
            audio = np.concatenate([c.audio for c in chunks])
            spoken["piper"][s].append((resample(audio, chunks[0].sample_rate, 16000), 16000))
    piper.unload()
    return spoken


def transcribe_all(asr_name: str, spoken) -> tuple[dict, list[float], list[float]]:
    """Each voice's sessions as heard by ``asr_name``; the word error rate of each question and
    the seconds of each transcription."""
    asr = open_model(asr_name)
    heard: dict[str, list[list[str]]] = {}
    rates, seconds = [], []
    for voice, sessions in spoken.items():
        heard[voice] = []
        for session, audios in zip(SESSIONS, sessions, strict=True):
            heard[voice].append([])
            for (text, _), (audio, rate) in zip(session, audios, strict=True):
                started = time.perf_counter()
                words = asr.transcribe(TranscriptionRequest(audio, rate)).text
                seconds.append(time.perf_counter() - started)
                heard[voice][-1].append(words)
                rates.append(word_error_rate(text, words))
    asr.unload()
    return heard, rates, seconds


def converse(llm, prompt: str, history: int, heard_session: list[str]) -> list[tuple[str, float]]:
    """The replies to one session's turns as heard, and the seconds each took."""
    dialogue = Dialogue(system_prompt=prompt, max_history=history)
    replies = []
    for t, words in enumerate(heard_session):
        asks = [a for a in dialogue.heard(f"turn-{t}", words, 0) if isinstance(a, Ask)]
        if not asks:  # heard as silence: no reply
            replies.append(("", 0.0))
            continue
        started = time.perf_counter()
        reply = "".join(chunk.text for chunk in llm.generate(asks[0].request)).strip()
        replies.append((reply, time.perf_counter() - started))
        dialogue.reply_text(asks[0].reply_id, reply, True)
        dialogue.spoken(asks[0].reply_id)
    return replies


def score(choice: Choice, llm, heard: dict, asr_stats: tuple[list[float], list[float]]) -> dict:
    scored = correct = in_english = 0
    llm_seconds, turns = [], []
    for voice in VOICES:
        for session, heard_session in zip(SESSIONS, heard[voice], strict=True):
            replies = converse(llm, PROMPTS[choice.prompt], choice.history, heard_session)
            for (text, accepted), words, (reply, seconds) in zip(session, heard_session, replies,
                                                                 strict=True):
                llm_seconds += [seconds] if reply else []
                in_english += english(reply)
                if accepted is not None:
                    scored += 1
                    correct += right(reply, accepted)
                turns.append({"voice": voice, "said": text, "heard": words, "reply": reply,
                              "right": None if accepted is None else right(reply, accepted)})
    rates, asr_seconds = asr_stats
    return {**asdict(choice), "label": choice.label, "accuracy": correct / scored,
            "correct": correct, "scored": scored,
            "english": in_english / sum(len(s) for s in SESSIONS) / len(VOICES),
            "asr_wer": statistics.mean(rates), "asr_s": statistics.median(asr_seconds),
            "llm_s": statistics.median(llm_seconds) if llm_seconds else 0.0,
            "turns": turns}


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 0.5 * len(rows) + 1.5))
    labels = [r["label"] for r in rows]
    ax.barh(range(len(rows)), [100 * r["accuracy"] for r in rows], color="#2ca02c")
    for i, r in enumerate(rows):
        ax.text(100 * r["accuracy"] + 1, i, f"{100 * r['accuracy']:.0f} %  (ASR {r['asr_s']:.2f} s,"
                f" LLM {r['llm_s']:.2f} s)", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 130)
    ax.set_xlabel("questions answered right, in English (%), espeak-ng and Piper voices")
    ax.set_title("The voice agent's answers per choice (benchmarks/voice_quality.py)")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> int:
    parser = make_parser(__doc__)
    add_output_flags(parser, "voice_quality.json", "voice_quality.png")
    parser.add_argument("--quick", action="store_true",
                        help="the first and the last prompt only, one history length")
    parser.add_argument("--llm-backend", default=None,
                        help="the LLM's backend (llama.cpp, ctranslate2, mlx); default: this "
                             "machine's choice")
    args = parser.parse_args()
    prompts = [*PROMPTS][:: len(PROMPTS) - 1] if args.quick else [*PROMPTS]
    histories = HISTORIES[:1] if args.quick else HISTORIES

    work = Path(tempfile.mkdtemp(prefix="voice-quality-"))
    try:
        print("speaking the sessions (espeak-ng, Piper) ...", file=sys.stderr, flush=True)
        spoken = speak_all(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    llm = open_model(task=Task.TEXT_GENERATION, backend=args.llm_backend)
    transcripts = {}
    rows = []

    def run(choice: Choice) -> dict:
        if choice.asr not in transcripts:
            print(f"transcribing with {choice.asr} ...", file=sys.stderr, flush=True)
            heard, rates, seconds = transcribe_all(choice.asr, spoken)
            transcripts[choice.asr] = (heard, (rates, seconds))
        print(f"answering: {choice.label} ...", file=sys.stderr, flush=True)
        heard, stats = transcripts[choice.asr]
        row = score(choice, llm, heard, stats)
        rows.append(row)
        return row

    for prompt in prompts:
        for history in histories:
            run(Choice(prompt, history, ASR_MODELS[0]))
    best = max(rows, key=lambda r: (r["accuracy"], -r["llm_s"]))
    run(Choice(best["prompt"], best["history"], ASR_MODELS[1]))
    backend = llm.backend
    llm.unload()

    print(f"\n{'choice':78} {'right':>6} {'English':>8} {'ASR WER':>8} {'ASR s':>6} {'LLM s':>6}")
    for r in rows:
        print(f"{r['label'][:78]:78} {100 * r['accuracy']:5.0f}% {100 * r['english']:7.0f}% "
              f"{r['asr_wer']:8.2f} {r['asr_s']:6.2f} {r['llm_s']:6.2f}")
    print(f"({rows[0]['scored']} questions scored per choice: {len(SESSIONS)} sessions x "
          f"{len(VOICES)} voices; {llm.spec.name} on {backend}, greedy, at most 96 tokens)")
    write_json(args.json, {**run_stamp(), "llm": llm.spec.name, "llm_backend": backend,
                           "sessions": SESSIONS, "prompts": PROMPTS, "choices": rows})
    plot(rows, args.png)
    print(f"\nwrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
