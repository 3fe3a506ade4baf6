"""A node serving a pipeline of stages (``STAGES`` in the dataflow) instead of a whole model.

:class:`StageSlot` builds the pipeline from the catalog and holds the models its
stages run on (each model loaded once, however many of its stages the node runs);
:class:`StageHost` serves it on the node's inputs. The node's input is named after
what the first stage takes — the task's request (``request`` or the task's name)
or ``tensor`` (the output of stages in another node) — and ``result`` carries what
the last stage makes. :class:`~mofa_omni.node.serving.RequestWorker` runs it exactly as
it runs a single model: in order, cancellable, within a deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mofa_omni.adapters.backends import stage_adapter
from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.contract.errors import ContractError, ModelLoadError
from mofa_omni.contract.stages import Handoff, StagePipeline, StageRef, builtin_stage
from mofa_omni.contract.tasks import TASK_SPECS, Tensor
from mofa_omni.models.catalog import Catalog
from mofa_omni.models.fetching import FetchError
from mofa_omni.models.store import ModelStore
from mofa_omni.node.host import PRIMARY_INPUT, RequestHost, Route

log = logging.getLogger("mofa_omni.node.stage_host")

TENSOR_INPUT = "tensor"


class StageHost(RequestHost):
    """Serves one :class:`StagePipeline` on the input named after what its first stage takes."""

    def __init__(self, pipeline: StagePipeline, node_id: str):
        super().__init__(node_id)
        self.pipeline = pipeline

    @property
    def served_name(self) -> str:
        return self.pipeline.label

    def input_names(self) -> list[str]:
        """The inputs this node serves."""
        if self.pipeline.consumes is Tensor:
            return [TENSOR_INPUT]
        tasks = [spec.task.value for spec in TASK_SPECS.values()
                 if spec.request_type is self.pipeline.consumes]
        return [PRIMARY_INPUT, *tasks]

    def route(self, input_id: str) -> Route:
        if input_id not in self.input_names():
            raise ContractError(f"input {input_id!r}: the stages {self.pipeline.label} take "
                                f"{self.pipeline.consumes.__name__} on "
                                f"{' or '.join(self.input_names())}")
        return Route(self.pipeline.consumes, self.pipeline.run, False)


class StageSlot:
    """The models of a node's stages, loaded and unloaded together; a model that cannot load
    leaves the host answering every request with ``unavailable`` and the reason."""

    def __init__(self, refs: list[StageRef], catalog: Catalog, node_id: str,
                 store: ModelStore | None = None, backend: str | None = None):
        self.store = store or ModelStore()
        self.adapters: dict[str, ModelAdapter] = {}
        steps = []
        for ref in refs:  # unknown models and stages fail here, before the node joins the graph
            if not ref.model:
                steps.append((str(ref), builtin_stage(ref.stage)))
                continue
            adapter = self.adapters.get(ref.model)
            if adapter is None or ref.stage not in adapter.stages():
                adapter = stage_adapter(catalog.get(ref.model), ref.stage, backend)
                if ref.model in self.adapters and adapter.backend != self.adapters[ref.model].backend:
                    raise ContractError(f"the stages of {ref.model} in one node must share a "
                                        f"backend ({self.adapters[ref.model].backend} and "
                                        f"{adapter.backend})")
                self.adapters[ref.model] = adapter
            steps.append((str(ref), adapter.stages()[ref.stage]))
        self.host = StageHost(StagePipeline(steps), node_id)

    @property
    def loaded(self) -> bool:
        return all(adapter.loaded for adapter in self.adapters.values())

    def observe(self, observer: Callable[[Handoff], None]) -> None:
        """Call ``observer(Handoff)`` at each hand-off between two stages (tests, benchmarks)."""
        self.host.pipeline.observe = observer

    def load(self) -> bool:
        for name, adapter in self.adapters.items():
            try:
                adapter.load(self.store.prepare(adapter))
            except (ModelLoadError, FetchError) as error:
                log.error("model %s cannot serve its stages: %s", name, error)
                self.host.unavailable = str(error)
                return False
            log.info("loaded %s on %s in %.2f s for %s", name, adapter.backend,
                     adapter.load_seconds, self.host.pipeline.label)
        return True

    def unload(self) -> None:
        for adapter in self.adapters.values():
            adapter.unload()

