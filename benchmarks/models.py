"""Per-model figures: load time, memory, throughput, adapter overhead, and the BLAS speed-up.

    python benchmarks/models.py [--models NAME...] [--repeats N] [--json FILE] [--png FILE]

For each model the same loaded weights are timed through the adapter and
through the library directly (mlx-lm's stream_generate, mlx_whisper's
transcribe, PiperVoice.synthesize, the MLX BERT forward pass), interleaved in
the same run; the ratio adapter/direct is the adapter's overhead (goal <= 1.05).
Moonshine and Kokoro, whose engines the adapters drive themselves, are measured against
their peers on the same weights: Moonshine's own C++ engine (moonshine-cpp) and kokoro-onnx
(``pip install -e '.[peers]'``; a model whose peer is missing is skipped, said so).
Generated rows follow (``--no-generated`` skips them): a tiny random-weight Qwen3-Omni, the
spoken question in, text out through the adapter against mlx-vlm directly, and a spoken
reply's seconds of speech per second; a tiny random-weight Wan 2.2 TI2V, a clip through the
adapter (progress, chunks) against mlx-gen's pipeline directly, with seconds per denoising
step and per decoded frame; a tiny random-weight checkpoint of each VLM family the tests prove
(SmolVLM, Qwen2-VL, Qwen2.5-VL, Gemma 3, LLaVA), a picture and a question through the adapter
against mlx-vlm directly; a tiny checkpoint of each LLM architecture of the matrix on MLX
(against mlx-lm) and as GGUF on llama.cpp (against llama-cpp-python); the BGE- and E5-style
embedders and the BERT and XLM-R cross-encoders on MLX and ONNX Runtime. The BLAS section runs a matmul and MiniLM in child
processes with OpenBLAS preloaded and with MLX's stock BLAS (goal >= 10x). Prints a table, writes
benchmarks/results/models.json (or --json FILE) and a plot of each model's overhead ratio,
benchmarks/results/models.png (or --png FILE).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from common import (
    add_output_flags,
    make_parser,
    pyplot,
    run_stamp,
    save_figure,
    timed,
    without_blas_setup,
    write_json,
)

from mofa_omni.models.compute import ensure_fast_blas

ensure_fast_blas()

import numpy as np  # noqa: E402

from mofa_omni.adapters.loading import open_model  # noqa: E402
from mofa_omni.contract.tasks import (  # noqa: E402
    ChatMessage,
    ChatRequest,
    EmbeddingRequest,
    SpeechRequest,
    TranscriptionRequest,
)
from mofa_omni.models.catalog import Catalog  # noqa: E402
from mofa_omni.models.memory import format_bytes, release_freed_memory, snapshot  # noqa: E402

PROMPT = "What is the capital of France? Answer in one sentence."
SPOKEN = "The quick brown fox jumps over the lazy dog. What is the capital of France?"
SENTENCES = [f"Sentence number {i} talks about {topic}." for i, topic in
             enumerate(["music", "the weather", "football", "cooking", "physics", "travel",
                        "a red car", "old books"] * 8)]


def best_of_interleaved(adapter_run: Callable[[], float], direct_run: Callable[[], float],
                        repeats: int) -> tuple[float, float]:
    """Median seconds of each, measured alternately so machine noise hits both alike."""
    adapter_times, direct_times = [], []
    for i in range(repeats):
        runs = [(adapter_run, adapter_times), (direct_run, direct_times)]
        for run, times in runs if i % 2 == 0 else reversed(runs):
            times.append(run())
    return statistics.median(adapter_times), statistics.median(direct_times)


def timed_reply(stream: Callable[[], Iterator], tokens: dict) -> Callable[[], float]:
    """A run of an adapter's streamed reply, timed: seconds, and its final chunk's completion
    tokens kept in ``tokens["adapter"]``."""
    def run() -> float:
        started = time.perf_counter()
        for chunk in stream():
            if getattr(chunk, "final", False) and hasattr(chunk, "completion_tokens"):
                tokens["adapter"] = chunk.completion_tokens
        return time.perf_counter() - started
    return run


def bench_llm(adapter, repeats: int) -> dict:
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    request = ChatRequest([ChatMessage("user", PROMPT)], max_tokens=48)
    prompt = adapter.prompt_tokens(request)
    tokens = {"adapter": 0}

    through_adapter = timed_reply(lambda: adapter.generate(request), tokens)

    def direct() -> float:
        sampler = make_sampler(temp=0.0)
        return timed(lambda: [r for r in stream_generate(
            adapter._model, adapter._tokenizer, prompt, max_tokens=48, sampler=sampler)])

    through_adapter()  # warm-up (graph compilation, caches)
    a, d = best_of_interleaved(through_adapter, direct, repeats)
    return {"throughput": tokens["adapter"] / a, "unit": "tok/s (prompt+decode)",
            "adapter_s": a, "direct_s": d}


def bench_asr(adapter, audio: np.ndarray, rate: int, repeats: int) -> dict:
    import mlx_whisper

    from mofa_omni.media.audio import resample

    request = TranscriptionRequest(audio, rate)
    audio16 = resample(audio, rate, 16000)
    fp16 = adapter._fp16
    model_dir = str(adapter.model_dir)
    # The direct baseline loads its own copy through mlx_whisper's ModelHolder (first call).
    mlx_whisper.transcribe(audio16, path_or_hf_repo=model_dir, fp16=fp16, verbose=None)
    adapter.transcribe(request)
    a, d = best_of_interleaved(
        lambda: timed(lambda: adapter.transcribe(request)),
        lambda: timed(lambda: mlx_whisper.transcribe(
            audio16, path_or_hf_repo=model_dir, fp16=fp16, verbose=None)), repeats)
    mlx_whisper.transcribe.__globals__["ModelHolder"].model = None
    seconds = len(audio) / rate
    return {"throughput": a / seconds, "unit": "real-time factor (lower is faster)",
            "adapter_s": a, "direct_s": d}


def bench_tts(adapter, repeats: int) -> dict:
    from piper.config import SynthesisConfig

    request = SpeechRequest(SPOKEN)
    voice = adapter._voice
    config = SynthesisConfig(length_scale=voice.config.length_scale)
    samples = {"n": 0}

    def through_adapter() -> float:
        started = time.perf_counter()
        samples["n"] = sum(len(c.audio) for c in adapter.synthesize(request))
        return time.perf_counter() - started

    through_adapter()
    a, d = best_of_interleaved(
        through_adapter, lambda: timed(lambda: list(voice.synthesize(SPOKEN, config))), repeats)
    return {"throughput": a / (samples["n"] / adapter.sample_rate),
            "unit": "real-time factor (lower is faster)", "adapter_s": a, "direct_s": d}


def bench_embedding(adapter, repeats: int, tokenize: bool = False) -> dict:
    """The MLX BERT adapter against its forward pass on the same tokens (``tokenize``: the
    tokenizing timed on both sides, as it counts for a tiny model)."""
    request = EmbeddingRequest(SENTENCES)
    encodings = adapter._tokenizer.encode_batch(SENTENCES)

    def direct() -> float:
        started = time.perf_counter()
        if tokenize:
            adapter._tokenizer.encode_batch(SENTENCES)
        for start in range(0, len(encodings), adapter.batch_size):
            adapter._embed_batch(encodings[start:start + adapter.batch_size],
                                 adapter.pipeline.normalize)
        return time.perf_counter() - started

    adapter.embed(request)
    a, d = best_of_interleaved(lambda: timed(lambda: adapter.embed(request)), direct, repeats)
    return {"throughput": len(SENTENCES) / a, "unit": "sentences/s", "adapter_s": a,
            "direct_s": d}


class PeerMissing(Exception):
    """The library a row is measured against is not installed."""


def peer_module(name: str, package: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise PeerMissing(f"{package} is not installed (pip install -e '.[peers]')") from None


def bench_moonshine(adapter, audio: np.ndarray, rate: int, repeats: int) -> dict:
    """The ort_moonshine adapter against Moonshine's own C++ engine (moonshine-cpp, with its
    own ONNX Runtime) called through its C API on the same ONNX graphs; and, once, that engine
    on the ``.ort`` files its wheel ships, as it runs out of the box (``peer_ort_s``)."""
    import ctypes

    from mofa_omni.media.audio import resample

    moonshine = peer_module("moonshine_cpp", "moonshine-cpp")
    request = TranscriptionRequest(audio, rate)
    audio16 = np.ascontiguousarray(resample(audio, rate, 16000), np.float32)

    def engine(model) -> Callable[[], float]:
        def run() -> float:
            text = ctypes.c_char_p()
            started = time.perf_counter()
            status = moonshine.moonshine_lib.moonshine_transcribe(
                model.model_handle, audio16.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                len(audio16), ctypes.byref(text))
            seconds = time.perf_counter() - started
            if status != 0:
                raise RuntimeError(f"moonshine_transcribe failed ({status})")
            moonshine.moonshine_lib.moonshine_free_text(text)
            return seconds
        return run

    same_graphs = engine(moonshine.MoonshineModel(model_dir_path=str(adapter.model_dir),
                                                  onnx_suffix="onnx", model_type="base"))
    shipped = engine(moonshine.MoonshineModel(model_type="base"))  # its wheel's base-en .ort
    same_graphs(), shipped(), adapter.transcribe(request)  # warm both
    a, d = best_of_interleaved(lambda: timed(lambda: adapter.transcribe(request)), same_graphs,
                               repeats)
    seconds = len(audio) / rate
    return {"throughput": a / seconds, "unit": "real-time factor (lower is faster)",
            "adapter_s": a, "direct_s": d, "peer": "moonshine-cpp",
            "peer_ort_s": min(shipped() for _ in range(2))}


def bench_kokoro(adapter, repeats: int) -> dict:
    """The kokoro adapter against kokoro-onnx on the same ONNX model and voice pack. Each
    phonemizes with espeak-ng its own way, so their clips differ in length: compared per
    second of speech (``direct_s`` is the peer's time scaled to the adapter's clip)."""
    kokoro_onnx = peer_module("kokoro_onnx", "kokoro-onnx")
    (graph,) = adapter.model_dir.glob("*.onnx")
    voices = sorted(adapter.model_dir.glob("*.npz"))[0]
    peer = kokoro_onnx.Kokoro(str(graph), str(voices))
    options = adapter.options
    request = SpeechRequest(SPOKEN)
    spoken = {"adapter": 0.0, "peer": 0.0}

    def through_adapter() -> float:
        started = time.perf_counter()
        samples = sum(len(c.audio) for c in adapter.synthesize(request))
        spoken["adapter"] = samples / adapter.sample_rate
        return time.perf_counter() - started

    def through_peer() -> float:
        started = time.perf_counter()
        samples, rate = peer.create(SPOKEN, voice=options.voice, speed=options.speed,
                                    lang=options.language)
        spoken["peer"] = len(samples) / rate
        return time.perf_counter() - started

    through_adapter(), through_peer()
    a, d = best_of_interleaved(through_adapter, through_peer, repeats)
    return {"throughput": a / spoken["adapter"], "unit": "real-time factor (lower is faster)",
            "adapter_s": a, "direct_s": d * spoken["adapter"] / spoken["peer"],
            "peer": "kokoro-onnx"}


def bench_rerank(adapter, repeats: int) -> dict:
    """A cross-encoder adapter against its tokenizer and engine's forward pass called
    directly on the same pairs (length batches, then the sigmoid of each logit)."""
    from mofa_omni.contract.tasks import RerankRequest
    from mofa_omni.formats.bert import length_batches, padded

    request = RerankRequest(PROMPT, SENTENCES)
    pairs = [(PROMPT, document) for document in SENTENCES]

    def direct() -> float:
        started = time.perf_counter()
        encodings = adapter._tokenizer.encode_batch(pairs)
        _, batches = length_batches([len(e.ids) for e in encodings], adapter.options.batch_size)
        for batch in batches:
            ids, types, mask = padded([encodings[i] for i in batch])
            logits = adapter._logits(ids, np.zeros_like(types) if adapter._one_type else types,
                                     mask)
            1 / (1 + np.exp(-logits.astype(np.float64)))
        return time.perf_counter() - started

    adapter.rerank(request)
    a, d = best_of_interleaved(lambda: timed(lambda: adapter.rerank(request)), direct, repeats)
    return {"throughput": len(SENTENCES) / a, "unit": "pairs/s", "adapter_s": a,
            "direct_s": d}


def spoken_question() -> tuple[np.ndarray, int]:
    tts = open_model("piper-joe")
    chunks = list(tts.synthesize(SpeechRequest(SPOKEN)))
    tts.unload()
    return np.concatenate([c.audio for c in chunks]), chunks[0].sample_rate


def bench_model(name: str, repeats: int, speech: tuple[np.ndarray, int]) -> dict:
    release_freed_memory()
    before = snapshot()
    # Each adapter against the library it wraps: the MLX adapter of models that also have a
    # CTranslate2 one, whichever this machine would pick (comparing backends is another table).
    catalog_spec = Catalog.load().get(name)
    adapter = open_model(name, backend="mlx" if len(catalog_spec.adapters) > 1 else None)
    after = snapshot()
    task = adapter.tasks[0].value
    runners = {
        "text_generation": lambda: bench_llm(adapter, repeats),
        "speech_recognition": lambda: bench_asr(adapter, *speech, repeats),
        "speech_synthesis": lambda: bench_tts(adapter, repeats),
        "embedding": lambda: bench_embedding(adapter, repeats),
    }
    # The families whose library is not wrapped as a Python call are measured against a peer.
    against_peer = {
        "ort_moonshine": lambda: bench_moonshine(adapter, *speech, repeats),
        "kokoro": lambda: bench_kokoro(adapter, repeats),
    }
    try:
        figures = against_peer.get(catalog_spec.adapters[0], runners[task])()
    except PeerMissing:
        adapter.unload()
        raise
    row = {"model": name, "task": task, "backend": adapter.backend,
           "load_s": adapter.load_seconds, "rss_bytes": after.rss_bytes - before.rss_bytes,
           "mlx_bytes": after.mlx_active_bytes - before.mlx_active_bytes, **figures,
           "overhead_ratio": figures["adapter_s"] / figures["direct_s"]}
    adapter.unload()
    return row


def open_generated(root, name: str, entry: str):
    """Load the generated checkpoint ``root / name`` through a catalog entry of its own (the
    ``entry`` lines, its source added) and a cache under ``root``; the adapter, and memory
    before and after."""
    from mofa_omni.models.store import ModelStore

    (root / "catalog.toml").write_text(f'[models.{name}]\n{entry}'
                                       f'source = {{ path = "{root / name}" }}\n')
    release_freed_memory()
    before = snapshot()
    adapter = open_model(name, catalog=Catalog.load([root / "catalog.toml"]),
                         store=ModelStore(root / "cache"))
    return adapter, before, snapshot()


def generated_row(model: str, task: str, backend: str, adapter, before, after,
                  figures: dict, **more) -> dict:
    """A generated checkpoint's row: its load and memory, ``figures`` (throughput, unit,
    adapter_s, direct_s) and their ratio."""
    return {"model": f"{model} (generated)", "task": task, "backend": backend,
            "load_s": adapter.load_seconds, "rss_bytes": after.rss_bytes - before.rss_bytes,
            "mlx_bytes": after.mlx_active_bytes - before.mlx_active_bytes, **figures,
            "overhead_ratio": figures["adapter_s"] / figures["direct_s"], **more,
            "generated": True}


def bench_generated_omni(repeats: int, speech: tuple[np.ndarray, int]) -> dict:
    """A tiny random-weight Qwen3-Omni (mofa_omni.testing.tiny_omni: no omni weights can be had
    offline), written to a temporary folder: the spoken question in, text out through the
    adapter against mlx-vlm's stream_generate on the same prompt; then a spoken reply, timed
    for its seconds of speech per second. Marked as generated: its speed is the architecture's
    at a toy size, not a real model's."""
    import tempfile
    from pathlib import Path

    from mlx_vlm.generate import stream_generate

    from mofa_omni.contract.tasks import OmniRequest
    from mofa_omni.media.audio import resample
    from mofa_omni.models.store import ModelStore
    from mofa_omni.testing.tiny_omni import write_tiny_qwen3_omni

    catalog = Catalog.load([])
    smollm2 = catalog.get("smollm2-135m")
    gguf = ModelStore().fetch(smollm2) / Path(smollm2.source.files[0]).name
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        write_tiny_qwen3_omni(root / "tiny-qwen3-omni", gguf)
        adapter, before, after = open_generated(
            root, "tiny-qwen3-omni", 'adapter = "mlx_omni"\ntasks = ["omni"]\nformat = "mlx"\n'
                                     'memory_mb = 200\noptions = { talker_temperature = 0.0 }\n')
        audio = resample(*speech, 16000)
        request = OmniRequest([ChatMessage("user", "Answer the question.")], audio=[audio],
                              max_tokens=32)
        prompt = adapter._prompt(request)
        tokens = {"adapter": 0}

        through_adapter = timed_reply(lambda: adapter.generate_omni(request), tokens)

        def direct() -> float:
            return timed(lambda: [r for r in stream_generate(
                adapter._model, adapter._processor, prompt, audio=[audio], max_tokens=32,
                temperature=0.0)])

        through_adapter()  # warm-up
        a, d = best_of_interleaved(through_adapter, direct, repeats)
        spoken = OmniRequest(request.messages, audio=[audio], max_tokens=8, speak=True)
        started = time.perf_counter()
        chunks = [c for c in adapter.generate_omni(spoken) if hasattr(c, "sample_rate")]
        speaking_s = time.perf_counter() - started
        seconds = sum(c.audio.size for c in chunks) / chunks[0].sample_rate
        first_sound = first_sound_against_mlx_vlm(adapter, audio, repeats)
        adapter.unload()
    figures = {"throughput": tokens["adapter"] / a, "unit": "tok/s (prompt+decode)",
               "adapter_s": a, "direct_s": d}
    return generated_row("tiny-qwen3-omni", "omni", "mlx", adapter, before, after, figures,
                         speech_per_s=seconds / speaking_s, **first_sound)


