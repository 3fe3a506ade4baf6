"""The voice agent's latency: time to first audio and turn time, per stage, vs. a sequential run.

    python benchmarks/voice_latency.py [--json FILE] [--png FILE] [--trace FILE]
                                       [--baseline-passes N] [--no-warmup] [--timeout S]
                                       [--no-streaming-comparison] [--no-peer]

Spoken questions are made with Piper (16 kHz WAVs in a temporary folder) and played in real time
through dataflows/voice.yml with ``dora run`` (wav_source -> Silero VAD -> whisper -> dialogue ->
SmolLM2 -> sentence splitter -> Piper -> wav_sink). The nodes write a timing trace
(``MOFA_OMNI_TRACE``, see :mod:`mofa_omni.node.trace`): one line per message sent or received, with
its request id, seq, final flag, origin and send times. In the same run the *sequential
baseline* serves the same questions with the same models in this one process, without streaming:
whisper on the whole utterance, then the whole LLM reply (the same system prompt, max tokens and
multi-turn history, through :class:`mofa_omni.voice.dialogue.Dialogue`), then Piper on the whole reply.
The baseline's conversation is built from what the graph heard (whisper on the VAD's cut of the
audio can differ by a word from whisper on the whole file, and the history then diverges), so
both run the LLM and the TTS on the same prompts and replies; its ASR still transcribes, and is
timed on, the whole file. A first warm-up question (not counted) goes through both, so that
neither measures model loading or first-call costs and both hold the same history.

All times of a turn are relative to the *end of the user's speech*: the VAD's utterance carries
it as origin_ns (the wall time at which the last voiced sample was played by the source), and
every later message of the turn carries the same origin_ns, which is how the trace is grouped.
(wav_source sends each 100 ms chunk at the start of its period, up to one chunk earlier than a
microphone could, so the endpoint time here is up to 100 ms shorter than with a live microphone.)

Per turn (graph):
    endpoint     end of speech -> the VAD sends the utterance (the VAD waits for MIN_SILENCE_MS
                 of silence; a policy, not model compute nor framework overhead)
    ASR          whisper's compute after the utterance was sent: the worker starts it -> the
                 transcript is sent (near 0 when the transcript of the pause snapshot, made
                 while the VAD waited for the silence to last, is the utterance's: see
                 mofa_omni.voice.streaming)
    LLM 1st      the LLM's compute until its first text chunk is sent
    LLM          the LLM's compute until its final chunk is sent
    TTS 1st      Piper's compute for the first sentence: start -> its first audio chunk sent
    TTFA         time to first audio: end of speech -> the sink receives the first audio chunk
    turn         end of speech -> the sink receives the last audio chunk
    stall        playback gaps a speaker would have had: chunks played back to back from the
                 first one's arrival, a chunk that arrives after the previous one has finished
                 playing leaves a gap (JSON: also ``heard_by_s``, when the last word is heard)
A model stage's compute runs from when its node's worker *starts* a request (not when it
arrived: the queue wait is not compute) to the send stamp (sent_ns) of its result, taken as soon
as the model yields it, before Arrow encoding and dora's send. The sink's receive time is taken
once the chunk is decoded (sub-millisecond).

Framework overhead of a turn (the `ovh%` column, as a share of the turn; the JSON also has it
with the endpoint counted as overhead) = turn - endpoint - model compute on the critical path,
where model compute on the critical path is the length of the union of the compute intervals of
all ASR, LLM and TTS requests of the turn, clipped to [utterance sent, last audio at the sink].
In this pipeline the LLM's request is one interval from its start to its final chunk and each
TTS request covers the waits of the sentences queued behind it, so the time not covered by any
model is exactly the non-compute part of the critical path: transfers between nodes, queue
waits, the dialogue and splitter nodes, encoding and decoding of messages at the edges, and idle
gaps where a model waits for its input. (Model compute includes the CPU contention of stages that
run at the same time on this machine.) The TTFA is also broken down exactly into consecutive
segments of its own critical chain (``ttfa_path`` in the JSON, printed as medians): utterance ->
ASR -> dialogue -> LLM until the chunk that completed the first sentence -> splitter -> TTS ->
sink; its non-compute segments are ``ttfa_overhead_s``.

Baseline turn = ASR + LLM + TTS, timed in this process after the graph run (the models are
loaded before it and stay idle while it runs), ``--baseline-passes`` times (default 2); each
figure is the mean of the passes, which evens out some of the noise of a shared machine. Goals:
median TTFA <= 0.5 x the median baseline turn, and framework overhead <= 10 % of the turn.

Streaming ASR (voice.yml's VAD sends snapshots while the user speaks, and one once a pause is
as long as its padding) is compared in the same run: the graph runs a second time with the
snapshots off (PARTIAL_EVERY_MS=0, TRANSCRIBE_ON_PAUSE=false), and its medians are printed and
saved beside (``without_streaming_asr``); --no-streaming-comparison skips that run.

The peer, in the same run: Pipecat (benchmarks/pipecat_peer.py: its own Silero VAD,
faster-whisper, an OpenAI LLM service on llama-cpp-python's own server, Piper) answers the same
WAVs, paced in real time, with the same models' files and the same silence ending a turn; the
medians of both are printed side by side, from the end of speech: the user's turn over, the
LLM's first text, the first audio. Goal: time to first audio <= 0.8 x Pipecat's. It needs
``pip install -e '.[peers]'``; --no-peer skips it.

With the dialogue's speculation (voice.yml's SPECULATE) the chat goes out on the words of the
pause, before the final transcript reaches the dialogue: the TTFA chain's "dialogue received ->
chat sent" segment is then negative, and the first audio waits at the sink for the release.

Prints a table, writes benchmarks/results/voice_latency.json (or --json FILE) and a PNG timeline
of one turn (the one whose reply has the most sentences) beside the baseline of the same
question, benchmarks/results/voice_turn.png (or --png FILE).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    ROOT,
    DoraRun,
    add_output_flags,
    dora_env,
    make_parser,
    pyplot,
    run_stamp,
    save_figure,
    write_json,
)

from mofa_omni.models.compute import ensure_fast_blas

ensure_fast_blas()

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from mofa_omni.adapters.loading import open_model  # noqa: E402
from mofa_omni.contract.tasks import SpeechRequest, Task, TranscriptionRequest  # noqa: E402
from mofa_omni.launch import dataflows  # noqa: E402
from mofa_omni.media.audio import read_wav, resample, write_wav  # noqa: E402
from mofa_omni.models.store import ModelStore  # noqa: E402
from mofa_omni.node import trace  # noqa: E402
from mofa_omni.voice.dialogue import Ask, Dialogue  # noqa: E402

VOICE = ROOT / "dataflows" / "voice.yml"
WARMUP = "Hello, can you hear me?"
QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Why is the sky blue?",  # SmolLM2 answers this in several sentences: streaming shows
    "Who wrote Romeo and Juliet?",
]


# --- inputs ----------------------------------------------------------------------------------

def dialogue_settings() -> tuple[str, int]:
    """The dialogue node's system prompt and max tokens, as dataflows/voice.yml sets them."""
    nodes = {n["id"]: n for n in yaml.safe_load(VOICE.read_text())["nodes"]}
    env = nodes["dialogue"].get("env") or {}
    defaults = Dialogue()
    return (str(env.get("SYSTEM_PROMPT") or defaults.system_prompt),
            int(env.get("MAX_TOKENS") or defaults.max_tokens))


