"""Which model node answers an HTTP request: routes read from the dataflow, and the choice.

The gateway node learns its routes from the dataflow descriptor: each of its
outputs feeds a model node's request input (``request`` or a task's name), and
that node's ``MODEL`` / ``TASK`` (or the catalog default) says which model it
serves. A request names a catalog model: the node serving it answers; a node
whose model runs on a remote OpenAI-compatible server (the ``openai_remote``
adapter) is the task's fallback when the local model is missing from the graph,
cannot load, or is too slow.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from mofa_omni.adapters.backends import select_adapter
from mofa_omni.contract.errors import ContractError, ErrorKind
from mofa_omni.contract.tasks import Task
from mofa_omni.gateway.openai_bodies import ApiError
from mofa_omni.models.catalog import Catalog, CatalogError

REMOTE_BACKEND = "remote"


@dataclass(frozen=True, slots=True)
class Route:
    node: str  # the model node
    output: str  # the gateway output feeding its request input
    input: str  # that input's name on the node
    task: Task
    model: str  # the catalog model it serves
    remote: bool = False  # served by a remote OpenAI-compatible server
    cancel: str = ""  # the gateway output feeding the node's ``cancel`` input, if any


@dataclass(frozen=True, slots=True)
class Choice:
    primary: Route
    fallback: Route | None = None


def _source(spec: Any) -> str:
    return spec["source"] if isinstance(spec, dict) else str(spec)


def input_sources(descriptor: dict[str, Any], node_id: str) -> dict[str, tuple[str, str]]:
    """Each input of ``node_id``: the node and output it comes from."""
    for node in descriptor.get("nodes", []):
        if node["id"] == node_id:
            sources = {name: _source(spec) for name, spec in (node.get("inputs") or {}).items()}
            return {name: tuple(source.split("/", 1)) for name, source in sources.items()
                    if "/" in source}
    return {}


def routes_from(descriptor: dict[str, Any], gateway: str, catalog: Catalog) -> list[Route]:
    """The model nodes the gateway's outputs feed, with the task and model each serves."""
    routes = []
    for node in descriptor.get("nodes", []):
        inputs = {name: _source(spec) for name, spec in (node.get("inputs") or {}).items()}
        fed = {name: source.partition("/")[2] for name, source in inputs.items()
               if source.partition("/")[0] == gateway}
        cancel = fed.pop("cancel", "")
        if not fed:
            continue
        env = node.get("env") or {}
        if env.get("STAGES"):
            raise ContractError(f"node {node['id']!r} runs STAGES: the gateway routes to whole "
                                "models only")
        task_name, model = env.get("TASK"), env.get("MODEL")
        try:
            spec = catalog.resolve(model, Task.parse(task_name)) if task_name else \
                catalog.get(model or "")
        except CatalogError as error:
            raise ContractError(f"node {node['id']!r}: {error}") from None
        remote = select_adapter(spec, env.get("BACKEND") or None).backend == REMOTE_BACKEND
        for input_name, output in fed.items():
            primary = Task.parse(task_name) if task_name else spec.tasks[0]
            task = primary if input_name == "request" else Task.parse(input_name)
            routes.append(Route(node["id"], output, input_name, task, spec.name, remote, cancel))
    return routes


@dataclass
class Router:
    """Chooses the route for a model and a task; follows swaps (a node's model can change)."""

    routes: list[Route]
    catalog: Catalog

    def choose(self, model: str, task: Task) -> Choice:
        """The node serving ``model`` for ``task`` (404 if none can), and its fallback."""
        for_task = [r for r in self.routes if r.task is task]
        remote = next((r for r in for_task if r.remote), None)
        local = next((r for r in for_task if r.model == model and not r.remote), None)
        if local:
            return Choice(local, remote)
        exact = next((r for r in for_task if r.model == model), None)
        if exact:
            return Choice(exact)
        if model not in self.catalog.models:
            raise ApiError(ErrorKind.BAD_REQUEST,
                           f"the model {model!r} does not exist (GET /v1/models lists them)",
                           status=404, code="model_not_found", param="model")
        if remote:  # a catalog model this graph has no node for: the remote server answers
            return Choice(remote)
        served = sorted({r.model for r in for_task})
        raise ApiError(ErrorKind.BAD_REQUEST,
                       f"no node of this graph serves {model!r} for {task.value}"
                       + (f"; it serves {', '.join(served)}" if served else ""),
                       status=404, code="model_not_served", param="model")

    def choose_for_images(self, model: str) -> Choice:
        """The node serving ``model`` for a chat holding pictures (vision_language); a 400
        when the catalog says ``model`` does not read pictures, naming those here that do."""
        return self._choose_for_media(model, Task.VISION_LANGUAGE,
                                      f"the messages hold images, and {model!r} does not read "
                                      "images", "models of this graph that do",
                                      "model_not_multimodal")

    def choose_for_sound(self, model: str) -> Choice:
        """The node serving ``model`` for a chat holding sound or asking for speech (omni);
        a 400 when the catalog says ``model`` does not hear or speak, naming those that do."""
        return self._choose_for_media(model, Task.OMNI,
                                      "the messages hold audio or ask for a spoken reply, and "
                                      f"{model!r} neither hears nor speaks",
                                      "omni models of this graph", "model_not_omni")

    def _choose_for_media(self, model: str, task: Task, problem: str, others: str,
                          code: str) -> Choice:
        spec = self.catalog.models.get(model)
        if spec is not None and task not in spec.tasks:
            serving = sorted({r.model for r in self.routes if r.task is task})
            raise ApiError(ErrorKind.BAD_REQUEST,
                           f"{problem} (it serves {', '.join(t.value for t in spec.tasks)}); "
                           + (f"{others}: {', '.join(serving)}" if serving
                              else "no model of this graph does"),
                           code=code, param="model")
        return self.choose(model, task)

    def served(self) -> dict[str, list[str]]:
        """The nodes serving each model."""
        nodes: dict[str, list[str]] = {}
        for route in self.routes:
            if route.node not in nodes.setdefault(route.model, []):
                nodes[route.model].append(route.node)
        return nodes

    def node_serves(self, node: str, model: str) -> None:
        """``node`` answered with ``model`` (after ``omni swap``, another than at start)."""
        if model and any(r.node == node and r.model != model for r in self.routes):
            self.routes = [replace(r, model=model) if r.node == node else r for r in self.routes]
