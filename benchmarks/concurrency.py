"""Many clients at once: what batching inside the model nodes buys, against the one-at-a-time
node and llama.cpp's own server, in one run.

    python benchmarks/concurrency.py [--json FILE] [--png FILE] [--quick]
                                     [--clients 1,2,4,8,16] [--seconds S] [--llama-server PATH]

(Run it with the project's environment first on PATH: the graph's nodes are its commands.)

dataflows/server.yml is started twice with `dora run`: as shipped ("batched": embedding, rerank
and transcription requests queued together are served in one engine call, four chat requests
decoded together by llama.cpp: the LLM node's PARALLEL) and with MAX_BATCH=1 and PARALLEL=1 in
every node ("one at a time": the node as it was). For each task and each
number of clients (default 1, 2, 4, 8, 16), that many threads, each with its own `openai`
client, send requests back to back for --seconds (default 8; --quick: 1, 4, 8 clients, 4 s):

  embeddings      minilm-l6, one short sentence per request
  rerank          minilm-l6 (cosine), a query and four documents (POST /v1/rerank)
  transcription   whisper-tiny.en, dataflows/samples/01-capital-of-france.wav
  chat            smollm2-135m on llama.cpp, streamed, temperature 0, max_tokens 32

and the table gives requests/s (answered over the time to the last answer), output tokens/s
for chat, p50 and p95 latency, the median time to first token, and errors (no answer within
60 s counts as one). A second table gives the CPU time spent per answered request by each
process (the clients, the gateway, the model node, the other nodes, `dora run`) and the rate
the machine's cores allow at that cost ("bound"): a rate near its bound is limited by the CPU
each request costs on its way, not by the model node's batching. In the same run, on the same
weights:

  llama-server    llama.cpp's own OpenAI server (`llama-server -np P --cont-batching`, the
                  same GGUF, the same 4096-token context) for chat, with the LLM node's
                  parallelism: P slots, P the clients up to server.yml's PARALLEL (4);
                  --llama-server names the binary, else benchmarks/.cache/llama-server,
                  which --build-llama-server builds once (~15 min on 2 cores) from the
                  llama.cpp source of the installed llama-cpp-python (its sdist, from PyPI),
                  as `omni install llama-cpp` builds that; without a binary its rows are
                  skipped
  direct          the engines called in this process with a whole batch at once, the upper
                  bound: MiniLM embedding 16 sentences per call; llama.cpp decoding 1..8
                  sequences together (mofa_omni.adapters.llama_engine, no HTTP, no dora)
  direct mlx      the same chat on MLX (smollm2-135m converted), 1, 2, 4 requests decoded
                  together by mlx-lm's batch generator (mofa_omni.adapters.mlx_engine), beside
                  "mlx alone": one request at a time through mlx-lm's stream_generate
                  (parallel = 1, what the adapter did before)
  direct ct2      the same on CTranslate2 (int8), 1, 2, 4 requests decoded in static batches
                  (mofa_omni.adapters.ct2_batches), beside "ct2 alone": one request at a time
                  through CTranslate2's generate_tokens (parallel = 1)

Goals (this 2-core machine): at 8 clients embeddings >= 5x and ASR >= 1.5x the single-client
throughput; chat output tokens/s >= 2x single-stream and >= 1.0x llama-server with the same
parallelism; p95 at 8 clients no worse than one at a time for any task; a lone request's
latency within 5 % of one at a time (on MLX and CTranslate2: a lone request through the batch
engine >= 0.95x the engine's own one-request path in tokens/s). --direct-only measures only
the engines in this process (~3 min).

Prints tables; writes benchmarks/results/concurrency.json and concurrency.png (throughput and
p95 against clients, per task). About 12 minutes; --quick about 5.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import (
    ROOT,
    SAMPLES,
    add_output_flags,
    back_to_back,
    free_port,
    machine,
    make_parser,
    median,
    percentile,
    print_header,
    pyplot,
    save_figure,
    write_json,
)
from gateway import SERVER, CpuMeter, Server

from mofa_omni.models.compute import ensure_fast_blas

ensure_fast_blas()

import httpx  # noqa: E402
import openai  # noqa: E402
import yaml  # noqa: E402

from mofa_omni.adapters.backends import create_adapter  # noqa: E402
from mofa_omni.adapters.llama_engine import Sampling  # noqa: E402
from mofa_omni.adapters.loading import open_model  # noqa: E402
from mofa_omni.contract.tasks import ChatMessage, ChatRequest, EmbeddingRequest  # noqa: E402
from mofa_omni.models.catalog import Catalog  # noqa: E402
from mofa_omni.models.store import ModelStore  # noqa: E402

CHAT_MODEL, ASR_MODEL, EMBED_MODEL = "smollm2-135m", "whisper-tiny.en", "minilm-l6"
SENTENCE = "The cat sleeps on the sofa."
QUERY = "Where does the cat sleep?"
DOCUMENTS = ["The cat sleeps on the sofa.", "Dora moves Arrow buffers.",
             "Paris is the capital of France.", "A lighthouse keeper watches the sea."]
PROMPT = "Tell me a long story about a lighthouse keeper and the sea."
MAX_TOKENS = 32
REQUEST_TIMEOUT_S = 60
# each model node's env, over server.yml's
MODES = {"batched": {}, "one at a time": {"MAX_BATCH": "1", "PARALLEL": "1"}}
LLAMA_SERVER = ROOT / "benchmarks" / ".cache" / "llama-server"
GOALS = {"embeddings": 5.0, "transcription": 1.5}  # x the single-client rate at 8 clients
CHAT_GOAL, PEER_GOAL, LONE_GOAL = 2.0, 1.0, 1.05
# the TASK of the model node serving each benchmark task (reranking: the embedder)
NODE_TASK = {"embeddings": "embedding", "rerank": "embedding",
             "transcription": "speech_recognition", "chat": "text_generation"}


# --- the requests (each returns its output tokens and time to first token, where it has them)

def embed(client: openai.OpenAI) -> dict:
    client.embeddings.create(model=EMBED_MODEL, input=SENTENCE)
    return {}


def rerank(client: openai.OpenAI) -> dict:
    reply = client.post("/rerank", cast_to=httpx.Response,
                        body={"model": EMBED_MODEL, "query": QUERY, "documents": DOCUMENTS})
    if len(reply.json()["results"]) != len(DOCUMENTS):
        raise ValueError("a result per document was expected")
    return {}


def transcriber(wav: bytes) -> Callable[[openai.OpenAI], dict]:
    def transcribe(client: openai.OpenAI) -> dict:
        text = client.audio.transcriptions.create(model=ASR_MODEL, file=("q.wav", wav)).text
        if not text.strip():
            raise ValueError("empty transcript")
        return {}
    return transcribe


def chat(client: openai.OpenAI, model: str = CHAT_MODEL) -> dict:
    started, first, tokens = time.perf_counter(), None, 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS,
        temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - started
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    if not tokens:
        raise ValueError("no tokens")
    return {"tokens": tokens, "ttft": first}


# --- load ------------------------------------------------------------------------------------

def under_load(base_url: str, clients: int, seconds: float,
               request: Callable[[openai.OpenAI], dict]) -> dict:
    """``clients`` threads, each with its own client, sending back to back for ``seconds``."""
    per_client = [openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0,
                                timeout=REQUEST_TIMEOUT_S) for _ in range(clients)]
    load = back_to_back(per_client, seconds, request)
    for client in per_client:
        client.close()
    done, errors, answering = load.done, load.errors, max(load.answering_s, 1e-9)
    ms = [latency * 1000 for latency, _ in done]
    tokens = sum(f.get("tokens", 0) for _, f in done)
    ttft = [f["ttft"] * 1000 for _, f in done if f.get("ttft") is not None]
    return {"clients": clients, "answered": len(done), "errors": len(errors),
            "error_kinds": sorted(set(errors))[:5],
            "requests_per_s": round(len(done) / answering, 2),
            "tokens_per_s": round(tokens / answering, 1) if tokens else None,
            "p50_ms": round(median(ms), 1), "p95_ms": round(percentile(ms, 95), 1),
            "ttft_ms": round(median(ttft), 1) if ttft else None}


def warm(base_url: str, request: Callable[[openai.OpenAI], dict], times: int = 3) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0,
                           timeout=REQUEST_TIMEOUT_S)
    for _ in range(times):
        request(client)
    client.close()


def server_yml(node_env: dict[str, str], folder: Path) -> Path:
    """dataflows/server.yml with ``node_env`` set on every model node."""
    descriptor = yaml.safe_load(SERVER.read_text())
    for node in descriptor["nodes"]:
        if node.get("path") == "omni-node":
            node["env"] = {**node.get("env", {}), **node_env}
    path = folder / "server.yml"
    path.write_text(yaml.safe_dump(descriptor, sort_keys=False))
    return path


def graph_rows(mode: str, node_env: dict, tasks: dict, clients: list[int],
               seconds: float) -> list:
    rows = []
    folder = Path(tempfile.mkdtemp(prefix="concurrency-"))
    with Server(free_port(), dataflow=server_yml(node_env, folder)) as server:
        server.wait_ready()
        for task, request in tasks.items():
            warm(server.url, request)
            meter = CpuMeter(server, NODE_TASK[task])
            for n in clients:
                before = meter.sample()
                row = {"mode": mode, "task": task, **under_load(server.url, n, seconds, request)}
                row |= cpu_per_request(before, meter.sample(), row["answered"])
                print(f"  {mode:14s} {task:13s} x{n:<2d} {row['requests_per_s']:8.1f} req/s"
                      f"  p95 {row['p95_ms']:7.1f} ms  errors {row['errors']}", flush=True)
                rows.append(row)
    return rows


def cpu_per_request(before: dict[str, float], after: dict[str, float], answered: int) -> dict:
    """The CPU time each role (the clients in this process, the gateway, the model node, the
    other nodes, `dora run`) spent per answered request, and the requests/s this machine's
    cores allow at that cost: when the measured rate is near it, the cores are the limit,
    not the model node's batching."""
    if not answered:
        return {}
    spent = {role: (after[role] - before[role]) * 1000 / answered for role in after}
    return {"cpu_ms_per_request": {role: round(ms, 2) for role, ms in spent.items()},
            "cpu_bound_per_s": round((os.cpu_count() or 1) * 1000 / sum(spent.values()), 1)}