def make_questions(folder: Path, texts: list[str], tts) -> list[dict]:
    """Speak each text with Piper into folder/NN.wav at 16 kHz."""
    folder.mkdir(parents=True, exist_ok=True)
    questions = []
    for i, text in enumerate(texts):
        chunks = list(tts.synthesize(SpeechRequest(text)))
        audio = resample(np.concatenate([c.audio for c in chunks]), chunks[0].sample_rate, 16000)
        path = folder / f"{i:02d}.wav"
        write_wav(path, audio, 16000)
        questions.append({"text": text, "wav": path.name, "seconds": len(audio) / 16000})
    return questions


# --- the sequential baseline -----------------------------------------------------------------

def run_baseline(folder: Path, questions: list[dict], system_prompt: str, max_tokens: int,
                 asr, llm, tts, graph_heard: list[str]) -> list[dict]:
    """Each question in turn: whole-utterance ASR, whole LLM reply, whole-reply TTS. The dialogue
    takes what the graph heard for the question (``graph_heard[i]``, when there is one)."""
    dialogue = Dialogue(system_prompt=system_prompt, max_tokens=max_tokens)
    rows = []
    for i, question in enumerate(questions):
        audio, rate = read_wav(folder / question["wav"])
        t0 = time.perf_counter()
        heard = asr.transcribe(TranscriptionRequest(audio, rate)).text
        t1 = time.perf_counter()
        said = graph_heard[i] if i < len(graph_heard) and graph_heard[i] else heard
        asks = [a for a in dialogue.heard(f"turn-{i}", said, 0) if isinstance(a, Ask)]
        reply, speech_s = "", 0.0
        t2 = t3 = first = t1
        if asks:
            pieces = []
            for chunk in llm.generate(asks[0].request):  # joined: only the first's time is noted
                if not pieces:
                    first = time.perf_counter()
                pieces.append(chunk.text)
            reply = "".join(pieces)
            t2 = time.perf_counter()
            dialogue.reply_text(asks[0].reply_id, reply, True)
            if reply.strip():
                chunks = list(tts.synthesize(SpeechRequest(reply)))
                speech_s = sum(len(c.audio) for c in chunks) / chunks[0].sample_rate
            t3 = time.perf_counter()
            dialogue.spoken(asks[0].reply_id)
        rows.append({"heard": heard, "reply": reply, "asr_s": t1 - t0,
                     "llm_first_token_s": first - t1, "llm_s": t2 - t1,
                     "tts_s": t3 - t2, "turn_s": t3 - t0, "reply_audio_s": speech_s})
    return rows


# --- the graph run -----------------------------------------------------------------------------

def graph_turns(graph_file: Path, inputs: Path, work: Path, replies: int, timeout: float) -> dict:
    """One graph run on the questions in ``inputs``: its status, log, turns and transcript."""
    outputs, trace_file = work / "out", work / "trace.jsonl"
    work.mkdir(parents=True)
    started = time.perf_counter()
    status, log = run_graph(graph_file, inputs, outputs, trace_file, replies, timeout)
    wall = time.perf_counter() - started
    return {"status": status, "log": log, "wall_s": wall, "trace_file": trace_file,
            "turns": analyse(trace.read(trace_file) if trace_file.exists() else []),
            "pairs": transcript_pairs(outputs / "transcript.txt"),
            "replies_written": len(list(outputs.glob("reply-*.wav")))}


