"""Running a test dataflow with `dora run` from the test's environment (tests only)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest


def start_dataflow(dataflow: Path, env: dict[str, str]) -> subprocess.Popen:
    bin_dir = str(Path(sys.executable).parent)
    full_env = {**os.environ, **env, "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    return subprocess.Popen([os.path.join(bin_dir, "dora"), "run", str(dataflow)], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float) -> str:
    try:
        log, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        log, _ = process.communicate()
        pytest.fail(f"the dataflow did not finish within {timeout:g} s:\n{log[-5000:]}")
    assert process.returncode == 0, log[-5000:]
    return log


def omni(*args: str, timeout: float = 60,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the `omni` command of the test's environment (plus ``env``)."""
    omni_bin = Path(sys.executable).parent / "omni"
    return subprocess.run([str(omni_bin), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def node_id_of(process: psutil.Process) -> str | None:
    """The dora node id a process runs as (dora says so in its environment), or None."""
    with contextlib.suppress(psutil.Error):
        config = process.environ().get("DORA_NODE_CONFIG", "")
        if found := re.search(r"^node_id:\s*(\S+)\s*$", config, re.MULTILINE):
            return found.group(1)
    return None


def node_process(dataflow_pid: int, node_id: str, wait_s: float = 0) -> psutil.Process:
    """The process of ``node_id`` in the dataflow run by the process ``dataflow_pid``, waiting
    up to ``wait_s`` for dora to start it."""
    deadline = time.monotonic() + wait_s
    while True:
        for process in psutil.Process(dataflow_pid).children(recursive=True):
            if node_id_of(process) == node_id:
                return process
        if time.monotonic() >= deadline:
            pytest.fail(f"no process of node {node_id!r}")
        time.sleep(0.2)
