"""The OpenAI-compatible gateway against calling the model's adapter directly, in one run; and
requests/s through the gateway under concurrency.

    python benchmarks/gateway.py [--json FILE] [--port PORT] [--quick] [--rounds N] [--trace]

(Run it with the project's environment first on PATH: dora starts `.py` nodes with `python`.)

dataflows/server.yml (the default models, a scheduler, the gateway node) is started with
`dora run` on --port (default: a free one); once every served model is loaded, the same models
are opened in this process with `open_model` (the backend the nodes pick on this machine) and
each request is served both ways, the paths taking turns (the order rotating every round, 0.2 s
apart: OpenBLAS, under MLX, spins a core for ~130 ms after each call), after a warm-up of each:

  chat            smollm2-135m, one user prompt, temperature 0, max_tokens 32: the adapter's
                  `generate` in this process ("direct": first non-empty chunk and last chunk),
                  the gateway whole (`client.chat.completions.create`, the official `openai`
                  client) and streamed (first non-empty content delta, last event); total
                  latency, time to first token and completion tokens/s, medians over --rounds
                  (default 25), and whether every path gave the same reply.
                  Goal: gateway whole / direct <= 1.05 (median total latency).
  embeddings      minilm-l6, one short sentence per request (60 rounds): median and p90;
                  overhead = gateway median - direct median. Goal: <= 10 ms.
  transcription   whisper-tiny.en on dataflows/samples/01-capital-of-france.wav (the WAV bytes
                  decoded in both paths), 5 rounds -- informational
  speech          piper-joe, one sentence, as WAV bytes both ways, 5 rounds -- informational
  tool calls      smollm2-135m asked "What is 123 times 457?" with a multiply tool: a required
                  call against prose from the same prompt ("auto", where SmolLM2 answers on its
                  own), through the gateway and direct, 10 rounds; time to a complete call vs
                  the prose answer, and ms per token of each.
                  Goal: constrained call per token / prose per token <= 1.2 (direct).
  http floor      `GET /stats` with a kept-alive httpx client: the loopback HTTP round trip
                  without any model, for reading the overheads above -- informational

The model nodes run in their own processes on the same cores as this one: while one path runs,
the other sits idle (the direct adapters stay loaded here). For chat and embeddings the CPU time
each path costs per request (its 0.2 s pause included) is also given, by process (this one, the
gateway node, the model node, the other nodes, `dora run`): the engines take a thread per core,
so what the gateway and dora spend on each streamed token is time taken from the engine.
--trace sets MOFA_OMNI_TRACE for the nodes and splits a gateway chat request into client ->
model node, waiting, the node serving it (token-to-token times against the direct ones), last
result -> client (the trace's file writes cost a little on every token).

Concurrency: 1, 4 and 8 client threads, each with its own `openai` client, send requests back to
back for a fixed time (embeddings 8 s, chat 10 s with max_tokens 8); requests/s (answered, over
the time to the last answer), median and p99 latency, errors (no answer within 30 s included;
goal: 0), the gateway's /stats (non-200 responses, replies dropped on its inputs) and any
messages the nodes saw dropped (their "lost on input" log lines). A model node serves one request
at a time, so chat throughput cannot grow with clients; embeddings show the gateway's own
capacity against the direct adapter's serial rate (1 / its median latency).

Prints tables, writes benchmarks/results/gateway.json (or --json FILE). About 3 minutes;
--quick is a smoke run (under a minute once the models are converted).
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import (
    ROOT,
    SAMPLES,
    DoraRun,
    add_output_flags,
    back_to_back,
    descendants,
    dora_env,
    free_port,
    machine,
    make_parser,
    median,
    percentile,
    print_header,
    timed,
    timer,
    write_json,
)

from mofa_omni.models.compute import ensure_fast_blas

ensure_fast_blas()

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import openai  # noqa: E402
import psutil  # noqa: E402

from mofa_omni.adapters.loading import open_model  # noqa: E402
from mofa_omni.contract.tasks import (  # noqa: E402
    ChatMessage,
    ChatRequest,
    EmbeddingRequest,
    SpeechRequest,
    Tool,
    TranscriptionRequest,
)
from mofa_omni.media.audio import read_wav, wav_bytes  # noqa: E402

SERVER = ROOT / "dataflows" / "server.yml"
SAMPLE = SAMPLES / "01-capital-of-france.wav"
CHAT_MODEL, ASR_MODEL, TTS_MODEL, EMBED_MODEL = \
    "smollm2-135m", "whisper-tiny.en", "piper-joe", "minilm-l6"
PROMPT = "Tell me a long story about a lighthouse keeper and the sea."
MAX_TOKENS = 32
LOAD_MAX_TOKENS = 8  # chat under concurrency
SENTENCE = "The cat sleeps on the sofa."
SPOKEN = "The capital of France is Paris."
# OpenBLAS (MLX's BLAS on Linux) keeps its threads spinning ~130 ms after a call, a whole core
# on a 2-core machine (measured here): each call gets this pause before the next one starts.
SETTLE_S = 0.2
LOAD_TIMEOUT_S = 30  # a request under load with no answer by then is an error
LOAD_S = 240  # the models' first load (conversion included) may take this long
CHAT_GOAL, EMBED_GOAL_MS, TOOL_TOKEN_GOAL = 1.05, 10.0, 1.2
TOOL_QUESTION = "What is 123 times 457?"
MULTIPLY_TOOL = {"type": "function", "function": {
    "name": "multiply", "description": "Multiply two numbers",
    "parameters": {"type": "object", "required": ["a", "b"],
                   "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}


# --- the server --------------------------------------------------------------------------------

class Server:
    """dataflows/server.yml under `dora run`, its log in a file, as a context manager: stopped
    on leaving (SIGINT, 90 s, then killed), however the block ends; its log is then ``output``."""

    def __init__(self, port: int, trace: Path | None = None,
                 env: dict[str, object] | None = None, dataflow: Path = SERVER):
        self.port = port
        self.url = f"http://127.0.0.1:{port}/v1"
        env = dora_env({"PORT": port, **({"MOFA_OMNI_TRACE": trace} if trace else {}),
                        **(env or {})})
        fd, log = tempfile.mkstemp(prefix="gateway-bench-", suffix=".log")
        os.close(fd)
        self.graph = DoraRun(dataflow, env, log=Path(log), cwd=ROOT, grace_s=90)
        self.http = httpx.Client(timeout=10)
        self.output = ""

    def __enter__(self) -> Server:
        self.graph.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()
        self.graph.__exit__(*exc)
        self.output = self.graph.log_text()
        self.graph.log.unlink()

    def log_text(self) -> str:
        return self.graph.log_text()

    def wait_ready(self, timeout: float = LOAD_S) -> list[str]:
        """Wait until every model with a serving node is loaded; their names."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.graph.running:
                raise RuntimeError(f"the graph stopped:\n{self.log_text()[-5000:]}")
            try:
                data = self.http.get(f"{self.url}/models", timeout=2).json()["data"]
                served = [m for m in data if m["served_by"]]
                if served and all(m["loaded"] for m in served):
                    return [m["id"] for m in served]
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the models did not load within {timeout:g} s:\n"
                           f"{self.log_text()[-5000:]}")

    def stats(self) -> dict:
        return self.http.get(self.url.removesuffix("/v1") + "/stats").json()

    def client(self, timeout: float = 120) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=timeout)


