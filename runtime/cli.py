"""`omni`: one-shot use of the catalog's models from the shell (like `ollama run`).

    omni models [--json]              the catalog, what is cached, sizes
    omni pull NAME... | --defaults    fetch and convert once (progress bars), then cached; a NAME
                                      may be a path or hf:ORG/REPO[:FILE] (registered, --name)
    omni chat "PROMPT"                stream the LLM's reply
    omni transcribe FILE.wav          speech to text
    omni say "TEXT" -o FILE.wav       text to speech
    omni embed TEXT... [--json]       sentence embeddings
    omni doctor                       platform, MLX device, BLAS in use, measured GFLOP/s
    omni status [--json]              a running graph's models, memory and scheduler decisions
    omni swap NODE MODEL              serve MODEL on a running graph's NODE, losing no request
    omni recover --dataflow NAME      restart a multi-machine graph when a lost machine is back
    omni serve [--models A,B] [--port N]   the OpenAI-compatible server (Ctrl-C stops it)
    omni voice [--input WAV|DIR] [-o DIR]  the voice agent (default: the microphone)
    omni voice --web [--port N]       the voice agent for a browser page / OpenAI Realtime clients
    omni robot [--input WAV|DIR] [-o DIR]  the voice-commanded robot
    omni init NAME                    a starter project: a dataflow of the packaged nodes
    omni ps                           the graphs these commands are running
    omni install ENGINE...            llama-cpp (built here), mlx-whisper, mlx-vlm, mflux
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from mofa_omni.launch.commands import add_commands
from mofa_omni.models.compute import ensure_fast_blas


def _catalog():
    from mofa_omni.models.catalog import Catalog

    return Catalog.load()


def _open(name: str | None, task, *, quiet: bool = False):
    from mofa_omni.adapters.loading import open_model
    from mofa_omni.models.by_name import resolve_model_name
    from mofa_omni.models.fetching import no_progress, tqdm_progress
    from mofa_omni.models.store import ModelStore

    catalog, store = _catalog(), ModelStore()
    progress = no_progress if quiet else tqdm_progress()
    if name:  # a path or hf: name is detected and registered on first use
        name = resolve_model_name(name, catalog, store, progress=progress).name
    return open_model(name, task=task, catalog=catalog, store=store, progress=progress)


def cmd_models(args: argparse.Namespace) -> int:
    from mofa_omni.adapters.backends import resolved
    from mofa_omni.adapters.base import adapter_class
    from mofa_omni.contract.errors import AdapterError
    from mofa_omni.models.memory import format_bytes
    from mofa_omni.models.store import ModelStore
    from mofa_omni.node.residency import estimated_bytes

    catalog, store = _catalog(), ModelStore()
    defaults = {name for name in catalog.defaults.values()}
    rows = []
    for spec in catalog.models.values():
        try:
            spec = resolved(spec)
            cls = adapter_class(spec.adapter)
            backend, ready = cls.backend, store.is_ready(spec, cls)
        except AdapterError:
            backend, ready = "(adapter not installed)", False
        rows.append({
            "name": spec.name, "tasks": [t.value for t in spec.tasks], "adapter": spec.adapter,
            "backend": backend, "format": spec.format,
            "memory_estimate_bytes": estimated_bytes(spec, store),
            "cached": ready, "size_on_disk_bytes": store.size_on_disk(spec) if ready else 0,
            "default": spec.name in defaults, "offline": spec.fetchable_offline,
            "ladder": catalog.ladder_of(spec.name), "description": spec.description,
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    name_width = max(24, *(len(row["name"]) for row in rows))
    tasks_width = max(28, *(len(",".join(row["tasks"])) for row in rows))
    print(f"{'NAME':{name_width}} {'TASKS':{tasks_width}} {'BACKEND':12} {'MEMORY':>10} "
          f"{'CACHED':>10}  NOTE")
    for row in rows:
        note = ["default"] if row["default"] else []
        note += [] if row["offline"] else ["needs a network"]
        cached = format_bytes(row["size_on_disk_bytes"]) if row["cached"] else "-"
        print(f"{row['name']:{name_width}} {','.join(row['tasks']):{tasks_width}} {row['backend']:12} "
              f"{format_bytes(row['memory_estimate_bytes']):>10} {cached:>10}  {', '.join(note)}")
    print(f"\ncache: {store.root}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from mofa_omni.adapters.loading import open_model
    from mofa_omni.models.by_name import resolve_model_name
    from mofa_omni.models.fetching import tqdm_progress
    from mofa_omni.models.memory import format_bytes
    from mofa_omni.models.store import ModelStore

    catalog, store = _catalog(), ModelStore()
    names = list(args.names) + (sorted(set(catalog.defaults.values())) if args.defaults else [])
    if not names:
        print("omni pull: name a model (see `omni models`), a path or hf:ORG/REPO, or pass "
              "--defaults", file=sys.stderr)
        return 2
    if args.name and len(names) != 1:
        print("omni pull: --name names one model; pull the others separately", file=sys.stderr)
        return 2
    for text in names:
        started = time.perf_counter()
        spec = resolve_model_name(text, catalog, store, name=args.name, force=args.force,
                                  progress=tqdm_progress())
        if spec.name != text:
            print(f"{text}: registered as {spec.name!r} ({spec.description})")
        name = spec.name
        adapter = open_model(name, catalog=catalog, store=store, progress=tqdm_progress(),
                             load=False)
        print(f"{name}: ready in {time.perf_counter() - started:.1f} s, "
              f"{format_bytes(store.size_on_disk(adapter.spec))} at {store.model_dir(adapter.spec)}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from mofa_omni.models.cleanup import plan_remove
    from mofa_omni.models.store import ModelStore

    return _clean(plan_remove(args.name, _catalog(), ModelStore()), args.dry_run,
                  f"{args.name} is not in the cache")


def cmd_prune(args: argparse.Namespace) -> int:
    from mofa_omni.models.cleanup import plan_prune
    from mofa_omni.models.store import ModelStore

    return _clean(plan_prune(_catalog(), ModelStore()), args.dry_run, "nothing to prune")


def _clean(removals, dry_run: bool, nothing: str) -> int:
    """List what goes and why (and what each frees), then remove it unless ``dry_run``."""
    from mofa_omni.models.cleanup import apply
    from mofa_omni.models.memory import format_bytes

    if not removals:
        print(nothing)
        return 0
    for removal in removals:
        print(f"{format_bytes(removal.freed):>10}  {removal.path}  ({removal.why})")
    total = sum(removal.freed for removal in removals)
    if dry_run:
        print(f"would free {format_bytes(total)} (--dry-run: nothing removed)")
    else:
        print(f"freed {format_bytes(apply(removals))}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from mofa_omni.contract.tasks import ChatMessage, ChatRequest, Task

    llm = _open(args.model, Task.TEXT_GENERATION, quiet=args.quiet)
    messages = [ChatMessage("system", args.system)] if args.system else []
    request = ChatRequest(messages + [ChatMessage("user", args.prompt)], args.max_tokens,
                          args.temperature, stop=args.stop or [])
    started, first = time.perf_counter(), None
    for chunk in llm.generate(request):
        first = first or time.perf_counter()
        print(chunk.text, end="", flush=True)
        if chunk.final:
            print()
            if args.verbose:
                elapsed = time.perf_counter() - started
                print(f"[{chunk.completion_tokens} tokens, first after {first - started:.2f} s, "
                      f"{chunk.completion_tokens / elapsed:.1f} tok/s, {chunk.finish_reason}]",
                      file=sys.stderr)
    return 0


def cmd_transcribe(args: argparse.Namespace) -> int:
    from mofa_omni.contract.tasks import Task, TranscriptionRequest
    from mofa_omni.media.audio import read_wav

    audio, rate = read_wav(args.file)
    asr = _open(args.model, Task.SPEECH_RECOGNITION, quiet=args.quiet)
    transcript = asr.transcribe(TranscriptionRequest(audio, rate, args.language or ""))
    print(transcript.text.strip())
    return 0


def cmd_say(args: argparse.Namespace) -> int:
    import numpy as np

    from mofa_omni.contract.tasks import SpeechRequest, Task
    from mofa_omni.media.audio import write_wav

    tts = _open(args.model, Task.SPEECH_SYNTHESIS, quiet=args.quiet)
    chunks = list(tts.synthesize(SpeechRequest(args.text, speed=args.speed)))
    audio = np.concatenate([c.audio for c in chunks])
    write_wav(args.output, audio, chunks[0].sample_rate)
    print(f"{args.output}: {len(audio) / chunks[0].sample_rate:.2f} s, "
          f"{len(chunks)} sentence(s), {chunks[0].sample_rate} Hz", file=sys.stderr)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from mofa_omni.contract.tasks import EmbeddingRequest, Task

    embedder = _open(args.model, Task.EMBEDDING, quiet=args.quiet)
    vectors = embedder.embed(EmbeddingRequest(list(args.texts))).vectors
    if args.json:
        print(json.dumps({"model": embedder.spec.name, "dim": int(vectors.shape[1]),
                          "embeddings": vectors.tolist()}))
        return 0
    for text, vector in zip(args.texts, vectors):
        print(f"{text[:40]:40} [{', '.join(f'{v:+.3f}' for v in vector[:6])}, ...] "
              f"({len(vector)} dims)")
    if len(args.texts) > 1:
        similarity = vectors @ vectors.T
        print("\ncosine similarity:")
        for i, text in enumerate(args.texts):
            print(f"{text[:40]:40} " + " ".join(f"{s:6.3f}" for s in similarity[i]))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import platform

    import mlx.core as mx

    from mofa_omni.adapters.backends import compute_platform, select_adapter
    from mofa_omni.contract.errors import AdapterError
    from mofa_omni.contract.tasks import Task
    from mofa_omni.models.compute import find_openblas, measure_blas, mlx_device
    from mofa_omni.models.memory import format_bytes, snapshot
    from mofa_omni.models.store import cache_root
    from mofa_omni.node.shared_memory import lock_limit, shared_memory_verdict

    report = measure_blas()
    memory = snapshot()
    print(f"platform     {platform.system()} {platform.machine()}, Python {platform.python_version()}")
    print(f"memory       {format_bytes(memory.system_available_bytes)} available of "
          f"{format_bytes(memory.system_total_bytes)}")
    print(f"mlx          {mx.__version__}, device {mlx_device()}")
    print(f"blas         {report.library}"
          + (f", OPENBLAS_CORETYPE={report.coretype}" if report.coretype else ""))
    print(f"matmul       {report.gflops:.1f} GFLOP/s (float32, 1024x1024, measured now)")
    if sys.platform.startswith("linux") and find_openblas() is None:
        print("warning      OpenBLAS is missing: `apt-get install libopenblas0-pthread`")
    if (allowance := lock_limit()) is not None:
        print(f"shared mem   {shared_memory_verdict(allowance)[1]}")
    print(f"cache        {cache_root()}")
    catalog = _catalog()
    print(f"\nbackends on this machine ({compute_platform()}): which adapter serves each task's "
          "default model, and why")
    print("task                  default model          adapter       backend       why")
    for task in Task:
        if task not in catalog.defaults:
            continue
        spec = catalog.default_for(task)
        try:
            chosen = select_adapter(spec)
            print(f"{task.value:21} {spec.name:22} {chosen.adapter:13} {chosen.backend:13} "
                  f"{chosen.reason}")
        except AdapterError as error:
            print(f"{task.value:21} {spec.name:22} unavailable: {error}")
    return 0


def _results_stream():
    """This command's standard output, kept for its results: from here on, what else writes to
    file descriptor 1 -- dora's and zenoh's log lines, written as JSON by the node a command
    connects as -- goes to standard error, so that `--json` output stays one JSON document."""
    sys.stdout.flush()
    results = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return results


def cmd_status(args: argparse.Namespace) -> int:
    import msgspec

    from mofa_omni.scheduler.client import GraphUnreachable, fetch_status
    from mofa_omni.scheduler.status import render_status

    results = _results_stream()
    try:
        status = fetch_status(args.timeout, args.dataflow)
    except GraphUnreachable as error:
        print(f"omni status: {error}", file=sys.stderr)
        return 1
    print(msgspec.json.format(msgspec.json.encode(status).decode()) if args.json
          else render_status(status), file=results)
    return 0


def cmd_swap(args: argparse.Namespace) -> int:
    import msgspec

    from mofa_omni.models.by_name import resolve_model_name
    from mofa_omni.scheduler.client import GraphUnreachable, swap
    from mofa_omni.scheduler.status import render_swap

    # An unknown name fails here, with close matches; a path or hf: name is registered first.
    args.model = resolve_model_name(args.model, _catalog()).name
    results = _results_stream()
    try:
        outcome = swap(args.node, args.model, args.timeout, args.dataflow)
    except GraphUnreachable as error:
        print(f"omni swap: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(outcome).decode()), file=results)
    else:
        print(render_swap(outcome), file=results if outcome.ok else sys.stderr)
    return 0 if outcome.ok else 1


def cmd_recover(args: argparse.Namespace) -> int:
    import shutil
    import subprocess

    from mofa_omni.cluster.recovery import CoordinatorGone, Recoverer, RecoveryFailed

    machines = None
    if args.descriptor:
        import yaml

        from mofa_omni.scheduler.graph import machine_of

        machines = set(machine_of(yaml.safe_load(args.descriptor.read_text())).values())
        if not machines:
            print(f"omni recover: {args.descriptor} places no node on a machine (deploy: "
                  f"machine): there is no machine to lose", file=sys.stderr)
            return 1
    dora = shutil.which("dora") or str(Path(sys.executable).parent / "dora")
    coordinator = ["--coordinator-addr", args.coordinator_addr,
                   "--coordinator-port", str(args.coordinator_port)]
    env = {**os.environ, "RUST_BACKTRACE": "0"}

    def run_dora(*dora_args: str) -> subprocess.CompletedProcess:
        return subprocess.run([dora, *dora_args, *coordinator], capture_output=True, text=True,
                              timeout=60, env=env, check=False)

    def log(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} omni recover: {line}", flush=True)

    recoverer = Recoverer(args.dataflow, run_dora, log, machines=machines,
                          interval=args.interval, coordinator_timeout=args.coordinator_timeout,
                          attempts=args.attempts)
    try:
        return recoverer.run()
    except (CoordinatorGone, RecoveryFailed) as error:  # dora's message names the address
        print(f"omni recover: {error}", file=sys.stderr)
    return 1


def cmd_install(args: argparse.Namespace) -> int:
    from mofa_omni.adapters.installs import install

    install(args.engines)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler, help_text: str, *, model: bool = True):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        if model:
            sub.add_argument("--model", help="catalog name, path or hf:ORG/REPO[:FILE] "
                                             "(default: the catalog's default)")
            sub.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        return sub

    sub = command("models", cmd_models, "list the catalog and what is cached", model=False)
    sub.add_argument("--json", action="store_true")
    sub = command("pull", cmd_pull, "fetch and convert models into the cache", model=False)
    sub.add_argument("names", nargs="*", help="catalog names, paths (a GGUF, a model "
                                              "folder) or hf:ORG/REPO[:FILE]")
    sub.add_argument("--name", help="the catalog name for a path or hf: model (default: from it)")
    sub.add_argument("--force", action="store_true",
                     help="replace a different catalog entry of that name")
    sub.add_argument("--defaults", action="store_true", help="every task's default model")
    sub = command("rm", cmd_rm, "remove a model's builds (and a source only it reads) from "
                                "the cache; its catalog entry stays", model=False)
    sub.add_argument("name", help="the catalog name")
    sub.add_argument("--dry-run", action="store_true", help="list what would go, remove nothing")
    sub = command("prune", cmd_prune, "remove from the cache what no catalog model names or "
                  "reads, what was cut off part-way, and content no model links", model=False)
    sub.add_argument("--dry-run", action="store_true", help="list what would go, remove nothing")
    sub = command("chat", cmd_chat, "stream an LLM reply to a prompt")
    sub.add_argument("prompt")
    sub.add_argument("--system", default="", help="system prompt")
    sub.add_argument("--max-tokens", type=int, default=256)
    sub.add_argument("--temperature", type=float, default=0.0)
    sub.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    sub = command("transcribe", cmd_transcribe, "transcribe a WAV file")
    sub.add_argument("file", type=Path)
    sub.add_argument("--language", help="e.g. en (default: detect)")
    sub = command("say", cmd_say, "synthesize speech into a WAV file")
    sub.add_argument("text")
    sub.add_argument("-o", "--output", type=Path, required=True)
    sub.add_argument("--speed", type=float, default=1.0)
    sub = command("embed", cmd_embed, "embed sentences")
    sub.add_argument("texts", nargs="+")
    sub.add_argument("--json", action="store_true")
    command("doctor", cmd_doctor, "platform, MLX device, BLAS and speed", model=False)
    sub = command("status", cmd_status, "a running graph's models, memory and decisions",
                  model=False)
    sub.add_argument("--json", action="store_true")
    sub.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the graph")
    sub.add_argument("--dataflow", help="the graph's name, when several run")
    sub = command("swap", cmd_swap, "serve another model on a running graph's node, while it "
                                    "keeps serving", model=False)
    sub.add_argument("node", help="the model node's id in the dataflow (e.g. llm)")
    sub.add_argument("model", help="the model to serve from now on: catalog name, path or "
                                   "hf:ORG/REPO[:FILE]")
    sub.add_argument("--json", action="store_true")
    sub.add_argument("--timeout", type=float, default=600.0,
                     help="seconds to wait for the swap to end (fetching, converting, loading)")
    sub.add_argument("--dataflow", help="the graph's name, when several run")
    sub = command("recover", cmd_recover, "watch a graph spread over machines; when a machine it "
                  "lost has its daemon connected again, restart the graph (dora restart --force)",
                  model=False)
    sub.add_argument("--dataflow", required=True, help="the running graph's name or UUID")
    sub.add_argument("--descriptor", type=Path,
                     help="its YAML, for the machines it runs on (default: every machine "
                          "connected when the watch begins)")
    sub.add_argument("--coordinator-addr", default=os.environ.get("DORA_COORDINATOR_ADDR",
                                                                  "127.0.0.1"))
    sub.add_argument("--coordinator-port", type=int,
                     default=int(os.environ.get("DORA_COORDINATOR_PORT", "6013")))
    sub.add_argument("--interval", type=float, default=2.0, help="seconds between two looks")
    sub.add_argument("--coordinator-timeout", type=float, default=60.0,
                     help="give up when the coordinator has not answered for this long")
    sub.add_argument("--attempts", type=int, default=3,
                     help="give up after this many failed restarts in a row")
    sub = command("install", cmd_install, "install an engine pip cannot install as a plain "
                  "requirement: llama-cpp (built from source), mlx-whisper, mlx-vlm, mflux",
                  model=False)
    sub.add_argument("engines", nargs="+", metavar="ENGINE")
    add_commands(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `omni` console script."""
    ensure_fast_blas()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from mofa_omni.contract.errors import ContractError, ModelLoadError
    from mofa_omni.models.fetching import FetchError

    try:
        return args.handler(args)
    except (ContractError, ModelLoadError, FetchError) as error:
        print(f"omni {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
