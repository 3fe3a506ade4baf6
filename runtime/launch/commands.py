"""The graphs as commands: `omni serve`, `omni voice`, `omni robot`, `omni video`, `omni init`,
`omni ps`.

Each runs a shipped dataflow (or, for `serve --models`, the server graph of those models)
under `dora run`, after pulling its models with progress bars, so that a bad name, a busy port
or a missing file is said before anything starts and nothing is left running.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from pathlib import Path

from mofa_omni.contract.errors import ConfigError
from mofa_omni.contract.tasks import Task
from mofa_omni.launch import dataflows
from mofa_omni.launch.runs import GraphRun, RunRecord, running
from mofa_omni.launch.server import server_graph
from mofa_omni.launch.starter import write_starter

SERVER_TASKS = (Task.TEXT_GENERATION, Task.SPEECH_RECOGNITION, Task.SPEECH_SYNTHESIS,
                Task.EMBEDDING)
READY_TIMEOUT_S = 600.0  # the first start converts models and loads them all


def _model_names(text: str | None) -> list[str]:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def _pulled(names: list[str]):
    """The specs of ``names`` (catalog names, paths, hf:), fetched and converted (progress)."""
    from mofa_omni.adapters.loading import open_model
    from mofa_omni.models.by_name import resolve_model_name
    from mofa_omni.models.catalog import Catalog
    from mofa_omni.models.fetching import tqdm_progress
    from mofa_omni.models.store import ModelStore

    catalog, store = Catalog.load(), ModelStore()
    specs = []
    for name in names:
        spec = resolve_model_name(name, catalog, store, progress=tqdm_progress())
        open_model(spec.name, catalog=catalog, store=store, progress=tqdm_progress(), load=False)
        specs.append(spec)
    return catalog, specs


def check_port_free(host: str, port: int) -> None:
    """ConfigError if ``host:port`` cannot be listened on (another server has it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the gateway binds
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror} (another "
                              "server has it? choose another with --port)") from None