# --- statistics --------------------------------------------------------------------------------

def summary_ms(seconds: list[float]) -> dict:
    ms = [s * 1000 for s in seconds]
    return {"median_ms": round(median(ms), 2), "p90_ms": round(percentile(ms, 90), 2),
            "min_ms": round(min(ms), 2) if ms else None, "n": len(ms)}


class CpuMeter:
    """CPU time (user + system) of this process and of the graph's processes, by role: the
    gateway node, the model node under test, the other nodes, and `dora run` (daemon and
    coordinator). Linux counts it in 10 ms ticks: meaningful as an average over many calls."""

    def __init__(self, server: Server, task: str):
        self.roles: dict[str, list[psutil.Process]] = {"client (this process)": [psutil.Process()],
                                                        "gateway node": [], "model node": [],
                                                        "other nodes": [],
                                                        "dora run": [psutil.Process(server.graph.pid)]}
        for process in descendants(server.graph.pid):
            try:
                command = " ".join(process.cmdline())
                # a node runs as its console script (omni-gateway) or, from a checkout, its file
                if "omni-gateway" in command or "gateway.py" in command:
                    self.roles["gateway node"].append(process)
                elif ("omni-node" in command or "omni_node.py" in command) \
                        and process.environ().get("TASK") == task:
                    self.roles["model node"].append(process)
                else:
                    self.roles["other nodes"].append(process)
            except psutil.Error:
                continue

    def sample(self) -> dict[str, float]:
        seconds = {}
        for role, processes in self.roles.items():
            total = 0.0
            for process in processes:
                try:
                    times = process.cpu_times()
                    total += times.user + times.system
                except psutil.Error:
                    pass
            seconds[role] = total
        return seconds