def _replies_heard(trace_file: Path) -> int:
    """How many replies' last audio chunk reached the sink so far."""
    if not trace_file.exists():
        return 0
    return sum(1 for r in trace.read(trace_file)
               if r["node"] == "sink" and r["event"] == "recv" and r["final"])


def run_graph(graph_file: Path, inputs: Path, outputs: Path, trace_file: Path, replies: int,
              timeout: float) -> tuple[int, str]:
    """``dora run dataflows/voice.yml`` with this interpreter's environment first on PATH;
    returns dora's exit status and output.

    The graph ends by itself after the last reply (the dialogue node ends once its transcript
    input closed and no reply is active, which closes the cycle dialogue -> llm -> ... -> sink ->
    dialogue). Should it not within 15 s of the sink receiving the last audio of ``replies``
    replies, it is stopped as with Ctrl-C (SIGINT: a Stop to every node) rather than left to
    dora 1.1.0's straggler watchdog, which stops a graph only after it has been silent for
    DORA_FINISH_DRAIN_GRACE_SECS (120 s by default; do not shorten it: a few seconds also stop
    a live graph that is silent while whisper computes).
    """
    # each node chooses its own BLAS set-up, as it would from a shell
    env = dora_env({"VOICE_INPUT": inputs, "VOICE_OUTPUT": outputs, trace.TRACE_ENV: trace_file},
                   own_blas=True)
    with DoraRun(graph_file, env, log=trace_file.with_suffix(".log")) as graph:
        deadline, all_heard, stopping = time.monotonic() + timeout, None, None
        while graph.running:
            now = time.monotonic()
            if all_heard is None and _replies_heard(trace_file) >= replies:
                all_heard = now
            if stopping is None and (now > deadline or (all_heard and now - all_heard > 15)):
                print("stopping the graph (it did not end by itself)", file=sys.stderr)
                graph.interrupt()
                stopping = now
            elif stopping is not None and now - stopping > 60:
                graph.process.terminate()
                stopping = now
            time.sleep(1.0)  # reading the trace costs little; keep the CPU for the graph
    return graph.returncode, graph.log_text()


def _union_ns(intervals: list[tuple[int, int]], lo: int, hi: int) -> int:
    """Length of the union of ``intervals`` clipped to [lo, hi]."""
    total, end = 0, lo
    for a, b in sorted((max(a, lo), min(b, hi)) for a, b in intervals):
        if b <= a or b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _jobs(records: list[dict], node: str) -> list[dict]:
    """A model node's requests: start time, arrival, and the send stamps of their results (the
    worker serves one request at a time, so a result belongs to the last request started)."""
    starts = sorted((r for r in records if r["node"] == node and r["event"] == "start"),
                    key=lambda r: r["now_ns"])
    recvs = [r for r in records if r["node"] == node and r["event"] == "recv"]
    jobs = []
    for start in starts:
        arrived = next((r["now_ns"] for r in recvs if r["request_id"] == start["request_id"]
                        and r["seq"] == start["seq"]), start["now_ns"])
        jobs.append({"seq": start["seq"], "recv": arrived, "start": start["now_ns"], "sends": []})
    for send in sorted((r for r in records if r["node"] == node and r["event"] == "send"),
                       key=lambda r: r["sent_ns"]):
        owner = [j for j in jobs if j["start"] <= send["sent_ns"]]
        if owner:
            owner[-1]["sends"].append(send)
    for job in jobs:
        job["end"] = job["sends"][-1]["sent_ns"] if job["sends"] else job["start"]
    return jobs


