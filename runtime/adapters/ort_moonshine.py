"""Moonshine speech recognition (English) on ONNX Runtime: an encoder-decoder ASR family besides
whisper, whose encoder's work follows the length of the audio (whisper pads every request to a
30 s window): quicker on the short utterances of a voice graph.

Moonshine's encoder reads raw 16 kHz samples (no log-mel: its first layers are convolutions
over the waveform, so its length follows the audio's instead of a fixed 30 s window); the
"merged" decoder is one graph with two branches chosen by ``use_cache_branch``: the first
step computes the cross-attention keys and values from the encoder's states, later steps
reuse them and feed back only the self-attention cache. Decoding is greedy from ``<s>`` (1)
to ``</s>`` (2).

The files are Moonshine's own export: ``encoder_model.ort`` and ``decoder_model_merged.ort``
(ONNX Runtime's flatbuffer format, int8 weights; ``.onnx`` files of the same graphs load the
same way) and ``tokenizer.bin``, the token strings of its SentencePiece vocabulary, each one
length byte then its UTF-8 bytes (``▁`` marks a space). Layers, heads and sizes are read from
the decoder graph's inputs, so tiny and base load alike. ``.ort`` graphs are rewritten as
ONNX once, when the model is prepared (see :func:`_ort_to_onnx`: 6-7x faster decoding).
``options.threads`` bounds ONNX Runtime's intra-op threads (unset: every core).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.onnx_session import cpu_session
from mofa_omni.adapters.options import AdapterOptions, Positive
from mofa_omni.contract.errors import ContractError, ModelLoadError
from mofa_omni.contract.tasks import (
    Segment,
    Task,
    Transcript,
    TranscriptionRequest,
    refuse_prefix,
    validate_request,
)
from mofa_omni.media.audio import resample
from mofa_omni.models.fetching import Progress
from mofa_omni.models.store import link_or_copy

SAMPLE_RATE = 16_000
# Moonshine's own bounds for one call: under 0.1 s the encoder's strided convolutions leave
# (almost) nothing to attend to; it was trained on utterances, and upstream refuses more than
# 64 s (attention cost grows with the square of the length: split long audio, as the VAD does).
MIN_SECONDS = 0.1
MAX_SECONDS = 64.0
# Upstream's bound on the reply: 6 tokens per second of audio (fast speech is ~4), which also
# stops a decoder that loops on noise.
TOKENS_PER_SECOND = 6
START, END = 1, 2  # <s>, </s>; 0 is <unk>
ENGLISH = ("", "en", "english")
TOKENIZER = "tokenizer.bin"
GRAPHS = ("encoder_model", "decoder_model_merged")
DECODER_INPUTS = {"input_ids", "encoder_hidden_states", "use_cache_branch"}


class MoonshineOptions(AdapterOptions):
    """The Moonshine adapter's options (ort_moonshine)."""

    threads: Positive | None = None  # ONNX Runtime intra-op threads; unset: every core