def first_sound_against_mlx_vlm(adapter, audio: np.ndarray, repeats: int) -> dict:
    """Seconds from a spoken request for 32 tokens to its first sound, greedy: through the
    adapter, whose talker starts on the first words, and through mlx-vlm's generate_stream on
    the same inputs, which writes the whole text first."""
    from mlx_vlm.utils import prepare_inputs

    from mofa_omni.adapters.mlx_omni import (
        _MEDIA,
        CHUNK_FRAMES,
        EXTRA_FRAMES,
        FRAMES_PER_TOKEN,
        LEFT_CONTEXT_FRAMES,
    )
    from mofa_omni.contract.tasks import AudioChunk, OmniRequest

    request = OmniRequest([ChatMessage("user", "Answer the question.")], audio=[audio],
                          max_tokens=32, speak=True)
    model = adapter._model
    inputs = prepare_inputs(adapter._processor, audio=[audio], prompts=adapter._prompt(request))

    def until_sound(stream, is_sound) -> Callable[[], float]:
        def run() -> float:
            started = time.perf_counter()
            replies = stream()
            try:
                next(r for r in replies if is_sound(r))
            finally:
                replies.close()
            return time.perf_counter() - started
        return run

    ours = until_sound(lambda: adapter.generate_omni(request),
                       lambda r: isinstance(r, AudioChunk) and r.audio.size > 0)
    theirs = until_sound(lambda: model.generate_stream(
        inputs["input_ids"], speaker=adapter._speaker(""), thinker_max_new_tokens=32,
        thinker_eos_token_id=model.config.eos_token_id, thinker_temperature=0.0,
        talker_temperature=0.0, talker_max_new_tokens=FRAMES_PER_TOKEN * 32 + EXTRA_FRAMES,
        chunk_size=CHUNK_FRAMES, left_context_size=LEFT_CONTEXT_FRAMES,
        **{key: inputs[key] for key in _MEDIA if key in inputs}), lambda r: r[0] == "audio")
    a, d = best_of_interleaved(ours, theirs, repeats)
    return {"first_sound_s": a, "first_sound_mlx_vlm_s": d}


