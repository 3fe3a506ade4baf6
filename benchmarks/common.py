"""What the benchmarks share: their folders, common flags, timing and statistics, table headers,
plots, JSON results, the machine's description, the `dora` processes they start, and their own
model cache (benchmarks/.cache, unless MOFA_OMNI_CACHE is set: never the user's).

The scripts beside it import it as ``from common import ...`` (``python benchmarks/X.py`` puts
this folder first on sys.path). At import it loads only the standard library, psutil and a light
part of mofa_omni (no numpy, no MLX): a benchmark may still call ensure_fast_blas() after it.

A graph a benchmark starts runs inside ``with DoraRun(...)`` (``dora run``) or ``with
DoraCoordinator()`` (``dora up`` / ``dora start``): however the block ends -- normally, by an
exception, by Ctrl-C, by a SIGTERM (`kill`, a CI's timeout) -- the graph is stopped and every
process it started is ended.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from mofa_omni.cluster.local import free_port

T = TypeVar("T")
C = TypeVar("C")  # a client of the server under load

ROOT = Path(__file__).resolve().parents[1]  # the checkout
RESULTS = ROOT / "benchmarks" / "results"  # the committed figures, each benchmark's default
FLOWS = ROOT / "benchmarks" / "dataflows"  # the benchmarks' own graphs and driver nodes
SAMPLES = ROOT / "dataflows" / "samples"  # the checkout's spoken questions (WAV)
BIN = Path(sys.executable).parent  # this environment's programs: dora, omni, omni-node, ...
# The benchmarks' own model cache (what they pull, convert and build under their own names stays
# out of the user's), unless MOFA_OMNI_CACHE names one; the graphs they start inherit it.
CACHE = Path(os.environ.setdefault("MOFA_OMNI_CACHE", str(ROOT / "benchmarks" / ".cache")))
# What ensure_fast_blas() sets to re-execute a process with OpenBLAS preloaded.
BLAS_SETUP = ("LD_PRELOAD", "OPENBLAS_CORETYPE", "MOFA_OMNI_BLAS_REEXEC")


# --- flags -------------------------------------------------------------------------------------

def make_parser(doc: str, *, full_help: bool = False) -> argparse.ArgumentParser:
    """A parser described by a benchmark's docstring: its first paragraph, or (``full_help``)
    all of it, as written."""
    if full_help:
        return argparse.ArgumentParser(description=doc,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    return argparse.ArgumentParser(description=doc.split("\n\n")[0])


def add_output_flags(parser: argparse.ArgumentParser, json_name: str,
                     png_name: str | None = None) -> None:
    """``--json FILE`` (and ``--png FILE`` with ``png_name``): where the figures go, by default
    under benchmarks/results/."""
    parser.add_argument("--json", type=Path, default=RESULTS / json_name)
    if png_name:
        parser.add_argument("--png", type=Path, default=RESULTS / png_name)


# --- timing and statistics ---------------------------------------------------------------------

def timed_result(call: Callable[[], T]) -> tuple[float, T]:
    """The seconds one call of ``call`` takes (perf_counter), and what it returned."""
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def timed(call: Callable[[], object]) -> float:
    """The seconds one call of ``call`` takes."""
    return timed_result(call)[0]


def timer(call: Callable[[], object]) -> Callable[[], float]:
    """A function that calls ``call`` and returns the seconds it took, each time."""
    return lambda: timed(call)


def median(values: Iterable[float], empty: Any = math.nan) -> Any:
    """The median of ``values`` as a float; ``empty`` where there are none."""
    values = list(values)
    return float(statistics.median(values)) if values else empty


def percentile(values: Iterable[float], q: float, empty: Any = math.nan) -> Any:
    """The ``q``-th percentile of ``values`` (numpy's linear interpolation); ``empty`` where
    there are none."""
    import numpy as np

    values = list(values)
    return float(np.percentile(values, q)) if values else empty


# --- output ------------------------------------------------------------------------------------

@dataclass
class Load:
    """What :func:`back_to_back` saw: each answered request's latency and result, each
    failure's description, and the time from the start to the last answer."""

    done: list[tuple[float, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    answering_s: float = 0.0
    wall_s: float = 0.0  # from the start until every client stopped


def back_to_back(clients: list[C], seconds: float, request: Callable[[C], Any]) -> Load:
    """One thread per client, each sending ``request(client)`` back to back for ``seconds``
    (started together); a request that raises counts as an error, whatever it raised."""
    load, lock, last = Load(), threading.Lock(), [0.0]
    go = threading.Barrier(len(clients) + 1)

    def worker(client: C) -> None:
        go.wait()
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                result = request(client)
            except Exception as error:  # noqa: BLE001 -- every failure counts, whatever it is
                with lock:
                    load.errors.append(f"{type(error).__name__}: {str(error)[:120]}")
                continue
            with lock:
                last[0] = max(last[0], time.perf_counter())
                load.done.append((last[0] - started, result))

    with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        futures = [pool.submit(worker, client) for client in clients]
        started = time.perf_counter()
        stop_at = started + seconds
        go.wait()
        for future in futures:
            future.result()
        load.wall_s = time.perf_counter() - started
    load.answering_s = (last[0] - started) if last[0] else load.wall_s
    return load


def print_header(header: str) -> None:
    """A table's header line, and a rule as long as it under it."""
    print(header)
    print("-" * len(header))


def write_json(path: Path, data: object, *, indent: int = 1, **options: Any) -> None:
    """``data`` as JSON at ``path`` (``options`` go to json.dumps), its folder made if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, **options))


def pyplot():
    """matplotlib.pyplot on the Agg backend (PNG files, no display), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> None:
    """``figure`` as a PNG at ``path`` (110 dpi), its folder made if needed; then closed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot().close(figure)


# --- the machine -------------------------------------------------------------------------------

def machine(*fields: str, **versions: str) -> dict:
    """This machine: platform, processor, CPU count and Python version -- only ``fields``, in
    that order, when named -- then ``versions`` (package -> version) as given."""
    described = {"platform": platform.platform(), "processor": platform.machine(),
                 "cpus": os.cpu_count(), "python": platform.python_version()}
    return {**({f: described[f] for f in fields} if fields else described), **versions}


def run_stamp() -> dict:
    """Which machine ran a benchmark (its host name), its CPU count, and when (to the minute)."""
    return {"machine": os.uname().nodename, "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


# --- processes ---------------------------------------------------------------------------------

def without_blas_setup(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without what ensure_fast_blas() set in this process, so that a child chooses its
    own BLAS set-up, as it would from a shell."""
    return {key: value for key, value in env.items() if key not in BLAS_SETUP}


def dora_env(extra: Mapping[str, object] | None = None, *,
             own_blas: bool = False) -> dict[str, str]:
    """This process's environment with its bin folder first on PATH (dora starts `.py` nodes
    with `python` and finds omni-node there), plus ``extra``; with ``own_blas``, without the
    BLAS set-up (:func:`without_blas_setup`)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           **{key: str(value) for key, value in (extra or {}).items()}}
    return without_blas_setup(env) if own_blas else env


def descendants(pid: int) -> list[psutil.Process]:
    """The processes below ``pid`` (children, theirs, ...); none once it has ended."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def session_members(sid: int) -> list[psutil.Process]:
    """The processes of session ``sid`` (dora gives each node a process group of its own, but
    they stay in the session of the `dora run` that spawned them, even once orphaned)."""
    members = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and os.getsid(process.pid) == sid:
                members.append(process)
        except (OSError, psutil.Error):
            continue
    return members


def _running(process: psutil.Process) -> bool:
    """Whether ``process`` still runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def end_processes(processes: Iterable[psutil.Process], grace_s: float = 5) -> list[int]:
    """End those of ``processes`` that still run: SIGTERM, then SIGKILL after ``grace_s``.
    Returns their ids."""
    alive = [p for p in {p.pid: p for p in processes}.values() if _running(p)]
    for process in alive:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(alive, timeout=grace_s)
    for process in still:
        try:
            process.kill()
        except psutil.Error:
            pass
    return [p.pid for p in alive]


def wait_for_file(path: Path, read: Callable[[Path], T], *, timeout: float, what: str,
                  every_s: float = 0.1, graph: DoraRun | None = None) -> T:
    """What ``read(path)`` returns once ``path`` exists and it returns something true, polling
    every ``every_s``. A ValueError from ``read`` (a JSON file still being written) counts as
    not yet. RuntimeError after ``timeout`` seconds, or at once when ``graph`` ended."""
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            try:
                if value := read(path):
                    return value
            except ValueError:
                pass
        if graph is not None and not graph.running:
            raise RuntimeError(f"the dataflow stopped:\n{graph.log_text()[-3000:]}")
        if time.monotonic() > deadline:
            tail = f":\n{graph.log_text()[-3000:]}" if graph is not None else ""
            raise RuntimeError(f"timed out waiting for {what}{tail}")
        time.sleep(every_s)


def exit_on_sigterm() -> None:
    """Make a SIGTERM end this process by SystemExit (status 143), so that the ``with`` blocks
    it is in stop their graphs: by default Python dies at once and leaves a `dora run` and its
    nodes running (their own session is out of reach of the signals sent to this one). Only
    where SIGTERM still has its default action, and only from the main thread (Python's rule)."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_143)


def _exit_143(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


class DoraRun:
    """``dora run DATAFLOW``, as a context manager: started on entering, its output (stdout and
    stderr) in the file ``log``, in a session of its own; on leaving, normally or by any
    exception, :meth:`stop` ends it and every process it started."""

    def __init__(self, dataflow: Path, env: Mapping[str, str], *, log: Path,
                 cwd: Path | str | None = None, grace_s: float = 30):
        self.dataflow, self.env, self.log, self.cwd = dataflow, dict(env), log, cwd
        self.grace_s = grace_s  # how long a SIGINT gets before SIGKILL
        self.process: subprocess.Popen | None = None
        self.interrupted = False
        self.leftovers: list[int] = []  # processes :meth:`stop` had to end after `dora run`

    def __enter__(self) -> DoraRun:
        exit_on_sigterm()
        with self.log.open("w") as log:
            self.process = subprocess.Popen([str(BIN / "dora"), "run", str(self.dataflow)],
                                            env=self.env, cwd=self.cwd, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for `dora run` to end (subprocess.TimeoutExpired after ``timeout``); its status."""
        return self.process.wait(timeout)

    def interrupt(self) -> None:
        """SIGINT to `dora run`, as a Ctrl-C: a Stop to every node (sent once)."""
        if not self.interrupted and self.running:
            self.process.send_signal(signal.SIGINT)
            self.interrupted = True

    def log_text(self) -> str:
        """What `dora run` wrote so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> list[int]:
        """End the graph: a SIGINT (unless sent already), ``grace_s`` to stop, then SIGKILL;
        then every process it started that still runs (the nodes, found below it and in its
        session) gets SIGTERM, then SIGKILL. Returns the ids of those; safe to call again."""
        if self.process is None:
            return []
        started = descendants(self.pid)
        if self.running:
            self.interrupt()
            try:
                self.process.wait(self.grace_s)
            except subprocess.TimeoutExpired:
                print(f"`dora run {self.dataflow.name}` did not stop within {self.grace_s:g} s: "
                      "killing it", file=sys.stderr)
                self.process.kill()
                self.process.wait()
        self.leftovers += end_processes([*started, *session_members(self.pid)])
        return self.leftovers


class DoraCoordinator:
    """``dora up`` (a coordinator and a daemon) on a free port of its own, for ``dora start``
    and ``omni`` commands, as a context manager: on leaving, normally or by any exception,
    ``dora destroy`` stops every dataflow it runs and ends it."""

    def __init__(self, env: Mapping[str, object] | None = None, cwd: Path = ROOT):
        self.port = free_port()
        self.env = dora_env({"DORA_COORDINATOR_PORT": self.port, **(env or {})})
        self.cwd = cwd
        self.dora, self.omni = str(BIN / "dora"), str(BIN / "omni")

    def __enter__(self) -> DoraCoordinator:
        exit_on_sigterm()
        try:
            self.run(self.dora, "up")
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """``args`` (a program of this environment and its arguments) against this coordinator,
        output captured."""
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.cwd)

    def destroy(self) -> None:
        self.run(self.dora, "destroy", timeout=60)