# --- llama.cpp's own server ------------------------------------------------------------------

def llama_server_rows(binary: Path, gguf: Path, clients: list[int], seconds: float) -> list:
    """llama-server on the same GGUF with the LLM node's parallelism: N clients, min(N, the
    node's PARALLEL) slots (-np), the node's context (4096 tokens) shared by the slots."""
    rows = []
    for n in clients:
        port = free_port()
        command = [str(binary), "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1",
                   "-np", str(min(n, llm_parallel())), "-c", "4096",
                   "-t", str(os.cpu_count() or 1), "--cont-batching", "--no-webui"]
        with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as peer:
            try:
                url = f"http://127.0.0.1:{port}/v1"
                deadline = time.monotonic() + 60
                while True:
                    try:
                        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline or peer.poll() is not None:
                        raise RuntimeError(f"llama-server did not start: {' '.join(command)}")
                    time.sleep(0.3)
                warm(url, chat)
                row = {"mode": "llama-server", "task": "chat", **under_load(url, n, seconds, chat)}
                print(f"  llama-server   chat          x{n:<2d} {row['tokens_per_s']:8.1f} tok/s"
                      f"  p95 {row['p95_ms']:7.1f} ms", flush=True)
                rows.append(row)
            finally:
                peer.terminate()
                peer.wait(10)
    return rows


