"""The LLM family: GGUF -> MLX conversion, the mlx_lm adapter, stop sequences, memory on unload.

Fast tests build a tiny random Llama GGUF with the `gguf` writer; the slow ones
use the real SmolLM2-135M and Gemma-3-270M weights from the model cache.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from mofa_omni.adapters.backends import create_adapter
from mofa_omni.adapters.chat import StopMatcher
from mofa_omni.adapters.loading import open_model
from mofa_omni.contract.errors import ContractError, ModelLoadError
from mofa_omni.contract.tasks import ChatMessage, ChatRequest
from mofa_omni.formats.gguf import convert_gguf
from mofa_omni.models.catalog import Catalog
from mofa_omni.models.memory import snapshot
from mofa_omni.models.store import ModelStore

CAPITAL = [ChatMessage("user", "What is the capital of France? Answer in one sentence.")]
STORY = [ChatMessage("user", "Write a long story about a dragon.")]


def reply(adapter, request: ChatRequest) -> tuple[str, list]:
    chunks = list(adapter.generate(request))
    return "".join(chunk.text for chunk in chunks), chunks


# --- stop sequences (pure) --------------------------------------------------------------

def stream_through(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


@pytest.mark.parametrize(("stops", "pieces", "expected", "stopped"), [
    ([], ["Hello", " world"], "Hello world", False),
    (["\n\n"], ["one\n", "\ntwo"], "one", True),  # split across two pieces
    (["<end>"], ["a<", "e", "nd", ">b"], "a", True),  # split across four
    (["<end>"], ["a<", "e", "x"], "a<ex", False),  # a false start is given back
    (["<end>"], ["x<en"], "x<en", False),  # held-back text is flushed at the end
    (["STOP", "ST"], ["aSTO", "P"], "a", True),  # the earliest match wins
    (["lo"], ["hello"], "hel", True),  # inside one piece
    ([""], ["abc"], "abc", False),  # an empty stop string matches nothing
])
def test_stop_matcher(stops, pieces, expected, stopped):
    assert stream_through(stops, pieces) == (expected, stopped)


def test_stop_matcher_emits_as_soon_as_safe():
    matcher = StopMatcher(["</s>"])
    assert matcher.feed("abc<") == ("abc", False)  # "<" could start the stop: held
    assert matcher.feed("b") == ("<b", False)


# --- conversion of a tiny synthetic GGUF --------------------------------------------------

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 64, 128, 2, 1, 30


def write_tiny_gguf(path: Path, arch: str = "llama") -> dict[str, np.ndarray]:
    """A one-layer random Llama in GGUF: Q8_0 embeddings, Q4_1 matrices, F32 norms."""
    import gguf

    rng = np.random.default_rng(0)
    head_dim = HIDDEN // HEADS
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,),
              "blk.0.attn_norm.weight": (HIDDEN,), "blk.0.ffn_norm.weight": (HIDDEN,),
              "blk.0.attn_q.weight": (HIDDEN, HIDDEN),
              "blk.0.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
              "blk.0.attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
              "blk.0.attn_output.weight": (HIDDEN, HIDDEN), "blk.0.ffn_gate.weight": (FFN, HIDDEN),
              "blk.0.ffn_up.weight": (FFN, HIDDEN), "blk.0.ffn_down.weight": (HIDDEN, FFN)}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    letters = [chr(c) for c in range(ord("a"), ord("a") + VOCAB - 4)]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<|endoftext|>", "<|im_end|>", "Ġ", "ab", *letters])
    writer.add_token_types([3, 3, 1, 1, *[1] * len(letters)])
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    values = {}
    for name, shape in shapes.items():
        data = rng.normal(0, 0.5, shape).astype(np.float32)
        if len(shape) == 1:
            writer.add_tensor(name, data)
            values[name] = data
            continue
        kinds = gguf.GGMLQuantizationType
        qtype = kinds.Q8_0 if name == "token_embd.weight" else kinds.Q4_1
        packed = gguf.quants.quantize(data, qtype)
        writer.add_tensor(name, packed, raw_dtype=qtype)
        values[name] = gguf.quants.dequantize(packed, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return values


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_tiny_gguf_converts_in_both_modes(tiny_gguf, tmp_path):
    import mlx.core as mx
    from mlx_lm.utils import load_model, load_tokenizer

    path, values = tiny_gguf
    calls = []
    config = convert_gguf(path, tmp_path / "f32", dtype="float32",
                          progress=lambda *call: calls.append(call))
    assert calls and calls[-1][1] == calls[-1][2]  # ends at done == total
    assert config["rope_traditional"] and config["tie_word_embeddings"]
    quantized = convert_gguf(path, tmp_path / "q", dtype="quantized")["quantization"]
    assert quantized["bits"] == 4 and quantized["model.embed_tokens"]["bits"] == 8

    weights = mx.load(str(tmp_path / "f32" / "model.safetensors"))
    assert weights["model.layers.0.mlp.down_proj.weight"].dtype == mx.float32
    np.testing.assert_array_equal(np.array(weights["model.layers.0.mlp.down_proj.weight"]),
                                  values["blk.0.ffn_down.weight"])
    tokens = mx.array([[4, 5, 6, 3, 7]])
    logits = {}
    for mode in ("f32", "q"):
        model, _ = load_model(tmp_path / mode)
        logits[mode] = np.array(model(tokens))
    # the same numbers, once dequantized ahead and once inside MLX's quantized matmul
    np.testing.assert_allclose(logits["q"], logits["f32"], rtol=1e-3, atol=1e-3)
    tokenizer = load_tokenizer(tmp_path / "f32")
    assert tokenizer.encode("ab c") == [3, 2, 6]
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("keep", [64, 2000, 0.5, 0.99])
def test_truncated_gguf_is_a_clear_error(tiny_gguf, tmp_path, keep):
    path, _ = tiny_gguf
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match="truncated"):
        convert_gguf(cut, tmp_path / "out")


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "other.gguf"
    write_tiny_gguf(path, arch="mamba")
    with pytest.raises(ModelLoadError, match="architecture 'mamba' is not supported"):
        convert_gguf(path, tmp_path / "out")


@pytest.mark.parametrize("fmt", ["gguf", "mlx"])
def test_tiny_model_through_the_store(tiny_gguf, tmp_path, fmt):
    """A user's own weights: a GGUF file (converted) or an MLX directory (linked as it is)."""
    source = tiny_gguf[0]
    if fmt == "mlx":
        source = tmp_path / "mlx-dir"
        convert_gguf(tiny_gguf[0], source, dtype="quantized")
    (tmp_path / "catalog.toml").write_text(
        f'[models.tiny]\nadapter = "mlx_lm"\ntasks = ["text_generation"]\nformat = "{fmt}"\n'
        f'source = {{ path = "{source}" }}\n')
    adapter = open_model("tiny", catalog=Catalog.load([tmp_path / "catalog.toml"]),
                         store=ModelStore(tmp_path / "cache"))
    try:
        built = ModelStore(tmp_path / "cache").model_dir(adapter.spec)
        files = {p.name for p in built.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
        chunks = list(adapter.generate(ChatRequest([ChatMessage("user", "abc")], max_tokens=3)))
        final = chunks[-1]
        assert final.final and final.prompt_tokens == 2  # "ab" "c" through the template
        if final.finish_reason == "length":
            assert final.completion_tokens == 3
        else:  # a random model may well pick EOS
            assert final.finish_reason == "stop" and final.completion_tokens < 3
    finally:
        adapter.unload()


def test_unknown_dtype_is_a_clear_error(tiny_gguf, tmp_path):
    with pytest.raises(ModelLoadError, match="dtype"):
        convert_gguf(tiny_gguf[0], tmp_path / "out", dtype="int3")


# --- real weights ------------------------------------------------------------------------

BACKENDS = ["mlx", "ctranslate2", "llama.cpp"]


@pytest.mark.slow
@pytest.mark.parametrize("name, backend", [("smollm2-135m", "mlx"), ("smollm2-135m", "ctranslate2"),
                                           ("smollm2-135m", "llama.cpp"),
                                           ("smollm2-135m-q4", None)])
def test_smollm2_knows_the_capital_of_france(model, name, backend):
    text, chunks = reply(model(name, backend), ChatRequest(CAPITAL, max_tokens=24))
    assert "Paris" in text
    assert chunks[-1].finish_reason == "stop"  # ended at EOS, well before max_tokens


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_yields_chunks_then_one_final(model, backend):
    chunks = list(model("smollm2-135m", backend).generate(ChatRequest(CAPITAL, max_tokens=24)))
    assert len([c for c in chunks if c.text]) >= 3
    assert [c.final for c in chunks] == [False] * (len(chunks) - 1) + [True]
    final = chunks[-1]
    assert final.text == "" and final.prompt_tokens > 10 and final.completion_tokens > 3


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_max_tokens_gives_length(model, backend):
    _, chunks = reply(model("smollm2-135m", backend), ChatRequest(STORY, max_tokens=7))
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 7


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mlx", "llama.cpp"])
def test_a_request_longer_than_the_context_is_refused(model, backend):
    """Both engines reserve a sequence's memory for the catalog's `context` (4096 tokens):
    a prompt and max_tokens beyond it are refused before anything is decoded."""
    adapter = model("smollm2-135m", backend)
    with pytest.raises(ContractError, match=r"the prompt \(\d+ tokens\) and max_tokens "
                                            r"\(4096\) exceed the 4096 tokens"):
        adapter.generate(ChatRequest(CAPITAL, max_tokens=4096))
    assert "Paris" in reply(adapter, ChatRequest(CAPITAL, max_tokens=24))[0]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_sequence_split_across_tokens_is_never_emitted(model, backend):
    # " is" and " Paris" are separate tokens: the stop text spans both
    text, chunks = reply(model("smollm2-135m", backend),
                         ChatRequest(CAPITAL, max_tokens=24, stop=[" is Par"]))
    assert chunks[-1].finish_reason == "stop"
    assert text and "Par" not in text and not text.endswith(" is")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_closing_the_stream_stops_generation(model, backend):
    adapter = model("smollm2-135m", backend)
    stream = adapter.generate(ChatRequest(STORY, max_tokens=200))
    assert next(stream).text
    stream.close()
    with pytest.raises(StopIteration):  # closed: nothing more is computed
        next(stream)
    text, chunks = reply(adapter, ChatRequest(CAPITAL, max_tokens=24))  # still usable
    assert "Paris" in text


@pytest.mark.slow
def test_unload_gives_memory_back(catalog, store, model):
    model("smollm2-135m-q4")  # libraries imported and warm, so what follows measures weights only
    before = snapshot()
    adapter = open_model("smollm2-135m", catalog=catalog, store=store, backend="mlx")
    loaded = snapshot()
    grew = loaded.mlx_active_bytes - before.mlx_active_bytes
    assert grew > 400e6  # 135M parameters in float32
    adapter.unload()
    after = snapshot()
    assert loaded.mlx_active_bytes - after.mlx_active_bytes > 0.95 * grew
    assert loaded.rss_bytes - after.rss_bytes > 0.7 * grew


@pytest.mark.slow
@pytest.mark.parametrize("backend, weights", [("ctranslate2", 100e6),  # 135M parameters, int8
                                              ("llama.cpp", 60e6)])  # the Q4_1 GGUF, mapped
def test_cpu_engines_unload_gives_memory_back(catalog, store, model, backend, weights):
    model("smollm2-135m", backend)  # libraries imported, the artifact built
    before = snapshot()
    adapter = open_model("smollm2-135m", catalog=catalog, store=store, backend=backend)
    loaded = snapshot()
    grew = loaded.rss_bytes - before.rss_bytes
    assert grew > weights  # the scheduler sees it in the process's resident memory
    adapter.unload()
    assert loaded.rss_bytes - snapshot().rss_bytes > 0.7 * grew


@pytest.mark.slow
def test_mlx_quantizes_to_8_bits_at_load_and_still_answers(catalog, store, model):
    model("smollm2-135m", "mlx")  # the float32 conversion the 8-bit model loads from, warm
    spec = catalog.get("smollm2-135m")
    eight = dataclasses.replace(spec, name="smollm2-135m-8bit", options=spec.options | {"bits": 8})
    before = snapshot().mlx_active_bytes
    adapter = create_adapter(eight, "mlx")
    adapter.load(store.prepare(adapter))
    try:
        grew = snapshot().mlx_active_bytes - before
        assert 100e6 < grew < 0.4 * 540e6  # 135M parameters: 8 bits and scales, not float32
        text, _ = reply(adapter, ChatRequest(CAPITAL, max_tokens=24))
        assert "Paris" in text
    finally:
        adapter.unload()


@pytest.mark.slow
def test_every_backend_answers_alike(model):
    texts = [reply(model("smollm2-135m", backend), ChatRequest(CAPITAL, max_tokens=24))[0]
             for backend in BACKENDS]
    assert all("capital of France is Paris" in text for text in texts), texts


@pytest.mark.slow
def test_truncated_real_gguf_is_a_clear_error(catalog, store, tmp_path):
    source = store.fetch(catalog.get("smollm2-135m"))
    original = next(source.glob("*.gguf"))
    cut = tmp_path / original.name
    with original.open("rb") as f:
        cut.write_bytes(f.read(60_000_000))
    with pytest.raises(ModelLoadError, match="truncated"):
        convert_gguf(cut, tmp_path / "out")


@pytest.mark.slow
def test_gemma3_continues_with_paris(model):
    # a base model: no chat template, the message is continued as plain text
    prompt = "The capital of Germany is Berlin. The capital of Italy is Rome. The capital of France is"
    text, chunks = reply(model("gemma-3-270m"), ChatRequest([ChatMessage("user", prompt)], max_tokens=4))
    assert text.strip().startswith("Paris")