def analyse_turn(records: list[dict], utterance: dict, all_records: list[dict]) -> dict | None:
    """Stage figures of one turn from the trace lines that carry its origin_ns."""
    origin = utterance["origin_ns"]

    def of(node: str, event: str, port: str | None = None) -> list[dict]:
        return [r for r in records if r["node"] == node and r["event"] == event
                and (port is None or r["port"] == port)]

    sink = sorted(of("sink", "recv", "audio"), key=lambda r: r["now_ns"])
    if not sink or not sink[-1]["final"]:
        return None  # no (complete) spoken reply: nothing to time
    asr, llm, tts = _jobs(records, "asr"), _jobs(records, "llm"), _jobs(records, "tts")
    # the utterance's own job (a pause snapshot's, with the same origin, goes before it)
    whole = [j for j in asr if j["seq"] == utterance["seq"]]
    if not (whole and llm and tts and whole[0]["sends"] and llm[0]["sends"] and tts[0]["sends"]):
        return None
    a, g, t0 = whole[0], llm[0], tts[0]
    transcript = [r for r in of("dialogue", "recv", "transcript") if r["final"]][0]
    chat = of("dialogue", "send", "chat")[0]
    splitter_in = sorted(of("splitter", "recv"), key=lambda r: r["now_ns"])
    speech = sorted(of("splitter", "send", "speech"), key=lambda r: r["sent_ns"])
    first_sentence = speech[0]
    # The LLM chunk whose arrival made the splitter send its first sentence.
    trigger = [r for r in splitter_in if r["now_ns"] <= first_sentence["sent_ns"]][-1]
    trigger_send = next(s for s in g["sends"] if s["seq"] == trigger["seq"])
    started = [r for r in all_records if r["node"] == "vad" and r["port"] == "speech_started"
               and r["request_id"] == utterance["request_id"]]

    def rel(ns: int) -> float:
        return (ns - origin) / 1e9

    chain = [  # the TTFA's critical chain: consecutive milestones (ns)
        ("end of speech", origin),
        ("utterance sent (VAD)", utterance["sent_ns"]),
        ("ASR received", a["recv"]), ("ASR started", a["start"]),
        ("transcript sent", a["end"]),
        ("dialogue received", transcript["now_ns"]), ("chat sent", chat["sent_ns"]),
        ("LLM received", g["recv"]), ("LLM started", g["start"]),
        ("LLM sent the chunk ending sentence 1", trigger_send["sent_ns"]),
        ("splitter received it", trigger["now_ns"]),
        ("sentence 1 sent", first_sentence["sent_ns"]),
        ("TTS received", t0["recv"]), ("TTS started", t0["start"]),
        ("first audio sent (TTS)", t0["sends"][0]["sent_ns"]),
        ("first audio at the sink", sink[0]["now_ns"]),
    ]
    compute_steps = {"ASR started", "LLM started", "TTS started"}  # a segment from these is compute
    path = [{"from": chain[i][0], "to": chain[i + 1][0], "s": (chain[i + 1][1] - chain[i][1]) / 1e9,
             "kind": "endpoint" if i == 0 else "compute" if chain[i][0] in compute_steps
             else "framework"} for i in range(len(chain) - 1)]
    # A speaker that starts with the first chunk and plays the rest back to back.
    playing_until, stall_ns, played = sink[0]["now_ns"], 0, []
    for r in sink:
        stall_ns += max(0, r["now_ns"] - playing_until)
        begin = max(playing_until, r["now_ns"])
        playing_until = begin + round(r.get("audio_s", 0) * 1e9)
        played.append((begin, playing_until))
    intervals = [(j["start"], j["end"]) for j in asr + llm + tts]
    turn_ns = sink[-1]["now_ns"] - origin
    endpoint_ns = utterance["sent_ns"] - origin
    compute_ns = _union_ns(intervals, utterance["sent_ns"], sink[-1]["now_ns"])
    ttfa_ns = sink[0]["now_ns"] - origin
    ttfa_compute_ns = sum(p["s"] for p in path if p["kind"] == "compute") * 1e9
    overhead_ns = turn_ns - endpoint_ns - compute_ns
    return {
        "request_id": utterance["request_id"], "reply_id": chat["request_id"],
        "speech_s": utterance.get("audio_s"),
        "speech_start_s": rel(started[0]["origin_ns"]) if started else None,
        "endpoint_s": endpoint_ns / 1e9,
        "asr_s": (a["end"] - a["start"]) / 1e9,
        "asr_queue_s": (a["start"] - a["recv"]) / 1e9,
        "llm_first_token_s": (g["sends"][0]["sent_ns"] - g["start"]) / 1e9,
        "llm_s": (g["end"] - g["start"]) / 1e9,
        "llm_chunks": len(g["sends"]),
        "sentences": len(speech),
        "tts_first_chunk_s": (t0["sends"][0]["sent_ns"] - t0["start"]) / 1e9,
        "tts_s": sum(j["end"] - j["start"] for j in tts) / 1e9,
        "ttfa_s": ttfa_ns / 1e9,
        "turn_s": turn_ns / 1e9,
        "reply_audio_s": sum(r.get("audio_s", 0) for r in sink),
        "stall_s": stall_ns / 1e9,
        "heard_by_s": rel(playing_until),
        "llm_first_s": rel(g["sends"][0]["sent_ns"]),  # the LLM's first text, from end of speech
        "model_compute_s": compute_ns / 1e9,
        "overhead_s": overhead_ns / 1e9,
        "overhead_pct": 100 * overhead_ns / turn_ns,
        "overhead_incl_endpoint_pct": 100 * (overhead_ns + endpoint_ns) / turn_ns,
        "ttfa_overhead_s": (ttfa_ns - endpoint_ns - ttfa_compute_ns) / 1e9,
        "ttfa_path": path,
        "milestones_s": {  # relative to the end of speech
            "utterance_sent": rel(utterance["sent_ns"]), "asr_done": rel(a["end"]),
            "chat_sent": rel(chat["sent_ns"]), "llm_start": rel(g["start"]),
            "llm_first_token": rel(g["sends"][0]["sent_ns"]), "llm_done": rel(g["end"]),
            "first_sentence_sent": rel(first_sentence["sent_ns"]),
            "tts_first_chunk": rel(t0["sends"][0]["sent_ns"]),
            "first_audio_at_sink": rel(sink[0]["now_ns"]),
            "last_audio_at_sink": rel(sink[-1]["now_ns"]),
        },
        "timeline": {  # for the PNG
            "asr": [(rel(j["start"]), rel(j["end"])) for j in asr],
            "llm": [(rel(j["start"]), rel(j["end"])) for j in llm],
            "llm_tokens": [rel(s["sent_ns"]) for s in g["sends"]],
            "sentences": [rel(s["sent_ns"]) for s in speech],
            "tts": [(rel(j["start"]), rel(j["end"])) for j in tts],
            "sink": [rel(r["now_ns"]) for r in sink],
            "playback": [(rel(a), rel(b)) for a, b in played],
            "dialogue": [rel(transcript["now_ns"]), rel(chat["sent_ns"])],
        },
    }