def rounds(paths: dict[str, Callable[[], dict]], count: int, warmup: int = 1,
           cpu: CpuMeter | None = None) -> tuple[dict[str, list], dict[str, dict[str, float]]]:
    """Each path ``count`` times, taking turns (the order rotating every round), after
    ``warmup`` untimed calls of each, SETTLE_S apart; and, with ``cpu``, each path's CPU
    milliseconds per call (and its settling time) by process role."""
    names = list(paths)
    for _ in range(warmup):
        for name in names:
            paths[name]()
    samples: dict[str, list] = {name: [] for name in names}
    used: dict[str, collections.Counter[str]] = {name: collections.Counter() for name in names}
    for i in range(count):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            before = cpu.sample() if cpu else {}
            samples[name].append(paths[name]())
            time.sleep(SETTLE_S)  # what the call left spinning ends before the next one
            if cpu:
                after = cpu.sample()
                used[name].update({role: after[role] - before[role] for role in after})
    cpu_ms = {name: {role: round(seconds * 1000 / count, 1) for role, seconds in roles.items()}
              for name, roles in used.items()} if cpu else {}
    return samples, cpu_ms


# --- chat --------------------------------------------------------------------------------------

def chat_direct(adapter) -> Callable[[], dict]:
    def run() -> dict:
        request = ChatRequest([ChatMessage("user", PROMPT)], max_tokens=MAX_TOKENS)
        started, first, pieces, last = time.perf_counter(), None, [], None
        for chunk in adapter.generate(request):
            if chunk.text and first is None:
                first = time.perf_counter()
            pieces.append(chunk.text)
            last = chunk
        ended = time.perf_counter()
        return {"total_s": ended - started, "first_s": (first or ended) - started,
                "tokens": last.completion_tokens, "finish": last.finish_reason,
                "text": "".join(pieces)}
    return run


def chat_whole(client: openai.OpenAI) -> Callable[[], dict]:
    def run() -> dict:
        wall, started = time.time_ns(), time.perf_counter()
        reply = client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": PROMPT}],
            max_tokens=MAX_TOKENS, temperature=0)
        total = time.perf_counter() - started
        return {"total_s": total, "tokens": reply.usage.completion_tokens,
                "wall_ns": (wall, time.time_ns()),
                "finish": reply.choices[0].finish_reason,
                "text": reply.choices[0].message.content}
    return run


def chat_stream(client: openai.OpenAI) -> Callable[[], dict]:
    def run() -> dict:
        wall = time.time_ns()
        started, first, pieces, tokens, finish = time.perf_counter(), None, [], 0, ""
        stream = client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": PROMPT}],
            max_tokens=MAX_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True})
        for event in stream:
            if event.choices:
                text = event.choices[0].delta.content
                if text and first is None:
                    first = time.perf_counter()
                pieces.append(text or "")
                finish = event.choices[0].finish_reason or finish
            if event.usage:
                tokens = event.usage.completion_tokens
        ended = time.perf_counter()
        return {"total_s": ended - started, "first_s": (first or ended) - started,
                "tokens": tokens, "finish": finish, "text": "".join(pieces),
                "wall_ns": (wall, time.time_ns())}
    return run


def chat_figures(samples: dict[str, list]) -> dict:
    out = {}
    for name, runs in samples.items():
        total = [r["total_s"] for r in runs]
        figures = {"total": summary_ms(total),
                   "tokens_per_s": round(median([r["tokens"] / r["total_s"] for r in runs]), 1),
                   "completion_tokens": sorted({r["tokens"] for r in runs}),
                   "finish_reasons": sorted({r["finish"] for r in runs}),
                   "totals_ms": [round(t * 1000, 1) for t in total]}
        if "first_s" in runs[0]:
            figures["first_token"] = summary_ms([r["first_s"] for r in runs])
        out[name] = figures
    direct = out["direct"]["total"]["median_ms"]
    for name in ("gateway whole", "gateway streamed"):
        out[name]["vs_direct"] = round(out[name]["total"]["median_ms"] / direct, 3)
    texts = {name: {r["text"] for r in runs} for name, runs in samples.items()}
    out["same_reply"] = all(t == texts["direct"] for t in texts.values()) and \
        len(texts["direct"]) == 1
    out["reply"] = next(iter(texts["direct"]))
    return out