class OrtMoonshineAdapter(ModelAdapter):
    """Moonshine (English speech to text) on ONNX Runtime's CPU provider."""

    supported_tasks: ClassVar[frozenset[Task]] = frozenset({Task.SPEECH_RECOGNITION})
    formats: ClassVar[frozenset[str]] = frozenset({"onnx"})
    backend: ClassVar[str] = "onnxruntime"
    requires: ClassVar[tuple[str, ...]] = ("onnxruntime",)
    # Measured on base-en loading and transcribing (benchmarks/footprints.py: peak 556 MiB over
    # 288 MiB of files): ONNX Runtime, the graph parsed at load, and the run's activations.
    runtime_bytes: ClassVar[int] = 270 << 20
    Options: ClassVar[type[AdapterOptions]] = MoonshineOptions
    options: MoonshineOptions

    def __init__(self, spec):
        super().__init__(spec)
        self._encoder: Any = None
        self._decoder: Any = None
        self._tokens: list[bytes] = []
        self._cache_shape: dict[str, tuple[int, int]] = {}  # past input -> (heads, head size)
        self._present: dict[str, str] = {}  # decoder output -> the past input it feeds

    # --- lifecycle -------------------------------------------------------------------

    def prepare(self, source_dir: Path, out_dir: Path, progress: Progress) -> None:
        if not (source_dir / TOKENIZER).is_file():
            raise ModelLoadError(f"model {self.spec.name!r}: {source_dir} has no {TOKENIZER}")
        for done, graph in enumerate(GRAPHS, 1):
            source = _graph_file(source_dir, graph, self.spec.name)
            if source.suffix == ".onnx":
                link_or_copy(source, out_dir / source.name)
            else:
                _ort_to_onnx(source, out_dir / f"{graph}.onnx", self.spec.name)
            progress("convert graphs", done, len(GRAPHS))
        link_or_copy(source_dir / TOKENIZER, out_dir / TOKENIZER)

    def _load(self, model_dir: Path) -> None:
        tokens = _read_tokens(model_dir / TOKENIZER, self.spec.name)  # first: it fails fast
        threads = self.options.threads or os.cpu_count() or 1
        # No memory arena: the encoder's attention over a long utterance needs hundreds of MiB
        # once; an arena would keep them (and the scheduler would count them) after the request.
        encoder, decoder = (cpu_session(model_dir / f"{graph}.onnx", threads,
                                        model_name=self.spec.name, memory_arena=False)
                            for graph in GRAPHS)
        self._check_graphs(encoder, decoder)
        self._tokens, self._encoder, self._decoder = tokens, encoder, decoder

    def _check_graphs(self, encoder, decoder) -> None:
        """Read the cache layout from the decoder's inputs; refuse graphs that are not Moonshine's."""
        encoder_inputs = [i.name for i in encoder.get_inputs()]
        inputs = {i.name: i for i in decoder.get_inputs()}
        outputs = [o.name for o in decoder.get_outputs()]
        past = [name for name in inputs if name.startswith("past_key_values.")]
        if (encoder_inputs != ["input_values"] or not DECODER_INPUTS <= set(inputs) or not past
                or outputs[:1] != ["logits"]):
            raise ModelLoadError(
                f"model {self.spec.name!r}: not Moonshine's encoder and merged decoder: expected "
                f"encoder input input_values and decoder inputs {', '.join(sorted(DECODER_INPUTS))}"
                f", past_key_values.* (logits first out); got encoder inputs "
                f"{', '.join(encoder_inputs)}, decoder inputs {', '.join(sorted(inputs)[:5])}"
                f"{', ...' if len(inputs) > 5 else ''}")
        self._cache_shape = {}
        for name in past:
            _, heads, _, size = inputs[name].shape  # (batch, heads, positions, head size)
            if not (isinstance(heads, int) and isinstance(size, int)):
                raise ModelLoadError(f"model {self.spec.name!r}: decoder input {name} has no "
                                     f"fixed head count and size: {inputs[name].shape}")
            self._cache_shape[name] = (heads, size)
        self._present = {o.name: o.name.replace("present.", "past_key_values.", 1)
                         for o in decoder.get_outputs() if o.name.startswith("present.")}
        if set(self._present.values()) != set(past):
            raise ModelLoadError(f"model {self.spec.name!r}: the decoder's present.* outputs "
                                 "do not match its past_key_values.* inputs")

    def _unload(self) -> None:
        self._encoder = self._decoder = None
        self._tokens = []

    # --- serving ---------------------------------------------------------------------

    @property
    def english_only(self) -> bool:
        return True

    def transcribe(self, request: TranscriptionRequest) -> Transcript:
        """Transcribe mono float32 audio at any sample rate (resampled to 16 kHz), 0.1 to 64 s
        long, in English (``language`` "" or "en"); one segment spans the whole audio."""
        validate_request(request)
        refuse_prefix(request, self.spec.name)
        if self._decoder is None:
            raise self.not_loaded()
        language = request.language.strip().lower()
        if language not in ENGLISH:
            raise ContractError(f"model {self.spec.name!r} is English-only; "
                                f"cannot transcribe {language!r}")
        seconds = request.audio.size / request.sample_rate
        if seconds < MIN_SECONDS:
            raise ContractError(f"audio is {seconds:.3f} s long; model {self.spec.name!r} "
                                f"needs at least {MIN_SECONDS} s")
        if seconds > MAX_SECONDS:
            raise ContractError(f"audio is {seconds:.1f} s long; model {self.spec.name!r} "
                                f"transcribes at most {MAX_SECONDS:g} s at once: split it "
                                "(the VAD node cuts speech into utterances)")
        audio = resample(request.audio, request.sample_rate, SAMPLE_RATE)
        tokens = self._generate(audio, max(1, math.ceil(seconds * TOKENS_PER_SECOND)))
        text = self._detokenize(tokens)
        return Transcript(text=text, language="en",
                          segments=[Segment(0.0, seconds, text)] if text else [])

    def _generate(self, audio: np.ndarray, max_tokens: int) -> list[int]:
        """Greedy decoding: the token ids after ``<s>``, without ``</s>``."""
        states = self._encoder.run(None, {"input_values": audio[None, :]})[0]
        # Empty caches on the first step: its branch computes the cross-attention keys/values.
        past = {name: np.zeros((1, heads, 0, size), np.float32)
                for name, (heads, size) in self._cache_shape.items()}
        names = [o.name for o in self._decoder.get_outputs()]
        tokens: list[int] = []
        previous = START
        for step in range(max_tokens):
            outputs = self._decoder.run(None, {
                "input_ids": np.array([[previous]], np.int64), "encoder_hidden_states": states,
                "use_cache_branch": np.array([step > 0]), **past})
            previous = int(outputs[0][0, -1].argmax())
            if previous == END:
                break
            tokens.append(previous)
            for name, value in zip(names[1:], outputs[1:]):
                # The cross-attention cache is computed once (step 0); the cached branch
                # passes it through unchanged, so only the self-attention cache is renewed.
                if step == 0 or ".decoder." in name:
                    past[self._present[name]] = value
        return tokens

    def _detokenize(self, tokens: list[int]) -> str:
        # Ids past the vocabulary (the graph's output is padded to 32768) and the specials are
        # not text; byte-fallback tokens are raw bytes, joined before decoding as UTF-8.
        pieces = b"".join(self._tokens[t] for t in tokens if END < t < len(self._tokens))
        return pieces.decode("utf-8", errors="replace").replace("\u2581", " ").strip()


