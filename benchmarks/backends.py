"""Every backend of every task on the same weights and inputs, the engines called directly, and
the default path through an omni-node in a dataflow -- in one run.

    python benchmarks/backends.py [--repeats N] [--duels D] [--json FILE] [--png FILE]
                                  [--tasks TASK...]

(Run it with the project's environment first on PATH: dora starts `.py` nodes with `python`.)

Per task, each contender serves the same request in --repeats rounds (default 5) after a
warm-up, the contenders taking turns; the median latency and the throughput are recorded:

  speech_recognition  whisper-tiny.en on a 4.6 s spoken question: MLX (float32), CTranslate2
                      float32 and int8 through our adapter; CTranslate2's Whisper.generate called
                      directly on the same features; faster-whisper (if installed: it is not a
                      dependency) on the same converted directory, greedy, English, no timestamps
  text_generation     SmolLM2-135M, one 48-token reply: MLX float32, 8-bit and 4-bit, CTranslate2
                      float32 and int8, llama.cpp on the Q4_1 GGUF through our adapters;
                      CTranslate2's Generator called directly on the same prompt tokens;
                      llama-cpp-python's create_chat_completion (its own template, greedy,
                      streamed) on the same GGUF
  speech_synthesis    Piper joe, two sentences: our adapter (ONNX Runtime), PiperVoice directly
  embedding           all-MiniLM-L6-v2, 32 sentences: our MLX and ONNX Runtime adapters (the
                      ONNX graph written from the same safetensors); ONNX Runtime's session
                      called directly on that graph

"node" is the task's default backend on this machine (mofa_omni.adapters.backends) served by an omni-node
in a real dataflow (benchmarks/dataflows/backends.yml), timed by a driver node from sending the
request to its last result, in the same rounds as the direct calls (each round, task by task:
every contender once and the node once, then --duels more passes (default 3) over the peers and
the node only, each pass in a rotated order). The node is compared with the fastest *peer*: a
library a user would call instead of us (faster-whisper or CTranslate2's engine,
llama-cpp-python or CTranslate2's Generator, PiperVoice, ONNX Runtime's session),
by throughput -- LLM engines write replies of different lengths, so the driver reports the
node's tokens. "vs fastest peer" is the median over the passes of the node's throughput divided
by the peer's in the same pass -- paired, so that the machine's drift between passes (up to
40 % here) cancels -- with the range of the middle half (goal >= 0.95); "latency" is the node's
median latency over the peer's (goal <= 1.1).

Peers a user would pick instead that cannot run here are named in the output
(sentence-transformers and fastembed for MiniLM; llama-cpp-python when the set-up could not
build it). Prints a table per task, writes benchmarks/results/backends.json (or --json FILE)
and a bar chart per task in one PNG (benchmarks/results/backends.png or --png FILE). About
5 minutes (18 with --repeats 12).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import (
    FLOWS,
    SAMPLES,
    DoraRun,
    add_output_flags,
    dora_env,
    make_parser,
    pyplot,
    save_figure,
    timed_result,
    wait_for_file,
    write_json,
)

from mofa_omni.models.compute import ensure_fast_blas

ensure_fast_blas()

from mofa_omni.adapters.backends import create_adapter, select_adapter  # noqa: E402
from mofa_omni.contract.tasks import (  # noqa: E402
    ChatMessage,
    ChatRequest,
    EmbeddingRequest,
    SpeechRequest,
    TranscriptionRequest,
)
from mofa_omni.media.audio import read_wav, resample  # noqa: E402
from mofa_omni.models.catalog import Catalog  # noqa: E402
from mofa_omni.models.store import ModelStore  # noqa: E402

SAMPLE = SAMPLES / "01-capital-of-france.wav"
PROMPT = "Write three short sentences about the sea."
MAX_TOKENS = 48
SPOKEN = "The capital of France is Paris. It is known for the Eiffel Tower."
SENTENCES = [f"Sentence number {i} is about {topic}." for i, topic in
             enumerate(["music", "the sea", "cooking", "robots"] * 8)]
SETTLE_S = 0.1  # pause before each timed call
MODELS = {"speech_recognition": "whisper-tiny.en", "text_generation": "smollm2-135m",
          "speech_synthesis": "piper-joe", "embedding": "minilm-l6"}
NOT_HERE = {
    "speech_recognition": "" if importlib.util.find_spec("faster_whisper") else
                          "faster-whisper is not installed (pip install faster-whisper)",
    "text_generation": "" if importlib.util.find_spec("llama_cpp") else
                       "llama.cpp: llama-cpp-python is not installed (scripts/setup.sh builds it)",
    "speech_synthesis": "",
    "embedding": "sentence-transformers needs torch; fastembed downloads its ONNX files",
}


@dataclasses.dataclass
class Contender:
    name: str
    run: Callable[[], float]  # serves the request once; returns the units it produced
    unit: str
    peer: bool = False  # a library a user would call instead of us (not one of our adapters)


class NodePath:
    """Each task's default backend in an omni-node of benchmarks/dataflows/backends.yml, timed
    by its driver in rounds this process starts, between the direct calls. A context manager:
    the graph is stopped on leaving, however the block ends."""

    def __init__(self, steps: int):
        self.work = Path(tempfile.mkdtemp(prefix="backends-"))
        env = dora_env({"WORK": self.work, "STEPS": steps, "SAMPLE": SAMPLE, "PROMPT": PROMPT,
                        "MAX_TOKENS": MAX_TOKENS, "SPOKEN": SPOKEN,
                        "SENTENCES": json.dumps(SENTENCES)})
        self.graph = DoraRun(FLOWS / "backends.yml", env, log=self.work / "dora.log")
        self.steps = 0

    def __enter__(self) -> NodePath:
        self.graph.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.graph.__exit__(*exc)

    def run(self, tasks: list[str], timeout: float = 600) -> dict[str, list]:
        """One request to each task's node, in turn: task -> [seconds, tokens or None]."""
        index, self.steps = self.steps, self.steps + 1
        (self.work / f"go-{index}").write_text(",".join(tasks))
        return wait_for_file(self.work / f"done-{index}.json", lambda p: json.loads(p.read_text()),
                             timeout=timeout, what="the driver's timings", every_s=0.02,
                             graph=self.graph)

    def finish(self) -> None:
        """Let the graph end by itself (its driver stops after the last step), for up to 60 s."""
        try:
            self.graph.wait(60)
        except subprocess.TimeoutExpired:
            pass


