"""The one model a node holds: load, unload and switch variants, with the memory each costs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mofa_omni.adapters.backends import create_adapter
from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.contract.errors import ModelLoadError, OmniError
from mofa_omni.contract.tasks import Task
from mofa_omni.models.catalog import Catalog, CatalogError, ModelSpec
from mofa_omni.models.fetching import FetchError
from mofa_omni.models.memory import peak_resident_bytes, reset_peak_resident, resident_bytes
from mofa_omni.models.store import ModelStore
from mofa_omni.node.host import ModelHost

log = logging.getLogger("mofa_omni.node.residency")


@dataclass(frozen=True, slots=True)
class LoadOutcome:
    model: str
    seconds: float
    bytes: int  # resident growth once loaded
    peak: int  # peak resident growth while fetching, converting and loading


def estimated_bytes(spec: ModelSpec, store: ModelStore, backend: str | None = None) -> int:
    """The memory ``spec`` will take on the adapter serving it here: the catalog's figure for
    that backend where it gives one, else that adapter's estimate from the prepared files
    (:mod:`mofa_omni.models.footprint`) once they are in the cache, else the largest figure
    the catalog gives (0: unknown until measured)."""
    try:
        adapter = create_adapter(spec, backend)
    except OmniError:  # no adapter can serve it here: it will not load either
        return spec.memory_bytes
    figure = spec.memory_bytes_on(adapter.backend)
    if figure is not None:
        return figure
    if store.is_ready(adapter.spec, type(adapter)):
        return adapter.estimate_bytes(store.model_dir(adapter.spec))
    return spec.memory_bytes


@dataclass(frozen=True, slots=True)
class PreparedModel:
    """A model's adapter and its verified files, ready to load (fetched and converted)."""

    spec: ModelSpec
    adapter: ModelAdapter
    files: Path


class ModelSlot:
    """Holds a node's model (``wanted``, or a smaller variant of its catalog ladder) in a
    :class:`ModelHost`. A model that cannot load leaves the host answering every request
    with an ``unavailable`` error naming why; the slot itself never raises on load."""

    def __init__(self, wanted: ModelSpec, catalog: Catalog, node_id: str,
                 store: ModelStore | None = None, backend: str | None = None,
                 task: Task | None = None):
        self.wanted, self.catalog, self.store = wanted, catalog, store or ModelStore()
        self.backend = backend  # None: the one mofa_omni.adapters.backends picks for this machine
        self.task = task or wanted.tasks[0]  # what the node's ``request`` input carries
        self.host = ModelHost(create_adapter(wanted, backend), node_id, task=self.task)
        # whether the process's peak resident memory counts from the model's load on (Linux)
        self.peak_since_load = False

    @property
    def model(self) -> str:
        return self.host.adapter.spec.name

    @property
    def loaded(self) -> bool:
        return self.host.adapter.loaded

    def ladder(self) -> list[tuple[str, int]]:
        """The wanted model and its smaller variants, with their estimated memory."""
        names = [self.wanted.name, *self.catalog.smaller_than(self.wanted.name)]
        return [(name, estimated_bytes(self.catalog.get(name), self.store, self.backend))
                for name in names]

    def sequences(self) -> tuple[int, int]:
        """Requests the wanted model serves together, and the memory each beyond the first
        takes at its longest (0 until its files are prepared: then only its own is counted)."""
        adapter = create_adapter(self.wanted, self.backend)
        parallel = adapter.parallel_requests(self.task)
        if parallel == 1 or not self.store.is_ready(adapter.spec, type(adapter)):
            return parallel, 0
        return parallel, adapter.sequence_bytes(self.store.model_dir(adapter.spec))

    def load(self, name: str | None = None) -> LoadOutcome | None:
        """Load ``name`` (default: the wanted model) in place of what is loaded; None if it
        failed (the host then answers with the reason)."""
        spec = self.catalog.get(name) if name else self.wanted
        if self.loaded and spec.name == self.model:
            return LoadOutcome(spec.name, 0.0, 0, 0)
        self.unload()
        adapter = self.host.adapter if spec.name == self.model else \
            create_adapter(spec, self.backend)
        try:
            outcome = self.load_prepared(PreparedModel(spec, adapter, self.store.prepare(adapter)))
        except (ModelLoadError, FetchError) as error:
            log.error("model %s cannot serve: %s", spec.name, error)
            self.host.adapter, self.host.unavailable = adapter, str(error)
            return None
        self.host.adapter, self.host.unavailable = adapter, ""
        return outcome

    def prepare(self, name: str) -> PreparedModel:
        """Fetch, convert and verify ``name``'s files without loading it (nor touching what is
        loaded). The catalog is read again first: a model added to it since the node started
        can be swapped in. Raises what the catalog or the store raise."""
        self.catalog = self.catalog.reload()
        spec = self.catalog.get(name)
        if self.task not in spec.tasks:
            raise CatalogError(f"{name} does not serve {self.task.value}, which this node serves")
        adapter = create_adapter(spec, self.backend)
        return PreparedModel(spec, adapter, self.store.prepare(adapter))

    def load_prepared(self, prepared: PreparedModel) -> LoadOutcome:
        """Load a prepared model, measuring the memory it takes; what is loaded stays loaded
        (a swap loads the new model beside the old one). Raises if the load fails."""
        adapter = prepared.adapter
        self.peak_since_load = False  # the peak measures this load now, not the serving
        precise = reset_peak_resident()
        before = resident_bytes()
        adapter.load(prepared.files)
        after = resident_bytes()
        peak = peak_resident_bytes() if precise else after
        # From here on the peak is the serving's: what the reports to the scheduler say.
        self.peak_since_load = precise and reset_peak_resident()
        log.info("loaded %s on %s in %.2f s (+%d MiB, peak +%d MiB)", prepared.spec.name,
                 adapter.backend, adapter.load_seconds, (after - before) >> 20,
                 (peak - before) >> 20)
        return LoadOutcome(prepared.spec.name, adapter.load_seconds or 0.0,
                           max(after - before, 0), max(peak - before, after - before, 0))

    def peak_from_now(self) -> None:
        """Count the serving's peak memory from now on (the model swapped out is gone)."""
        self.peak_since_load = self.loaded and reset_peak_resident()

    def install(self, prepared: PreparedModel) -> None:
        """Serve ``prepared`` from now on, and want it: its ladder is the node's ladder now."""
        self.host.adapter, self.host.unavailable = prepared.adapter, ""
        self.wanted = prepared.spec

    def unload(self) -> None:
        """Drop the model and give its memory back to the system."""
        self.peak_since_load = False
        if self.loaded:
            self.host.adapter.unload()
            log.info("unloaded %s (resident now %d MiB)", self.model, resident_bytes() >> 20)
