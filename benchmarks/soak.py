"""Soak: dataflows/server.yml under mixed, bounded load for a long while, with swaps and crashes.

    python benchmarks/soak.py [--minutes M] [--clients N] [--kill-every S] [--swap-every S]
                              [--json FILE] [--png FILE]

(Run it with the project's environment first on PATH: dora starts `.py` nodes with `python`.)

The default models serve on loopback; --clients threads (default 4) each send requests back to
back, a task drawn at random each time: chat whole and streamed (16 tokens), a stream cancelled
after its first chunk, a transcription (a spoken sample), speech, embeddings, a rerank, and a
bad request (an empty input or an unknown model). Every --swap-every seconds (default 300) the
LLM node is swapped to gemma-3-270m or back (`omni swap`); every --kill-every seconds (default
240) one model node's process is killed with SIGKILL (an out-of-memory kill, a crash in an
engine), in turn llm, asr, tts, embedder: dora restarts it (server.yml's restart_policy).

Every request is accounted for: answered, or an explicit error (an HTTP status with an OpenAI
error body, or an error event in a stream), or silent (no answer within 60 s, a dropped
connection): goal 0 silent. The resident memory of every process of the graph is sampled each
second; growth is the last minute's median over the median of the minute after warm-up
(--warmup, default 120 s), per process (a restarted node starts a new series; the LLM's is cut
at each swap, a model being another footprint): goal <= 5 %. The part of it in shared-memory
segments is shown apart, with the process's own growth: a process keeps the segments of every
node that sent it large messages mapped after that node died (see memory_growth). Chat asks for the model the LLM
node serves, following each swap.
Per task and minute: p50 and p99 latency of the answered requests; goal p99 <= 3x p50 outside
the minute of a kill. A killed node is back when its task is next answered: goal within 30 s.
Prints tables, writes benchmarks/results/soak.json (or --json FILE) and a plot of memory and
latency over time with the kills and swaps marked, benchmarks/results/soak.png (or --png FILE).
About --minutes (default 20) plus the models' load.
"""

from __future__ import annotations

import random
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import httpx
import psutil
from common import (
    BIN,
    SAMPLES,
    add_output_flags,
    make_parser,
    percentile,
    print_header,
    pyplot,
    run_stamp,
    save_figure,
    write_json,
)
from gateway import Server

from mofa_omni.cluster.local import free_port

TASKS = ("chat", "chat_stream", "cancel", "transcribe", "speech", "embed", "rerank", "bad")
NODE_OF = {"chat": "llm", "chat_stream": "llm", "cancel": "llm", "transcribe": "asr",
           "speech": "tts", "embed": "embedder", "rerank": "embedder"}
KILLED_IN_TURN = ("llm", "asr", "tts", "embedder")
REQUEST_TIMEOUT_S = 60
BACK_GOAL_S, GROWTH_GOAL, TAIL_GOAL = 30.0, 0.05, 3.0


@dataclass
class Outcome:
    task: str
    started: float  # seconds since the load began
    seconds: float
    kind: str  # "answered", "error", or "silent"
    detail: str = ""