def measure(contenders: dict[str, list[Contender]], repeats: int,
            duels: int) -> dict[str, dict]:
    """Per task, each contender's median latency and the node path's, in interleaved rounds
    (the machine's drift falls on all alike), after a warm-up each. Each round is one pass over
    every contender and the node, then ``duels`` passes over the peers and the node only: what
    the goal compares gets more samples, each pass pairing the node with the peers beside it."""
    passes = {task: [[*range(len(group)), None]] + [[*peers(group), None]] * duels
              for task, group in contenders.items()}
    with NodePath(1 + repeats * sum(len(p) for p in passes.values())) as node:
        units = {task: [c.run() for c in group] for task, group in contenders.items()}  # warm-up
        node.run(list(contenders))
        times: dict[str, list[list[float]]] = {t: [[] for _ in g] for t, g in contenders.items()}
        node_runs: dict[str, list[list]] = {task: [] for task in contenders}
        for round_ in range(repeats):
            for task, group in contenders.items():
                for number, turns in enumerate(passes[task]):
                    # In an order rotated each pass: whatever runs right after another use of
                    # the same weights (warm caches) changes turns.
                    shift = (round_ + number) % len(turns)
                    for position in turns[shift:] + turns[:shift]:
                        # ONNX Runtime's threads spin ~20 ms after a run: let them settle first,
                        # so that no call pays for the one before it (in this process or the
                        # node's).
                        time.sleep(SETTLE_S)
                        if position is None:
                            node_runs[task].append(node.run([task])[task])
                            continue
                        seconds, units[task][position] = timed_result(group[position].run)
                        times[task][position].append(seconds)
        node.finish()
    return {task: _summary(group, units[task], times[task], node_runs[task])
            for task, group in contenders.items()}


