"""The dataflows shipped with mofa-omni (a checkout's dataflows/, an installed package's
mofa_omni/dataflows/) and the changes the `omni` commands make to one before running it:
which model each model node serves, and its nodes' settings.

A descriptor is the YAML as dora reads it (a dict); every change here returns a new one.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from mofa_omni.config import SHIPPED_DATAFLOWS
from mofa_omni.contract.errors import ConfigError
from mofa_omni.contract.tasks import Task
from mofa_omni.models.catalog import ModelSpec

Descriptor = dict[str, Any]
GRAPHS = ("server", "voice", "voice.omni", "voice.web", "robot", "agent", "video")


def shipped(name: str) -> Path:
    """The path of a shipped dataflow (``voice`` -> .../dataflows/voice.yml)."""
    path = SHIPPED_DATAFLOWS / f"{name}.yml"
    if name not in GRAPHS or not path.is_file():
        raise ConfigError(f"no shipped dataflow {name!r} in {SHIPPED_DATAFLOWS} "
                          f"(they are: {', '.join(GRAPHS)})")
    return path


def load(path: Path) -> Descriptor:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


def dump(descriptor: Descriptor, header: str = "") -> str:
    import yaml

    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    return comment + yaml.safe_dump(descriptor, sort_keys=False, width=100)


def node(descriptor: Descriptor, node_id: str) -> dict[str, Any]:
    for entry in descriptor["nodes"]:
        if entry["id"] == node_id:
            return entry
    raise ConfigError(f"the dataflow has no node {node_id!r}")


def with_env(descriptor: Descriptor, node_id: str, **env: str) -> Descriptor:
    """``descriptor`` with ``env`` added to a node's settings (values as strings)."""
    changed = copy.deepcopy(descriptor)
    entry = node(changed, node_id)
    entry["env"] = {**(entry.get("env") or {}), **{k: str(v) for k, v in env.items()}}
    return changed


def model_nodes(descriptor: Descriptor) -> dict[str, Task]:
    """The model nodes (``omni-node`` with a TASK) and the task each serves."""
    return {entry["id"]: Task.parse(entry["env"]["TASK"]) for entry in descriptor["nodes"]
            if entry.get("path") == "omni-node" and "TASK" in (entry.get("env") or {})}


def served_models(descriptor: Descriptor, defaults: dict[Task, str]) -> dict[str, str]:
    """Each model node and the model it serves (its ``MODEL``, else its task's default)."""
    return {node_id: (node(descriptor, node_id).get("env") or {}).get("MODEL")
            or defaults.get(task, "") for node_id, task in model_nodes(descriptor).items()}


def with_models(descriptor: Descriptor, specs: list[ModelSpec]) -> Descriptor:
    """Each model served by the model node of its task (``MODEL``); a model no node's task
    fits, or two models for one node, is a ConfigError naming what the graph has."""
    nodes = model_nodes(descriptor)
    placed: dict[str, str] = {}
    for spec in specs:
        fits = [node_id for node_id, task in nodes.items() if task in spec.tasks]
        if not fits:
            graph = ", ".join(f"{node_id} ({task.value})" for node_id, task in nodes.items())
            raise ConfigError(f"model {spec.name!r} ({', '.join(t.value for t in spec.tasks)}) "
                              f"has no place in this graph: its model nodes are {graph}")
        taken = [node_id for node_id in fits if node_id in placed]
        if len(taken) == len(fits):
            raise ConfigError(f"models {placed[taken[0]]!r} and {spec.name!r} both ask for node "
                              f"{taken[0]!r} ({nodes[taken[0]].value}): name one per task")
        placed[next(node_id for node_id in fits if node_id not in placed)] = spec.name
    for node_id, model in placed.items():
        descriptor = with_env(descriptor, node_id, MODEL=model)
    return descriptor
