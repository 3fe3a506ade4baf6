"""`omni init NAME`: a starter project to change — the voice agent as a dataflow of the
packaged nodes, two sample questions, a user-catalog stub, and a README of what to change."""

from __future__ import annotations

import shutil
from pathlib import Path

from mofa_omni.config import SHIPPED_DATAFLOWS
from mofa_omni.contract.errors import ConfigError
from mofa_omni.launch import dataflows

CATALOG_STUB = """\
# Your own models, merged over mofa-omni's catalog by the model nodes of dataflow.yml
# (MOFA_OMNI_CATALOG). `omni models` lists the built-in ones. For example:
#
# [models.my-llm]
# description = "A GGUF of my own"
# adapter = ["llama_cpp", "mlx_lm"]
# tasks = ["text_generation"]
# format = "gguf"
# memory_mb = 400
# source = { path = "/models/my-llm.Q4_K_M.gguf" }
#
# `omni pull hf:ORG/REPO` or `omni pull ./model-folder --name my-llm` writes such an entry for
# you (into your user catalog) from the model's own files.
"""

README = """\
# {name}

A voice agent made of mofa-omni's packaged nodes: WAV turns -> voice activity detection ->
speech recognition -> a dialogue with an LLM -> speech synthesis -> WAV replies.

    dora run dataflow.yml        # from this folder; replies and transcript.txt in replies/

What to change:
- `samples/`: your own questions as WAV files (any rate, mono or stereo), taken in name order;
  or `VOICE_INPUT` in dataflow.yml.
- A model: set `MODEL` in a model node's `env` (`path: omni-node`), e.g. `MODEL: whisper-base`
  on `asr`; `omni models` lists them, and `omni pull` fetches one first (with progress).
- Models of your own: describe them in `catalog.toml`.
- The assistant: `SYSTEM_PROMPT` on the `dialogue` node.
- The microphone instead of files: replace the `source` node with `path: omni-microphone`
  (needs `pip install sounddevice`), and set `SINK: speaker` on `sink`.
- While it runs: `omni status` shows its models and memory, `omni swap asr whisper-base`
  changes a model without stopping it.
"""


def write_starter(folder: Path) -> Path:
    """Write the starter project into ``folder`` (created; refused if it holds anything)."""
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"{folder} exists and is not empty: choose a new name")
    descriptor = dataflows.load(dataflows.shipped("voice"))
    descriptor = dataflows.with_env(descriptor, "source", VOICE_INPUT="samples")
    for node_id in ("dialogue", "sink"):
        descriptor = dataflows.with_env(descriptor, node_id, VOICE_OUTPUT="replies")
    for node_id in dataflows.model_nodes(descriptor):
        descriptor = dataflows.with_env(descriptor, node_id, MOFA_OMNI_CATALOG="catalog.toml")
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    for sample in sorted((SHIPPED_DATAFLOWS / "samples").glob("*.wav")):
        shutil.copyfile(sample, folder / "samples" / sample.name)
    header = (f"{folder.name}: the voice agent, made of mofa-omni's packaged nodes.\n"
              "Run it from this folder: dora run dataflow.yml (see README.md)")
    (folder / "dataflow.yml").write_text(dataflows.dump(descriptor, header), encoding="utf-8")
    (folder / "catalog.toml").write_text(CATALOG_STUB, encoding="utf-8")
    (folder / "README.md").write_text(README.format(name=folder.name), encoding="utf-8")
    return folder