def analyse(trace_lines: list[dict]) -> list[dict]:
    """One figure set per utterance that got a spoken reply, in the order they were heard."""
    utterances = sorted((r for r in trace_lines if r["node"] == "vad" and r["event"] == "send"
                         and r["port"] == "utterance" and r["final"]), key=lambda r: r["sent_ns"])
    turns = []
    for utterance in utterances:
        mine = [r for r in trace_lines if r.get("origin_ns") == utterance["origin_ns"]
                and r["node"] != "vad"]
        if (turn := analyse_turn(mine, utterance, trace_lines)) is not None:
            turns.append(turn)
        else:
            print(f"warning: {utterance['request_id']} got no complete spoken reply",
                  file=sys.stderr)
    return turns


def transcript_pairs(path: Path) -> list[tuple[str, str]]:
    """(user, assistant) lines of the dialogue's transcript.txt, in order."""
    users, answers = [], []
    for line in path.read_text().splitlines() if path.exists() else []:
        role, _, text = line.partition(": ")
        (users if role == "user" else answers if role == "assistant" else []).append(text)
    return list(zip(users, answers))


# --- the peer: Pipecat --------------------------------------------------------------------------

PEER = Path(__file__).with_name("pipecat_peer.py")


def vad_silence_ms() -> float:
    """The silence that ends a turn in dataflows/voice.yml (its VAD's MIN_SILENCE_MS)."""
    nodes = {n["id"]: n for n in yaml.safe_load(VOICE.read_text())["nodes"]}
    return float((nodes["vad"].get("env") or {}).get("MIN_SILENCE_MS", 600))


def peer_files(asr, llm, tts) -> tuple[Path, Path, Path] | str:
    """The graph's own weights in the forms Pipecat reads (whisper for CTranslate2, a GGUF, a
    Piper voice), or why it cannot use them."""
    if importlib.util.find_spec("pipecat") is None:
        return "pipecat-ai is not installed (pip install -e '.[peers]')"
    if importlib.util.find_spec("llama_cpp.server") is None or importlib.util.find_spec(
            "starlette_context") is None:
        return "llama-cpp-python's server is not installed (pip install -e '.[peers]')"
    store = ModelStore()
    whisper, gguf, voice = (store.prepare(model) for model in (asr, llm, tts))
    voices = sorted(voice.glob("*.onnx"))
    if not (whisper / "model.bin").is_file() or not (gguf / "model.gguf").is_file() or not voices:
        return ("the graph's models here are not CTranslate2 whisper, a GGUF and a Piper voice "
                f"({asr.spec.name}, {llm.spec.name}, {tts.spec.name}): Pipecat cannot share them")
    return whisper, gguf / "model.gguf", voices[0]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_peer(inputs: Path, work: Path, files: tuple[Path, Path, Path], system_prompt: str,
             max_tokens: int, timeout: float) -> list[dict]:
    """Pipecat on the same questions, with llama-cpp-python's server on the same GGUF (its
    threads as many as the graph's LLM node uses: every core)."""
    import httpx

    whisper, gguf, voice = files
    port, threads = _free_port(), str(os.cpu_count() or 1)
    server = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "4096", "--n_threads", threads,
         "--n_threads_batch", threads], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("llama-cpp-python's server did not start")
            time.sleep(0.3)
        out = work / "pipecat.json"
        subprocess.run([sys.executable, str(PEER), "--wavs", str(inputs),
                        "--llm-url", f"http://127.0.0.1:{port}/v1", "--whisper", str(whisper),
                        "--piper", str(voice), "--silence-ms", str(vad_silence_ms()),
                        "--max-tokens", str(max_tokens), "--system-prompt", system_prompt,
                        "--json", str(out)], check=True, timeout=timeout)
        return json.loads(out.read_text())
    finally:
        server.terminate()
        server.wait(10)


# Cumulative milestones from the end of speech, the graph's and Pipecat's.
MILESTONES = [("turn over", "endpoint_s", "turn_end_s"),
              ("1st text", "llm_first_s", "llm_first_s"),
              ("1st audio", "ttfa_s", "ttfa_s")]


def peer_comparison(timed: list[dict], peer: list[dict]) -> dict | None:
    """Medians of the graph's and Pipecat's turns side by side (printed); None if Pipecat timed
    none."""
    peer = [row for row in peer if "ttfa_s" in row]
    if not peer:
        print("warning: Pipecat answered no question", file=sys.stderr)
        return None
    ours = {key: statistics.median(t[key] for t in timed) for _, key, _ in MILESTONES}
    theirs = {key: statistics.median(t[key] for t in peer if key in t)
              for _, _, key in MILESTONES}
    theirs["vad_stop_s"] = statistics.median(t.get("vad_stop_s", float("nan")) for t in peer)
    theirs["transcript_s"] = statistics.median(t.get("transcript_s", float("nan"))
                                               for t in peer)
    print(f"\n{'same questions, same models (medians, s)':42} "
          + " ".join(f"{name:>9}" for name, _, _ in MILESTONES))
    print(f"{'mofa-omni (dataflows/voice.yml)':42} "
          + " ".join(f"{ours[key]:9.2f}" for _, key, _ in MILESTONES))
    print(f"{'Pipecat 1.14 (its VAD, STT, LLM, TTS)':42} "
          + " ".join(f"{theirs[key]:9.2f}" for _, _, key in MILESTONES))
    ratio = ours["ttfa_s"] / theirs["ttfa_s"]
    print(f"Pipecat: VAD stop {theirs['vad_stop_s']:.2f} s, transcript {theirs['transcript_s']:.2f}"
          f" s after the end of speech")
    print(f"time to first audio, mofa-omni / Pipecat: {ratio:.2f} (goal <= 0.8) -> "
          f"{'met' if ratio <= 0.8 else 'NOT met'}")
    return {"turns": peer, "median": theirs, "ours_median": ours, "ttfa_ratio": ratio}