class Load:
    """The clients' requests, each ending in an :class:`Outcome`."""

    def __init__(self, server: Server, started: float):
        self.url, self.started = server.url, started
        self.wav = (SAMPLES / "01-capital-of-france.wav").read_bytes()
        self.llm_model = "smollm2-135m"  # what the LLM node serves: it follows each swap
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()

    def run(self, seed: int, until: float) -> None:
        chooser = random.Random(seed)
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
            while time.monotonic() < until:
                task = chooser.choice(TASKS)
                began = time.monotonic()
                try:
                    kind, detail = getattr(self, f"_{task}")(http)
                except (httpx.TimeoutException, httpx.TransportError) as error:
                    kind, detail = "silent", type(error).__name__
                with self.lock:
                    self.outcomes.append(Outcome(task, began - self.started,
                                                 time.monotonic() - began, kind, detail))

    def _post(self, http: httpx.Client, path: str, **body) -> tuple[str, str]:
        response = http.post(f"{self.url}{path}", **body)
        if response.status_code == 200:
            return "answered", ""
        error = response.json().get("error", {})  # an OpenAI error body, or it is not explicit
        return "error", f"{response.status_code} {error.get('code')}"

    def _chat(self, http):
        return self._post(http, "/chat/completions", json={
            "model": self.llm_model, "max_tokens": 16,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})

    def _chat_stream(self, http, cancel: bool = False):
        with http.stream("POST", f"{self.url}/chat/completions", json={
                "model": self.llm_model, "max_tokens": 16, "stream": True,
                "messages": [{"role": "user", "content": "Tell me a story."}]}) as response:
            if response.status_code != 200:
                response.read()
                return "error", f"{response.status_code}"
            for line in response.iter_lines():
                if cancel and line.startswith("data: {"):
                    return "answered", "cancelled by the client"
                if line.startswith('data: {"error"'):
                    return "error", "error event"
                if line == "data: [DONE]":
                    return "answered", ""
        return "silent", "stream ended without [DONE]"

    def _cancel(self, http):
        return self._chat_stream(http, cancel=True)

    def _transcribe(self, http):
        return self._post(http, "/audio/transcriptions", data={"model": "whisper-tiny.en"},
                          files={"file": ("q.wav", self.wav, "audio/wav")})

    def _speech(self, http):
        return self._post(http, "/audio/speech", json={"model": "piper-joe", "voice": "",
                                                       "input": "The sea is calm today."})

    def _embed(self, http):
        return self._post(http, "/embeddings", json={"model": "minilm-l6",
                                                     "input": "A boat on the sea."})

    def _rerank(self, http):
        return self._post(http, "/rerank", json={"model": "minilm-l6", "query": "capital",
                                                 "documents": ["Paris is a city.", "Cats."]})

    def _bad(self, http):
        body = random.choice([{"model": "minilm-l6", "input": ""}, {"model": "nope", "input": "x"}])
        kind, detail = self._post(http, "/embeddings", json=body)
        return ("answered" if kind == "error" and detail.startswith("4") else "silent"), detail


class Chaos:
    """Kills a model node now and then, swaps the LLM now and then; records when."""

    def __init__(self, server: Server, load: Load, started: float, kill_every: float,
                 swap_every: float):
        self.server, self.load, self.started = server, load, started
        self.kill_every, self.swap_every = kill_every, swap_every
        self.kills: list[tuple[float, str]] = []
        self.swaps: list[tuple[float, str, bool]] = []

    def run(self, until: float) -> None:
        next_kill, next_swap, turn, to_gemma = self.kill_every, self.swap_every, 0, True
        while time.monotonic() < until:
            now = time.monotonic() - self.started
            if now >= next_kill:
                node = KILLED_IN_TURN[turn % len(KILLED_IN_TURN)]
                process = node_process(self.server, node)
                if process is not None:
                    process.kill()
                    self.kills.append((now, node))
                turn, next_kill = turn + 1, next_kill + self.kill_every
            if now >= next_swap:
                model = "gemma-3-270m" if to_gemma else "smollm2-135m"
                done = subprocess.run([str(BIN / "omni"), "swap", "llm", model, "--timeout",
                                       "300"], capture_output=True, text=True, check=False)
                self.swaps.append((now, model, done.returncode == 0))
                if done.returncode == 0:
                    self.load.llm_model = model  # the old name is not served any more
                to_gemma, next_swap = not to_gemma, next_swap + self.swap_every
            time.sleep(0.5)


def graph_processes(server: Server) -> dict[int, str]:
    """The graph's node processes: pid -> node id."""
    found = {}
    for process in psutil.Process(server.graph.pid).children(recursive=True):
        try:
            config = process.environ().get("DORA_NODE_CONFIG", "")
        except psutil.Error:
            continue
        if match := re.search(r"^node_id:\s*(\S+)", config, re.MULTILINE):
            found[process.pid] = match.group(1)
    return found


def node_process(server: Server, node: str) -> psutil.Process | None:
    for pid, name in graph_processes(server).items():
        if name == node:
            return psutil.Process(pid)
    return None


# (seconds since the start, resident bytes, of which in shared-memory segments)
Sample = tuple[float, int, int]


def shared_segments_rss(process: psutil.Process) -> int:
    """The resident bytes of ``process``'s mappings of shared-memory segments (/dev/shm): its
    own pool and the pools of the nodes that sent it messages through shared memory."""
    return sum(m.rss for m in process.memory_maps(grouped=True) if m.path.startswith("/dev/shm/"))


def sample_memory(server: Server, started: float, until: float,
                  samples: dict[str, list[Sample]]) -> None:
    """Each second: the resident memory of each node process, and its part in shared-memory
    segments, under "node (pid)"."""
    while time.monotonic() < until:
        for pid, node in graph_processes(server).items():
            try:
                process = psutil.Process(pid)
                rss, shared = process.memory_info().rss, shared_segments_rss(process)
            except psutil.Error:
                continue
            samples[f"{node} ({pid})"].append((time.monotonic() - started, rss, shared))
        time.sleep(1.0)


