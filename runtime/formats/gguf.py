"""GGUF -> a model directory that mlx-lm loads: config.json, model.safetensors, tokenizer files.

Two ways to carry the weights over, chosen by ``dtype``:

- ``"float32"`` (or ``"float16"``): every tensor is dequantized with the pure-numpy
  ``gguf`` package, which reads every GGUF type, K-quants included. On a CPU,
  float32 is the fastest for small models.
- ``"quantized"``: the GGUF's own quantization is kept as MLX affine-quantized
  weights. ``mx.load`` turns Q4_0/Q4_1/Q8_0 blocks into MLX (weight, scales,
  biases) triples. A file mixes bit widths (e.g. 8-bit token embeddings beside
  4-bit layers): the config's "quantization" section names the most common
  width and has an entry for every layer quantized otherwise.

The tokenizer is rebuilt from the GGUF metadata with transformers' GGUF
tokenizer builder (no torch), and the chat template is copied from it.
Supported architectures (see ``ARCHITECTURES``): ``llama`` (Mistral's and, with experts,
Mixtral's too), ``phi3``, ``gemma2``, ``gemma3``, ``qwen2``, ``qwen3``, ``qwen2moe`` and
``qwen3moe``.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mofa_omni.contract.errors import ModelLoadError
from mofa_omni.models.fetching import Progress

if TYPE_CHECKING:
    from mofa_omni.formats.gguf_file import GGUFFile

DTYPES = {"float32": np.float32, "float16": np.float16}
QUANTIZED = "quantized"
GROUP_SIZE = 32  # the block size of Q4_0, Q4_1 and Q8_0
_CHUNK_ELEMENTS = 1 << 22  # dequantize big tensors in row chunks to bound memory


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


# --- architectures ---------------------------------------------------------------------

_ATTENTION_MLP = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class Metadata:
    """Typed access to a GGUF file's key/value metadata."""

    def __init__(self, reader):
        self.reader = reader
        self.arch = str(self.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelLoadError(f"GGUF metadata lacks {key!r}")
        return value

    def arch_key(self, key: str, default: Any = None) -> Any:
        """``<architecture>.<key>``; required unless a default is given."""
        name = f"{self.arch}.{key}"
        return self.need(name) if default is None else self.get(name, default)

    def has_tensor(self, name: str) -> bool:
        return any(t.name == name for t in self.reader.tensors)


def _rope_scaling(meta: Metadata) -> dict | None:
    kind = meta.arch_key("rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(meta.arch_key("rope.scaling.factor"))}
    raise ModelLoadError(f"GGUF rope scaling {kind!r} is not supported")


def _common_config(meta: Metadata) -> dict:
    heads = int(meta.arch_key("attention.head_count"))
    hidden = int(meta.arch_key("embedding_length"))
    eos = [int(meta.need("tokenizer.ggml.eos_token_id"))]
    eot = meta.get("tokenizer.ggml.eot_token_id")  # chat models end turns with e.g. <end_of_turn>
    if eot is not None and int(eot) not in eos:
        eos.append(int(eot))
    return {
        "hidden_size": hidden,
        "num_hidden_layers": int(meta.arch_key("block_count")),
        "intermediate_size": int(meta.arch_key("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.arch_key("attention.head_count_kv", heads)),
        "head_dim": int(meta.arch_key("attention.key_length", hidden // heads)),
        # stored as float32: 1e-5 would otherwise read 9.999999747378752e-06
        "rms_norm_eps": float(f"{float(meta.arch_key('attention.layer_norm_rms_epsilon')):.7g}"),
        "max_position_embeddings": int(meta.arch_key("context_length")),
        "vocab_size": len(meta.need("tokenizer.ggml.tokens")),
        "rope_scaling": _rope_scaling(meta),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos if len(eos) > 1 else eos[0],
    }


def _llama_config(meta: Metadata) -> dict:
    config = {
        "model_type": "llama",
        **_common_config(meta),
        "rope_theta": float(meta.arch_key("rope.freq_base", 10000.0)),
        # llama.cpp permutes Q/K rows to the interleaved rotary layout; say so instead of undoing it
        "rope_traditional": True,
        "tie_word_embeddings": not meta.has_tensor("output.weight"),
        "attention_bias": meta.has_tensor("blk.0.attn_q.bias"),
        "mlp_bias": meta.has_tensor("blk.0.ffn_up.bias"),
    }
    if int(meta.arch_key("expert_count", 0)):  # llama.cpp's Mixtral: a Llama with experts
        config.update({
            "model_type": "mixtral",
            "num_local_experts": int(meta.arch_key("expert_count")),
            "num_experts_per_tok": int(meta.arch_key("expert_used_count")),
        })
    return config


def _phi3_config(meta: Metadata) -> dict:
    config = _common_config(meta)
    if meta.has_tensor("rope_factors_long.weight"):
        raise ModelLoadError("GGUF phi3 with LongRoPE factors (rope_factors_long) is not supported")
    rotary = int(meta.arch_key("rope.dimension_count", config["head_dim"]))
    return {
        "model_type": "phi3",
        **config,
        "rope_theta": float(meta.arch_key("rope.freq_base", 10000.0)),
        "partial_rotary_factor": rotary / config["head_dim"],
        "original_max_position_embeddings": config["max_position_embeddings"],
        "tie_word_embeddings": not meta.has_tensor("output.weight"),
    }


def _gemma_query_scalar(config: dict) -> int:
    # llama.cpp scales queries by 1/sqrt(head_dim), but by 1/sqrt(hidden/heads) for the 27B
    # models (Gemma 2's 46 layers, Gemma 3's 62), rather than storing the scalar in the file.
    big = config["num_hidden_layers"] == {"gemma2": 46, "gemma3_text": 62}[config["model_type"]]
    return config["hidden_size"] // config["num_attention_heads"] if big else config["head_dim"]


def _gemma2_config(meta: Metadata) -> dict:
    # mlx-lm's Gemma 2 attends globally in every layer: the same as llama.cpp's alternating
    # sliding window (attention.sliding_window, 4096 in Gemma 2) as long as the context is shorter.
    config = {"model_type": "gemma2", **_common_config(meta)}
    config.update({
        "rope_theta": float(meta.arch_key("rope.freq_base", 10000.0)),
        "attn_logit_softcapping": float(meta.arch_key("attn_logit_softcapping", 50.0)),
        "final_logit_softcapping": float(meta.arch_key("final_logit_softcapping", 30.0)),
        "query_pre_attn_scalar": _gemma_query_scalar(config),
    })
    return config


def _gemma3_config(meta: Metadata) -> dict:
    config = {"model_type": "gemma3_text", **_common_config(meta)}
    # Values llama.cpp hard-codes for gemma3 unless the file says otherwise.
    config.update({
        "rope_theta": float(meta.arch_key("rope.freq_base", 1_000_000.0)),
        "rope_local_base_freq": 10_000.0,
        "sliding_window": int(meta.arch_key("attention.sliding_window", 512)),
        "sliding_window_pattern": _sliding_window_period(meta, 6),
        "query_pre_attn_scalar": _gemma_query_scalar(config),
    })
    return config


def _sliding_window_period(meta: Metadata, default: int) -> int:
    """Every how many layers one attends globally: ``attention.sliding_window_pattern`` is that
    period, or one flag per layer (true: sliding window), which mlx-lm can only take periodic."""
    pattern = meta.arch_key("attention.sliding_window_pattern", default)
    if isinstance(pattern, int):
        return pattern
    flags = [bool(flag) for flag in pattern]
    period = flags.index(False) + 1 if False in flags else len(flags) + 1
    if flags != [(i + 1) % period != 0 for i in range(len(flags))]:
        raise ModelLoadError(f"GGUF sliding-window layers {flags} are not every {period}th global")
    return period


def _qwen2_config(meta: Metadata) -> dict:
    # llama.cpp rotates the halves of a Qwen head, as Hugging Face does: no permuted rows here
    return {
        "model_type": "qwen2",
        **_common_config(meta),
        "rope_theta": float(meta.arch_key("rope.freq_base", 1_000_000.0)),
        "tie_word_embeddings": not meta.has_tensor("output.weight"),
    }


def _qwen3_config(meta: Metadata) -> dict:
    return {**_qwen2_config(meta), "model_type": "qwen3"}


def _qwen2_moe_config(meta: Metadata) -> dict:
    config = {**_qwen2_config(meta), "model_type": "qwen2_moe"}
    config.update({  # every layer a mixture beside a shared expert; the chosen weights as routed
        "num_experts": int(meta.arch_key("expert_count")),
        "num_experts_per_tok": int(meta.arch_key("expert_used_count")),
        "moe_intermediate_size": int(meta.arch_key("expert_feed_forward_length")),
        "shared_expert_intermediate_size": int(
            meta.arch_key("expert_shared_feed_forward_length")),
    })
    return config


def _qwen3_moe_config(meta: Metadata) -> dict:
    config = {**_qwen3_config(meta), "model_type": "qwen3_moe"}
    config.update({  # every layer a mixture (llama.cpp's qwen3moe has no dense layers)
        "num_experts": int(meta.arch_key("expert_count")),
        "num_experts_per_tok": int(meta.arch_key("expert_used_count")),
        "moe_intermediate_size": int(meta.arch_key("expert_feed_forward_length")),
        "decoder_sparse_step": 1, "mlp_only_layers": [],
        "norm_topk_prob": True,  # llama.cpp renormalises the chosen experts' weights
    })
    return config


@dataclass(frozen=True, slots=True)
class Architecture:
    config: Callable[[Metadata], dict]
    layer_names: dict[str, str]  # GGUF block tensor -> mlx-lm module inside model.layers.N
    norm_shift: float = 0.0  # llama.cpp stores these RMSNorm weights as w + shift


_LLAMA_LAYER = {**_ATTENTION_MLP, "attn_norm": "input_layernorm",
                "ffn_norm": "post_attention_layernorm"}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_EXPERTS = {  # the router, and the experts stacked (expert, out, in) as mlx-lm's SwitchGLU
    "ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.switch_mlp.gate_proj",
    "ffn_up_exps": "mlp.switch_mlp.up_proj", "ffn_down_exps": "mlp.switch_mlp.down_proj"}

_MIXTRAL_EXPERTS = {  # llama.cpp's Mixtral: the same tensors, mlx-lm's Mixtral's module names
    part: "block_sparse_moe." + module.removeprefix("mlp.") for part, module in _EXPERTS.items()}
_SHARED_EXPERT = {
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}
_GEMMA_LAYER = {
    **_ATTENTION_MLP,
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
}

ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(_llama_config, {**_LLAMA_LAYER, **_MIXTRAL_EXPERTS}),
    # Phi-3 fuses Q/K/V into attn_qkv, and gate/up into ffn_up (gate rows first): as mlx-lm does
    "phi3": Architecture(_phi3_config, {
        **_LLAMA_LAYER, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}),
    # Gemma's RMSNorm multiplies by (1 + w): llama.cpp stores w + 1, mlx-lm adds the 1 itself
    "gemma2": Architecture(_gemma2_config, _GEMMA_LAYER, norm_shift=1.0),
    "gemma3": Architecture(_gemma3_config, {**_GEMMA_LAYER, **_QK_NORMS}, norm_shift=1.0),
    "qwen2": Architecture(_qwen2_config, _LLAMA_LAYER),
    "qwen3": Architecture(_qwen3_config, {**_LLAMA_LAYER, **_QK_NORMS}),
    "qwen2moe": Architecture(_qwen2_moe_config, {**_LLAMA_LAYER, **_EXPERTS, **_SHARED_EXPERT}),
    "qwen3moe": Architecture(_qwen3_moe_config, {**_LLAMA_LAYER, **_QK_NORMS, **_EXPERTS}),
}

_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def mlx_name(gguf_name: str, arch: Architecture) -> str:
    """The mlx-lm parameter name of a GGUF tensor (``blk.3.attn_q.weight`` -> ``model.layers.3...``)."""
    if match := _BLOCK_TENSOR.match(gguf_name):
        layer, part, kind = match.groups()
        if part in arch.layer_names:
            return f"model.layers.{layer}.{arch.layer_names[part]}.{kind}"
    else:
        base, _, kind = gguf_name.rpartition(".")
        if base in _GLOBAL_NAMES and kind in ("weight", "bias"):
            return f"{_GLOBAL_NAMES[base]}.{kind}"
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no counterpart in mlx-lm's model")


def _mlx_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape mlx-lm's module has: a GGUF may keep the one-output shared-expert gate as a
    vector where mlx-lm has a (1, hidden) Linear."""
    if name.endswith("shared_expert_gate.weight") and len(shape) == 1:
        return (1, *shape)
    return shape


# --- reading and checking --------------------------------------------------------------

# llama.cpp's gguf-split names the parts of a split model PREFIX-00001-of-00003.gguf ...; the
# first holds the metadata, each holds some of the tensors, and llama.cpp loads the first.
SPLIT_PART = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def gguf_parts(path: Path) -> list[Path]:
    """The files of the GGUF model ``path``: itself, or — for the first part of a split model
    — every part, in order; a part missing, or a later part given, is a ModelLoadError."""
    path = Path(path)
    match = SPLIT_PART.match(path.name)
    if match is None:
        return [path]
    if int(match["no"]) != 1:
        raise ModelLoadError(f"{path.name} is part {int(match['no'])} of a split GGUF model: "
                             f"name its first part, {split_part_name(match, 1)}")
    count = int(match["count"])
    parts = [path.with_name(split_part_name(match, number)) for number in range(1, count + 1)]
    missing = [part.name for part in parts if not part.is_file()]
    if missing:
        raise ModelLoadError(f"{path.name}: the split GGUF model lacks its part(s) "
                             f"{', '.join(missing)}")
    return parts


def split_part_name(match: re.Match, number: int) -> str:
    return f"{match['prefix']}-{number:05d}-of-{match['count']}.gguf"


def open_gguf_parts(path: Path) -> list:
    """A reader on each file of the GGUF model ``path`` (:func:`gguf_parts`), each checked
    whole, and the split's own count checked against the parts found."""
    readers = [open_gguf(part) for part in gguf_parts(path)]
    declared = Metadata(readers[0]).get("split.count")
    if declared is not None and int(declared) != len(readers):
        raise ModelLoadError(f"{Path(path).name} says the model is split in {declared} parts; "
                             f"{len(readers)} match its name")
    return readers


def open_gguf(path: Path) -> GGUFFile:
    """The metadata and tensor index of the GGUF file ``path``
    (:class:`~mofa_omni.formats.gguf_file.GGUFFile`), after checking that every tensor's data
    is in the file; ModelLoadError if it is not, or if the file is not a readable GGUF."""
    from mofa_omni.formats.gguf_file import GGUFFile

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    try:
        return GGUFFile(path)
    except Exception as error:  # ValueError for what does not fit; OSError, struct.error
        raise ModelLoadError(f"{path.name} is not a readable GGUF file (truncated or corrupt?): "
                             f"{type(error).__name__}: {error}") from error


def _architecture(meta: Metadata) -> Architecture:
    if meta.arch not in ARCHITECTURES:
        raise ModelLoadError(f"GGUF architecture {meta.arch!r} is not supported; "
                             f"supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[meta.arch]


def _check_finite(name: str, values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        raise ModelLoadError(f"GGUF tensor {name} contains NaN or infinite values (corrupt file?)")


# --- weights ---------------------------------------------------------------------------

@dataclass(slots=True)
class _Entry:
    """One tensor of the output file: its layout and a producer of its bytes, in row chunks."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[np.ndarray]]
    source_bytes: int  # bytes of GGUF data it comes from (for progress)


def _float_entries(readers: list, arch: Architecture, dtype: type) -> list[_Entry]:
    from gguf.quants import dequantize

    def producer(tensor, shift: float) -> Callable[[], Iterator[np.ndarray]]:
        def convert(data: np.ndarray) -> np.ndarray:
            values = dequantize(data, tensor.tensor_type).astype(np.float32, copy=False)
            _check_finite(tensor.name, values)
            return (values - np.float32(shift) if shift else values).astype(dtype, copy=False)

        def chunks() -> Iterator[np.ndarray]:
            data = tensor.data  # rows of the tensor, each row's blocks as raw bytes
            if data.ndim == 1:
                yield convert(data)
                return
            step = max(1, _CHUNK_ELEMENTS // (int(tensor.n_elements) // data.shape[0]))
            for start in range(0, data.shape[0], step):
                yield convert(data[start:start + step])
        return chunks

    entries = []
    for tensor in (t for reader in readers for t in reader.tensors):
        name = mlx_name(tensor.name, arch)
        shape = _mlx_shape(name, tuple(int(n) for n in reversed(tensor.shape)))
        shift = arch.norm_shift if tensor.name.endswith("norm.weight") else 0.0
        entries.append(_Entry(name, np.dtype(dtype), shape, producer(tensor, shift),
                              int(tensor.n_bytes)))
    return entries


_MLX_READABLE = {"F32", "F16", "Q4_0", "Q4_1", "Q8_0"}


def _quantized_entries(path: Path, readers: list, arch: Architecture
                       ) -> tuple[list[_Entry], dict]:
    """Entries keeping the file's quantization, and the config's "quantization" section."""
    import mlx.core as mx

    tensors = [t for reader in readers for t in reader.tensors]
    unreadable = sorted({t.tensor_type.name for t in tensors} - _MLX_READABLE)
    if unreadable:
        raise ModelLoadError(f"{path.name} uses {', '.join(unreadable)}, which cannot be kept "
                             f"quantized (only {', '.join(sorted(_MLX_READABLE))}); "
                             f'convert it with dtype="float32"')
    weights = {k: v for part in gguf_parts(path) for k, v in mx.load(str(part)).items()}
    entries, bits_of = [], {}

    def constant(array: np.ndarray) -> Callable[[], Iterator[np.ndarray]]:
        return lambda: iter([array])

    for tensor in tensors:
        name = mlx_name(tensor.name, arch)
        base = tensor.name.removesuffix(".weight")
        if f"{base}.scales" in weights:
            packed = np.array(weights[tensor.name])
            # float16 scales make quantized matmuls very slow on a CPU: keep them float32
            scales = np.array(weights[f"{base}.scales"].astype(mx.float32))
            biases = np.array(weights[f"{base}.biases"].astype(mx.float32))
            _check_finite(tensor.name, scales)
            _check_finite(tensor.name, biases)
            module = name.removesuffix(".weight")
            bits_of[module] = packed.shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)
            for suffix, array in (("weight", packed), ("scales", scales), ("biases", biases)):
                entries.append(_Entry(f"{module}.{suffix}", array.dtype, array.shape, constant(array),
                                      int(tensor.n_bytes) if suffix == "weight" else 0))
        else:
            values = np.array(weights[tensor.name].astype(mx.float32))
            _check_finite(tensor.name, values)
            if arch.norm_shift and tensor.name.endswith("norm.weight"):
                values = values - np.float32(arch.norm_shift)
            values = values.reshape(_mlx_shape(name, values.shape))
            entries.append(_Entry(name, values.dtype, values.shape, constant(values),
                                  int(tensor.n_bytes)))
    del weights
    if not bits_of:
        return entries, {}
    widths = list(bits_of.values())
    default = max(set(widths), key=widths.count)
    quantization = {"group_size": GROUP_SIZE, "bits": default, "mode": "affine"}
    quantization.update({module: {"group_size": GROUP_SIZE, "bits": bits}
                         for module, bits in bits_of.items() if bits != default})
    return entries, quantization


_SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                       np.dtype(np.uint32): "U32"}


def write_safetensors(path: Path, entries: Iterable[_Entry], progress: Progress, stage: str) -> None:
    """Write ``entries`` as one safetensors file, one chunk at a time (never all in memory)."""
    entries = list(entries)
    header, offset = {}, 0
    for entry in entries:
        size = int(np.prod(entry.shape, dtype=np.int64)) * entry.dtype.itemsize
        header[entry.name] = {"dtype": _SAFETENSORS_DTYPES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    total = sum(entry.source_bytes for entry in entries)
    done = 0
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for entry in entries:
            begin, end = header[entry.name]["data_offsets"]
            written = 0
            for chunk in entry.chunks():
                data = np.ascontiguousarray(chunk, dtype=entry.dtype)
                f.write(memoryview(data).cast("B"))
                written += data.nbytes
            if written != end - begin:
                raise ModelLoadError(f"tensor {entry.name}: wrote {written} bytes, "
                                     f"expected {end - begin}")
            done += entry.source_bytes
            progress(stage, done, total)


# --- tokenizer -------------------------------------------------------------------------

def tokenizer_files(meta: Metadata) -> tuple[Any, dict]:
    """The ``tokenizers.Tokenizer`` the metadata describes, and its tokenizer_config.json."""
    from tokenizers import processors
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    described = {name: meta.get(f"tokenizer.{key}")
                 for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()}
    described = {name: value for name, value in described.items() if value is not None}
    try:
        tokenizer, _ = convert_gguf_tokenizer(meta.arch, described)
    except (ValueError, KeyError) as error:
        raise ModelLoadError(f"cannot rebuild the tokenizer from the GGUF metadata: {error}") from error
    tokens = described["tokens"]
    special = {name: tokens[int(described[key])]
               for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                                 ("unk_token", "unk_token_id"), ("pad_token", "pad_token_id"))
               if described.get(key) is not None}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if add_bos and "bos_token" in special:
        bos = special["bos_token"]
        bos_id = int(described["bos_token_id"])
        # Baked into tokenizer.json so that every loader adds it, not only the ones reading the flag.
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": add_bos,
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.arch_key("context_length")),
    }
    if (template := meta.get("tokenizer.chat_template")) is not None:
        config["chat_template"] = template
    return tokenizer, config


# --- the conversion --------------------------------------------------------------------

def convert_gguf(gguf_path: Path, out_dir: Path, *, dtype: str = "float32",
                 progress: Progress = _no_progress) -> dict:
    """Convert ``gguf_path`` into an mlx-lm model directory ``out_dir``; returns the config.

    ``dtype`` is ``"float32"``/``"float16"`` (dequantize everything) or
    ``"quantized"`` (keep Q4_0/Q4_1/Q8_0 as MLX quantized weights). ``progress``
    is called with GGUF bytes converted so far. Raises ModelLoadError for an
    unsupported architecture or dtype and for a truncated or corrupt file.
    """
    if dtype != QUANTIZED and dtype not in DTYPES:
        raise ModelLoadError(f"unknown GGUF conversion dtype {dtype!r}; "
                             f"use one of {', '.join([*DTYPES, QUANTIZED])}")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    readers = open_gguf_parts(gguf_path)  # a split model: the metadata is in the first part
    meta = Metadata(readers[0])
    arch = _architecture(meta)
    config = arch.config(meta)
    if dtype == QUANTIZED:
        entries, quantization = _quantized_entries(gguf_path, readers, arch)
        if quantization:
            config["quantization"] = quantization
    else:
        entries = _float_entries(readers, arch, DTYPES[dtype])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(out_dir / "model.safetensors", entries, progress, f"convert {gguf_path.name}")
    _write_description(meta, config, out_dir, "config.json")
    return config


def write_description(gguf_path: Path, out_dir: Path, config_name: str = "config.json") -> dict:
    """Write the tokenizer (tokenizer.json, tokenizer_config.json) and the model config the
    GGUF's metadata describes into ``out_dir``, reading no weights (for an engine that runs
    the GGUF as it is); returns the config."""
    meta = Metadata(open_gguf(gguf_path))
    config = _architecture(meta).config(meta)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    _write_description(meta, config, Path(out_dir), config_name)
    return config


def _write_description(meta: Metadata, config: dict, out_dir: Path, config_name: str) -> None:
    tokenizer, tokenizer_config = tokenizer_files(meta)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    (out_dir / config_name).write_text(json.dumps(config, indent=1))


def find_gguf(source_dir: Path, model: str, pattern: str | None = None) -> Path:
    """The one GGUF file of ``model`` in ``source_dir`` (``pattern``: its ``options.file``);
    a split model is its first part (the others go with it: :func:`gguf_parts`)."""
    ggufs = sorted(path for path in Path(source_dir).glob(pattern or "*.gguf")
                   if not ((match := SPLIT_PART.match(path.name)) and int(match["no"]) > 1))
    if len(ggufs) != 1:
        raise ModelLoadError(f"model {model!r}: expected one .gguf file in {source_dir}, "
                             f"found {[p.name for p in ggufs]} (name one with options.file)")
    return ggufs[0]
