"""Running a graph for an `omni` command: the descriptor written into a run folder, `dora run`
on it in its own process group, a record that `omni ps` reads, and a clean stop on Ctrl-C.

A run folder is ``<state dir>/runs/<graph>-<pid>/`` (dataflow.yml, run.json and dora's own
``out/`` logs); it is removed when the run ends, unless the graph failed (its logs then stay,
and the command says where).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import platformdirs

from mofa_omni.launch.dataflows import Descriptor, dump

STOP_GRACE_S = 20.0  # after Ctrl-C, how long dora gets to stop the graph before it is killed


class RunRecord(msgspec.Struct, frozen=True):
    """What `omni ps` shows of a graph an `omni` command started."""

    graph: str  # server, voice, robot
    pid: int  # the `omni` command's process
    dora_pid: int
    started: float  # time.time()
    models: dict[str, str]  # model node -> the model it serves
    url: str = ""  # the server's address
    output: str = ""  # where the graph writes its results
    folder: str = ""  # the run folder


def runs_root() -> Path:
    return Path(os.environ.get("MOFA_OMNI_RUNS") or
                Path(platformdirs.user_state_dir("mofa-omni")) / "runs")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running() -> list[RunRecord]:
    """The graphs `omni` commands are running now (records of ended ones are cleared)."""
    records = []
    root = runs_root()
    for path in sorted(root.glob("*/run.json")) if root.is_dir() else []:
        try:
            record = msgspec.json.decode(path.read_bytes(), type=RunRecord)
        except (OSError, msgspec.DecodeError):
            continue
        if _alive(record.pid) and _alive(record.dora_pid):
            records.append(record)
        elif not _alive(record.pid):  # its command is gone (killed): nothing will clean up
            shutil.rmtree(path.parent, ignore_errors=True)
    return records


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


class GraphRun:
    """`dora run` of a descriptor; use as a context manager around waiting for it."""

    def __init__(self, graph: str, descriptor: Descriptor, *, header: str = "",
                 env: dict[str, str] | None = None, models: dict[str, str] | None = None,
                 url: str = "", output: str = "", quiet: bool = False):
        self.graph, self.descriptor, self.header, self.env = graph, descriptor, header, env or {}
        self.quiet = quiet  # dora's own output to the run folder's dora.log, not the terminal
        self.models, self.url, self.output = models or {}, url, output
        self.folder = runs_root() / f"{graph}-{os.getpid()}"
        self.process: subprocess.Popen | None = None

    def start(self) -> GraphRun:
        self.folder.mkdir(parents=True, exist_ok=True)
        dataflow = self.folder / "dataflow.yml"
        dataflow.write_text(dump(self.descriptor, self.header), encoding="utf-8")
        bin_dir = str(Path(sys.executable).parent)  # this install's node programs and dora
        # PWD: nodes read relative paths from where the user is (dora starts them elsewhere)
        env = {**os.environ, **self.env, "PWD": os.getcwd(),
               "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
        dora = shutil.which("dora", path=env["PATH"]) or "dora"
        # Its own process group: Ctrl-C reaches `omni`, which stops dora once, gracefully.
        log = (self.folder / "dora.log").open("wb") if self.quiet else None
        self.process = subprocess.Popen([dora, "run", str(dataflow)], env=env,
                                        start_new_session=True, stdout=log,
                                        stderr=subprocess.STDOUT if log else None)
        if log is not None:
            log.close()  # dora holds its own copy
        record = RunRecord(self.graph, os.getpid(), self.process.pid, time.time(), self.models,
                           self.url, self.output, str(self.folder))
        (self.folder / "run.json").write_bytes(msgspec.json.encode(record))
        signal.signal(signal.SIGTERM, _interrupt)  # a `kill` of omni stops its graph too
        return self

    def wait(self, timeout: float | None = None) -> int | None:
        """dora's exit code, or None if it still runs after ``timeout``."""
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> int:
        """Stop the graph as dora does on Ctrl-C; killed if it has not ended in time."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            if self.wait(STOP_GRACE_S) is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> GraphRun:
        return self.start()

    def __exit__(self, *exc) -> None:
        code = self.stop()
        if code in (0, -signal.SIGINT, 130) or exc[0] is KeyboardInterrupt:
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            (self.folder / "run.json").unlink(missing_ok=True)
            print(f"omni: the {self.graph} graph ended with code {code}; its logs are in "
                  f"{self.folder / 'out'}" + (f" and {self.folder / 'dora.log'}" if self.quiet
                                              else ""), file=sys.stderr)