def peers(group: list[Contender]) -> list[int]:
    """The positions of the libraries a user would call instead of us (of every contender where
    none has the weights)."""
    return [i for i, c in enumerate(group) if c.peer] or list(range(len(group)))


def _summary(group: list[Contender], units: list[float], times: list[list[float]],
             node_runs: list[list]) -> dict:
    """The task's rows, and the node compared with the fastest peer library (by throughput:
    LLM engines write replies of different lengths) round by round."""
    rows = []
    for contender, produced, latencies in zip(group, units, times):
        latency = statistics.median(latencies)
        rows.append({"contender": contender.name, "latency_s": round(latency, 4),
                     "throughput": round(produced / latency, 3), "unit": contender.unit,
                     "peer": contender.peer})
    best = max(peers(group), key=lambda i: rows[i]["throughput"])
    # The node produces what the reference does (the same audio, sentences), except an LLM,
    # whose driver reports the reply's tokens.
    node_units = [tokens if tokens is not None else units[best] for _, tokens in node_runs]
    node_seconds = [seconds for seconds, _ in node_runs]
    paired = sorted((n / s) / (units[best] / d)
                    for n, s, d in zip(node_units, node_seconds, times[best]))
    quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
    latency = statistics.median(node_seconds)
    return {"direct": rows, "node": {
        "latency_s": round(latency, 4),
        "throughput": round(statistics.median(node_units) / latency, 3),
        "vs_fastest_peer": round(statistics.median(paired), 3),
        "vs_fastest_middle_half": [round(quartiles[0], 3), round(quartiles[2], 3)],
        "latency_vs_fastest_peer": round(latency / rows[best]["latency_s"], 3),
        "fastest_peer": group[best].name, "latencies": node_seconds,
        "tokens": [tokens for _, tokens in node_runs]}}


def variant(catalog: Catalog, name: str, backend: str, **options):
    """``name`` on ``backend``, with other options under its own name (its own converted files)."""
    spec = catalog.get(name)
    if options:
        suffix = "-".join(str(v) for v in options.values())
        spec = dataclasses.replace(spec, name=f"{name}-{suffix}", options=spec.options | options)
    adapter = create_adapter(spec, backend)
    adapter.load(ModelStore().prepare(adapter))
    return adapter


def asr_contenders(catalog: Catalog) -> list[Contender]:
    import ctranslate2

    from mofa_omni.adapters import ct2_whisper, whisper_features

    audio, rate = read_wav(SAMPLE)
    request, seconds = TranscriptionRequest(audio, rate), len(audio) / rate
    contenders = []
    for label, backend, options in [("MLX float32", "mlx", {}),
                                    ("CTranslate2 float32", "ctranslate2",
                                     {"compute_type": "float32"}),
                                    ("CTranslate2 int8", "ctranslate2", {})]:
        adapter = variant(catalog, MODELS["speech_recognition"], backend, **options)
        contenders.append(Contender(f"{label} (adapter)",
                                    lambda a=adapter: (a.transcribe(request), seconds)[1],
                                    "audio s/s"))
    engine, tokenizer = adapter._model, adapter._tokenizer  # the int8 one, loaded above
    audio16 = resample(audio, rate, whisper_features.SAMPLE_RATE)

    def direct() -> float:
        features = ctranslate2.StorageView.from_array(whisper_features.log_mel(audio16)[None])
        engine.generate(features, [list(tokenizer.sot_sequence_including_notimestamps)],
                        beam_size=1, max_length=ct2_whisper.MAX_NEW_TOKENS, suppress_blank=True)
        return seconds

    contenders.append(Contender("CTranslate2 int8 (engine directly)", direct, "audio s/s",
                                peer=True))
    try:
        from faster_whisper import WhisperModel
    except ImportError:
        return contenders
    # The same converted directory: ct2_whisper writes the tokenizer.json faster-whisper reads.
    peer = WhisperModel(str(adapter.model_dir), device="cpu", compute_type="int8",
                        cpu_threads=os.cpu_count() or 1)

    def faster_whisper() -> float:
        segments, _ = peer.transcribe(audio16, beam_size=1, language="en",
                                      without_timestamps=True, vad_filter=False,
                                      condition_on_previous_text=False)
        list(segments)
        return seconds

    contenders.append(Contender("faster-whisper int8 (library directly)", faster_whisper,
                                "audio s/s", peer=True))
    return contenders