def trace_segments(path: Path, runs: list[dict], node: str = "llm") -> dict:
    """Where a gateway request's time goes, from the nodes' trace (MOFA_OMNI_TRACE) and the
    client's wall clock: client -> model node's input ("in"), waiting in the node ("queue"),
    the node serving it up to its last result ("node"), of which its first result ("node
    first"), and last result -> the client's end ("out"); medians in ms. Requests are serial,
    so the one the node received within a call's window is that call's."""
    from mofa_omni.node import trace

    by_request: dict[str, list[dict]] = collections.defaultdict(list)
    for line in trace.read(path):
        if line.get("node") == node:
            by_request[str(line.get("request_id"))].append(line)
    received = {rid: min(line["now_ns"] for line in lines if line["event"] == "recv")
                for rid, lines in by_request.items() if any(line["event"] == "recv" for line in lines)}
    parts: dict[str, list[float]] = collections.defaultdict(list)
    gaps: list[float] = []
    for run in runs:
        begin, end = run["wall_ns"]
        mine = [rid for rid, at in received.items() if begin <= at <= end]
        if len(mine) != 1:
            continue
        lines = by_request[mine[0]]
        recv = received[mine[0]]
        start = min((line["now_ns"] for line in lines if line["event"] == "start"), default=recv)
        sends = sorted(line["now_ns"] for line in lines if line["event"] == "send")
        if not sends:
            continue
        for name, ns in (("in", recv - begin), ("queue", start - recv), ("node", sends[-1] - start),
                         ("node first", sends[0] - start), ("out", end - sends[-1])):
            parts[name].append(ns / 1e6)
        gaps += [(b - a) / 1e6 for a, b in itertools.pairwise(sends[:-1])]  # token to token
    out = {name: round(median(values), 2) for name, values in parts.items()}
    out["requests"] = len(parts["node"])
    if gaps:
        out["token_gap_median_ms"], out["token_gap_p90_ms"] = round(median(gaps), 2), \
            round(percentile(gaps, 90), 2)
    return out


def direct_token_gaps(adapter, count: int) -> dict:
    """The direct adapter's token-to-token times (the same slice as trace_segments takes)."""
    gaps: list[float] = []
    for _ in range(count):
        request = ChatRequest([ChatMessage("user", PROMPT)], max_tokens=MAX_TOKENS)
        times = [time.perf_counter()]
        for _chunk in adapter.generate(request):
            times.append(time.perf_counter())
        gaps += [(b - a) * 1000 for a, b in itertools.pairwise(times[1:-1])]
    return {"token_gap_median_ms": round(median(gaps), 2),
            "token_gap_p90_ms": round(percentile(gaps, 90), 2)}


# --- tool calls --------------------------------------------------------------------------------

def tool_gateway(client: openai.OpenAI, choice: str) -> Callable[[], dict]:
    def run() -> dict:
        started = time.perf_counter()
        reply = client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": TOOL_QUESTION}],
            tools=[MULTIPLY_TOOL], tool_choice=choice, max_tokens=MAX_TOKENS, temperature=0)
        message = reply.choices[0].message
        return {"total_s": time.perf_counter() - started, "tokens": reply.usage.completion_tokens,
                "calls": [(c.function.name, c.function.arguments) for c in message.tool_calls or []]}
    return run


def tool_direct(adapter, choice: str) -> Callable[[], dict]:
    tool = MULTIPLY_TOOL["function"]
    request = ChatRequest([ChatMessage("user", TOOL_QUESTION)], max_tokens=MAX_TOKENS,
                          tools=[Tool(tool["name"], tool["description"],
                                      json.dumps(tool["parameters"]))], tool_choice=choice)

    def run() -> dict:
        started = time.perf_counter()
        chunks = list(adapter.generate(request))
        return {"total_s": time.perf_counter() - started, "tokens": chunks[-1].completion_tokens,
                "calls": [(c.name, c.arguments) for chunk in chunks for c in chunk.tool_calls]}
    return run


