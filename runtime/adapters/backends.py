"""Which adapter — and so which backend — serves a model on this machine. Decided here only.

A catalog model may name several adapters (``adapter = ["mlx_whisper", "ct2_whisper"]``);
the one whose backend ranks first for this platform, and can be imported, serves it:
MLX on Apple Silicon (Metal), CTranslate2 then MLX on a CUDA machine, and the CPU
engines (llama.cpp, CTranslate2, ONNX Runtime) before MLX on a Linux CPU, where MLX's
CPU backend is slow at small-batch decoding (measured: whisper tiny.en 3 s with MLX,
0.6 s with CTranslate2 int8, same transcript; SmolLM2 11 tok/s with MLX float32, 45-63
with CTranslate2 int8, 60-68 with llama.cpp on the GGUF as it is, which also evaluates
only the new tokens of a conversation's next turn). A user pins one adapter in their
catalog (``adapter = "mlx_whisper"``), or a node asks for a backend (``BACKEND``).
Every adapter a model lists must accept its catalog options: :func:`resolved` and
:func:`select_adapter` check them (:func:`mofa_omni.adapters.base.check_options`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from mofa_omni.adapters.base import ModelAdapter, adapter_class, check_options
from mofa_omni.adapters.installs import hint_for
from mofa_omni.contract.errors import AdapterError
from mofa_omni.models.catalog import ModelSpec

PREFERENCE = {
    "apple-silicon": ("mlx", "llama.cpp", "onnxruntime", "ctranslate2", "python"),
    "cuda": ("ctranslate2", "llama.cpp", "mlx", "onnxruntime", "python"),
    "cpu": ("llama.cpp", "ctranslate2", "onnxruntime", "mlx", "python"),
}


@dataclass(frozen=True, slots=True)
class Selection:
    adapter: str
    backend: str
    reason: str


def compute_platform() -> str:
    """``apple-silicon``, ``cuda`` (an NVIDIA driver is present) or ``cpu``."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "apple-silicon"
    if Path("/proc/driver/nvidia/version").exists():
        return "cuda"
    return "cpu"


def missing_requirement(adapter: str) -> str | None:
    """Why ``adapter`` cannot run here (its library is not installed), or None."""
    try:
        cls = adapter_class(adapter)
    except AdapterError as error:
        return str(error)
    for module in getattr(cls, "requires", ()):
        if importlib.util.find_spec(module) is None:
            hint = hint_for(module)
            return f"{module} is not installed" + (f" ({hint})" if hint else "")
    return None


def select_adapter(spec: ModelSpec, backend: str | None = None,
                   where: str | None = None) -> Selection:
    """The adapter serving ``spec`` here; ``backend`` asks for one backend explicitly.
    Options that an adapter of the model does not take are refused first (``check_options``)."""
    check_options(spec)
    where = where or compute_platform()
    candidates = spec.adapters or (spec.adapter,)
    backends = {name: _backend_of(name) for name in candidates}
    if backend:
        chosen = [name for name in candidates if backends[name] == backend]
        if not chosen:
            raise AdapterError(f"model {spec.name!r} has no {backend} adapter; its backends: "
                               f"{', '.join(sorted(set(backends.values())))}")
        problem = missing_requirement(chosen[0])
        if problem:
            raise AdapterError(f"model {spec.name!r}: the {backend} backend cannot run: {problem}")
        return Selection(chosen[0], backend, f"{backend} asked for")
    if len(candidates) == 1:
        return Selection(candidates[0], backends[candidates[0]], "the only adapter listed")
    order = PREFERENCE[where]
    ranked = sorted(candidates, key=lambda n: order.index(backends[n])
                    if backends[n] in order else len(order))
    skipped = []
    for name in ranked:
        problem = missing_requirement(name)
        if problem is None:
            reason = f"fastest available on {where}"
            if skipped:
                reason += f" ({'; '.join(skipped)})"
            return Selection(name, backends[name], reason)
        skipped.append(f"{backends[name]} skipped: {problem}")
    raise AdapterError(f"model {spec.name!r}: no adapter can run here: {'; '.join(skipped)}")


def resolved(spec: ModelSpec, backend: str | None = None) -> ModelSpec:
    """``spec`` with ``adapter`` set to the one that serves it here, once every adapter it
    lists accepts its options (``check_options``; ``omni models`` lists models through this)."""
    if len(spec.adapters) <= 1 and not backend:
        check_options(spec)
        return spec
    return dataclasses.replace(spec, adapter=select_adapter(spec, backend).adapter)


def stage_adapter(spec: ModelSpec, stage: str, backend: str | None = None) -> ModelAdapter:
    """An adapter of ``spec`` that offers ``stage``: the one chosen for this machine when it
    does, else the first listed that does (stages are an MLX feature: on a Linux CPU whisper
    is served whole by CTranslate2, and split into stages by MLX)."""
    first = select_adapter(spec, backend).adapter
    candidates = [first] if backend else [first, *(spec.adapters or ())]
    offered: dict[str, list[str]] = {}
    for name in dict.fromkeys(candidates):
        if missing_requirement(name):
            continue
        adapter = adapter_class(name)(dataclasses.replace(spec, adapter=name))
        if stage in (stages := adapter.stages()):
            return adapter
        offered[name] = sorted(stages)
    listing = "; ".join(f"{name}: {', '.join(names) or 'none'}" for name, names in offered.items())
    raise AdapterError(f"model {spec.name!r} has no stage {stage!r} (stages offered: {listing})")


def create_adapter(spec: ModelSpec, backend: str | None = None) -> ModelAdapter:
    """The adapter serving ``spec`` on this machine (see :mod:`mofa_omni.adapters.backends`)."""
    spec = resolved(spec, backend)
    return adapter_class(spec.adapter)(spec)


def _backend_of(adapter: str) -> str:
    try:
        return adapter_class(adapter).backend
    except AdapterError:
        return "unavailable"