def llm_contenders(catalog: Catalog) -> list[Contender]:
    request = ChatRequest([ChatMessage("user", PROMPT)], max_tokens=MAX_TOKENS)

    def through(adapter) -> Callable[[], float]:
        def run() -> float:
            return next(c for c in adapter.generate(request) if c.final).completion_tokens
        return run

    contenders = []
    backends = [("MLX float32", "smollm2-135m", "mlx", {}),
                ("MLX 8-bit", "smollm2-135m", "mlx", {"bits": 8}),
                ("MLX 4-bit", "smollm2-135m-q4", "mlx", {}),
                ("CTranslate2 float32", "smollm2-135m", "ctranslate2", {"compute_type": "float32"}),
                ("CTranslate2 int8", "smollm2-135m", "ctranslate2", {})]
    for label, name, backend, options in backends:
        adapter = variant(catalog, name, backend, **options)
        contenders.append(Contender(f"{label} (adapter)", through(adapter), "tok/s"))
    from mofa_omni.adapters.chat import chat_prompt_tokens

    generator, tokenizer = adapter._generator, adapter._tokenizer  # the int8 one
    prompt = tokenizer.convert_ids_to_tokens(chat_prompt_tokens(tokenizer, request))
    end = tokenizer.convert_ids_to_tokens(sorted(tokenizer.eos_token_ids))

    def direct() -> float:
        return sum(1 for _ in generator.generate_tokens(prompt, max_length=MAX_TOKENS,
                                                        end_token=end, sampling_topk=1))

    contenders.append(Contender("CTranslate2 int8 (engine directly)", direct, "tok/s",
                                peer=True))
    if importlib.util.find_spec("llama_cpp") is None:
        return contenders
    adapter = variant(catalog, "smollm2-135m", "llama.cpp")
    contenders.append(Contender("llama.cpp Q4_1 (adapter)", through(adapter), "tok/s"))
    from llama_cpp import Llama

    # What a llama-cpp-python user writes: the GGUF, its own chat template, greedy, streamed.
    peer = Llama(model_path=str(adapter.model_dir / "model.gguf"), n_ctx=4096,
                 n_threads=os.cpu_count() or 1, verbose=False)
    messages = [{"role": "user", "content": PROMPT}]

    def llama_cpp() -> float:
        stream = peer.create_chat_completion(messages, max_tokens=MAX_TOKENS, temperature=0.0,
                                             repeat_penalty=1.0, stream=True)
        return sum(1 for chunk in stream if chunk["choices"][0]["delta"].get("content"))

    contenders.append(Contender("llama-cpp-python (library directly)", llama_cpp, "tok/s",
                                peer=True))
    return contenders


def tts_contenders(catalog: Catalog) -> list[Contender]:
    from piper.config import SynthesisConfig

    adapter = variant(catalog, MODELS["speech_synthesis"], "onnxruntime")
    rate = adapter.sample_rate
    voice = adapter._voice
    config = SynthesisConfig(length_scale=voice.config.length_scale)
    return [
        Contender("ONNX Runtime (adapter)", lambda: sum(
            len(c.audio) for c in adapter.synthesize(SpeechRequest(SPOKEN))) / rate,
            "audio s/s"),
        Contender("PiperVoice (library directly)", lambda: sum(
            len(c.audio_float_array) for c in voice.synthesize(SPOKEN, config)) / rate,
            "audio s/s", peer=True),
    ]