def _wait_until_serving(run: GraphRun, url: str, api_key: str, probe: str = "/models") -> bool:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if run.wait(0.5) is not None:
            return False
        try:
            if httpx.get(f"{url}{probe}", headers=headers, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
    return False


def cmd_serve(args: argparse.Namespace) -> int:
    from mofa_omni.models.catalog import Catalog

    names = _model_names(args.models)
    if not names:
        defaults = Catalog.load().defaults
        names = [defaults[task] for task in SERVER_TASKS]
    catalog, specs = _pulled(names)
    check_port_free(args.host, args.port)
    descriptor = server_graph(specs, defaults=catalog.defaults)
    url = f"http://{args.host}:{args.port}/v1"
    api_key = args.api_key or os.environ.get("OMNI_API_KEY", "")
    env = {"PORT": str(args.port), "HOST": args.host, "API_KEY": api_key}
    models = dataflows.served_models(descriptor, catalog.defaults)
    try:
        with GraphRun("server", descriptor, env=env, models=models, url=url,
                      header="omni serve: an OpenAI-compatible server") as run:
            if _wait_until_serving(run, url, api_key):
                served = ", ".join(spec.name for spec in specs)
                print(f"omni serve: {url} serves {served} (Ctrl-C stops)", flush=True)
            return run.wait() or 0
    except KeyboardInterrupt:  # how a server is meant to end: the graph was stopped cleanly
        print("omni serve: stopped", flush=True)
        return 0


def _voice_like(graph: str, args: argparse.Namespace) -> int:
    web, omni = getattr(args, "web", False), getattr(args, "omni", False)
    if web and (omni or args.input is not None):
        raise ConfigError("--web hears the browser's microphone: it takes no --input or --omni")
    shipped = "voice.omni" if omni else "voice.web" if web else graph
    descriptor = dataflows.load(dataflows.shipped(shipped))
    catalog, specs = _pulled(_model_names(args.models))
    descriptor = dataflows.with_models(descriptor, specs)
    env, url = {}, None
    if web:
        check_port_free(args.host, args.port)
        env.update(PORT=str(args.port), HOST=args.host)
        url = f"http://{args.host}:{args.port}"
    elif args.input is not None:
        if not args.input.exists():
            raise ConfigError(f"--input {args.input}: no such file or folder")
        env["VOICE_INPUT"] = str(args.input.resolve())
    elif graph == "voice":  # the microphone, and replies on the speaker
        descriptor = microphone_graph(descriptor)
    output = (args.output or Path("out") / graph).resolve()
    env["VOICE_OUTPUT"] = str(output)
    models = dataflows.served_models(descriptor, catalog.defaults)
    named = {spec.name for spec in specs}  # the others are fetched before the graph starts
    _pulled([model for model in models.values() if model and model not in named])
    with GraphRun(graph, descriptor, env=env, models=models, output=str(output), url=url or "",
                  header=f"omni {graph}") as run:
        if url and _wait_until_serving(run, url, "", probe="/health"):
            print(f"omni voice: open {url}/ to talk, or point an OpenAI Realtime client at "
                  f"{url.replace('http', 'ws', 1)}/v1/realtime (Ctrl-C stops)", flush=True)
        code = run.wait() or 0
    transcript = output / "transcript.txt"
    if transcript.is_file():
        print(f"== {transcript}\n{transcript.read_text(encoding='utf-8')}", end="")
    return code


def microphone_graph(descriptor: dataflows.Descriptor) -> dataflows.Descriptor:
    """The voice graph listening to the microphone and speaking on the speaker."""
    changed = dataflows.with_env(descriptor, "sink", SINK="speaker")
    source = dataflows.node(changed, "source")
    source.clear()
    source.update({"id": "source", "path": "omni-microphone", "outputs": ["audio"]})
    return changed


def cmd_voice(args: argparse.Namespace) -> int:
    return _voice_like("voice", args)


def cmd_robot(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("pymunk") is None:  # its simulator node would die at start
        raise ConfigError("the robot's simulator needs pymunk, in the `robot` extra: "
                          "pip install 'mofa-omni[robot]'")
    return _voice_like("robot", args)


DEFAULT_VIDEO_MODEL = "wan2.2-ti2v-5b"
STATUS_POLL_S = 0.2


def cmd_video(args: argparse.Namespace) -> int:
    """`omni video PROMPT -o clip.mp4`: the video graph on one request, with a progress bar."""
    output = args.output.resolve()
    if output.suffix != ".mp4":
        raise ConfigError(f"--output {args.output}: the clip is written as MP4 (name it .mp4)")
    if args.image is not None and not args.image.is_file():
        raise ConfigError(f"--image {args.image}: no such file")
    _, specs = _pulled([args.model or DEFAULT_VIDEO_MODEL])
    descriptor = dataflows.with_models(dataflows.load(dataflows.shipped("video")), specs)
    settings = {"PROMPT": args.prompt, "SIZE": args.size, "FRAMES": str(args.frames),
                "FPS": str(args.fps), "STEPS": str(args.steps), "SEED": str(args.seed)}
    if args.image is not None:
        settings["IMAGE"] = str(args.image.resolve())
    descriptor = dataflows.with_env(descriptor, "request", **settings)
    run = GraphRun("video", descriptor, models={"video": specs[0].name}, output=str(output),
                   header="omni video", quiet=True)  # the progress bar alone on the terminal
    status_file = run.folder / "status.json"
    descriptor = dataflows.with_env(descriptor, "sink", VIDEO_OUTPUT=str(output),
                                    VIDEO_STATUS=str(status_file))
    run.descriptor = descriptor
    output.unlink(missing_ok=True)  # so that a file there afterwards is this run's
    with run:
        clip = _follow_clip(run, status_file, quiet=args.quiet)
    if clip is None or clip.error or not output.is_file():
        why = clip.error if clip is not None and clip.error else "the graph ended without a clip"
        raise ConfigError(f"no clip: {why}")
    print(f"{output} ({clip.frames} frames)")
    return 0


CLIP_ENDED = ("written", "failed", "cancelled")
# The bar each phase of a clip shows: a short clip may be written before its denoising was
# ever seen, and then shows its frames' bar at once.
CLIP_BARS = {"denoise": "denoise", "decode": "decode", "written": "decode"}


def _follow_clip(run: GraphRun, status_file: Path, *, quiet: bool):
    """Draw the clip's progress (denoising steps, then frames) until it ends or the graph does;
    the clip's last status (None if it never began)."""
    from tqdm import tqdm

    from mofa_omni.media.video_stream import read_statuses

    bar, shown, last = None, "", None
    try:
        while True:
            ended = run.wait(STATUS_POLL_S) is not None
            statuses = read_statuses(status_file)
            last = statuses[-1] if statuses else last
            phase = CLIP_BARS.get(last.phase, "") if last is not None and not quiet else ""
            if phase and phase != shown:
                if bar is not None:
                    bar.close()
                shown = phase
                bar = tqdm(total=last.steps if phase == "denoise" else last.total_frames,
                           desc=phase, unit="step" if phase == "denoise" else "frame")
            if phase:
                # decoding: frames decoded (its progress) or written (its chunks), the further
                bar.n = last.step if phase == "denoise" else max(last.frames, last.step)
                bar.refresh()
            if ended or (last is not None and last.phase in CLIP_ENDED):
                return last
    finally:
        if bar is not None:
            bar.close()


def cmd_init(args: argparse.Namespace) -> int:
    folder = write_starter(Path(args.name))
    print(f"omni init: wrote {folder}/ (dataflow.yml, catalog.toml, samples/, README.md)\n"
          f"  cd {args.name} && dora run dataflow.yml")
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    records = running()
    if args.json:
        import msgspec

        print(msgspec.json.encode(records).decode())
        return 0
    if not records:
        print("no graph started by omni is running")
        return 0
    print(f"{'GRAPH':8} {'PID':>8} {'UP':>8}  {'WHERE':32} MODELS")
    for record in records:
        print(_row(record))
    return 0


def _row(record: RunRecord) -> str:
    up = time.time() - record.started
    where = record.url or record.output
    models = ", ".join(f"{node}={model}" for node, model in record.models.items())
    return f"{record.graph:8} {record.pid:>8} {up:>7.0f}s  {where:32} {models}"


def add_commands(command) -> None:
    """Register the commands with the CLI's ``command(name, handler, help)`` helper."""
    sub = command("serve", cmd_serve, "run the OpenAI-compatible server on models of your "
                  "choice (Ctrl-C stops it)", model=False)
    sub.add_argument("--models", help="comma-separated catalog names, paths or hf:ORG/REPO "
                                      "(default: the default chat, speech recognition, speech "
                                      "and embedding models)")
    sub.add_argument("--port", type=int, default=8000)
    sub.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default: loopback only; 0.0.0.0: all)")
    sub.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: "
                                       "$OMNI_API_KEY, else none)")
    for graph, handler, text in (
            ("voice", cmd_voice, "run the voice agent on WAV turns, or the microphone"),
            ("robot", cmd_robot, "run the voice-commanded robot on WAV commands")):
        sub = command(graph, handler, text, model=False)
        sub.add_argument("--input", "-i", type=Path,
                         help="a WAV file or a folder of them, taken as turns in name order"
                              + (" (default: the microphone)" if graph == "voice" else
                                 " (default: the shipped commands)"))
        sub.add_argument("--output", "-o", type=Path,
                         help=f"folder for the replies and transcript.txt (default: out/{graph})")
        sub.add_argument("--models", help="comma-separated models, each served by the node of "
                                          "its task (default: the dataflow's)")
        if graph == "voice":
            sub.add_argument("--omni", action="store_true",
                             help="one omni model hears and answers aloud (voice.omni.yml; an "
                                  "ASR, an LLM and a TTS stand by for when it cannot serve); "
                                  "name it with --models")
            sub.add_argument("--web", action="store_true",
                             help="talk from a browser page or an OpenAI Realtime client "
                                  "(voice.web.yml) instead of WAV files or the microphone")
            sub.add_argument("--port", type=int, default=8001, help="with --web (default 8001)")
            sub.add_argument("--host", default="127.0.0.1",
                             help="with --web: the address to listen on (default: loopback)")
    sub = command("video", cmd_video, "generate a clip from a prompt (and a first picture) "
                  "into an MP4", model=True)
    sub.add_argument("prompt", help="what the clip shows")
    sub.add_argument("--output", "-o", type=Path, default=Path("clip.mp4"),
                     help="the MP4 to write (default: clip.mp4)")
    sub.add_argument("--image", type=Path, help="a picture to start from (image to video)")
    sub.add_argument("--size", default="832x480", help="WIDTHxHEIGHT (default: 832x480)")
    sub.add_argument("--frames", type=int, default=17, help="how many frames (default: 17)")
    sub.add_argument("--fps", type=int, default=16, help="frames a second (default: 16)")
    sub.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    sub.add_argument("--seed", type=int, default=0)
    sub = command("init", cmd_init, "write a starter project: a dataflow of the packaged nodes, "
                  "a catalog stub and a README", model=False)
    sub.add_argument("name", help="the folder to create")
    sub = command("ps", cmd_ps, "the graphs omni serve / voice / robot are running", model=False)
    sub.add_argument("--json", action="store_true")

