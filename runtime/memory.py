"""Measuring memory: process resident set, MLX active/peak, and the system's available memory."""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass

import psutil


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
        rss_bytes=psutil.Process().memory_info().rss,
        mlx_active_bytes=active,
        mlx_peak_bytes=peak,
        mlx_cache_bytes=cache,
        system_available_bytes=system.available,
        system_total_bytes=system.total,
    )


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


def format_bytes(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
