"""Typed catalog options: what an adapter accepts in a catalog entry's ``options`` table.

Each adapter declares the options it takes as a frozen :class:`AdapterOptions` struct with
defaults (``Options`` on the adapter class; the base takes none). The adapter decodes the
entry's table into it when it is made (``self.options``), and
:func:`mofa_omni.adapters.base.check_options` checks the table against every adapter a model
lists when the model is resolved or listed. A key the struct does not know, or a value of
another type, is a :class:`~mofa_omni.models.catalog.CatalogError` naming the model, the
option and what is accepted: a misspelt option is never silently ignored.

A catalog entry may list several adapters for one model (``adapter = ["mlx_lm", "llama_cpp",
"ct2_lm"]``), and every one of them must accept its options: adapters that serve the same
models share one struct here, whose fields say which adapter reads them ("used by ...").
TOML has no null: a field whose default is None is one the entry leaves unset.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec

from mofa_omni.models.catalog import CatalogError


class AdapterOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """No options at all: the base of every adapter's options (subclasses inherit its
    strictness: frozen, keyword-only, unknown keys refused)."""


Positive = Annotated[int, msgspec.Meta(ge=1)]
# CTranslate2's quantizations: what a model is saved in (ct2_lm) and computed in at load.
Ct2ComputeType = Literal["int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16",
                         "float16", "bfloat16", "float32"]


class ChatLmOptions(AdapterOptions):
    """The chat-LM adapters' options (mlx_lm, llama_cpp, ct2_lm: one GGUF entry lists several)."""

    file: str | None = None  # a glob naming the GGUF among the source's files; unset: the only one
    rerank: str = "query_likelihood"  # how it reranks: one of mofa_omni.adapters.llm_rerank.METHODS
    # used by mlx_lm: how a GGUF is converted (mofa_omni.formats.gguf), and MLX quantization at load
    dtype: Literal["float32", "float16", "quantized"] = "float32"
    bits: Positive | None = None  # unset: the weights as converted
    group_size: Positive = 64  # with ``bits``
    compute_type: Ct2ComputeType = "int8"  # used by ct2_lm
    # used by llama_cpp: tokens, the prompt and the reply together; by mlx_lm: the longest
    # sequence whose KV cache a request decoded beside others reserves (see sequence_bytes)
    context: Positive = 4096
    # used by llama_cpp (sharing the context's tokens) and mlx_lm (mlx-lm's batch generator, each
    # sequence's KV cache growing as it decodes): requests decoded together; 1: one at a time
    parallel: Positive = 4
    # a greedy reply the same whatever is decoded beside it: llama_cpp turns flash attention off
    # and keeps a float32 KV cache (~10 % slower per token, twice the KV cache; see
    # llama_engine); ct2_lm computes in float32 instead of compute_type (int8 quantizes the
    # activations of a batch whose prompts differ in length otherwise; ~2x slower on a CPU)
    deterministic: bool = False
    threads: Positive | None = None  # used by llama_cpp; unset: every core


class WhisperOptions(AdapterOptions):
    """The whisper adapters' options (mlx_whisper, ct2_whisper: one entry lists both)."""

    # used by ct2_whisper (int8: fastest on a CPU, same transcripts here); mlx_whisper computes
    # in float16 on a GPU and float32 on a CPU
    compute_type: Ct2ComputeType = "int8"
    # used by ct2_whisper: 30 s windows decoded in one engine call, across requests and within a
    # long one; unset: 1 on a CPU (measured on 2 cores: 8 windows together were 7 % slower and
    # held 90 MiB more per window), 8 on a GPU
    windows_per_call: Positive | None = None