def llm_parallel() -> int:
    """The chat requests server.yml's LLM node decodes together (its PARALLEL)."""
    nodes = yaml.safe_load(SERVER.read_text())["nodes"]
    return int(next(n for n in nodes if n["id"] == "llm").get("env", {}).get("PARALLEL", 1))


def build_llama_server(target: Path) -> None:
    """llama-server built from the llama.cpp source that the installed llama-cpp-python
    vendors (the same version of llama.cpp as the node's), with the same CPU settings."""
    import importlib.metadata
    import shutil
    import tarfile

    from mofa_omni.adapters.installs import llama_cpp_cmake_args

    work = target.parent / "llama-server-build"
    work.mkdir(parents=True, exist_ok=True)
    version = importlib.metadata.version("llama-cpp-python")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", str(work)],
                   check=True)
    with tarfile.open(next(work.glob(f"llama_cpp_python-{version}.tar.gz"))) as sdist:
        sdist.extractall(work, filter="data")
    source = work / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    flags = [f for f in llama_cpp_cmake_args().split() if "BUILD_TOOLS" not in f]
    subprocess.run(["cmake", "-S", str(source), "-B", str(work / "build"), *flags,
                    "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
                    "-DBUILD_SHARED_LIBS=OFF",  # one binary, copied out of the build
                    "-DCMAKE_BUILD_TYPE=Release"], check=True)
    subprocess.run(["cmake", "--build", str(work / "build"), "--target", "llama-server",
                    "-j", str(os.cpu_count() or 1)], check=True)
    shutil.copy2(work / "build" / "bin" / "llama-server", target)
    shutil.rmtree(work)