def tool_figures(samples: dict[str, list[dict]]) -> dict:
    """Per path: median time and tokens, ms per token; a call against prose from the same
    prompt (the tools shown, the model answering on its own under "auto")."""
    out: dict = {}
    for name, runs in samples.items():
        total = median([r["total_s"] for r in runs])
        tokens = median([r["tokens"] for r in runs])
        out[name] = {"median_ms": round(total * 1000, 1), "tokens": tokens,
                     "ms_per_token": round(total * 1000 / max(tokens, 1), 2),
                     "calls": runs[-1]["calls"]}
    for where in ("gateway", "direct"):
        call, prose = out[f"call ({where})"], out[f"prose ({where})"]
        out[f"call vs prose ({where})"] = round(call["median_ms"] / prose["median_ms"], 3)
        out[f"per token, call vs prose ({where})"] = round(
            call["ms_per_token"] / prose["ms_per_token"], 3)
    return out


# --- embeddings, transcription, speech -------------------------------------------------------

def embed_direct(adapter) -> None:
    vectors = adapter.embed(EmbeddingRequest([SENTENCE])).vectors
    assert vectors.shape == (1, 384), vectors.shape


def embed_gateway(client: openai.OpenAI) -> None:
    data = client.embeddings.create(model=EMBED_MODEL, input=[SENTENCE]).data
    assert len(data) == 1 and len(data[0].embedding) == 384


def transcribe_direct(adapter, wav: bytes) -> str:
    audio, rate = read_wav(wav)
    return adapter.transcribe(TranscriptionRequest(audio, rate)).text


def transcribe_gateway(client: openai.OpenAI, wav: bytes) -> str:
    return client.audio.transcriptions.create(model=ASR_MODEL,
                                              file=("sample.wav", wav, "audio/wav")).text


def speak_direct(adapter) -> bytes:
    chunks = list(adapter.synthesize(SpeechRequest(SPOKEN)))
    return wav_bytes(np.concatenate([c.audio for c in chunks]), chunks[-1].sample_rate)


def speak_gateway(client: openai.OpenAI) -> bytes:
    return client.audio.speech.create(model=TTS_MODEL, voice="", input=SPOKEN,
                                      response_format="wav").content


def pair_figures(samples: dict[str, list[float]]) -> dict:
    out = {name: summary_ms(values) for name, values in samples.items()}
    out["overhead_ms"] = round(out["gateway"]["median_ms"] - out["direct"]["median_ms"], 2)
    out["overhead_p90_ms"] = round(out["gateway"]["p90_ms"] - out["direct"]["p90_ms"], 2)
    out["vs_direct"] = round(out["gateway"]["median_ms"] / out["direct"]["median_ms"], 3)
    return out


# --- concurrency -------------------------------------------------------------------------------

def under_load(server: Server, clients: int, seconds: float,
               request: Callable[[openai.OpenAI], None]) -> dict:
    """``clients`` threads, each with its own client, sending back to back for ``seconds``.
    A request with no answer within LOAD_TIMEOUT_S counts as an error; requests/s is the
    answered ones over the time from the start to the last answer."""
    per_client = [server.client(LOAD_TIMEOUT_S) for _ in range(clients)]
    before = server.stats()
    load = back_to_back(per_client, seconds, request)
    after = server.stats()
    for client in per_client:
        client.close()
    non_200 = {code: n - before["responses"].get(code, 0) for code, n in after["responses"].items()
               if code != "200" and n != before["responses"].get(code, 0)}
    lost = sum(after["lost"].values()) - sum(before["lost"].values()) \
        if isinstance(after.get("lost"), dict) else None
    ms = [latency * 1000 for latency, _ in load.done]
    return {"clients": clients, "seconds": round(load.wall_s, 2), "answered": len(load.done),
            "errors": len(load.errors), "error_kinds": dict(collections.Counter(load.errors)),
            "requests_per_s": round(len(load.done) / load.answering_s, 2),
            "median_ms": round(median(ms), 1), "p99_ms": round(percentile(ms, 99), 1),
            "gateway_non_200": non_200, "gateway_lost": lost,
            "in_flight_after": after.get("in_flight")}


def load_chat(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": PROMPT}],
        max_tokens=LOAD_MAX_TOKENS, temperature=0)
    if not reply.choices[0].message.content:
        raise ValueError("empty reply")


# --- the run -----------------------------------------------------------------------------------