def bench_generated_vlms(repeats: int) -> list[dict]:
    """One tiny random-weight checkpoint per VLM family the tests prove
    (mofa_omni.testing.tiny_vlm.VLM_ARCHITECTURES: no VLM weights can be had offline): a
    picture and a question in, text out, through the adapter against mlx-vlm's
    stream_generate on the same prompt and picture. Marked as generated: the speed is the
    architecture's at a toy size, not a real model's."""
    import tempfile
    from pathlib import Path

    from mlx_vlm.generate import stream_generate
    from mlx_vlm.prompt_utils import apply_chat_template

    from mofa_omni.adapters.mlx_vlm import to_rgb
    from mofa_omni.contract.tasks import OmniRequest
    from mofa_omni.models.store import ModelStore
    from mofa_omni.testing import tiny_name
    from mofa_omni.testing.tiny_vlm import VLM_ARCHITECTURES

    smollm2 = Catalog.load([]).get("smollm2-135m")
    gguf = ModelStore().fetch(smollm2) / Path(smollm2.source.files[0]).name
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    request = OmniRequest([ChatMessage("user", "What is in this picture?")], [pixels],
                          max_tokens=32)
    rows = []
    for model_type, write in VLM_ARCHITECTURES.items():
        print(f"measuring a generated tiny {model_type} ...", file=sys.stderr, flush=True)
        name = tiny_name(model_type)
        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch)
            write(root / name, gguf)
            adapter, before, after = open_generated(
                root, name, 'adapter = "mlx_vlm"\ntasks = ["vision_language"]\n'
                            'format = "mlx"\nmemory_mb = 60\n')
            prompt = apply_chat_template(adapter._processor, adapter._model.config,
                                         [{"role": "user", "content": "What is in this picture?"}],
                                         num_images=1)
            tokens = {"adapter": 0}

            through_adapter = timed_reply(lambda: adapter.generate_from_images(request), tokens)

            def direct() -> float:
                return timed(lambda: [r for r in stream_generate(
                    adapter._model, adapter._processor, prompt, image=[to_rgb(pixels)],
                    max_tokens=32)])

            through_adapter()  # warm-up
            a, d = best_of_interleaved(through_adapter, direct, repeats)
            adapter.unload()
        rows.append(generated_row(name, "vision_language", "mlx", adapter, before, after, {
            "throughput": tokens["adapter"] / a, "unit": "tok/s (prompt+decode)",
            "adapter_s": a, "direct_s": d}))
    return rows


