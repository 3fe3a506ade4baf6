"""Opening a catalog model: resolve the name, fetch and convert once, verify, load."""

from __future__ import annotations

from mofa_omni.adapters.backends import create_adapter
from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.contract.tasks import Task
from mofa_omni.models.catalog import Catalog, ModelSpec
from mofa_omni.models.fetching import Progress, no_progress
from mofa_omni.models.store import ModelStore


def open_model(name: str | None = None, *, task: Task | None = None,
               catalog: Catalog | None = None, store: ModelStore | None = None,
               progress: Progress = no_progress, load: bool = True,
               backend: str | None = None) -> ModelAdapter:
    """The adapter of model ``name`` (or the catalog's default for ``task``), loaded; on
    ``backend`` if given, else on the one :mod:`mofa_omni.adapters.backends` picks for this machine.

    Unknown names raise CatalogError listing close matches; damaged cached weights
    are rebuilt; weights that cannot be loaded raise ModelLoadError.
    """
    catalog = catalog or Catalog.load()
    spec: ModelSpec = catalog.resolve(name, task) if task else catalog.get(name or "")
    adapter = create_adapter(spec, backend)
    model_dir = (store or ModelStore()).prepare(adapter, progress)
    if load:
        adapter.load(model_dir)
    return adapter
