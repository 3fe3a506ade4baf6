"""Text generation on CTranslate2, from the catalog's GGUF weights (Llama, Mistral, Qwen2,
Qwen3 and Phi-3 models: :data:`ARCHITECTURES`).

``prepare`` dequantizes the GGUF (the same reader the MLX path uses), maps the
weights onto a CTranslate2 decoder spec and saves it quantized — no torch
needed. Tokenizer, chat template and streaming detokenization are mlx-lm's, so
both backends build the same prompt and stream the same way. On this 2-core
CPU SmolLM2-135M runs ~65 tok/s in int8 and ~30 tok/s in float32, against ~9
tok/s for MLX float32.

``options.compute_type`` (:class:`~mofa_omni.adapters.options.ChatLmOptions`): ``int8``
(default), ``float32``, or ``int8_float16`` / ``float16`` on CUDA. With ``options.parallel``
above 1 (default 4) the requests waiting when a batch starts decode together in static batches
(:mod:`mofa_omni.adapters.ct2_batches`: CTranslate2 has no continuous batching);
``parallel = 1`` serves one request at a time. In int8 a greedy reply decoded beside prompts
of other lengths may part from its lone one where two tokens nearly tie (the batch's
activations are quantized together); ``options.deterministic`` computes in float32, where it
does not.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mofa_omni.adapters.chat import Piece, detokenized_pieces
from mofa_omni.adapters.chat_lm import ChatLmAdapter
from mofa_omni.adapters.ct2_batches import Ct2Batches, Sampling
from mofa_omni.contract.errors import ModelLoadError
from mofa_omni.contract.tasks import ChatRequest, Task
from mofa_omni.models.fetching import Progress

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
MODEL_CONFIG = "model_config.json"  # the model's own config (CTranslate2 writes config.json)


class Ct2LmAdapter(ChatLmAdapter):
    """Chat models of :data:`ARCHITECTURES` (SmolLM2, Llama, Mistral, Qwen2/3, Phi-3)
    on CTranslate2."""

    formats: ClassVar[frozenset[str]] = frozenset({"gguf"})
    backend: ClassVar[str] = "ctranslate2"
    runtime_bytes: ClassVar[int] = 148 << 20  # measured on SmolLM2-135M, int8, answering
    requires: ClassVar[tuple[str, ...]] = ("ctranslate2", "mlx_lm")

    def __init__(self, spec):
        super().__init__(spec)
        self._generator: Any = None
        self._batches: Ct2Batches | None = None

    # --- lifecycle -------------------------------------------------------------------

    def prepare(self, source_dir: Path, out_dir: Path, progress: Progress) -> None:
        from mofa_omni.formats.gguf import convert_gguf, find_gguf

        gguf = find_gguf(source_dir, self.spec.name, self.options.file)
        with tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch:
            config = convert_gguf(gguf, Path(scratch), dtype="float32", progress=progress)
            progress("build CTranslate2 model", 0, 1)
            spec = _decoder_spec(Path(scratch), config)
            spec.optimize(quantization=self.options.compute_type)
            spec.save(str(out_dir))
            for name in TOKENIZER_FILES:
                shutil.copy(Path(scratch) / name, out_dir / name)
            shutil.copy(Path(scratch) / "config.json", out_dir / MODEL_CONFIG)
            progress("build CTranslate2 model", 1, 1)

    def _load(self, model_dir: Path) -> None:
        import ctranslate2
        from mlx_lm.utils import load_tokenizer

        device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        try:
            self._generator = ctranslate2.Generator(
                str(model_dir), device=device,
                compute_type="float32" if self.options.deterministic else self.options.compute_type,
                intra_threads=os.cpu_count() or 1)
        except (RuntimeError, ValueError) as error:
            raise ModelLoadError(f"model {self.spec.name!r}: CTranslate2 cannot load "
                                 f"{model_dir}: {error}") from error
        config = json.loads((model_dir / MODEL_CONFIG).read_text())
        self._tokenizer = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))
        if self.options.parallel > 1:
            self._batches = Ct2Batches(self._generator, self._end_token(),
                                       parallel=self.options.parallel, model_name=self.spec.name)

    def _unload(self) -> None:
        batches, self._batches = self._batches, None
        if batches is not None:
            batches.close()
        self._generator = self._tokenizer = None

    # --- serving ---------------------------------------------------------------------

    def parallel_requests(self, task: Task) -> int:
        return self.options.parallel

    def _end_token(self) -> list[str]:
        return self._tokenizer.convert_ids_to_tokens(sorted(self._tokenizer.eos_token_ids))

    def pieces(self, request: ChatRequest, prompt: list[int]) -> Generator[Piece, None, None]:
        tokenizer = self._tokenizer
        sampling = Sampling() if request.temperature <= 0 else \
            Sampling(0, request.temperature, request.top_p)
        tokens = tokenizer.convert_ids_to_tokens(prompt)
        if self._batches is not None:
            return detokenized_pieces(self._batches.tokens(tokens, sampling, request.max_tokens),
                                      tokenizer)
        steps = self._generator.generate_tokens(tokens, max_length=request.max_tokens,
                                                end_token=self._end_token(), **sampling.options())
        return detokenized_pieces((step.token_id for step in _closing(steps)), tokenizer)

    def next_log_probs(self, prompts: list[list[int]]) -> np.ndarray:
        log_probs = np.asarray(self._generator.forward_batch(prompts, return_log_probs=True))
        return np.stack([log_probs[i, len(p) - 1] for i, p in enumerate(prompts)])

    def sequence_log_probs(self, sequences: list[list[int]]) -> list[np.ndarray]:
        scored = self._generator.score_batch(
            [self._tokenizer.convert_ids_to_tokens(s) for s in sequences])
        return [np.asarray(result.log_probs, np.float32) for result in scored]


def _closing(steps):
    """The engine's steps, closed when the reader stops early (stops CTranslate2's decoding)."""
    try:
        yield from steps
    finally:
        steps.close()


# The mlx-lm architectures (``model_type`` of the GGUF converted to MLX) whose weights map onto
# CTranslate2's TransformerDecoderSpec as its own Transformers converters map them. Not here:
# Gemma 2 (CTranslate2 has no attention or final-logit soft-capping), Gemma 3 (CTranslate2 4.8
# computes it exactly only within its sliding window: ``forward_batch`` refuses a longer prompt
# and generation drifts from Hugging Face's past it) and the mixtures of experts (CTranslate2 has
# no mixture-of-experts decoder).
ARCHITECTURES = frozenset({"llama", "qwen2", "qwen3", "phi3"})


def _decoder_spec(model_dir: Path, config: dict):
    """A CTranslate2 decoder spec with the weights of an mlx-lm model directory of one of
    :data:`ARCHITECTURES`, laid out as CTranslate2's own converter for it lays them out."""
    from ctranslate2.specs import attention_spec, common_spec, transformer_spec
    from safetensors.numpy import load_file

    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES or config.get("mlp_bias"):
        raise ModelLoadError(f"CTranslate2 serves {', '.join(sorted(ARCHITECTURES))} models here, "
                             f"not {model_type!r}")
    weights = load_file(str(model_dir / "model.safetensors"))
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rotary = round(head_dim * config.get("partial_rotary_factor", 1.0))  # Phi-3 may rotate part
    scaling: dict[str, Any] = {}
    if rope_scaling := config.get("rope_scaling"):
        if rope_scaling.get("type", rope_scaling.get("rope_type")) != "linear":
            raise ModelLoadError(f"CTranslate2: RoPE scaling {rope_scaling} is not supported here")
        scaling = {"rotary_scaling_type": attention_spec.RotaryScalingType.Linear,
                   "rotary_scaling_factor": float(rope_scaling["factor"])}
    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        config["num_hidden_layers"], heads, activation=common_spec.Activation.SWISH,
        pre_norm=True, ffn_glu=True, rms_norm=True,
        rotary_dim=0 if rotary == head_dim else rotary,  # 0: every dimension
        # GGUF keeps a Llama's Q/K rows in the order of llama.cpp's interleaved rotary
        rotary_interleave=bool(config.get("rope_traditional", False)),
        rotary_base=config.get("rope_theta", 10000.0), **scaling,
        num_heads_kv=config.get("num_key_value_heads", heads), head_dim=head_dim,
        qk_norm=any(name.endswith("self_attn.q_norm.weight") for name in weights))
    decoder = spec.decoder
    decoder.scale_embeddings = False  # Llama does not scale embeddings by sqrt(d_model)

    def weight(name: str) -> np.ndarray:
        return np.ascontiguousarray(weights[name].astype(np.float32))

    decoder.embeddings.weight = weight("model.embed_tokens.weight")
    decoder.layer_norm.gamma = weight("model.norm.weight")
    decoder.projection.weight = (weight("lm_head.weight") if "lm_head.weight" in weights
                                 else decoder.embeddings.weight)
    for index, layer in enumerate(decoder.layer):
        prefix = f"model.layers.{index}."
        attention, ffn = layer.self_attention, layer.ffn
        attention.layer_norm.gamma = weight(prefix + "input_layernorm.weight")
        ffn.layer_norm.gamma = weight(prefix + "post_attention_layernorm.weight")
        if prefix + "self_attn.q_norm.weight" in weights:  # Qwen3's per-head Q/K norms
            attention.q_norm.gamma = weight(prefix + "self_attn.q_norm.weight")
            attention.k_norm.gamma = weight(prefix + "self_attn.k_norm.weight")
        if prefix + "self_attn.qkv_proj.weight" in weights:  # Phi-3's fused projection
            attention.linear[0].weight = weight(prefix + "self_attn.qkv_proj.weight")
        else:
            attention.linear[0].weight = np.concatenate(
                [weight(prefix + f"self_attn.{p}_proj.weight") for p in "qkv"])
        if prefix + "self_attn.q_proj.bias" in weights:  # Qwen2's Q/K/V biases
            attention.linear[0].bias = np.concatenate(
                [weight(prefix + f"self_attn.{p}_proj.bias") for p in "qkv"])
        attention.linear[1].weight = weight(prefix + "self_attn.o_proj.weight")
        if prefix + "mlp.gate_up_proj.weight" in weights:  # Phi-3's, gate rows first
            ffn.linear_0.weight, ffn.linear_0_noact.weight = np.split(
                weight(prefix + "mlp.gate_up_proj.weight"), 2)
        else:
            ffn.linear_0.weight = weight(prefix + "mlp.gate_proj.weight")
            ffn.linear_0_noact.weight = weight(prefix + "mlp.up_proj.weight")
        ffn.linear_1.weight = weight(prefix + "mlp.down_proj.weight")
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocabulary = _vocabulary(tokenizer, config["vocab_size"])
    spec.register_vocabulary(vocabulary)
    bos = config.get("bos_token_id")
    spec.config.bos_token = vocabulary[1 if bos is None else bos]
    eos = config.get("eos_token_id", 2)
    spec.config.eos_token = vocabulary[eos[0] if isinstance(eos, list) else eos]
    spec.config.unk_token = vocabulary[0]
    spec.config.layer_norm_epsilon = config["rms_norm_eps"]
    spec.validate()
    return spec


def _vocabulary(tokenizer: dict, size: int) -> list[str]:
    """Token strings by id (CTranslate2 wants one per id; the ids are what matter)."""
    tokens = [f"<unused_{i}>" for i in range(size)]
    for text, index in tokenizer["model"]["vocab"].items():
        if index < size:
            tokens[index] = text
    for added in tokenizer.get("added_tokens", []):
        if added["id"] < size:
            tokens[added["id"]] = added["content"]
    return tokens