def bench_gguf(adapter, repeats: int) -> dict:
    """A GGUF LLM on the llama_cpp adapter against llama-cpp-python's Llama on the same file and
    prompt tokens, greedy, streamed. Random weights may stop at different points on the two
    paths' arithmetic: each side's speed is its own tokens (prompt + reply) per second."""
    from llama_cpp import Llama

    request = ChatRequest([ChatMessage("user", PROMPT)], max_tokens=48)
    prompt = adapter.prompt_tokens(request)
    peer = Llama(model_path=str(adapter.model_dir / "model.gguf"), n_ctx=1024,
                 n_threads=os.cpu_count() or 1, verbose=False)
    tokens = {"adapter": 0, "direct": 0}

    through_adapter = timed_reply(lambda: adapter.generate(request), tokens)

    def direct() -> float:
        started = time.perf_counter()
        peer.reset()  # a fresh prompt, as the adapter reads it: no prefix reused
        stream = peer.create_completion(prompt, max_tokens=48, temperature=0.0, top_k=1,
                                        repeat_penalty=1.0, stream=True)
        # the last chunk only says why it stopped
        tokens["direct"] = sum(1 for chunk in stream
                               if chunk["choices"][0]["finish_reason"] is None)
        return time.perf_counter() - started

    through_adapter()  # warm-up
    a, d = best_of_interleaved(through_adapter, direct, repeats)
    # time per token (prompt + reply) on each side, so that a different stopping point does
    # not count
    adapter_tokens, direct_tokens = (len(prompt) + tokens[side] for side in ("adapter", "direct"))
    return {"throughput": adapter_tokens / a, "unit": "tok/s (prompt+decode)",
            "adapter_s": a / adapter_tokens, "direct_s": d / direct_tokens, "tokens": tokens}