# --- the engines directly --------------------------------------------------------------------

def direct_rows(seconds: float) -> list:
    rows = []
    embedder = open_model(EMBED_MODEL)
    batch = EmbeddingRequest([SENTENCE] * 16)
    embedder.embed(batch)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        embedder.embed(batch)
        count += 16
    rows.append({"mode": "direct", "task": "embeddings", "clients": 16,
                 "requests_per_s": round(count / (time.perf_counter() - started), 1)})
    embedder.unload()
    llm = open_model(CHAT_MODEL, backend="llama.cpp")
    prompt = llm.prompt_tokens(ChatRequest([ChatMessage("user", PROMPT)], MAX_TOKENS))
    engine = llm._engine

    def one() -> int:
        with engine.slot(len(prompt) + MAX_TOKENS, prompt) as slot:
            return sum(1 for _ in slot.tokens(prompt, Sampling(), MAX_TOKENS, frozenset()))

    one()
    rows += [{"mode": "direct", "task": "chat", "clients": n,
              "tokens_per_s": together(one, n, seconds)} for n in (1, 2, 4)]
    llm.unload()
    return rows + batch_engine_rows(seconds, "mlx") + batch_engine_rows(seconds, "ctranslate2")


def together(one: Callable[[], int], n: int, seconds: float) -> float:
    """Tokens/s of ``one`` (a request; it returns the tokens it got) run ``n`` at a time, round
    after round, for ``seconds``."""
    tokens, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            tokens += sum(pool.map(lambda _: one(), range(n)))
    return round(tokens / (time.perf_counter() - started), 1)


# backend -> (its batch engine's mode, its one-request mode, what that one-request path is)
BATCH_ENGINES = {"mlx": ("direct mlx", "mlx alone", "stream_generate"),
                 "ctranslate2": ("direct ct2", "ct2 alone", "generate_tokens")}
ENGINE_MODES = tuple(mode for modes in BATCH_ENGINES.values() for mode in modes[:2])


def batch_engine_rows(seconds: float, backend: str) -> list:
    """Chat on ``backend``: n requests decoded together by its batch engine, and one at a
    time through the engine's own one-request path (parallel = 1)."""
    rows = []
    request = ChatRequest([ChatMessage("user", PROMPT)], MAX_TOKENS)
    spec, store = Catalog.load().get(CHAT_MODEL), ModelStore()
    batched, alone, _ = BATCH_ENGINES[backend]
    for mode, parallel, counts in ((alone, 1, (1,)), (batched, 4, (1, 2, 4))):
        llm = create_adapter(dataclasses.replace(spec, options={**spec.options,
                                                                "parallel": parallel}), backend)
        llm.load(store.prepare(llm))

        def one() -> int:
            *_, final = llm.generate(request)
            return final.completion_tokens

        one()
        rows += [{"mode": mode, "task": "chat", "clients": n,
                  "tokens_per_s": together(one, n, seconds)} for n in counts]
        llm.unload()
    return rows


# --- report ----------------------------------------------------------------------------------

def rate(row: dict) -> float:
    return row["tokens_per_s"] if row["task"] == "chat" else row["requests_per_s"]


def find(rows: list, mode: str, task: str, clients: int) -> dict | None:
    return next((r for r in rows if (r["mode"], r["task"], r["clients"]) == (mode, task, clients)),
                None)


