"""The engines pip cannot install as plain requirements, and `omni install NAME` that does.

- llama.cpp (``llama-cpp-python``) has no binary wheel on PyPI: it is built from source once,
  for the CPU features every x86-64 machine with AVX2 has (not ``-march=native``: it picks up
  instructions some virtual machines advertise but fault on); pip keeps the wheel.
- mlx-whisper, mlx-vlm and mlx-gen (it ships ``mflux``) declare requirements their inference
  never imports (torch, the CUDA build of MLX, opencv, datasets, a web server): each is
  installed without its dependencies, after what its code does import.

scripts/setup.sh installs them through this module, so the versions live here only.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mofa_omni.contract.errors import ConfigError


@dataclass(frozen=True)
class Engine:
    name: str  # `omni install NAME`
    module: str  # its import name
    package: str  # the pinned requirement
    needs: tuple[str, ...] = ()  # what its code imports, installed with their dependencies
    no_deps: bool = True  # the package itself without its declared requirements
    built: bool = False  # compiled from source (minutes)
    why: str = ""
    replaces: tuple[str, ...] = ()  # distributions it supersedes: removed first (same modules)


ENGINES = {engine.name: engine for engine in (
    Engine("llama-cpp", "llama_cpp", "llama-cpp-python==0.3.36", no_deps=False, built=True,
           why="the fastest LLM engine on a Linux CPU; no binary wheel on PyPI: built once"),
    Engine("mlx-whisper", "mlx_whisper", "mlx-whisper==0.4.3",
           needs=("numba", "tiktoken", "more-itertools"),
           why="whisper on MLX (Metal on a Mac); its metadata requires torch, which it only "
               "uses to convert checkpoints"),
    Engine("mlx-vlm", "mlx_vlm", "mlx-vlm==0.7.10",
           why="vision-language models on MLX; its metadata pulls 64 packages (opencv, "
               "datasets, mlx-audio, a web server) that inference never imports"),
    Engine("mlx-gen", "mflux", "mlx-gen==0.38.0",
           # Pillow 13 cannot be imported by mflux on Python 3.11 (PIL._typing needs
           # numbers._IntegralLike, which only newer Pythons have)
           needs=("piexif>=1.1", "toml>=0.10", "Pillow>=12.1.1,<13"), replaces=("mflux",),
           why="image (FLUX.2) and video (Wan 2.2) generation on MLX, as the `mflux` package; "
               "its metadata requires torch, opencv and the CUDA build of MLX, which its "
               "pipelines do not use (Wan's prompt encoder runs here on MLX instead of torch)"),
)}


def hint_for(module: str) -> str | None:
    """How to get an engine's module, said when a backend is skipped for want of it."""
    for engine in ENGINES.values():
        if engine.module == module:
            return f"`omni install {engine.name}` adds it"
    return None


def llama_cpp_cmake_args(cpuinfo: str | None = None, machine: str | None = None) -> str:
    """CMake settings for this CPU: AVX2/FMA/F16C where all three exist, never native."""
    args = ["-DGGML_NATIVE=OFF", "-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_CURL=OFF"]
    machine = machine or platform.machine()
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                      if line.startswith("flags")), []))
    if machine == "x86_64" and {"avx2", "fma", "f16c"} <= flags:
        args += ["-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"]
    return " ".join(args)


def pip_steps(engine: Engine, python: str = sys.executable) -> list[list[str]]:
    """The pip commands installing ``engine`` into ``python``'s environment."""
    pip = [python, "-m", "pip", "install", "--quiet"]
    steps = [[python, "-m", "pip", "uninstall", "--yes", "--quiet", *engine.replaces]] \
        if engine.replaces else []
    steps += [pip + list(engine.needs)] if engine.needs else []
    return steps + [pip + (["--no-deps"] if engine.no_deps else []) + [engine.package]]


def install(names: list[str], *, python: str = sys.executable,
            say: Callable[[str], None] = print) -> None:
    """Install the named engines, saying what runs and for how long (a build takes minutes)."""
    unknown = [name for name in names if name not in ENGINES]
    if unknown or not names:
        raise ConfigError(f"unknown engine {', '.join(unknown) or '(none given)'}: "
                          f"`omni install` knows {', '.join(ENGINES)}")
    for name in names:
        engine = ENGINES[name]
        env = dict(os.environ)
        if engine.built:
            env.setdefault("CMAKE_ARGS", llama_cpp_cmake_args())
            env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        say(f"omni install {name}: {engine.package} ({engine.why})")
        for step in pip_steps(engine, python):
            _run_with_heartbeat(step, env, f"{name}: {'building' if engine.built else 'installing'}",
                                say)
        say(f"omni install {name}: done")


def _run_with_heartbeat(command: list[str], env: dict[str, str], doing: str,
                        say: Callable[[str], None]) -> None:
    started = time.monotonic()
    done = threading.Event()

    def beat() -> None:  # pip is quiet for minutes while a build compiles
        while not done.wait(15):
            say(f"  {doing}... {time.monotonic() - started:.0f} s")

    threading.Thread(target=beat, daemon=True).start()
    try:
        result = subprocess.run(command, env=env)
    finally:
        done.set()
    if result.returncode != 0:
        raise ConfigError(f"{doing} failed: `{' '.join(command)}` exited with "
                          f"{result.returncode} (its output is above)")
