"""The graphs as commands, without running them: the server graph of any models, the shipped
dataflows' models and settings, the microphone variant, run records, the starter project.
(tests/test_installed.py runs the commands themselves from an installed wheel.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import msgspec
import pytest

from mofa_omni.contract.errors import ConfigError
from mofa_omni.contract.tasks import Task
from mofa_omni.launch import dataflows
from mofa_omni.launch.commands import check_port_free, microphone_graph
from mofa_omni.launch.runs import RunRecord, running
from mofa_omni.launch.server import server_graph
from mofa_omni.launch.starter import write_starter

SERVER_TASKS = (Task.TEXT_GENERATION, Task.SPEECH_RECOGNITION, Task.SPEECH_SYNTHESIS,
                Task.EMBEDDING)


def test_the_server_graph_of_the_default_models_is_the_shipped_server_yml(catalog):
    specs = [catalog.get(catalog.defaults[task]) for task in SERVER_TASKS]
    assert server_graph(specs, defaults=catalog.defaults) == \
        dataflows.load(dataflows.shipped("server"))


def test_a_server_of_other_models_routes_each_to_its_own_node(catalog):
    from mofa_omni.gateway.routes import routes_from

    specs = [catalog.get(name) for name in ("smollm2-135m", "gemma-3-270m", "whisper-base",
                                            "minilm-l6")]
    graph = server_graph(specs, defaults=catalog.defaults)
    routes = {(r.node, r.task, r.model) for r in routes_from(graph, "gateway", catalog)}
    assert routes == {("llm", Task.TEXT_GENERATION, "smollm2-135m"),
                      ("llm-2", Task.TEXT_GENERATION, "gemma-3-270m"),
                      ("asr", Task.SPEECH_RECOGNITION, "whisper-base"),
                      ("embedder", Task.EMBEDDING, "minilm-l6"),
                      ("embedder", Task.RERANK, "minilm-l6")}
    gateway = dataflows.node(graph, "gateway")
    assert gateway["outputs"] == ["chat", "transcribe", "embed", "rank", "cancel"]
    assert set(dataflows.node(graph, "scheduler")["inputs"]) == \
        {"llm", "llm-2", "asr", "embedder", "control"}
    with pytest.raises(ConfigError, match="at least one model"):
        server_graph([], defaults=catalog.defaults)
    with pytest.raises(ConfigError, match="silero-vad.*the server's endpoints serve"):
        server_graph([catalog.get("silero-vad")], defaults=catalog.defaults)


def test_models_go_to_the_node_of_their_task(catalog):
    voice = dataflows.load(dataflows.shipped("voice"))
    assert dataflows.model_nodes(voice) == {"asr": Task.SPEECH_RECOGNITION,
                                            "llm": Task.TEXT_GENERATION,
                                            "tts": Task.SPEECH_SYNTHESIS}
    changed = dataflows.with_models(voice, [catalog.get("whisper-base")])
    assert dataflows.served_models(changed, catalog.defaults) == {
        "asr": "whisper-base", "llm": catalog.defaults[Task.TEXT_GENERATION],
        "tts": catalog.defaults[Task.SPEECH_SYNTHESIS]}
    assert "MODEL" not in (dataflows.node(voice, "asr").get("env") or {})  # a copy was changed
    with pytest.raises(ConfigError, match="both ask for node 'asr'"):
        dataflows.with_models(voice, [catalog.get("whisper-base"),
                                      catalog.get("whisper-tiny.en")])
    with pytest.raises(ConfigError, match="minilm-l6.*no place in this graph.*asr "
                                          r"\(speech_recognition\)"):
        dataflows.with_models(voice, [catalog.get("minilm-l6")])
    with pytest.raises(ConfigError, match="no shipped dataflow 'nope'"):
        dataflows.shipped("nope")


def test_the_voice_graph_on_the_microphone():
    voice = dataflows.load(dataflows.shipped("voice"))
    live = microphone_graph(voice)
    assert dataflows.node(live, "source") == {"id": "source", "path": "omni-microphone",
                                              "outputs": ["audio"]}
    assert dataflows.node(live, "sink")["env"]["SINK"] == "speaker"
    assert dataflows.node(live, "vad")["inputs"] == dataflows.node(voice, "vad")["inputs"]


def test_a_busy_port_is_refused_by_name():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # free again


def test_ps_lists_live_runs_and_clears_those_whose_command_died(tmp_path, monkeypatch):
    monkeypatch.setenv("MOFA_OMNI_RUNS", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid in (("live", os.getpid()), ("dead", dead.pid)):
        (tmp_path / name).mkdir()
        record = RunRecord("server", pid, pid, 0.0, {"llm": "smollm2-135m"}, folder=name)
        (tmp_path / name / "run.json").write_bytes(msgspec.json.encode(record))
    assert [r.folder for r in running()] == ["live"]
    assert not (tmp_path / "dead").exists()


def test_the_starter_project_runs_the_packaged_nodes(tmp_path):
    folder = write_starter(tmp_path / "demo")
    graph = dataflows.load(folder / "dataflow.yml")
    paths = {node["path"] for node in graph["nodes"]}
    assert paths <= {"omni-wav-source", "omni-vad", "omni-node", "omni-dialogue",
                     "omni-sentence-splitter", "omni-wav-sink", "omni-scheduler", "dynamic"}
    assert sorted(p.name for p in (folder / "samples").iterdir()) == \
        ["01-capital-of-france.wav", "02-capital-of-italy.wav"]
    assert {"README.md", "catalog.toml"} <= {p.name for p in folder.iterdir()}
    with pytest.raises(ConfigError, match="not empty"):
        write_starter(folder)


def test_the_omni_voice_graph_takes_an_omni_model(catalog, tmp_path):
    from mofa_omni.models.catalog import Catalog

    voice = dataflows.load(dataflows.shipped("voice.omni"))
    assert dataflows.model_nodes(voice) == {  # the omni model, and the cascade standing by
        "omni": Task.OMNI, "asr": Task.SPEECH_RECOGNITION, "llm": Task.TEXT_GENERATION,
        "tts": Task.SPEECH_SYNTHESIS}
    user = tmp_path / "catalog.toml"
    user.write_text('[models.my-omni]\nadapter = "mlx_omni"\n'
                    'tasks = ["omni", "vision_language", "text_generation"]\nformat = "mlx"\n'
                    f'memory_mb = 200\nsource = {{ path = "{tmp_path}" }}\n')
    changed = dataflows.with_models(voice, [Catalog.load([user]).get("my-omni")])
    assert dataflows.node(changed, "omni")["env"]["MODEL"] == "my-omni"
    assert "MODEL" not in dataflows.node(changed, "llm")["env"]
    cascade = dataflows.with_models(voice, [catalog.get("smollm2-135m")])  # the cascade's LLM
    assert dataflows.node(cascade, "llm")["env"]["MODEL"] == "smollm2-135m"
    with pytest.raises(ConfigError, match="minilm.*no place in this graph"):
        dataflows.with_models(voice, [catalog.get("minilm-l6")])


def test_a_server_of_an_omni_model_routes_sound_pictures_and_chat_to_it(catalog, tmp_path):
    from mofa_omni.gateway.routes import routes_from
    from mofa_omni.models.catalog import Catalog

    user = tmp_path / "catalog.toml"
    user.write_text('[models.my-omni]\nadapter = "mlx_omni"\n'
                    'tasks = ["omni", "vision_language", "text_generation"]\nformat = "mlx"\n'
                    f'memory_mb = 200\nsource = {{ path = "{tmp_path}" }}\n')
    both = Catalog.load([user])
    graph = server_graph([both.get("my-omni"), both.get("minilm-l6")], defaults=both.defaults)
    omni = dataflows.node(graph, "omni")
    assert {name: spec["source"] for name, spec in omni["inputs"].items() if
            isinstance(spec, dict)} == {"omni": "gateway/hear", "vision_language": "gateway/look",
                                        "text_generation": "gateway/chat"}
    routes = {(r.node, r.task) for r in routes_from(graph, "gateway", both)
              if r.model == "my-omni"}
    assert routes == {("omni", Task.OMNI), ("omni", Task.VISION_LANGUAGE),
                      ("omni", Task.TEXT_GENERATION)}
    assert dataflows.node(graph, "gateway")["outputs"] == \
        ["hear", "look", "chat", "embed", "rank", "cancel"]
