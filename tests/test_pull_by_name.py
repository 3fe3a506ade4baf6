"""`omni pull PATH --name NAME` and `--model PATH` as a user runs them: real processes, real
weights, a user catalog and a model cache of the test's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mofa_omni.models.catalog import Catalog
from mofa_omni.models.store import ModelStore, link_or_copy

OMNI = str(Path(sys.executable).with_name("omni"))


@pytest.fixture()
def home(tmp_path: Path) -> dict[str, str]:
    """The environment of a user whose catalog and cache are the test's."""
    return {**os.environ, "MOFA_OMNI_CATALOG": str(tmp_path / "catalog.toml"),
            "MOFA_OMNI_CACHE": str(tmp_path / "cache"), "XDG_CONFIG_HOME": str(tmp_path / "config")}


def omni(env: dict[str, str], *args: str, code: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([OMNI, *args], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == code, result.stderr[-3000:]
    return result


def test_a_folder_pulled_by_path_serves_by_its_name(tmp_path: Path, home: dict[str, str],
                                                    catalog: Catalog, store: ModelStore):
    packaged = store.fetch(catalog.get("minilm-l6"))
    folder = tmp_path / "My MiniLM"
    for file in packaged.iterdir():
        if not file.name.endswith(".json") or file.name in ("config.json", "tokenizer.json"):
            link_or_copy(file, folder / file.name)

    pulled = omni(home, "pull", str(folder), "--name", "mine")
    assert "registered as 'mine'" in pulled.stdout and "mine: ready" in pulled.stdout
    entry = tomllib.loads((tmp_path / "catalog.toml").read_text())["models"]["mine"]
    assert entry["adapter"] == ["mlx_bert", "ort_bert"] and entry["tasks"] == ["embedding", "rerank"]
    assert entry["source"] == {"path": str(folder)}

    result = json.loads(omni(home, "embed", "--model", "mine", "--json", "-q", "a cat",
                             "a kitten").stdout)
    assert result["model"] == "mine" and result["dim"] == 384
    # the same folder again under the same name: nothing changes; another folder: refused
    omni(home, "pull", str(folder), "--name", "mine")
    other = tmp_path / "other"
    other.mkdir()
    for file in folder.iterdir():
        link_or_copy(file, other / file.name)
    refused = omni(home, "pull", str(other), "--name", "mine", code=1)
    assert "a different model 'mine'" in refused.stderr and "--force" in refused.stderr
    omni(home, "pull", str(other), "--name", "mine", "--force")
    models = {row["name"]: row for row in json.loads(omni(home, "models", "--json").stdout)}
    assert models["mine"]["cached"] and "smollm2-135m" in models


def test_a_gguf_path_as_model_is_registered_on_first_use(tmp_path: Path, home: dict[str, str],
                                                         catalog: Catalog, store: ModelStore):
    spec = catalog.get("smollm2-135m")
    gguf = store.fetch(spec) / Path(spec.source.files[0]).name
    reply = omni(home, "chat", "--model", str(gguf), "-q", "--max-tokens", "4", "Say hi")
    assert reply.stdout.strip()
    names = tomllib.loads((tmp_path / "catalog.toml").read_text())["models"]
    assert names["smollm2-135m-instruct.q4_1"]["source"] == {"path": str(gguf.resolve())}
    assert names["smollm2-135m-instruct.q4_1"]["format"] == "gguf"
    bad = omni(home, "pull", "hf:not-a-repo", code=1)
    assert "ORG/REPO" in bad.stderr
    unknown = omni(home, "pull", str(tmp_path / "nowhere"), code=1)
    assert "does not exist" in unknown.stderr


def test_an_omni_node_model_may_be_a_path(tmp_path: Path, home: dict[str, str],
                                          catalog: Catalog, store: ModelStore):
    """omni-node's MODEL: a path is detected and registered as the node starts (the slot is
    built, nothing loaded: loading waits for the graph)."""
    voice = store.fetch(catalog.get("piper-joe"))
    script = ("from mofa_omni.models.catalog import Catalog\n"
              "from mofa_omni_nodes.omni_node import slot_from_env\n"
              "slot = slot_from_env(Catalog.load())\n"
              "print(slot.model, slot.host.adapter.spec.adapter, slot.task.value)\n")
    env = {**home, "MODEL": str(voice / "en_US-joe-medium.onnx"), "TASK": "speech_synthesis"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["en_us-joe-medium", "piper", "speech_synthesis"]
    entry = tomllib.loads((tmp_path / "catalog.toml").read_text())["models"]["en_us-joe-medium"]
    assert entry["source"] == {"path": str(voice.resolve())}
    env["TASK"] = "embedding"  # the voice does not embed: said before the node joins a graph
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode != 0 and "does not serve embedding" in result.stderr


def test_a_hub_name_is_fetched_detected_and_served(tmp_path: Path, home: dict[str, str],
                                                   local_hub, catalog: Catalog,
                                                   store: ModelStore):
    """`omni pull hf:ORG/REPO`: the real download code against the loopback Hub, then detection
    on the fetched files, then the entry serves by its name."""
    packaged = store.fetch(catalog.get("minilm-l6"))
    files = {path.name: path for path in sorted(packaged.iterdir())
             if not path.name.endswith(".json") or path.name in ("config.json", "tokenizer.json")}
    local_hub.add("sentence-transformers/all-MiniLM-L6-v2", files)
    env = {**home, "HF_ENDPOINT": local_hub.url}
    env.pop("HF_HUB_OFFLINE", None)

    pulled = omni(env, "pull", "hf:sentence-transformers/all-MiniLM-L6-v2", "--name", "hub-minilm")
    assert "hub-minilm: ready" in pulled.stdout
    entry = tomllib.loads((tmp_path / "catalog.toml").read_text())["models"]["hub-minilm"]
    assert entry["source"]["hf"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert entry["adapter"] == ["mlx_bert", "ort_bert"]
    result = json.loads(omni(env, "embed", "--model", "hub-minilm", "--json", "-q",
                             "a cat").stdout)
    assert result["model"] == "hub-minilm" and result["dim"] == 384
    missing = omni(env, "pull", "hf:nobody/nothing", code=1)
    assert "'nobody/nothing' does not exist" in missing.stderr