def goals(rows: list) -> list[tuple[bool, str]]:
    said = []
    for task, goal in GOALS.items():
        one, eight = find(rows, "batched", task, 1), find(rows, "batched", task, 8)
        if one and eight:
            ratio = rate(eight) / rate(one)
            bound = (f"; the CPU spent per request at 8 clients allows "
                     f"{eight['cpu_bound_per_s'] / rate(one):.2f}x"
                     if eight.get("cpu_bound_per_s") else "")
            said.append((ratio >= goal, f"{task} at 8 clients / 1 client: {ratio:.2f}x "
                                        f"(goal >= {goal}x{bound})"))
    one, eight = find(rows, "batched", "chat", 1), find(rows, "batched", "chat", 8)
    if one and eight:
        ratio = rate(eight) / rate(one)
        said.append((ratio >= CHAT_GOAL, f"chat tokens/s at 8 clients / single stream: "
                                         f"{ratio:.2f}x (goal >= {CHAT_GOAL}x)"))
    for n in sorted({r["clients"] for r in rows if r["mode"] == "llama-server"}):
        ours, peer = find(rows, "batched", "chat", n), find(rows, "llama-server", "chat", n)
        if ours and peer and peer.get("tokens_per_s"):
            ratio = rate(ours) / rate(peer)
            said.append((ratio >= PEER_GOAL, f"chat tokens/s vs llama-server at {n} clients: "
                                             f"{ratio:.2f}x (goal >= {PEER_GOAL}x)"))
    for backend, (batched, lone, path) in BATCH_ENGINES.items():
        alone, one, four = (find(rows, mode, "chat", n) for mode, n in
                            ((lone, 1), (batched, 1), (batched, 4)))
        if alone and one and four:
            ratio = rate(one) / rate(alone)
            said.append((ratio >= 1 / LONE_GOAL, f"{backend} lone request, batch engine / "
                                                 f"{path}: {ratio:.2f}x tokens/s (goal >= "
                                                 f"{1 / LONE_GOAL:.2f}x)"))
            said.append((rate(four) >= CHAT_GOAL * rate(one), f"{backend} chat tokens/s, 4 "
                         f"requests together / one: {rate(four) / rate(one):.2f}x (goal >= "
                         f"{CHAT_GOAL}x)"))
    for task in sorted({r["task"] for r in rows if r["mode"] == "batched"}):
        ours, before = find(rows, "batched", task, 8), find(rows, "one at a time", task, 8)
        if ours and before:
            ok = ours["p95_ms"] <= before["p95_ms"] * 1.05
            said.append((ok, f"{task} p95 at 8 clients: {ours['p95_ms']:.0f} ms vs "
                             f"{before['p95_ms']:.0f} ms one at a time"))
        ours, before = find(rows, "batched", task, 1), find(rows, "one at a time", task, 1)
        if ours and before:
            ratio = ours["p50_ms"] / before["p50_ms"]
            said.append((ratio <= LONE_GOAL, f"{task} lone request p50: {ratio:.3f}x one at a "
                                             f"time (goal <= {LONE_GOAL}x)"))
    return said


def print_tables(rows: list) -> None:
    print_header("requests/s (chat: output tokens/s), p50 / p95 ms, time to first token")
    print(f"{'task':13s} {'mode':14s} {'clients':>7s} {'rate':>9s} {'x1 client':>9s} "
          f"{'p50':>8s} {'p95':>8s} {'ttft':>7s} {'errors':>6s}")
    for task in ("embeddings", "rerank", "transcription", "chat"):
        for mode in (*MODES, "llama-server", "direct", *ENGINE_MODES):
            base = find(rows, mode, task, 1)
            for row in (r for r in rows if (r["mode"], r["task"]) == (mode, task)):
                gain = f"{rate(row) / rate(base):.2f}x" if base and rate(base) else "-"
                print(f"{task:13s} {mode:14s} {row['clients']:7d} {rate(row):9.1f} {gain:>9s} "
                      f"{row.get('p50_ms') or '-':>8} {row.get('p95_ms') or '-':>8} "
                      f"{row.get('ttft_ms') or '-':>7} {row.get('errors', '-'):>6}")
    measured = [r for r in rows if r.get("cpu_ms_per_request")]
    if measured:
        roles = list(measured[0]["cpu_ms_per_request"])
        print_header(f"CPU ms per request, by process, and the rate {os.cpu_count()} cores allow "
                     "at that cost")
        print(f"{'task':13s} {'mode':14s} {'clients':>7s} "
              + " ".join(f"{role.split(' ')[0]:>8s}" for role in roles)
              + f" {'total':>7s} {'bound':>8s} {'rate':>8s}")
        for row in measured:
            cpu = row["cpu_ms_per_request"]
            print(f"{row['task']:13s} {row['mode']:14s} {row['clients']:7d} "
                  + " ".join(f"{cpu[role]:8.2f}" for role in roles)
                  + f" {sum(cpu.values()):7.2f} {row['cpu_bound_per_s']:8.1f} "
                  f"{row['requests_per_s']:8.1f}")
    print_header("goals")
    for ok, text in goals(rows):
        print(f"  {'met ' if ok else 'MISSED'}  {text}")


