"""Measuring memory: process resident set, MLX active/peak, and the system's available memory."""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass

import psutil

from mofa_omni.contract.errors import ConfigError


@dataclass(frozen=True, slots=True)
class MemorySnapshot:
    rss_bytes: int  # this process's resident set
    mlx_active_bytes: int  # memory MLX holds in live arrays (0 when MLX is not imported)
    mlx_peak_bytes: int
    mlx_cache_bytes: int
    system_available_bytes: int
    system_total_bytes: int


def _mlx_core():
    # Only look at MLX if something already imported it: measuring must not load it.
    module = sys.modules.get("mlx.core")
    return module


def snapshot() -> MemorySnapshot:
    """Measure now. Cheap enough to call after every load/unload and periodically."""
    mx = _mlx_core()
    active = peak = cache = 0
    if mx is not None:
        active, peak, cache = mx.get_active_memory(), mx.get_peak_memory(), mx.get_cache_memory()
    system = psutil.virtual_memory()
    return MemorySnapshot(
        rss_bytes=resident_bytes(),
        mlx_active_bytes=active,
        mlx_peak_bytes=peak,
        mlx_cache_bytes=cache,
        system_available_bytes=system.available,
        system_total_bytes=system.total,
    )


def resident_bytes() -> int:
    """This process's resident set now."""
    return psutil.Process().memory_info().rss


def reset_peak_resident() -> bool:
    """Start measuring this process's peak resident set afresh (Linux); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_resident_bytes() -> int:
    """The peak resident set since :func:`reset_peak_resident` (Linux VmHWM), else since start."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def release_freed_memory() -> None:
    """Give freed memory back to the OS: Python garbage, MLX's buffer cache, malloc arenas."""
    gc.collect()
    mx = _mlx_core()
    if mx is not None:
        mx.clear_cache()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
          "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4,
          "tb": 1000**4, "tib": 1 << 40}


def parse_size(text: str, total: int | None = None) -> int:
    """Bytes from ``"1.5GiB"``, ``"800MB"``, ``"123456"``, or a fraction of ``total`` (``"0.5"``,
    ``"50%"``) — the way a budget is written in a dataflow's env. A bad one is a ConfigError
    (a ``ValueError`` too)."""
    cleaned = text.strip().lower().replace(" ", "")
    try:
        if cleaned.endswith("%"):
            fraction = float(cleaned[:-1]) / 100
        else:
            number = cleaned.rstrip("abcdefghijklmnopqrstuvwxyz")
            value, unit = float(number), cleaned[len(number):]
            if unit not in _UNITS:
                raise ValueError(unit)
            if unit or value > 1:
                return int(value * _UNITS[unit])
            fraction = value
    except ValueError:
        raise ConfigError(f"not a memory size: {text!r} (write e.g. 1.5GiB, 800MB, 0.5 or 50%)") \
            from None
    if total is None:
        raise ConfigError(f"{text!r} is a fraction, but of what total is not known")
    if not 0 < fraction <= 1:
        raise ConfigError(f"not a fraction between 0 and 1: {text!r}")
    return int(fraction * total)


def format_bytes(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