# --- output ------------------------------------------------------------------------------------

COMPARED = [("endpt", "endpoint_s"), ("ASR", "asr_s"), ("TTFA", "ttfa_s"), ("turn", "turn_s")]


def streaming_comparison(streamed: list[dict], unstreamed: list[dict], baseline_turn_s: float
                         ) -> dict | None:
    """Medians of the two graph runs side by side (printed); None if the second timed none."""
    if not unstreamed:
        print("warning: the run without streaming ASR timed no turn", file=sys.stderr)
        return None
    medians = {label: {key: statistics.median(t[key] for t in turns) for _, key in COMPARED}
               for label, turns in (("streamed", streamed), ("unstreamed", unstreamed))}
    print(f"\n{'streaming ASR (medians, s)':30} " + " ".join(f"{n:>7}" for n, _ in COMPARED)
          + f" {'TTFA/base':>9}")
    for label, row in (("on (voice.yml)", medians["streamed"]),
                       ("off (no VAD snapshots)", medians["unstreamed"])):
        print(f"{label:30} " + " ".join(f"{row[key]:7.2f}" for _, key in COMPARED)
              + f" {row['ttfa_s'] / baseline_turn_s:9.2f}")
    ratio = medians["streamed"]["ttfa_s"] / medians["unstreamed"]["ttfa_s"]
    print(f"TTFA with streaming ASR / without: {ratio:.2f}")
    return {"turns": unstreamed, "median": medians["unstreamed"],
            "streamed_median": medians["streamed"], "ttfa_ratio_streamed_to_unstreamed": ratio}

COLUMNS = [("endpt", "endpoint_s"), ("ASR", "asr_s"), ("LLM1st", "llm_first_token_s"),
           ("LLM", "llm_s"), ("TTS1st", "tts_first_chunk_s"), ("TTFA", "ttfa_s"),
           ("turn", "turn_s"), ("stall", "stall_s"), ("base", "baseline_turn_s")]


def print_table(rows: list[dict], median: dict) -> None:
    head = " ".join(f"{name:>7}" for name, _ in COLUMNS)
    print(f"\n{'question':38} {head} {'TTFA/base':>9} {'ovh%':>6}")
    for r in [*rows, median]:
        cells = " ".join(f"{r[key]:7.2f}" for _, key in COLUMNS)
        print(f"{r['question'][:38]:38} {cells} {r['ttfa_ratio']:9.2f} {r['overhead_pct']:6.1f}")
    print("(seconds; endpt..stall from the graph, `base` = the sequential baseline's turn)")