def bench_generated_llms(repeats: int) -> list[dict]:
    """One tiny random-weight checkpoint per LLM architecture the tests prove
    (mofa_omni.testing.tiny_llm.LLM_ARCHITECTURES, written by mlx-lm's own classes) through the
    mlx_lm adapter against mlx-lm's stream_generate, and the same weights as GGUF
    (tiny_gguf.GGUF_ARCHITECTURES) through the llama_cpp adapter against llama-cpp-python.
    Marked as generated: the speed is the architecture's at a toy size."""
    import importlib.util
    import tempfile
    from pathlib import Path

    from mofa_omni.models.store import ModelStore
    from mofa_omni.testing import tiny_name
    from mofa_omni.testing.tiny_gguf import GGUF_ARCHITECTURES, write_tiny_gguf
    from mofa_omni.testing.tiny_llm import LLM_ARCHITECTURES, write_tiny_llm, write_tokenizer

    smollm2 = Catalog.load([]).get("smollm2-135m")
    gguf = ModelStore().fetch(smollm2) / Path(smollm2.source.files[0]).name
    with_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        tokenizer = write_tokenizer(root / "tokenizer", gguf)
        for seed, architecture in enumerate(LLM_ARCHITECTURES):
            print(f"measuring a generated tiny {architecture} ...", file=sys.stderr, flush=True)
            name = tiny_name(architecture)
            write_tiny_llm(root / name, architecture, tokenizer, seed=seed)
            engines = [("mlx", name, 'adapter = "mlx_lm"\nformat = "mlx"\n', bench_llm)]
            if with_llama_cpp and architecture in GGUF_ARCHITECTURES:
                write_tiny_gguf(root / name, root / f"{name}-gguf" / "model.gguf", gguf)
                engines.append(("llama.cpp", f"{name}-gguf",
                                'adapter = "llama_cpp"\nformat = "gguf"\n', bench_gguf))
            for backend, folder, entry, bench in engines:
                adapter, before, after = open_generated(
                    root, folder, entry + 'tasks = ["text_generation"]\nmemory_mb = 60\n')
                figures = bench(adapter, repeats)
                adapter.unload()
                rows.append(generated_row(folder, "text_generation", backend, adapter,
                                          before, after, figures))
    return rows


