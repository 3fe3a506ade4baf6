"""mofa-omni as a user installs it: the wheel built from this checkout, installed with the
`piper` extra into a fresh virtual environment (pip's cache, the registry, nothing else), and
used from a folder outside the checkout — `omni transcribe`, `omni serve` with the official
openai client, `omni voice`, `omni init` run by `dora run` as written, `omni ps`, and the
errors a user meets (a busy port, an unknown model, a missing file, a missing extra).

The models come from the user's cache, pulled by the set-up (the installed code builds them the
same way). One module fixture installs once: ~40 s from pip's cache."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import psutil
import pytest

CHECKOUT = Path(__file__).resolve().parents[1]
SAMPLES = CHECKOUT / "dataflows" / "samples"

pytestmark = pytest.mark.slow
# Runs the program in argv[1:] with SIGINT's default action restored (exec keeps it).
AS_FROM_A_TERMINAL = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                      "os.execv(sys.argv[1], sys.argv[1:])")


class Installed:
    def __init__(self, venv: Path, home: Path):
        self.venv, self.home = venv, home
        self.bin = venv / "bin"
        path = [p for p in os.environ["PATH"].split(os.pathsep)
                if not p.startswith(str(CHECKOUT))]  # not this checkout's environment
        self.env = {**{k: v for k, v in os.environ.items()
                       if k not in ("VIRTUAL_ENV", "PYTHONPATH", "MOFA_OMNI_RUNS")},
                    "PATH": os.pathsep.join([str(self.bin), *path]),
                    "MOFA_OMNI_RUNS": str(home / "runs")}

    def omni(self, *args: str, cwd: Path | None = None, timeout: float = 300,
             ) -> subprocess.CompletedProcess:
        cwd = cwd or self.home
        return subprocess.run([str(self.bin / "omni"), *args], cwd=cwd,
                              env={**self.env, "PWD": str(cwd)},  # as a shell in cwd has it
                              capture_output=True, text=True, timeout=timeout)

    def start(self, *args: str) -> subprocess.Popen:
        """``omni ARGS`` running as from a terminal, where Ctrl-C (SIGINT) reaches it: a suite
        started in the background by a shell without job control (``nohup ... &``) passes
        SIGINT on ignored, and a Python program started so ignores it too."""
        return subprocess.Popen([sys.executable, "-c", AS_FROM_A_TERMINAL,
                                 str(self.bin / "omni"), *args], cwd=self.home,
                                env={**self.env, "PWD": str(self.home)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def processes(self) -> list[psutil.Process]:
        """Processes of this environment still running (dora, nodes, omni)."""
        found = []
        for process in psutil.process_iter(["cmdline", "exe"]):
            try:
                text = " ".join(process.info["cmdline"] or []) + " " + (process.info["exe"] or "")
            except psutil.Error:
                continue
            if str(self.venv) in text or str(self.home / "runs") in text:
                found.append(process)
        return found


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("installed")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(root / "wheel"), str(CHECKOUT)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((root / "wheel").glob("mofa_omni-*.whl"))
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(root / "venv")], check=True, timeout=300)
    subprocess.run([str(root / "venv" / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    f"{wheel}[piper]"], check=True, capture_output=True, timeout=900)
    home = root / "home"  # the user's folder: outside the checkout
    home.mkdir()
    environment = Installed(root / "venv", home)
    yield environment
    for process in environment.processes():
        process.kill()


def test_the_install_has_no_torch_cuda_physics_or_numba(installed):
    listed = subprocess.run([str(installed.bin / "python"), "-m", "pip", "list",
                             "--format=freeze"], capture_output=True, text=True, check=True)
    names = {line.split("==")[0].lower() for line in listed.stdout.splitlines()}
    assert "mofa-omni" in names and "piper-tts" in names
    assert not {n for n in names if n.startswith(("torch", "nvidia", "numba", "llvmlite",
                                                  "pymunk", "mlx-whisper", "mlx-vlm"))}


def test_transcribe_from_a_plain_install(installed):
    shutil.copy(SAMPLES / "01-capital-of-france.wav", installed.home / "question.wav")
    result = installed.omni("transcribe", "-q", "question.wav")
    assert result.returncode == 0, result.stderr
    assert "capital of france" in result.stdout.lower()


def test_serve_answers_the_openai_client_then_stops_on_ctrl_c(installed):
    from openai import OpenAI

    port = _free_port()
    server = installed.start("serve", "--port", str(port))
    try:
        _wait_for_line(server, "serves", timeout=600)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120)
        reply = client.chat.completions.create(
            model="smollm2-135m", temperature=0, max_tokens=16,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in reply.choices[0].message.content
        with (SAMPLES / "02-capital-of-italy.wav").open("rb") as audio:
            heard = client.audio.transcriptions.create(model="whisper-tiny.en", file=audio)
        assert "italy" in heard.text.lower()
        speech = client.audio.speech.create(model="piper-joe", voice="joe", input="Hello there.",
                                            response_format="wav")
        assert speech.content[:4] == b"RIFF" and len(speech.content) > 10_000
        vectors = client.embeddings.create(model="minilm-l6", input=["a", "b"])
        assert [len(item.embedding) for item in vectors.data] == [384, 384]

        listed = installed.omni("ps")
        assert f"http://127.0.0.1:{port}/v1" in listed.stdout and "smollm2-135m" in listed.stdout
        busy = installed.omni("serve", "--port", str(port))
        assert busy.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    finally:
        server.send_signal(signal.SIGINT)  # as Ctrl-C does
        server.wait(60)
    assert server.returncode == 0
    deadline = time.monotonic() + 15
    while installed.processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert installed.processes() == []
    assert "no graph started by omni is running" in installed.omni("ps").stdout


def test_voice_answers_a_wav_and_init_writes_a_graph_dora_runs(installed):
    shutil.copy(SAMPLES / "01-capital-of-france.wav", installed.home / "question.wav")
    result = installed.omni("voice", "--input", "question.wav", "-o", "replies")
    assert result.returncode == 0, result.stderr[-2000:]
    transcript = (installed.home / "replies" / "transcript.txt").read_text()
    assert "capital of France" in transcript and "Paris" in transcript.split("assistant:")[1]
    with wave.open(str(installed.home / "replies" / "reply-001.wav")) as reply:
        assert reply.getnframes() > reply.getframerate() // 2  # more than half a second

    assert installed.omni("init", "demo").returncode == 0
    demo = installed.home / "demo"
    run = subprocess.run(["dora", "run", "dataflow.yml"], cwd=demo,
                         env={**installed.env, "PWD": str(demo)},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, _errors(run.stdout + run.stderr)
    turns = (demo / "replies" / "transcript.txt").read_text()
    assert "Paris" in turns and "Rome" in turns
    assert installed.processes() == []


def test_bad_commands_say_why_and_leave_nothing_running(installed):
    unknown = installed.omni("serve", "--models", "smollm2-135m,no-such-model",
                             "--port", str(_free_port()))
    assert unknown.returncode != 0 and "no-such-model" in unknown.stderr
    missing = installed.omni("voice", "--input", "nowhere.wav")
    assert missing.returncode != 0 and "--input nowhere.wav: no such file" in missing.stderr
    robot = installed.omni("robot")  # its simulator is the `robot` extra, not installed here
    assert robot.returncode != 0 and "mofa-omni[robot]" in robot.stderr
    assert installed.processes() == []
    assert not list((installed.home / "runs").glob("*/run.json"))


def _errors(log: str) -> str:
    """The lines of a dora log that say what went wrong (not its backtraces)."""
    lines = [line for line in log.splitlines()
             if any(word in line for word in ("ERROR", "Error", "error:", "failed", "Caused"))]
    return "\n".join(lines[-40:])


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_line(process: subprocess.Popen, text: str, timeout: float) -> None:
    """Read the process's output until a line holds ``text`` (output is kept flowing after,
    so that dora's logging never blocks on a full pipe)."""
    import threading

    found = threading.Event()
    seen: list[str] = []

    def read() -> None:
        for line in process.stdout:
            seen.append(line)
            if text in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout):
        raise AssertionError(f"no line with {text!r} within {timeout} s:\n{''.join(seen[-40:])}")