def _graph_file(directory: Path, graph: str, model: str) -> Path:
    """``graph``'s file in ``directory``: ONNX Runtime's format first, else plain ONNX."""
    for suffix in (".ort", ".onnx"):
        if (path := directory / (graph + suffix)).is_file():
            return path
    raise ModelLoadError(f"model {model!r}: {directory} has no {graph}.ort or {graph}.onnx")


def _read_tokens(path: Path, model: str) -> list[bytes]:
    """The token strings of ``tokenizer.bin`` by id (one length byte, then the bytes)."""
    if not path.is_file():
        raise ModelLoadError(f"model {model!r}: {path} is missing")
    data = path.read_bytes()
    tokens, at = [], 0
    while at < len(data):
        length = data[at]
        if at + 1 + length > len(data):
            raise ModelLoadError(f"model {model!r}: {path} ends inside token {len(tokens)} "
                                 "(truncated or not a Moonshine tokenizer.bin)")
        tokens.append(data[at + 1:at + 1 + length])
        at += 1 + length
    if len(tokens) <= END:
        raise ModelLoadError(f"model {model!r}: {path} holds {len(tokens)} tokens: "
                             "not a Moonshine tokenizer.bin")
    return tokens


def _ort_to_onnx(source: Path, target: Path, model: str) -> None:
    """Rewrite an ONNX Runtime format graph (``.ort``) as a plain ONNX file, once.

    ONNX Runtime runs an ``.ort`` graph as it was saved, without optimizing it at load: here
    every int8 weight is then dequantized (Cast, Mul, Add) again on every decoder step: 58-98 ms
    a token on this CPU (base, 2 or 1 threads), against 9.5-14 ms once they are float32
    constants (4x the weights' memory). ONNX Runtime writes the graph back as ONNX (unoptimized: the graph as shipped);
    then its basic, semantics-preserving optimizations fold the dequantization into
    constants and it is written again, so that loading does not fold it each time (which
    peaked 170 MiB higher for base's decoder).
    """
    import onnx

    shipped = target.with_name(f"{target.stem}.shipped.onnx")
    _ort_rewrite(source, shipped, optimize=False, model=model)
    graph = _named(onnx.load(str(shipped)), source.stem)
    _hoist_weight_transposes(graph.graph)
    onnx.save(graph, str(shipped))
    _ort_rewrite(shipped, target, optimize=True, model=model)
    onnx.save(_named(onnx.load(str(target)), source.stem), str(target))
    shipped.unlink()


def _ort_rewrite(source: Path, target: Path, *, optimize: bool, model: str) -> None:
    """ONNX Runtime loads ``source`` and writes it to ``target`` as ONNX: as it is, or after
    its basic optimizations (constant folding, redundant nodes removed)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = (onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
                                        if optimize else
                                        onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.optimized_model_filepath = str(target)
    try:
        onnxruntime.InferenceSession(str(source), sess_options=options,
                                     providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's Fail / InvalidGraph / ...
        raise ModelLoadError(f"model {model!r}: cannot convert {source.name} to ONNX: "
                             f"{error}") from None


def _named(graph, name: str):
    """``graph`` with names on its graph and its If branches: ONNX requires them, and ONNX
    Runtime leaves them empty when it writes back a graph read from its own format."""
    import onnx

    graph.graph.name = graph.graph.name or name
    for node in graph.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH and not attribute.g.name:
                attribute.g.name = f"{node.name}_{attribute.name}"
    return graph


def _hoist_weight_transposes(graph) -> None:
    """Move Transposes of outer constants out of the If branches into the main graph, one per
    constant: folded inside each branch, the tied embedding's transpose (the logits' weights)
    was held twice, 54 MiB each for base."""
    import onnx

    outer = ({i.name for i in graph.initializer}
             | {out for node in graph.node if node.op_type != "If" for out in node.output})
    hoisted: dict[tuple, Any] = {}
    nodes = []  # the main graph's nodes, each hoisted Transpose just before its first user
    for node in graph.node:
        branches = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
        for branch in branches:
            inner = {out for n in branch.node for out in n.output} | {i.name for i in branch.input}
            returned = {out.name for out in branch.output}
            for transpose in [n for n in branch.node if n.op_type == "Transpose"
                              and n.input[0] in outer and n.input[0] not in inner
                              and n.output[0] not in returned]:
                key = (transpose.input[0], tuple(tuple(a.ints) for a in transpose.attribute))
                if key not in hoisted:
                    hoisted[key] = onnx.helper.make_node(
                        "Transpose", [transpose.input[0]], [f"{transpose.output[0]}_hoisted"])
                    hoisted[key].attribute.extend(transpose.attribute)
                    nodes.append(hoisted[key])
                shared = hoisted[key].output[0]
                for user in branch.node:
                    user.input[:] = [shared if name == transpose.output[0] else name
                                     for name in user.input]
                branch.node.remove(transpose)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
