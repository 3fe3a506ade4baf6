"""Running a test dataflow with `dora run` from the test's environment (tests only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
