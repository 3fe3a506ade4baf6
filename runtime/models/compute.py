"""Platform and backend selection, in one place: which device MLX uses and which BLAS it runs on.

On a Linux CPU the ``mlx[cpu]`` wheel links a reference BLAS that is ~17x
slower than OpenBLAS. Every process that runs MLX there calls
:func:`ensure_fast_blas` before anything imports MLX: if OpenBLAS is installed
but not preloaded, the process re-executes itself once with ``LD_PRELOAD`` and
an ``OPENBLAS_CORETYPE`` matched to the CPU's flags (Debian's OpenBLAS 0.3.21
does not recognise recent CPUs and otherwise picks a slow generic kernel).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
_REEXEC_MARK = "MOFA_OMNI_BLAS_REEXEC"
_DISABLE = "MOFA_OMNI_NO_OPENBLAS"  # set to 1 to keep the stock BLAS (benchmarks compare both)


def find_openblas() -> Path | None:
    for candidate in OPENBLAS_CANDIDATES:
        if Path(candidate).exists():
            return Path(candidate)
    return None


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def openblas_coretype(flags: set[str]) -> str | None:
    """The newest OpenBLAS kernel family this CPU really supports (never one it lacks)."""
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    if "avx" in flags:
        return "Sandybridge"
    return None


def blas_environment(flags: set[str] | None = None) -> dict[str, str]:
    """Environment variables that make a new process run MLX on OpenBLAS (empty if not applicable)."""
    if not sys.platform.startswith("linux"):
        return {}
    library = find_openblas()
    if library is None:
        return {}
    env = {"LD_PRELOAD": " ".join(filter(None, [str(library), os.environ.get("LD_PRELOAD", "")]))}
    coretype = os.environ.get("OPENBLAS_CORETYPE") or openblas_coretype(
        cpu_flags() if flags is None else flags)
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    # OpenBLAS's idle threads otherwise spin a core for ~130 ms after every call (measured:
    # 128 ms of CPU after a 17 ms MiniLM embed), taken from the other nodes on a small machine;
    # with 2^4 cycles they sleep at once, and the embed is as fast (16.4 vs 16.6 ms).
    env["OPENBLAS_THREAD_TIMEOUT"] = os.environ.get("OPENBLAS_THREAD_TIMEOUT", "4")
    return env


def openblas_preloaded() -> bool:
    return "openblas" in os.environ.get("LD_PRELOAD", "")


def ensure_fast_blas() -> None:
    """Re-exec this process once with OpenBLAS preloaded when it is a Linux CPU process without it.

    Call at the very start of a program (before MLX is imported). Warns when
    OpenBLAS is missing; does nothing on macOS or when already preloaded.
    """
    if not sys.platform.startswith("linux") or openblas_preloaded():
        return
    # The mark names the process that re-executed: a child inherits it but must still check
    # for itself (dora removes LD_PRELOAD from the environment of the nodes it spawns).
    if os.environ.get(_DISABLE) == "1" or os.environ.get(_REEXEC_MARK) == str(os.getpid()):
        return
    env = blas_environment()
    if not env:
        warnings.warn("OpenBLAS is not installed: MLX on this CPU will be ~17x slower. "
                      "Install it with `apt-get install libopenblas0-pthread`.", stacklevel=2)
        return
    if "mlx.core" in sys.modules:
        warnings.warn("MLX was imported before ensure_fast_blas(): OpenBLAS cannot be preloaded",
                      stacklevel=2)
        return
    os.environ.update(env)
    os.environ[_REEXEC_MARK] = str(os.getpid())
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def prepare_compute_thread() -> None:
    """Make the calling (non-main) thread able to run models.

    MLX keeps its streams per thread: a thread that never set one fails on the
    first evaluation ("There is no Stream(cpu, 0) in current thread"). Other
    backends need nothing.
    """
    mx = sys.modules.get("mlx.core")
    if mx is not None:
        mx.set_default_stream(mx.new_stream(mx.default_device()))


def mlx_device() -> str:
    """The device MLX computes on: 'gpu' (Metal or CUDA) or 'cpu'."""
    import mlx.core as mx

    return "gpu" if mx.default_device() == mx.gpu else "cpu"


@dataclass(frozen=True, slots=True)
class BlasReport:
    library: str  # what MLX's matmul runs on
    coretype: str
    gflops: float


def measure_blas(size: int = 1024, repeats: int = 5) -> BlasReport:
    """Measure float32 matmul throughput of MLX in this process."""
    import mlx.core as mx

    a = mx.random.normal((size, size))
    b = mx.random.normal((size, size))
    mx.eval(a @ b)
    started = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    seconds = (time.perf_counter() - started) / repeats
    if mlx_device() == "gpu":
        library = "Metal" if sys.platform == "darwin" else "CUDA"
    elif sys.platform == "darwin":
        library = "Accelerate"
    else:
        library = "OpenBLAS (preloaded)" if openblas_preloaded() else "reference BLAS (slow)"
    return BlasReport(library, os.environ.get("OPENBLAS_CORETYPE", ""), 2 * size**3 / seconds / 1e9)


LINUX_BUDGET_FRACTION = 0.7  # of physical memory: the rest for the system and other apps


def default_memory_budget() -> tuple[int, str]:
    """The memory the scheduler may give models when the dataflow sets none, and why.

    On Apple Silicon, Metal's recommended working set (what the GPU can keep
    resident without paging); elsewhere a fraction of physical memory.
    """
    import psutil

    total = psutil.virtual_memory().total
    if sys.platform == "darwin":
        try:
            import mlx.core as mx

            size = int(mx.metal.device_info()["max_recommended_working_set_size"])
            return size, "Metal's recommended working set"
        except Exception:  # no Metal (an Intel Mac): fall through
            pass
    return int(total * LINUX_BUDGET_FRACTION), \
        f"{LINUX_BUDGET_FRACTION:.0%} of physical memory"