def bench_ort_embedding(adapter, repeats: int) -> dict:
    """The ort_bert adapter against its tokenizer and ONNX graph run directly (padded batches,
    then the pooling its sentence-transformers config names)."""
    from mofa_omni.adapters.ort_bert import INPUTS
    from mofa_omni.formats.bert import length_batches, padded
    from mofa_omni.formats.sentence_transformers import pool

    request = EmbeddingRequest(SENTENCES)

    def direct() -> float:
        started = time.perf_counter()
        encodings = adapter._tokenizer.encode_batch(SENTENCES)
        _, batches = length_batches([len(e.ids) for e in encodings], adapter.batch_size)
        for batch in batches:
            arrays = padded([encodings[i] for i in batch])
            (states,) = adapter._session.run(None, dict(zip(INPUTS, arrays)))
            pool(states, arrays[2], adapter.pipeline.pooling, adapter.pipeline.normalize)
        return time.perf_counter() - started

    adapter.embed(request)
    a, d = best_of_interleaved(lambda: timed(lambda: adapter.embed(request)), direct, repeats)
    return {"throughput": len(SENTENCES) / a, "unit": "sentences/s", "adapter_s": a,
            "direct_s": d}


def generated_bert_row(root, name: str, task: str, backend: str, adapter_name: str,
                       bench: Callable[[Any, int], dict], repeats: int,
                       write: Callable[[Any], Any]) -> dict:
    """The row of one BERT-family checkpoint ``write`` puts in a folder, served by
    ``adapter_name``: the same weights (same seed) under a name per engine, since each engine
    prepares its own files from them."""
    print(f"measuring {name} on {backend} ...", file=sys.stderr, flush=True)
    write(root / f"{name}-{backend}")
    adapter, before, after = open_generated(
        root, f"{name}-{backend}", f'adapter = "{adapter_name}"\ntasks = ["{task}"]\n'
        'format = "safetensors"\nmemory_mb = 10\n')
    figures = bench(adapter, repeats)
    adapter.unload()
    return generated_row(name, task, backend, adapter, before, after, figures)


def bench_generated_embedders(repeats: int) -> list[dict]:
    """Tiny random-weight sentence-transformers embedders (mofa_omni.testing.tiny_bert) in the
    two layouts the tests prove -- a BERT with CLS pooling as BGE has, an XLM-R with mean
    pooling and query/passage prompts as multilingual E5 has -- on MLX and ONNX Runtime, each
    against its tokenizer and engine's forward pass called directly."""
    import tempfile
    from pathlib import Path

    from mofa_omni.testing.tiny_bert import write_embedder

    layouts = {"tiny-bge-style-bert": ("bert", "cls", None),
               "tiny-e5-style-xlmr": ("xlm-roberta", "mean",
                                      {"query": "query: ", "document": "passage: "})}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for name, (family, pooling, prompts) in layouts.items():
            for backend, adapter_name, bench in (("mlx", "mlx_bert", lambda adapter, repeats:
                                                  bench_embedding(adapter, repeats, True)),
                                                 ("onnxruntime", "ort_bert",
                                                  bench_ort_embedding)):
                rows.append(generated_bert_row(
                    root, name, "embedding", backend, adapter_name, bench, repeats,
                    lambda folder: write_embedder(folder, family, pooling=pooling,
                                                  prompts=prompts)))
    return rows