class BertOptions(AdapterOptions):
    """The BERT sentence-embedding adapters' options (mlx_bert, ort_bert: one entry lists both).

    ``pooling``, ``normalize`` and the prefixes override what the checkpoint's
    sentence-transformers files say (:mod:`mofa_omni.formats.sentence_transformers`): E5 as
    published has no prompts in its files, so its entry sets ``query_prefix = "query: "`` and
    ``document_prefix = "passage: "``.
    """

    max_length: Positive | None = None  # tokens per text; unset: where tokenizer.json truncates
    batch_size: Positive = 32  # texts per forward pass
    threads: Positive | None = None  # used by ort_bert (ONNX Runtime intra-op); unset: every core
    # unset: 1_Pooling/config.json's mode, else mean ("cls": BGE; "lasttoken": decoder embedders)
    pooling: Literal["cls", "mean", "max", "mean_sqrt_len", "lasttoken"] | None = None
    normalize: bool | None = None  # unit vectors; unset: whether modules.json has Normalize, else yes
    query_prefix: str | None = None  # put before texts embedded as queries; unset: prompts["query"]
    document_prefix: str | None = None  # before documents; unset: prompts["document"/"passage"]


class CrossEncoderOptions(AdapterOptions):
    """The cross-encoder reranker's options (ort_cross_encoder)."""

    max_length: Positive | None = None  # tokens per (query, document) pair; unset: the encoder's
    batch_size: Positive = 16  # pairs per forward pass
    threads: Positive | None = None  # ONNX Runtime intra-op threads; unset: every core
    # "sigmoid": scores in (0, 1), sentence-transformers' CrossEncoder and Cohere's/Jina's
    # relevance_score; "logits": the raw logit, as FlagEmbedding's BGE-Reranker compute_score
    # gives it by default. The order is the same.
    scores: Literal["sigmoid", "logits"] = "sigmoid"


def decode_options(options_type: type[AdapterOptions], raw: Mapping[str, Any], *, model: str,
                   adapter: str) -> AdapterOptions:
    """``raw`` (a catalog entry's ``options`` table) decoded as ``options_type``, the options of
    ``adapter``; CatalogError naming ``model``, the option and what is accepted when a key is
    unknown or a value is not of its option's type."""
    fields = {field.name: field for field in msgspec.structs.fields(options_type)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise CatalogError(f"model {model!r}: option {key!r} is not an option of {adapter}"
                               f"{hint} ({accepted(options_type)})")
    for key, value in raw.items():  # one at a time: the error names the option at fault
        try:
            msgspec.convert(value, fields[key].type)  # strict: "8" is not 8, true is not 1
        except msgspec.ValidationError:
            raise CatalogError(f"model {model!r}: option {key} = {value!r} is not "
                               f"{_expected(fields[key].type)} ({adapter})") from None
    try:
        return msgspec.convert(dict(raw), options_type)
    except msgspec.ValidationError as error:  # a check across options (a __post_init__)
        raise CatalogError(f"model {model!r}: options of {adapter}: {error}") from None


def accepted(options_type: type[AdapterOptions]) -> str:
    """``accepted: context: int >= 1, file: str, ...``, or that there are none."""
    fields = msgspec.structs.fields(options_type)
    if not fields:
        return "it takes no options"
    return "accepted: " + ", ".join(f"{field.name}: {type_name(field.type)}" for field in fields)


def type_name(annotation: Any) -> str:
    """An option's type as a catalog writer reads it: ``int >= 1``, ``'int8' | 'float32'``,
    ``float in [0.0, 2.0]`` (None, "unset", is left out: TOML cannot write it)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *metadata = get_args(annotation)
        return type_name(base) + "".join(_bounds(meta) for meta in metadata
                                         if isinstance(meta, msgspec.Meta))
    if origin is Literal:
        return " | ".join(repr(value) for value in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in get_args(annotation) if arg is not type(None))
    return getattr(annotation, "__name__", str(annotation))


def _expected(annotation: Any) -> str:
    name = type_name(annotation)
    if "'" in name:  # literals
        return "one of " + name.replace(" | ", ", ")
    return ("an " if name[0] in "aeiou" else "a ") + name


def _bounds(meta: msgspec.Meta) -> str:
    if meta.ge is not None and meta.le is not None:
        return f" in [{meta.ge}, {meta.le}]"
    signs = ((">=", meta.ge), (">", meta.gt), ("<=", meta.le), ("<", meta.lt))
    limits = [f"{sign} {value}" for sign, value in signs if value is not None]
    return " " + " and ".join(limits) if limits else ""