def embedding_contenders(catalog: Catalog) -> list[Contender]:
    import onnxruntime
    from tokenizers import Tokenizer

    request = EmbeddingRequest(SENTENCES)
    contenders = []
    for label, backend in [("MLX", "mlx"), ("ONNX Runtime", "onnxruntime")]:
        adapter = variant(catalog, MODELS["embedding"], backend)
        contenders.append(Contender(f"{label} (adapter)", lambda a=adapter: (
            a.embed(request), len(SENTENCES))[1], "sentences/s"))
    # What an ONNX Runtime user writes for an exported sentence encoder: one session with its
    # default threads, the tokenizer padding the whole list to its longest text, one run.
    session = onnxruntime.InferenceSession(str(adapter.model_dir / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(adapter.model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(adapter.max_length)
    tokenizer.enable_padding()

    def direct() -> float:
        encodings = tokenizer.encode_batch(SENTENCES)
        feed = {name: np.array([getattr(e, field) for e in encodings], np.int64)
                for name, field in [("input_ids", "ids"), ("token_type_ids", "type_ids"),
                                    ("attention_mask", "attention_mask")]}
        return len(session.run(None, feed)[0])

    contenders.append(Contender("ONNX Runtime (engine directly)", direct, "sentences/s",
                                peer=True))
    return contenders


BUILDERS = {"speech_recognition": asr_contenders, "text_generation": llm_contenders,
            "speech_synthesis": tts_contenders, "embedding": embedding_contenders}


def main() -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--duels", type=int, default=3,
                        help="extra passes per round over the peers and the node only")
    add_output_flags(parser, "backends.json", "backends.png")
    parser.add_argument("--tasks", nargs="*", choices=list(MODELS), default=list(MODELS))
    args = parser.parse_args()
    catalog = Catalog.load()
    contenders = {}
    for task in args.tasks:
        print(f"loading {task} ...", flush=True)
        contenders[task] = BUILDERS[task](catalog)
    print(f"measuring, {args.repeats} rounds ...", flush=True)
    results = measure(contenders, args.repeats, args.duels)
    for task in args.tasks:
        default = select_adapter(catalog.get(MODELS[task]))
        results[task] |= {"model": MODELS[task], "not_measured": NOT_HERE[task],
                          "default": f"{default.adapter} ({default.backend}): {default.reason}"}
    print_tables(results)
    write_json(args.json, {"repeats": args.repeats, "duels": args.duels, "tasks": results})
    plot(results, args.png)
    print(f"\nwrote {args.json} and {args.png}")
    return 0


def print_tables(results: dict[str, dict]) -> None:
    for task, result in results.items():
        print(f"\n{task}: {result['model']}; default here: {result['default']}")
        for row in result["direct"]:
            print(f"  {row['contender']:38} {row['latency_s'] * 1000:8.1f} ms "
                  f"{row['throughput']:9.2f} {row['unit']}")
        node = result["node"]
        print(f"  {'default in an omni-node (dataflow)':38} {node['latency_s'] * 1000:8.1f} ms "
              f"{node['throughput']:9.2f}   {node['vs_fastest_peer']:.2f}x the throughput of "
              f"{node['fastest_peer']} (middle half of the passes "
              f"{node['vs_fastest_middle_half'][0]:.2f}-{node['vs_fastest_middle_half'][1]:.2f}x), "
              f"latency {node['latency_vs_fastest_peer']:.2f}x")
        if result["not_measured"]:
            print(f"  not measured: {result['not_measured']}")


def plot(results: dict[str, dict], path: Path) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(len(results), 1, figsize=(9, 2.6 * len(results)), squeeze=False)
    for axis, (task, result) in zip(axes[:, 0], results.items()):
        names = [r["contender"] for r in result["direct"]] + ["default in an omni-node"]
        values = [r["throughput"] for r in result["direct"]] + [result["node"]["throughput"]]
        colors = ["#8899aa"] * len(result["direct"]) + ["#dd7733"]
        axis.barh(names, values, color=colors)
        axis.set_title(f"{task} ({result['model']}): {result['direct'][0]['unit']}, higher is "
                       f"faster", fontsize=10)
        axis.invert_yaxis()
        axis.tick_params(labelsize=8)
    figure.tight_layout()
    save_figure(figure, path)


if __name__ == "__main__":
    sys.exit(main())