def bench_generated_rerankers(repeats: int) -> list[dict]:
    """Tiny random-weight one-label cross-encoders (mofa_omni.testing.tiny_bert) -- a BERT
    head as ms-marco MiniLM and BGE-Reranker-base have, an XLM-R head as BGE-Reranker-v2-m3
    has -- on MLX and ONNX Runtime, each against its engine's forward pass called directly."""
    import tempfile
    from pathlib import Path

    from mofa_omni.testing.tiny_bert import write_reranker

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for family in ("bert", "xlm-roberta"):
            name = f"tiny-{family}-cross-encoder"
            for backend, adapter_name in (("mlx", "mlx_cross_encoder"),
                                          ("onnxruntime", "ort_cross_encoder")):
                rows.append(generated_bert_row(
                    root, name, "rerank", backend, adapter_name, bench_rerank, repeats,
                    lambda folder: write_reranker(folder, family)))
    return rows


def bench_generated_wan(repeats: int) -> dict:
    """A tiny random-weight Wan 2.2 TI2V (mofa_omni.testing.tiny_wan: no video weights can be
    had offline): a 17-frame 128x128 clip in 4 steps through the adapter (progress and
    chunks) against mlx-gen's generate_video on the same thread, with the frames read out;
    then the seconds per denoising step and per decoded frame, from the adapter's progress.
    Marked as generated: the architecture's speed at a toy size, not a real model's."""
    import tempfile
    from pathlib import Path

    from mofa_omni.contract.tasks import VideoChunk, VideoProgress, VideoRequest
    from mofa_omni.testing.tiny_wan import write_tiny_wan

    request = VideoRequest("a red kite over green hills", 17, 16, 128, 128, 4, 1)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        write_tiny_wan(root / "tiny-wan")
        adapter, before, after = open_generated(
            root, "tiny-wan", 'adapter = "mlx_wan"\ntasks = ["video_generation"]\n'
                              'format = "diffusers"\nmemory_mb = 100\n'
                              'options = { guidance = 1.0 }\n')
        marks: dict[str, float] = {}

        def through_adapter() -> float:
            marks.clear()
            started = time.perf_counter()
            for result in adapter.generate_video(request):
                now = time.perf_counter()
                if isinstance(result, VideoProgress) and result.phase == "denoise":
                    marks.setdefault("first_step", now)
                    marks["last_step"] = now
                elif isinstance(result, VideoChunk) and result.final:
                    marks["decoded"] = now
            return time.perf_counter() - started

        def direct() -> float:
            def run() -> None:
                video = adapter._pipeline.generate_video(
                    seed=request.seed, prompt=request.prompt, num_inference_steps=request.steps,
                    height=request.height, width=request.width, num_frames=request.frames,
                    fps=request.fps, guidance=1.0)
                [frame.convert("RGB") for frame in video.frames]
            return timed(lambda: adapter._engine.call(run))

        through_adapter()  # warm-up
        a, d = best_of_interleaved(through_adapter, direct, repeats)
        through_adapter()
        step_s = (marks["last_step"] - marks["first_step"]) / (request.steps - 1)
        frame_s = (marks["decoded"] - marks["last_step"]) / request.frames
        adapter.unload()
    return generated_row("tiny-wan", "video_generation", "mlx", adapter, before, after, {
        "throughput": request.frames / a, "unit": "frames/s", "adapter_s": a, "direct_s": d},
        step_s=step_s, frame_s=frame_s)


BLAS_PROBE = """
import json, time
from mofa_omni.models.compute import measure_blas
from mofa_omni.adapters.loading import open_model
from mofa_omni.contract.tasks import EmbeddingRequest
report = measure_blas()
model = open_model("minilm-l6")
texts = [f"Sentence {i} about the weather and music." for i in range(64)]
model.embed(EmbeddingRequest(texts[:8]))
started = time.perf_counter(); model.embed(EmbeddingRequest(texts))
print(json.dumps({"library": report.library, "gflops": report.gflops,
                  "sentences_per_s": len(texts) / (time.perf_counter() - started)}))
"""


def bench_blas() -> dict:
    """MLX on OpenBLAS versus its stock BLAS, each in a fresh child process."""
    results = {}
    for label, disable in (("openblas", "0"), ("stock", "1")):
        env = without_blas_setup(os.environ)
        env["MOFA_OMNI_NO_OPENBLAS"] = disable
        code = "from mofa_omni.models.compute import ensure_fast_blas; ensure_fast_blas()\n" + BLAS_PROBE
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout
        results[label] = json.loads(out.strip().splitlines()[-1])
    results["matmul_ratio"] = results["openblas"]["gflops"] / results["stock"]["gflops"]
    results["minilm_ratio"] = (results["openblas"]["sentences_per_s"]
                               / results["stock"]["sentences_per_s"])
    return results