def print_tables(result: dict) -> None:
    chat = result["chat"]
    print(f"\nchat: {CHAT_MODEL}, max_tokens {MAX_TOKENS}, {chat['rounds']} rounds "
          f"(same reply every way: {'yes' if chat['same_reply'] else 'NO'})")
    print_header(f"{'path':18} {'total':>9} {'p90':>9} {'first token':>11} {'tokens/s':>9} "
                 f"{'tokens':>7} {'vs direct':>9}")
    for name in ("direct", "gateway whole", "gateway streamed"):
        row = chat[name]
        first = f"{row['first_token']['median_ms']:.1f} ms" if "first_token" in row else "-"
        vs = f"{row['vs_direct']:.3f}x" if "vs_direct" in row else "1"
        print(f"{name:18} {row['total']['median_ms']:>6.1f} ms {row['total']['p90_ms']:>6.1f} ms "
              f"{first:>11} {row['tokens_per_s']:>9.1f} "
              f"{','.join(map(str, row['completion_tokens'])):>7} {vs:>9}")

    print("\nCPU ms per chat request (all processes; 10 ms ticks, averaged over the rounds)")
    print_cpu(chat["cpu_ms_per_request"])
    if "trace" in chat:
        print("\nwhere a gateway chat request's time goes (trace, medians, ms): client -> node in,"
              " queue, node serving (its first result), last result -> client out")
        for name in ("gateway whole", "gateway streamed"):
            row = chat["trace"][name]
            print(f"  {name:17} in {row.get('in', 0):6.2f}  queue {row.get('queue', 0):5.2f}  "
                  f"node {row.get('node', 0):7.1f} (first {row.get('node first', 0):5.1f})  "
                  f"out {row.get('out', 0):5.2f}  token gap median/p90 "
                  f"{row.get('token_gap_median_ms', 0):.2f}/{row.get('token_gap_p90_ms', 0):.2f}")
        direct = chat["trace"]["direct"]
        print(f"  {'direct':17} total {chat['direct']['total']['median_ms']:.1f}, first "
              f"{chat['direct']['first_token']['median_ms']:.1f}, token gap median/p90 "
              f"{direct['token_gap_median_ms']:.2f}/{direct['token_gap_p90_ms']:.2f}")

    tools = result["tool_calls"]
    print(f"\ntool calls: {CHAT_MODEL}, {tools['question']!r}, one multiply tool, "
          f"{tools['rounds']} rounds; prose = the same prompt answered under \"auto\"")
    print_header(f"{'path':16} {'median':>10} {'tokens':>7} {'ms/token':>9}  calls")
    for name in ("call (gateway)", "prose (gateway)", "call (direct)", "prose (direct)"):
        row = tools[name]
        print(f"{name:16} {row['median_ms']:>7.1f} ms {row['tokens']:>7} "
              f"{row['ms_per_token']:>9.2f}  {row['calls'] or '-'}")
    for where in ("gateway", "direct"):
        print(f"  {where}: a complete call / prose {tools[f'call vs prose ({where})']:.3f}x, "
              f"per token {tools[f'per token, call vs prose ({where})']:.3f}x")

    print("\nsingle requests (median / p90 ms; overhead = gateway - direct, medians)")
    print_header(f"{'endpoint':15} {'direct':>16} {'gateway':>16} {'overhead':>10} {'vs direct':>9}"
                 f" {'n':>4}")
    for name in ("embeddings", "transcription", "speech"):
        if name not in result:
            continue
        row = result[name]
        direct, gateway = row["direct"], row["gateway"]
        print(f"{name:15} {direct['median_ms']:>7.1f} / {direct['p90_ms']:>6.1f} "
              f"{gateway['median_ms']:>7.1f} / {gateway['p90_ms']:>6.1f} "
              f"{row['overhead_ms']:>7.1f} ms {row['vs_direct']:>8.3f}x {direct['n']:>4}")
    floor = result["http_floor"]
    print(f"{'http floor':15} {'-':>16} {floor['median_ms']:>7.1f} / {floor['p90_ms']:>6.1f}"
          f"   (GET /stats, no model)")
    print("\nCPU ms per embeddings request")
    print_cpu(result["embeddings"]["cpu_ms_per_request"])

    print("\nunder concurrency (each client its own openai client, back to back)")
    print_header(f"{'endpoint':12} {'clients':>7} {'answered':>8} {'errors':>6} {'req/s':>8} "
                 f"{'median':>10} {'p99':>10} {'non-200':>8} {'lost':>5}")
    for row in result["concurrency"]:
        print(f"{row['endpoint']:12} {row['clients']:>7} {row['answered']:>8} {row['errors']:>6} "
              f"{row['requests_per_s']:>8.1f} {row['median_ms']:>7.1f} ms {row['p99_ms']:>7.1f} ms "
              f"{sum(row['gateway_non_200'].values()):>8} {row['gateway_lost']!s:>5}")
    print(f"(direct serial rate for reference: embeddings "
          f"{result['direct_serial_rate']['embeddings']:.1f}/s, chat at max_tokens "
          f"{LOAD_MAX_TOKENS} {result['direct_serial_rate']['chat']:.1f}/s)")

    print("\ngoals")
    for goal in result["goals"]:
        print(f"  {'met ' if goal['met'] else 'MISSED'}  {goal['what']}: {goal['value']} "
              f"(goal {goal['goal']})")


