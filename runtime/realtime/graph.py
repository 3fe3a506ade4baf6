"""What a Realtime session reports of the graph it talks to, read from the dataflow."""

from __future__ import annotations

from typing import Any

from mofa_omni.contract.errors import ConfigError
from mofa_omni.contract.tasks import Task
from mofa_omni.models.catalog import Catalog, CatalogError
from mofa_omni.node.wiring import source_node
from mofa_omni.realtime.protocol import SessionConfig, TurnDetection


def _source_node(node_config: dict[str, Any], input_id: str) -> str:
    return source_node((node_config.get("inputs") or {}).get(input_id, ""))


def _node(descriptor: dict[str, Any], node_id: str) -> dict[str, Any]:
    return next((n for n in descriptor.get("nodes", []) if n.get("id") == node_id), {})


def _model(node: dict[str, Any], task: Task, catalog: Catalog) -> str:
    env = node.get("env") or {}
    try:
        return catalog.resolve(env.get("MODEL") or None, task).name
    except CatalogError as error:
        raise ConfigError(f"node {node.get('id')!r}: {error}") from None


def session_config(descriptor: dict[str, Any], node_config: dict[str, Any],
                   catalog: Catalog) -> SessionConfig:
    """The session a client starts with: the voice (the model of the node whose speech comes
    on our ``audio`` input), the ASR's model (``transcript``), the VAD's settings
    (``speech_started``), as the dataflow sets them when the graph starts."""
    vad_env = _node(descriptor, _source_node(node_config, "speech_started")).get("env") or {}
    detection = TurnDetection(
        threshold=float(vad_env.get("THRESHOLD", 0.5)),
        prefix_padding_ms=int(float(vad_env.get("SPEECH_PAD_MS", 100))),
        silence_duration_ms=int(float(vad_env.get("MIN_SILENCE_MS", 600))))
    voice = _model(_node(descriptor, _source_node(node_config, "audio")),
                   Task.SPEECH_SYNTHESIS, catalog)
    heard_by = _model(_node(descriptor, _source_node(node_config, "transcript")),
                      Task.SPEECH_RECOGNITION, catalog)
    return SessionConfig(voice=voice, transcription_model=heard_by, turn_detection=detection)