# --- figures -------------------------------------------------------------------------------------

def accounting(outcomes: list[Outcome]) -> dict:
    by_task = defaultdict(lambda: defaultdict(int))
    for outcome in outcomes:
        by_task[outcome.task][outcome.kind] += 1
    return {task: dict(kinds) for task, kinds in sorted(by_task.items())}


def latency_per_minute(outcomes: list[Outcome], kills: list[tuple[float, str]]) -> list[dict]:
    rows = []
    minutes = defaultdict(list)
    for outcome in outcomes:
        if outcome.kind == "answered" and outcome.task != "bad":
            minutes[(outcome.task, int(outcome.started // 60))].append(outcome.seconds)
    for (task, minute), seconds in sorted(minutes.items()):
        killed = any(minute * 60 - 5 <= at < (minute + 1) * 60 for at, _ in kills)
        p50, p99 = statistics.median(seconds), percentile(seconds, 99)
        rows.append({"task": task, "minute": minute, "count": len(seconds), "p50_s": p50,
                     "p99_s": p99, "kill_in_minute": killed, "tail_ratio": p99 / p50})
    return rows


def memory_growth(samples: dict[str, list[Sample]], warmup: float,
                  swaps: list[tuple[float, str, bool]]) -> list[dict]:
    """Per process, and for the LLM per model it held between two swaps: the last minute's
    median resident memory over the median of the minute after warm-up; and the same for the
    process's own memory, its resident memory less its mappings of shared-memory segments.

    Why both: a process that received messages through shared memory from a node keeps that
    node's segments mapped after the node died (zenoh, dora's transport, never detaches a
    sender's segments: eclipse-zenoh/zenoh#2787, #1700), so each restart of a node adds up to
    its pool to every process it sent large messages to."""
    rows = []
    cuts = [at for at, _, _ in swaps]
    for name, series in sorted(samples.items()):
        bounds = [0.0, *(cuts if name.startswith("llm ") else []), float("inf")]
        for start, stop in zip(bounds, bounds[1:]):
            part = [sample for sample in series if start <= sample[0] < stop]
            if not part:
                continue
            first, end = max(part[0][0], start + warmup if start else warmup), part[-1][0]
            base = [sample for sample in part if first <= sample[0] < first + 60]
            last = [sample for sample in part if sample[0] >= end - 60]
            if not base or not last or end - first < 120:
                continue  # too short to say (a node restarted, or a swap came soon)

            def median(samples: list[Sample], own: bool = False) -> float:
                return statistics.median(rss - shared if own else rss
                                         for _, rss, shared in samples)

            rows.append({"process": name + (f" from {start:.0f} s" if start else ""),
                         "after_warmup_mib": median(base) / 2**20,
                         "last_minute_mib": median(last) / 2**20,
                         "growth": median(last) / median(base) - 1,
                         "shared_growth_mib": (median(last) - median(last, True)
                                               - median(base) + median(base, True)) / 2**20,
                         "own_growth": median(last, True) / median(base, True) - 1})
    return rows


def back_after_kills(outcomes: list[Outcome], kills: list[tuple[float, str]]) -> list[dict]:
    rows = []
    for at, node in kills:
        answered = [o.started + o.seconds for o in outcomes if NODE_OF.get(o.task) == node
                    and o.kind == "answered" and o.started >= at]
        rows.append({"killed_at_s": at, "node": node,
                     "back_after_s": min(answered) - at if answered else None})
    return rows


def plot(result: dict, samples: dict[str, list[Sample]], outcomes: list[Outcome],
         path) -> None:
    plt = pyplot()
    figure, (memory, latency) = plt.subplots(2, 1, figsize=(12, 8), sharex=True)
    for name, series in sorted(samples.items()):
        memory.plot([t / 60 for t, _, _ in series], [r / 2**20 for _, r, _ in series], lw=1,
                    label=name)
    memory.set_ylabel("resident memory (MiB)")
    memory.legend(fontsize=6, ncol=3)
    for task in TASKS[:-1]:
        points = [(o.started / 60, o.seconds) for o in outcomes
                  if o.task == task and o.kind == "answered"]
        latency.scatter([t for t, _ in points], [s for _, s in points], s=3, label=task)
    latency.set_yscale("log")
    latency.set_ylabel("latency (s)")
    latency.set_xlabel("minutes")
    latency.legend(fontsize=7, ncol=4)
    for axis in (memory, latency):
        for at, node in result["kills"]:
            axis.axvline(at / 60, color="red", lw=0.8, ls="--")
        for at, model, _ in result["swaps"]:
            axis.axvline(at / 60, color="green", lw=0.8, ls=":")
    memory.set_title("server.yml under mixed load: kills (red), swaps (green)")
    figure.tight_layout()
    save_figure(figure, path)


def print_tables(result: dict) -> None:
    print_header(f"{'task':12} {'answered':>9} {'errors':>7} {'silent':>7}")
    for task, kinds in result["accounting"].items():
        print(f"{task:12} {kinds.get('answered', 0):9} {kinds.get('error', 0):7} "
              f"{kinds.get('silent', 0):7}")
    print()
    print_header(f"{'process':34} {'after warm-up':>14} {'last minute':>12} {'growth':>8} "
                 f"{'of it, shared segments':>23} {'own growth':>11}")
    for row in result["memory"]:
        print(f"{row['process']:34} {row['after_warmup_mib']:12.0f} M {row['last_minute_mib']:10.0f}"
              f" M {row['growth']:8.1%} {row['shared_growth_mib']:+21.0f} M "
              f"{row['own_growth']:11.1%}")
    print()
    print_header(f"{'killed':10} {'at (s)':>8} {'back after (s)':>15}")
    for row in result["kills_back"]:
        back = f"{row['back_after_s']:.1f}" if row["back_after_s"] is not None else "never"
        print(f"{row['node']:10} {row['killed_at_s']:8.0f} {back:>15}")
    print()
    tails = [r for r in result["latency"] if not r["kill_in_minute"] and r["count"] >= 5]
    worst = max(tails, key=lambda r: r["tail_ratio"], default=None)
    silent = sum(k.get("silent", 0) for k in result["accounting"].values())
    growth = max((r["growth"] for r in result["memory"]), default=0.0)
    own = max((r["own_growth"] for r in result["memory"]), default=0.0)
    backs = [r["back_after_s"] for r in result["kills_back"]]
    print(f"goal 0 silent: {silent} -> {'met' if silent == 0 else 'NOT met'}")
    print(f"goal memory growth <= 5 %: {growth:.1%} -> {'met' if growth <= GROWTH_GOAL else 'NOT met'}"
          f"; the processes' own memory (less shared segments they map): {own:.1%} -> "
          f"{'met' if own <= GROWTH_GOAL else 'NOT met'}")
    print(f"goal killed nodes back within {BACK_GOAL_S:g} s: "
          f"{'met' if all(b is not None and b <= BACK_GOAL_S for b in backs) else 'NOT met'}")
    if worst:
        print(f"goal p99 <= 3x p50 outside a kill's minute: worst {worst['tail_ratio']:.1f}x "
              f"({worst['task']}, minute {worst['minute']}) -> "
              f"{'met' if worst['tail_ratio'] <= TAIL_GOAL else 'NOT met'}")


def main() -> int:
    parser = make_parser(__doc__, full_help=True)
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--kill-every", type=float, default=240)
    parser.add_argument("--swap-every", type=float, default=300)
    parser.add_argument("--warmup", type=float, default=120)
    add_output_flags(parser, "soak.json", "soak.png")
    args = parser.parse_args()

    with Server(free_port()) as server:
        print(f"models: {', '.join(server.wait_ready())}", file=sys.stderr)
        started = time.monotonic()
        until = started + args.minutes * 60
        load = Load(server, started)
        chaos = Chaos(server, load, started, args.kill_every, args.swap_every)
        samples: dict[str, list[Sample]] = defaultdict(list)
        threads = [threading.Thread(target=load.run, args=(seed, until)) for seed in
                   range(args.clients)]
        threads += [threading.Thread(target=chaos.run, args=(until,)),
                    threading.Thread(target=sample_memory, args=(server, started, until, samples))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = server.stats()

    outcomes = load.outcomes
    result = {**run_stamp(), "minutes": args.minutes, "clients": args.clients,
              "accounting": accounting(outcomes), "kills": chaos.kills, "swaps": chaos.swaps,
              "kills_back": back_after_kills(outcomes, chaos.kills),
              "memory": memory_growth(samples, args.warmup, chaos.swaps),
              "latency": latency_per_minute(outcomes, chaos.kills), "gateway_stats": stats,
              "silent": [asdict(o) for o in outcomes if o.kind == "silent"]}
    print_tables(result)
    write_json(args.json, result)
    plot(result, samples, outcomes, args.png)
    print(f"\nwrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