def print_cpu(cpu_ms: dict[str, dict[str, float]]) -> None:
    roles = list(next(iter(cpu_ms.values())))
    print_header(f"{'path':18}" + "".join(f" {role:>21}" for role in roles) + f" {'all':>7}")
    for name, used in cpu_ms.items():
        print(f"{name:18}" + "".join(f" {used[role]:>21.1f}" for role in roles) +
              f" {sum(used.values()):>7.1f}")


def main() -> int:
    parser = make_parser(__doc__, full_help=True)
    add_output_flags(parser, "gateway.json")
    parser.add_argument("--port", type=int, default=0, help="the gateway's port (default: free)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few rounds, short loads")
    parser.add_argument("--rounds", type=int, help="chat rounds (default 25; quick 3)")
    parser.add_argument("--trace", action="store_true",
                        help="trace the nodes (MOFA_OMNI_TRACE) and split the gateway's chat "
                             "latency into in / node / out (each token then also writes a line)")
    args = parser.parse_args()
    quick = args.quick
    chat_rounds = args.rounds or (3 if quick else 25)
    embed_rounds, media_rounds = (10, 1) if quick else (60, 5)
    tool_rounds = 2 if quick else 10
    levels = [1, 4] if quick else [1, 4, 8]
    embed_s, chat_s = (2.0, 2.0) if quick else (8.0, 10.0)

    port = args.port or free_port()
    print(f"starting {SERVER.relative_to(ROOT)} on port {port} ...", flush=True)
    started = time.monotonic()
    trace_dir = tempfile.TemporaryDirectory(prefix="gateway-trace-")  # removed however it ends
    trace_file = Path(trace_dir.name) / "trace.jsonl" if args.trace else None
    with trace_dir, Server(port, trace_file) as server:
        served = server.wait_ready()
        ready_s = time.monotonic() - started
        print(f"gateway ready in {ready_s:.1f} s, serving {', '.join(served)}; "
              f"opening the models here ...", flush=True)
        llm, embedder = open_model(CHAT_MODEL), open_model(EMBED_MODEL)
        asr, tts = open_model(ASR_MODEL), open_model(TTS_MODEL)
        backends = {name: type(a).__name__ for name, a in
                    [(CHAT_MODEL, llm), (EMBED_MODEL, embedder), (ASR_MODEL, asr), (TTS_MODEL, tts)]}
        client = server.client()
        floor = httpx.Client(timeout=10)
        stats_url = server.url.removesuffix("/v1") + "/stats"
        result: dict = {"machine": machine("cpus", "platform", "python"),
                        "quick": quick, "gateway_ready_s": round(ready_s, 1),
                        "direct_backends": backends}

        print("chat ...", flush=True)
        samples, cpu_ms = rounds({"direct": chat_direct(llm), "gateway whole": chat_whole(client),
                                  "gateway streamed": chat_stream(client)}, chat_rounds,
                                 cpu=CpuMeter(server, "text_generation"))
        result["chat"] = {"rounds": chat_rounds, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                          **chat_figures(samples), "cpu_ms_per_request": cpu_ms}
        if trace_file:
            result["chat"]["trace"] = {
                "gateway whole": trace_segments(trace_file, samples["gateway whole"]),
                "gateway streamed": trace_segments(trace_file, samples["gateway streamed"]),
                "direct": direct_token_gaps(llm, max(chat_rounds // 2, 2))}

        print("tool calls ...", flush=True)
        samples, _ = rounds({"call (gateway)": tool_gateway(client, "required"),
                             "prose (gateway)": tool_gateway(client, "auto"),
                             "call (direct)": tool_direct(llm, "required"),
                             "prose (direct)": tool_direct(llm, "auto")}, tool_rounds)
        result["tool_calls"] = {"rounds": tool_rounds, "question": TOOL_QUESTION,
                                **tool_figures(samples)}

        print("embeddings, transcription, speech ...", flush=True)
        pairs, cpu_ms = rounds({"direct": timer(lambda: embed_direct(embedder)),
                                "gateway": timer(lambda: embed_gateway(client)),
                                "floor": timer(lambda: floor.get(stats_url).raise_for_status())},
                               embed_rounds, warmup=3, cpu=CpuMeter(server, "embedding"))
        result["http_floor"] = summary_ms(pairs.pop("floor"))
        cpu_ms.pop("floor")
        result["embeddings"] = {"sentence": SENTENCE, **pair_figures(pairs),
                                "cpu_ms_per_request": cpu_ms}
        wav = SAMPLE.read_bytes()
        heard = {}
        pairs, _ = rounds({"direct": timer(lambda: heard.setdefault("direct", transcribe_direct(asr, wav))),
                        "gateway": timer(lambda: heard.setdefault("gateway",
                                                                  transcribe_gateway(client, wav)))},
                       media_rounds)
        result["transcription"] = {"sample": SAMPLE.name, "informational": True,
                                   "same_text": heard["direct"] == heard["gateway"],
                                   "text": heard["direct"], **pair_figures(pairs)}
        pairs, _ = rounds({"direct": timer(lambda: speak_direct(tts)),
                        "gateway": timer(lambda: speak_gateway(client))}, media_rounds)
        result["speech"] = {"text": SPOKEN, "informational": True, **pair_figures(pairs)}
        floor.close()
        client.close()

        # the direct adapters' serial rates, for the load table
        direct_chat = [timed(lambda: list(llm.generate(ChatRequest(
            [ChatMessage("user", PROMPT)], max_tokens=LOAD_MAX_TOKENS)))) for _ in range(5)]
        result["direct_serial_rate"] = {
            "embeddings": round(1000 / result["embeddings"]["direct"]["median_ms"], 1),
            "chat": round(1 / median(direct_chat), 1)}

        print("under concurrency ...", flush=True)
        load = []
        for endpoint, seconds, request in (("embeddings", embed_s, embed_gateway),
                                           ("chat", chat_s, load_chat)):
            for clients in levels:
                row = under_load(server, clients, seconds, request)
                load.append({"endpoint": endpoint, **row})
                print(f"  {endpoint} x{clients}: {row['requests_per_s']:.1f} req/s, "
                      f"{row['errors']} errors", flush=True)
        result["concurrency"] = load
        result["gateway_stats"] = server.stats()
    log = server.output

    whole = result["chat"]["gateway whole"]["vs_direct"]
    overhead = result["embeddings"]["overhead_ms"]
    errors = sum(row["errors"] for row in result["concurrency"])
    tools = result["tool_calls"]
    per_token = tools["per token, call vs prose (direct)"]
    result["goals"] = [
        {"what": "constrained tool call per token / prose per token, direct", "value": per_token,
         "goal": f"<= {TOOL_TOKEN_GOAL}", "met": per_token <= TOOL_TOKEN_GOAL},
        {"what": "chat through the gateway (whole) / direct, median total", "value": whole,
         "goal": f"<= {CHAT_GOAL}", "met": whole <= CHAT_GOAL},
        {"what": "embeddings overhead per request, median", "value": f"{overhead} ms",
         "goal": f"<= {EMBED_GOAL_MS:g} ms", "met": overhead <= EMBED_GOAL_MS},
        {"what": "errors under concurrency", "value": errors, "goal": "0", "met": errors == 0},
    ]
    lines = log.splitlines()
    result["graph_log"] = {
        "tracebacks": log.count("Traceback"),
        # what the nodes' gap detectors saw dora drop (the gateway's /stats has its own only)
        "lost_messages": [line for line in lines if "lost on input" in line],
        "warnings": [line for line in lines if ("WARN" in line or "ERROR" in line)
                     and "diagnostic)" not in line][-20:]}
    print_tables(result)
    for line in result["graph_log"]["lost_messages"]:
        print(f"  graph log: {line}")
    if result["graph_log"]["tracebacks"]:
        print(f"\nthe graph's log has {result['graph_log']['tracebacks']} traceback(s):\n"
              f"{log[-3000:]}")
    write_json(args.json, result)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