def print_table(rows: list[dict], blas: dict | None) -> None:
    width = max(18, *(len(r["model"]) for r in rows))
    print(f"\n{'model':{width}} {'backend':12} {'load':>7} {'RSS':>10} {'MLX':>10} "
          f"{'throughput':>12}  {'overhead':>8}")
    for r in rows:
        unit = {"tok/s (prompt+decode)": "tok/s", "sentences/s": "sent/s",
                "frames/s": "frame/s", "pairs/s": "pair/s"}.get(r["unit"], "RTF")
        print(f"{r['model']:{width}} {r['backend']:12} {r['load_s']:6.2f}s "
              f"{format_bytes(r['rss_bytes']):>10} {format_bytes(r['mlx_bytes']):>10} "
              f"{r['throughput']:7.2f} {unit:6}  {r['overhead_ratio']:7.3f}x")
        if "peer" in r:
            shipped = (f"; {r['peer']} on the .ort files its wheel ships: "
                       f"{r['peer_ort_s'] / r['direct_s']:.1f}x slower") if "peer_ort_s" in r else ""
            print(f"{'':{width}} overhead against {r['peer']} on the same model{shipped}")
        if "speech_per_s" in r:
            print(f"{'':{width}} spoken reply: {r['speech_per_s']:.1f} s of speech per second "
                  "(generated weights: the architecture at a toy size)")
        if "first_sound_s" in r:
            print(f"{'':{width}} first sound {r['first_sound_s'] * 1000:.0f} ms after a spoken "
                  f"request for 32 tokens; {r['first_sound_mlx_vlm_s'] * 1000:.0f} ms through "
                  f"mlx-vlm's generate_stream (the whole text first)")
        if "step_s" in r:
            print(f"{'':{width}} {r['step_s'] * 1000:.0f} ms per denoising step, "
                  f"{r['frame_s'] * 1000:.0f} ms per decoded frame (17 frames of 128x128; "
                  "generated weights: the architecture at a toy size)")
    if blas:
        print(f"\nMLX BLAS        {'OpenBLAS':>10} {'stock':>10} {'ratio':>7}")
        print(f"matmul GFLOP/s  {blas['openblas']['gflops']:10.1f} {blas['stock']['gflops']:10.1f} "
              f"{blas['matmul_ratio']:6.1f}x")
        print(f"MiniLM sent/s   {blas['openblas']['sentences_per_s']:10.1f} "
              f"{blas['stock']['sentences_per_s']:10.1f} {blas['minilm_ratio']:6.1f}x")


def plot(rows: list[dict], path) -> None:
    """Each model's adapter/direct time ratio, against the 1.05 goal."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 3.5))
    axes.bar([r["model"] for r in rows], [r["overhead_ratio"] for r in rows], color="tab:blue")
    axes.tick_params(axis="x", labelrotation=30)
    axes.axhline(1.05, color="tab:red", linestyle="--", label="goal 1.05x")
    axes.set_ylabel("adapter time / direct time")
    axes.set_title("Adapter overhead per model (same loaded weights, interleaved)")
    axes.legend()
    figure.tight_layout()
    save_figure(figure, path)


def main() -> int:
    parser = make_parser(__doc__, full_help=True)
    parser.add_argument("--models", nargs="+",
                        default=["smollm2-135m", "smollm2-135m-q4", "whisper-tiny.en",
                                 "moonshine-base-en", "piper-joe", "kokoro-82m", "minilm-l6"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-blas", action="store_true", help="skip the BLAS comparison")
    parser.add_argument("--no-generated", action="store_true",
                        help="skip the generated-weight rows (a tiny Qwen3-Omni, a tiny Wan, "
                             "a tiny VLM, LLM, embedder and cross-encoder per family)")
    add_output_flags(parser, "models.json", "models.png")
    args = parser.parse_args()

    speech = spoken_question()
    rows = []
    for name in args.models:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        try:
            rows.append(bench_model(name, args.repeats, speech))
        except PeerMissing as missing:
            print(f"skipping {name}: {missing}", file=sys.stderr, flush=True)
    if not args.no_generated:
        print("measuring a generated tiny Qwen3-Omni ...", file=sys.stderr, flush=True)
        rows.append(bench_generated_omni(args.repeats, speech))
        print("measuring a generated tiny Wan 2.2 TI2V ...", file=sys.stderr, flush=True)
        rows.append(bench_generated_wan(args.repeats))
        rows += bench_generated_vlms(args.repeats)
        rows += bench_generated_llms(args.repeats)
        rows += bench_generated_embedders(args.repeats)
        rows += bench_generated_rerankers(args.repeats)
    blas = None if args.no_blas else bench_blas()
    print_table(rows, blas)
    write_json(args.json, {**run_stamp(), "models": rows, "blas": blas})
    plot(rows, args.png)
    print(f"\nwrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