def plot_turn(path: Path, turn: dict, baseline: dict, question: str) -> None:
    plt = pyplot()
    t = turn["timeline"]
    rows: list[tuple[str, list[tuple[float, float]], str]] = []
    if turn["speech_start_s"] is not None:
        rows.append(("user speech", [(turn["speech_start_s"], 0.0)], "#9e9e9e"))
    rows += [("VAD endpointing", [(0.0, turn["endpoint_s"])], "#bdbdbd"),
             ("ASR (whisper)", t["asr"], "#1f77b4"),
             ("dialogue", [tuple(t["dialogue"])], "#8c564b"),
             ("LLM (SmolLM2)", t["llm"], "#2ca02c"),
             ("TTS (Piper)", t["tts"], "#d62728"),
             ("speaker (simulated)", t["playback"], "#ff7f0e")]
    b0 = 0.0
    base = [("baseline ASR", [(b0, b0 + baseline["asr_s"])], "#1f77b4"),
            ("baseline LLM", [(b0 + baseline["asr_s"], b0 + baseline["asr_s"] + baseline["llm_s"])],
             "#2ca02c"),
            ("baseline TTS", [(b0 + baseline["asr_s"] + baseline["llm_s"], baseline["turn_s"])],
             "#d62728"),
            ("baseline speaker", [(baseline["turn_s"],
                                   baseline["turn_s"] + baseline["reply_audio_s"])], "#ff7f0e")]
    labels = [r[0] for r in rows[:-1]] + ["splitter: sentences", "sink: audio chunks",
                                          rows[-1][0]] + [r[0] for r in base]
    fig, ax = plt.subplots(figsize=(11, 0.48 * len(labels) + 1.6))
    y = {label: len(labels) - 1 - i for i, label in enumerate(labels)}
    for label, spans, color in rows + base:
        alpha = 0.55 if label.startswith("baseline") else 0.9
        ax.broken_barh([(a, max(b - a, 0.004)) for a, b in spans], (y[label] - 0.35, 0.7),
                       facecolors=color, alpha=alpha, edgecolor="black", linewidth=0.4)
    llm_y = y["LLM (SmolLM2)"]
    ax.plot(t["llm_tokens"], [llm_y] * len(t["llm_tokens"]), "|", color="black", ms=8,
            label="LLM text chunk sent")
    ax.plot(t["sentences"], [y["splitter: sentences"]] * len(t["sentences"]), "v",
            color="#9467bd", ms=8)
    ax.plot(t["sink"], [y["sink: audio chunks"]] * len(t["sink"]), "s", color="#ff7f0e", ms=7)
    ax.axhline(y["baseline ASR"] + 0.5, color="gray", lw=0.6)
    marks = [(0.0, "end of speech", "black"),
             (turn["ttfa_s"], f"first audio {turn['ttfa_s']:.2f} s", "#ff7f0e"),
             (turn["turn_s"], f"last audio {turn['turn_s']:.2f} s", "#d62728"),
             (baseline["turn_s"], f"baseline done {baseline['turn_s']:.2f} s", "gray")]
    if abs(turn["turn_s"] - turn["ttfa_s"]) < 0.05:  # one audio chunk: first = last
        marks[1:3] = [(turn["ttfa_s"], f"first = last audio {turn['ttfa_s']:.2f} s", "#d62728")]
    for k, (x, name, color) in enumerate(sorted(marks)):
        ax.axvline(x, color=color, ls="--", lw=1)
        ax.text(x, len(labels) - 0.05 - 0.32 * (k % 2), " " + name, fontsize=8, color=color,
                va="bottom", ha="left")
    ax.set_yticks(list(y.values()), list(y.keys()))
    ax.set_ylim(-0.7, len(labels) + 0.5)
    ax.set_xlabel("seconds after the end of the user's speech")
    ax.set_title(f"One voice turn through dataflows/voice.yml vs. the sequential baseline\n"
                 f"\u201c{question}\u201d  (TTFA {turn['ttfa_s']:.2f} s, "
                 f"turn {turn['turn_s']:.2f} s,"
                 f" framework overhead {turn['overhead_pct']:.1f} %)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> int:
    parser = make_parser(__doc__, full_help=True)
    add_output_flags(parser, "voice_latency.json", "voice_turn.png")
    parser.add_argument("--trace", type=Path, help="keep the graph's raw trace (JSON lines) here")
    parser.add_argument("--no-warmup", action="store_true",
                        help="count the first question too (no untimed warm-up turn)")
    parser.add_argument("--timeout", type=float, default=600, help="longest graph run, seconds")
    parser.add_argument("--no-streaming-comparison", action="store_true",
                        help="skip the second graph run, without streaming ASR")
    parser.add_argument("--no-peer", action="store_true",
                        help="skip Pipecat's run on the same questions and models")
    parser.add_argument("--baseline-passes", type=int, default=2,
                        help="times the sequential baseline is run (figures are their mean)")
    args = parser.parse_args()

    system_prompt, max_tokens = dialogue_settings()
    load = {"start": os.getloadavg()[0]}  # other work on the machine skews every figure
    texts = QUESTIONS if args.no_warmup else [WARMUP, *QUESTIONS]
    skip = 0 if args.no_warmup else 1
    work = Path(tempfile.mkdtemp(prefix="voice-latency-"))
    try:
        inputs = work / "in"
        print("speaking the questions, loading the baseline's models ...", file=sys.stderr,
              flush=True)
        speaker = open_model("piper-joe")
        questions = make_questions(inputs, texts, speaker)
        speaker.unload()
        # The graph's models: omni-node serves each task's catalog default. Loaded now, they
        # stay idle while the graph runs.
        asr = open_model(task=Task.SPEECH_RECOGNITION)
        llm = open_model(task=Task.TEXT_GENERATION)
        tts = open_model(task=Task.SPEECH_SYNTHESIS)
        models = {"asr": asr.spec.name, "llm": llm.spec.name, "tts": tts.spec.name}
        print("graph run (dora run dataflows/voice.yml, real-time audio) ...", file=sys.stderr,
              flush=True)
        run = graph_turns(VOICE, inputs, work / "streamed", len(questions), args.timeout)
        status, log, turns, pairs = run["status"], run["log"], run["turns"], run["pairs"]
        load["after_graph"] = os.getloadavg()[0]
        if args.trace:
            args.trace.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run["trace_file"], args.trace)
            args.trace.with_suffix(".dora.log").write_text(log)
        if status != 0:
            print(f"warning: dora run exited with status {status}; last lines of its output:\n"
                  f"{log[-2000:]}", file=sys.stderr)
            if len(turns) < len(questions):
                return 1
        unstreamed = None
        if not args.no_streaming_comparison:
            print("graph run without streaming ASR (no VAD snapshots) ...", file=sys.stderr,
                  flush=True)
            plain = work / "voice.unstreamed.yml"
            plain.write_text(dataflows.dump(dataflows.with_env(
                dataflows.load(VOICE), "vad", PARTIAL_EVERY_MS="0", TRANSCRIBE_ON_PAUSE="false")))
            unstreamed = graph_turns(plain, inputs, work / "unstreamed", len(questions),
                                     args.timeout)
            load["after_second_graph"] = os.getloadavg()[0]
        peer: list[dict] | str = "skipped (--no-peer)"
        if not args.no_peer:
            files = peer_files(asr, llm, tts)
            if isinstance(files, str):
                peer = files
                print(f"warning: no Pipecat run: {files}", file=sys.stderr)
            else:
                print("Pipecat on the same questions (its own pipeline, the same models) ...",
                      file=sys.stderr, flush=True)
                peer = run_peer(inputs, work, files, system_prompt, max_tokens, args.timeout)
                load["after_pipecat"] = os.getloadavg()[0]
        passes = []
        for n in range(args.baseline_passes):
            print(f"sequential baseline, pass {n + 1} ...", file=sys.stderr, flush=True)
            passes.append(run_baseline(inputs, questions, system_prompt, max_tokens, asr, llm,
                                       tts, [user for user, _ in pairs]))
        for adapter in (asr, llm, tts):
            adapter.unload()
        load["end"] = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    replies_written, graph_wall = run["replies_written"], run["wall_s"]

    stages = ("asr_s", "llm_first_token_s", "llm_s", "tts_s", "turn_s")
    baseline = [{**runs[0], **{key: statistics.mean(run[key] for run in runs) for key in stages},
                 "passes": [{k: run[k] for k in stages} for run in runs]}
                for runs in zip(*passes)]
    answered = sum(1 for r in baseline if r["reply"].strip())
    if replies_written != answered:
        print(f"warning: the sink wrote {replies_written} reply WAV files for {answered} replies",
              file=sys.stderr)
    if len(turns) != len(questions):
        print(f"warning: {len(turns)} timed turns for {len(questions)} questions; matched in "
              "order", file=sys.stderr)
    rows = []
    for i, (turn, question, base) in enumerate(zip(turns, questions, baseline)):
        heard, answer = pairs[i] if i < len(pairs) else ("", "")
        turn.update(question=question["text"], heard=heard, reply=answer,
                    baseline_turn_s=base["turn_s"], ttfa_ratio=turn["ttfa_s"] / base["turn_s"],
                    baseline=base, warmup=i < skip,
                    same_reply=" ".join(answer.split()) == " ".join(base["reply"].split()))
        if not turn["same_reply"]:
            print(f"warning: question {i}: the graph and the baseline replied differently",
                  file=sys.stderr)
        rows.append(turn)
    timed = [r for r in rows if not r["warmup"]]
    if not timed:
        print("no turn could be timed", file=sys.stderr)
        return 1
    median = {"question": "median"}
    for key in ["endpoint_s", "asr_s", "llm_first_token_s", "llm_s", "tts_first_chunk_s",
                "ttfa_s", "turn_s", "baseline_turn_s", "overhead_s", "overhead_pct",
                "ttfa_overhead_s", "model_compute_s", "asr_queue_s", "stall_s", "heard_by_s",
                "overhead_incl_endpoint_pct"]:
        median[key] = statistics.median(r[key] for r in timed)
    median["ttfa_ratio"] = median["ttfa_s"] / median["baseline_turn_s"]
    for stage in ("asr_s", "llm_first_token_s", "llm_s", "tts_s"):
        median[f"baseline_{stage}"] = statistics.median(r["baseline"][stage] for r in timed)
    segments: dict[str, list[float]] = {}
    for r in timed:
        for p in r["ttfa_path"]:
            segments.setdefault(f"{p['from']} -> {p['to']}", []).append(p["s"])
    median["ttfa_path"] = {k: statistics.median(v) for k, v in segments.items()}

    print_table(timed, median)
    print("\nTTFA critical chain, median per segment (ms):")
    for name, seconds in median["ttfa_path"].items():
        print(f"  {seconds * 1000:8.1f}  {name}")
    print(f"\n{'sequential baseline':38} {'ASR':>7} {'LLM1st':>7} {'LLM':>7} {'TTS':>7} "
          f"{'turn':>7} {'heard':>7} {'graph heard':>11}")
    for r in timed:
        b = r["baseline"]
        print(f"{r['question'][:38]:38} {b['asr_s']:7.2f} {b['llm_first_token_s']:7.2f} "
              f"{b['llm_s']:7.2f} {b['tts_s']:7.2f} {b['turn_s']:7.2f} "
              f"{b['turn_s'] + b['reply_audio_s']:7.2f} {r['heard_by_s']:11.2f}")
    print("(`heard`: when the last word of the reply has been played, from the end of speech)")
    goals = {"ttfa_le_half_baseline": median["ttfa_s"] <= 0.5 * median["baseline_turn_s"],
             "overhead_le_10pct": median["overhead_pct"] <= 10.0}
    print(f"goal TTFA <= 0.5 x baseline turn: {median['ttfa_s']:.2f} s vs "
          f"{0.5 * median['baseline_turn_s']:.2f} s -> "
          f"{'met' if goals['ttfa_le_half_baseline'] else 'NOT met'}")
    print(f"goal framework overhead <= 10 % of the turn: {median['overhead_pct']:.1f} % "
          f"({median['overhead_s'] * 1000:.0f} ms, endpointing of {median['endpoint_s']:.2f} s "
          f"not counted) -> {'met' if goals['overhead_le_10pct'] else 'NOT met'}")

    comparison = None
    if unstreamed is not None:
        comparison = streaming_comparison(timed, unstreamed["turns"][skip:],
                                          median["baseline_turn_s"])
    versus_peer = peer if isinstance(peer, str) else peer_comparison(timed, peer[skip:])
    pick = max(timed, key=lambda r: r["sentences"])  # the most pipelining to see
    plot_turn(args.png, pick, pick["baseline"], pick["question"])
    write_json(args.json, {
        **run_stamp(), "models": models,
        "system_prompt": system_prompt, "max_tokens": max_tokens,
        "warmup_question": None if args.no_warmup else WARMUP,
        "graph_wall_s": graph_wall, "dora_status": status,
        "reply_wavs_written": replies_written, "baseline_passes": args.baseline_passes,
        "load_average_1min": load,
        "turns": rows, "median": median,
        "goals": goals, "without_streaming_asr": comparison, "pipecat": versus_peer,
        "timeline_png": str(args.png), "timeline_turn": pick["question"],
    })
    print("machine load (1-minute average): " + ", ".join(f"{k.replace('_', ' ')} {v:.2f}"
                                                           for k, v in load.items()))
    print(f"\nwrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
