"""The adapter base class and the run-time discovery of adapters.

An adapter wraps one model family / library. It declares the tasks it can
serve, the formats it reads, its backend, and implements the task protocols of
:mod:`mofa_omni.contract.tasks` for the tasks it serves. Adapters are found through
the ``mofa_omni.adapters`` entry-point group, so a third-party package adds a
model family without touching this repository. The catalog options an adapter takes are a
typed struct (``Options``, see :mod:`mofa_omni.adapters.options`), checked by
:func:`check_options` wherever a catalog model is put to use.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import ClassVar

from mofa_omni.adapters.options import AdapterOptions, decode_options
from mofa_omni.contract.arrow import check_generic_schema
from mofa_omni.contract.errors import (
    AdapterError,
    ContractError,
    ModelLoadError,
    ModelNotLoaded,
    unknown_name_message,
)
from mofa_omni.contract.stages import Stage
from mofa_omni.contract.tasks import TASK_SPECS, GenericRequest, GenericResult, GenericSpec, Task
from mofa_omni.models.catalog import ModelSpec
from mofa_omni.models.fetching import Progress
from mofa_omni.models.footprint import weight_bytes
from mofa_omni.models.memory import release_freed_memory

ENTRY_POINT_GROUP = "mofa_omni.adapters"

class ModelAdapter(ABC):
    """One model of one family: converts its weights once, loads, serves, unloads.

    Subclasses set ``supported_tasks``, ``formats`` and ``backend`` (and ``Options``, the
    struct of the catalog options they take: ``self.options`` holds the model's, typed) and
    implement ``prepare`` (format conversion into the cache), ``_load`` and ``_unload``, plus
    the protocol method of each task they serve.
    """

    supported_tasks: ClassVar[frozenset[Task]]
    formats: ClassVar[frozenset[str]]
    backend: ClassVar[str]  # "mlx", "onnxruntime", "ctranslate2", "remote", ...
    requires: ClassVar[tuple[str, ...]] = ()  # modules it imports when loading: checked first
    artifact_version: ClassVar[int] = 1  # bump when ``prepare`` changes: cached builds are redone
    # Resident memory a load adds besides the weights: the engine's libraries and buffers, as
    # measured in a fresh process (see mofa_omni.models.footprint).
    runtime_bytes: ClassVar[int] = 0
    # The catalog options it takes, with their defaults: none unless a subclass declares some.
    Options: ClassVar[type[AdapterOptions]] = AdapterOptions
    options: AdapterOptions  # the model's catalog options, decoded as ``Options``

    def __init__(self, spec: ModelSpec):
        unsupported = set(spec.tasks) - self.supported_tasks
        if unsupported:
            raise AdapterError(f"model {spec.name!r}: adapter {spec.adapter!r} cannot serve "
                               f"{', '.join(sorted(t.value for t in unsupported))}")
        if spec.format not in self.formats:
            raise AdapterError(f"model {spec.name!r}: adapter {spec.adapter!r} reads "
                               f"{', '.join(sorted(self.formats))}, not {spec.format!r}")
        self.spec = spec
        # Decoded once here: an unknown or mistyped option is refused now, never read as a default.
        self.options = decode_options(self.Options, spec.options, model=spec.name,
                                      adapter=spec.adapter)
        self.model_dir: Path | None = None
        self.load_seconds: float | None = None

    # --- lifecycle -------------------------------------------------------------------

    @abstractmethod
    def prepare(self, source_dir: Path, out_dir: Path, progress: Progress) -> None:
        """Convert the fetched source files in ``source_dir`` into ``out_dir`` (run once, cached)."""

    def estimate_bytes(self, model_dir: Path) -> int:
        """The resident memory loading the prepared model in ``model_dir`` will add, before it
        loads (:mod:`mofa_omni.models.footprint`): by default its weights plus
        ``runtime_bytes``."""
        return weight_bytes(model_dir) + self.runtime_bytes

    @abstractmethod
    def _load(self, model_dir: Path) -> None: ...

    @abstractmethod
    def _unload(self) -> None: ...

    @property
    def loaded(self) -> bool:
        return self.model_dir is not None

    def load(self, model_dir: Path) -> None:
        """Load the prepared weights in ``model_dir``; measures how long it took."""
        if self.loaded:
            return
        started = time.perf_counter()
        try:
            self._load(model_dir)
        except ModelLoadError:
            raise
        except Exception as error:  # a library failing deep inside: say which model and where
            raise ModelLoadError(f"model {self.spec.name!r}: loading {model_dir} failed: "
                                 f"{type(error).__name__}: {error}") from error
        self.load_seconds = time.perf_counter() - started
        self.model_dir = model_dir

    def unload(self) -> None:
        """Drop the model and give its memory back."""
        if not self.loaded:
            return
        self._unload()
        self.model_dir = None
        release_freed_memory()

    # --- serving ---------------------------------------------------------------------

    @property
    def tasks(self) -> tuple[Task, ...]:
        return self.spec.tasks

    def parallel_requests(self, task: Task) -> int:
        """How many ``task`` requests the loaded model serves at once (their work interleaved
        by the engine, e.g. LLM sequences decoded together); 1: one after the other."""
        return 1

    def batches_requests(self, task: Task) -> bool:
        """Whether ``task`` requests that queued up are served faster in one call than one by
        one (the node then serves them together, see :mod:`mofa_omni.node.batching`); where
        not, each is answered as soon as its own work is done."""
        return True

    def sequence_bytes(self, model_dir: Path) -> int:
        """Memory each request served alongside the first takes at its longest (an LLM
        sequence's KV cache, where the engine grows one per request), estimated from the
        prepared files; 0: none beyond what :meth:`estimate_bytes` counts."""
        return 0

    def handler(self, task: Task) -> Callable:
        """The bound protocol method serving ``task``."""
        if task not in self.spec.tasks:
            raise AdapterError(f"model {self.spec.name!r} does not serve {task.value}")
        if not self.loaded:
            raise self.not_loaded()
        if task is Task.GENERIC:
            return self._run_generic_checked
        return getattr(self, TASK_SPECS[task].method)

    def not_loaded(self) -> ModelNotLoaded:
        """The error for serving before :meth:`load` (or after :meth:`unload`): the server's
        state, answered as ``unavailable``, not the caller's mistake."""
        return ModelNotLoaded(f"model {self.spec.name!r} is not loaded")

    def stages(self) -> dict[str, Stage]:
        """The steps this model can be split into, by name (see :mod:`mofa_omni.contract.stages`);
        they run on the loaded model."""
        return {}

    def generic_specs(self) -> list[GenericSpec]:
        """The task kinds this adapter serves through ``Task.GENERIC`` (with their schemas)."""
        return []

    def _run_generic_checked(self, request: GenericRequest) -> GenericResult:
        specs = {spec.name: spec for spec in self.generic_specs()}
        if request.kind not in specs:
            raise ContractError(unknown_name_message("generic task kind", request.kind, list(specs)))
        spec = specs[request.kind]
        check_generic_schema(request.batch, spec.input_schema, f"{spec.name} input")
        result = self.run_generic(request)  # type: ignore[attr-defined]
        check_generic_schema(result.batch, spec.output_schema, f"{spec.name} output")
        return result


def adapter_names() -> list[str]:
    """Names of every adapter registered under the ``mofa_omni.adapters`` entry-point group."""
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def adapter_class(name: str) -> type[ModelAdapter]:
    """The adapter class registered as ``name`` (imported only now)."""
    points = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in points:
        raise AdapterError(unknown_name_message("adapter", name, list(points)))
    try:
        cls = points[name].load()
    except ImportError as error:
        raise AdapterError(f"adapter {name!r} ({points[name].value}) cannot be imported: "
                           f"{error}") from error
    if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)):
        raise AdapterError(f"entry point {name!r} ({points[name].value}) is not a ModelAdapter")
    return cls


def check_options(spec: ModelSpec) -> None:
    """Refuse ``spec.options`` unless every adapter the model lists accepts them all: a
    CatalogError naming the model, the option and the options accepted.

    The catalog itself reads options as an untyped table (it cannot import the adapters, which
    import it); they are checked here, where a model is put to use:
    :func:`mofa_omni.adapters.backends.resolved` and ``select_adapter`` call this, so
    ``create_adapter``, ``open_model`` (``omni pull``, ``omni chat``..., a node starting),
    ``omni models`` and ``omni doctor`` report a misspelt option as soon as they meet the model.
    An adapter that cannot be imported here (its optional engine is missing) is skipped: the
    model stays usable through the others.
    """
    for name in spec.adapters or (spec.adapter,):
        try:
            cls = adapter_class(name)
        except AdapterError:
            continue  # not installed here (select_adapter says so if it was the one wanted)
        decode_options(cls.Options, spec.options, model=spec.name, adapter=name)