def plot(rows: list, path: Path) -> None:
    plt = pyplot()
    tasks = [t for t in ("embeddings", "rerank", "transcription", "chat")
             if any(r["task"] == t for r in rows)]
    figure, axes = plt.subplots(2, len(tasks), figsize=(4 * len(tasks), 7), squeeze=False)
    for column, task in enumerate(tasks):
        for mode in (*MODES, "llama-server", "direct", *ENGINE_MODES):
            mine = [r for r in rows if (r["mode"], r["task"]) == (mode, task)]
            if not mine:
                continue
            axes[0][column].plot([r["clients"] for r in mine], [rate(r) for r in mine], "o-",
                                 label=mode)
            if all(r.get("p95_ms") for r in mine):  # the engines called directly: no latency
                axes[1][column].plot([r["clients"] for r in mine], [r["p95_ms"] for r in mine],
                                     "o-", label=mode)
        axes[0][column].set_title(task)
        axes[0][column].set_ylabel("tokens/s" if task == "chat" else "requests/s")
        axes[1][column].set_ylabel("p95 latency (ms)")
        for row in axes:
            row[column].set_xscale("log", base=2)
            row[column].set_xlabel("clients")
            if row[column].get_legend_handles_labels()[0]:
                row[column].legend(fontsize=7)
    figure.suptitle("mofa-omni under concurrent clients (dataflows/server.yml)")
    save_figure(figure, path)


def graph_and_peer_rows(binary: Path | None, tasks: dict, clients: list[int],
                        seconds: float) -> list:
    """The graph run once per mode, then llama-server where its binary is there."""
    print(f"{len(clients)} client counts, {seconds:g} s each, {len(tasks)} tasks, "
          f"{len(MODES)} graph runs", flush=True)
    rows = []
    for mode, env in MODES.items():
        rows += graph_rows(mode, env, tasks, clients, seconds)
    binary = binary or (LLAMA_SERVER if LLAMA_SERVER.is_file() else None)
    if binary:
        llm = open_model(CHAT_MODEL, backend="llama.cpp")  # the GGUF the node serves
        gguf = llm.model_dir / "model.gguf"
        llm.unload()
        rows += llama_server_rows(binary, gguf, clients, seconds)
    else:
        print("no llama-server binary: its rows are skipped (see --llama-server)")
    return rows


def main() -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="1, 4, 8 clients, 4 s each")
    parser.add_argument("--clients", default="", help="numbers of clients, comma-separated")
    parser.add_argument("--seconds", type=float, default=0, help="per task and client count")
    parser.add_argument("--llama-server", type=Path, default=None,
                        help=f"llama.cpp's server binary (default: {LLAMA_SERVER} if built)")
    parser.add_argument("--direct-only", action="store_true",
                        help="only the engines in this process (no graph, no llama-server)")
    parser.add_argument("--build-llama-server", action="store_true",
                        help=f"build {LLAMA_SERVER} first (once; ~15 min on 2 cores)")
    add_output_flags(parser, "concurrency.json", png_name="concurrency.png")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")] if args.clients else \
        ([1, 4, 8] if args.quick else [1, 2, 4, 8, 16])
    seconds = args.seconds or (4.0 if args.quick else 8.0)
    wav = (SAMPLES / "01-capital-of-france.wav").read_bytes()
    tasks = {"embeddings": embed, "rerank": rerank, "transcription": transcriber(wav),
             "chat": chat}
    if args.build_llama_server and not LLAMA_SERVER.is_file():
        print(f"building {LLAMA_SERVER} ...", flush=True)
        build_llama_server(LLAMA_SERVER)
    rows: list = []
    if not args.direct_only:
        rows += graph_and_peer_rows(args.llama_server, tasks, clients, seconds)
    rows += direct_rows(seconds)
    print_tables(rows)
    result = {"machine": machine(), "clients": clients, "seconds": seconds, "rows": rows,
              "goals": [{"met": ok, "goal": text} for ok, text in goals(rows)]}
    write_json(args.json, result)
    plot(rows, args.png)
    print(f"\nwrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
