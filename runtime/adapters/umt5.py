"""UMT5's encoder on MLX: the text encoder of Wan 2.x, without torch.

This is Hugging Face's ``UMT5EncoderModel`` (as ``google/umt5-xxl`` and the ``text_encoder/``
folder of ``Wan-AI/Wan2.2-TI2V-5B-Diffusers`` ship it), written out in one file. The weights keep
their Hugging Face names, so a checkpoint loads as it is and :meth:`UMT5Encoder.save` writes one
that ``transformers`` reads back.

UMT5 is T5 v1.1's encoder with one change and a few T5 habits worth spelling out:

- every layer has its *own* relative-position bias table (T5 keeps one, in layer 0, and shares
  it);
- the attention scores are ``q . k`` with no ``1/sqrt(d)`` scaling (T5's initialisation folds
  it into the weights);
- the layer norm is T5's RMS norm: no mean subtraction, no bias;
- relative positions are bucketed both ways (an encoder sees the past and the future): half the
  buckets for keys after the query, half for keys before, each half exact for short distances
  and logarithmic up to ``relative_attention_max_distance``;
- padding is masked by adding a large negative number to its scores;
- the feed-forward is gated-GELU (GELU with the tanh approximation, HF's ``gelu_new``).

The weights stay in the dtype the checkpoint stores (bfloat16 for Wan's UMT5-XXL, ~11 GB), and
the hidden states are float32 throughout: MLX promotes ``float32 @ bfloat16`` to float32, so
each product runs in float32 on the stored weights, with no float32 copy of the model kept.
(The torch pipeline mlx-gen uses runs the encoder in bfloat16; float32 here is the more exact
of the two, and the embeddings handed to the transformer are cast to bfloat16 either way.)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mofa_omni.contract.errors import ModelLoadError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The embedding table's name in UMT5EncoderModel, and the tied copy some checkpoints store.
EMBEDDING_NAMES = ("shared.weight", "encoder.embed_tokens.weight")


@dataclass(frozen=True)
class UMT5Config:
    """The sizes of a UMT5 encoder, under the names of Hugging Face's ``config.json``."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self) -> None:
        if self.feed_forward_proj != "gated-gelu":
            raise ModelLoadError(
                f"UMT5 feed_forward_proj {self.feed_forward_proj!r} is not supported: this encoder "
                "implements 'gated-gelu' (the one UMT5 and Wan use)")

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> UMT5Config:
        """The config of a Hugging Face ``config.json`` (its other keys are ignored)."""
        names = cls.__dataclass_fields__
        missing = [name for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers",
                                     "num_heads") if name not in config]
        if missing:
            raise ModelLoadError(f"the UMT5 config lacks {', '.join(missing)}")
        return cls(**{key: value for key, value in config.items() if key in names})

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` for ``UMT5EncoderModel`` with these sizes."""
        return {
            "architectures": ["UMT5EncoderModel"], "model_type": "umt5", **asdict(self),
            "dense_act_fn": "gelu_new", "is_gated_act": True, "num_decoder_layers": self.num_layers,
            "dropout_rate": 0.1, "initializer_factor": 1.0, "is_encoder_decoder": True,
            "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
            "tie_word_embeddings": False, "use_cache": True,
        }


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """The bucket of each (query, key) pair of a ``length``-token sequence, both directions:
    int ``[length, length]``.

    Keys after the query take the upper half of the buckets. Within a half, distances below
    ``max_exact`` (a quarter of all buckets) have a bucket each; longer ones share buckets
    spaced logarithmically up to ``max_distance``, past which all fall in the last bucket. The
    logarithm is taken in float32 as torch takes it, so the rounding at bucket edges agrees."""
    position = np.arange(length)
    relative = position[None, :] - position[:, None]  # key - query
    half = num_buckets // 2
    buckets = np.where(relative > 0, half, 0)
    distance = np.abs(relative)
    max_exact = half // 2
    # (distance 0 would be log(0); the short distances do not use this value anyway)
    ratio = np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact)
    scaled = (np.log(ratio) / np.float32(math.log(max_distance / max_exact))
              * np.float32(half - max_exact))
    far = np.minimum(max_exact + scaled.astype(np.int64, copy=False), half - 1)
    return buckets + np.where(distance < max_exact, distance, far)


class RMSNorm(nn.Module):
    """T5's layer norm: scale by the root mean square, no mean subtraction, no bias."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        variance = mx.mean(mx.square(x), axis=-1, keepdims=True)
        return self.weight * (x * mx.rsqrt(variance + self.eps))


class SelfAttention(nn.Module):
    """Multi-head self-attention with the layer's own relative-position bias."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads = config.num_heads
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets,
                                                    config.num_heads)

    def __call__(self, x: mx.array, padding: mx.array, buckets: mx.array) -> mx.array:
        batch, length, _ = x.shape

        def heads(projection: mx.array) -> mx.array:  # [B, L, H*D] -> [B, H, L, D]
            return projection.reshape(batch, length, self.num_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        # [L, L, H] -> [1, H, L, L]; the table may be bfloat16, the scores are float32
        position_bias = self.relative_attention_bias(buckets).transpose(2, 0, 1)[None]
        scores = q @ k.transpose(0, 1, 3, 2)  # no 1/sqrt(d): UMT5 does not scale
        scores = scores + position_bias.astype(mx.float32) + padding
        weights = mx.softmax(scores, axis=-1)
        out = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
        return self.o(out)


class GatedGelu(nn.Module):
    """T5 v1.1's feed-forward: ``wo(gelu(wi_0 x) * wi_1 x)``, GELU with the tanh approximation."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate = self.wi_0(x)
        gelu = 0.5 * gate * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi)
                                           * (gate + 0.044715 * gate ** 3)))
        return self.wo(gelu * self.wi_1(x))


class AttentionLayer(nn.Module):
    """``layer.0`` of a block: pre-norm self-attention with a residual."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.SelfAttention = SelfAttention(config)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array, padding: mx.array, buckets: mx.array) -> mx.array:
        return x + self.SelfAttention(self.layer_norm(x), padding, buckets)


class FeedForwardLayer(nn.Module):
    """``layer.1`` of a block: pre-norm gated-GELU feed-forward with a residual."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.DenseReluDense = GatedGelu(config)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.DenseReluDense(self.layer_norm(x))


class Block(nn.Module):
    def __init__(self, config: UMT5Config):
        super().__init__()
        self.layer = [AttentionLayer(config), FeedForwardLayer(config)]

    def __call__(self, x: mx.array, padding: mx.array, buckets: mx.array) -> mx.array:
        return self.layer[1](self.layer[0](x, padding, buckets))


class Stack(nn.Module):
    """``encoder``: the blocks and the final norm."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.block = [Block(config) for _ in range(config.num_layers)]
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)


class UMT5Encoder(nn.Module):
    """UMT5's encoder. Its parameter names are the Hugging Face tensor names
    (``shared.weight``, ``encoder.block.{i}.layer.0.SelfAttention.q.weight``, ...)."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config)

    # --- files ------------------------------------------------------------------------

    @classmethod
    def from_directory(cls, directory: Path | str) -> UMT5Encoder:
        """The encoder of a Hugging Face checkpoint folder: ``config.json`` and one
        ``model.safetensors`` or shards listed by ``model.safetensors.index.json``. The weights
        keep their stored dtype and are read lazily (``mx.eval`` the parameters to load them)."""
        directory = Path(directory)
        try:
            config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"{directory}/config.json is unreadable: {error}") from None
        encoder = cls(UMT5Config.from_hf(config))
        encoder.load_tensors(_read_tensors(directory), source=str(directory))
        return encoder

    def load_tensors(self, tensors: dict[str, mx.array], *, source: str = "the weights") -> None:
        """Take every parameter from ``tensors`` (Hugging Face names); refuse, naming them, a
        missing or mis-shaped tensor. Tensors the encoder does not use are ignored."""
        tensors = dict(tensors)
        if "shared.weight" not in tensors and EMBEDDING_NAMES[1] in tensors:
            tensors["shared.weight"] = tensors[EMBEDDING_NAMES[1]]  # tied copy only
        expected = dict(tree_flatten(self.parameters()))
        missing = [name for name in expected if name not in tensors]
        if missing:
            raise ModelLoadError(f"{source}: UMT5 tensors missing: {_some(missing)}")
        wrong = [f"{name} {tuple(tensors[name].shape)} (expected {tuple(value.shape)})"
                 for name, value in expected.items() if tensors[name].shape != value.shape]
        if wrong:
            raise ModelLoadError(f"{source}: UMT5 tensors of the wrong shape: {_some(wrong)}")
        self.update(tree_unflatten([(name, tensors[name]) for name in expected]))

    def save(self, directory: Path | str) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (Hugging Face names, the parameters'
        own dtype) into ``directory``; return it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config.to_hf(), indent=2) + "\n",
                                               encoding="utf-8")
        mx.save_safetensors(str(directory / WEIGHTS_FILE), dict(tree_flatten(self.parameters())),
                            metadata={"format": "pt"})  # transformers expects the marker
        return directory

    # --- encoding ---------------------------------------------------------------------

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> mx.array:
        """The last hidden states, float32 ``[B, L, d_model]``, of token ids ``[B, L]``; the
        mask (1 for a token, 0 for padding) keeps the tokens from attending to padding."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
        mask = np.asarray(attention_mask) > 0
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {mask.shape} does not match input_ids {ids.shape}")
        config = self.config
        # [B, 1, 1, L]: added to every query's scores, so no token looks at padding
        padding = mx.array(np.where(mask, 0.0, np.finfo(np.float32).min)
                           .astype(np.float32)[:, None, None, :])
        buckets = mx.array(relative_position_buckets(
            ids.shape[1], config.relative_attention_num_buckets,
            config.relative_attention_max_distance))
        x = self.shared(mx.array(ids.astype(np.int32))).astype(mx.float32)
        for block in self.encoder.block:
            x = block(x, padding, buckets)
        return self.encoder.final_layer_norm(x)


def prompt_embeddings(encoder: UMT5Encoder, input_ids: np.ndarray, attention_mask: np.ndarray,
                      max_sequence_length: int) -> mx.array:
    """What mlx-gen's ``Wan2_2_TI2V._load_t5_prompt_embeds`` returns for these tokens: each
    row's hidden states for its valid tokens (as many as its mask counts), then zeros up to
    ``max_sequence_length``, in mlx-gen's precision (``ModelConfig.precision``, bfloat16)."""
    from mflux.models.common.config.model_config import ModelConfig

    hidden = encoder.encode(input_ids, attention_mask)
    length = hidden.shape[1]
    if length > max_sequence_length:
        raise ValueError(f"{length} tokens is more than max_sequence_length "
                         f"{max_sequence_length}")
    if length < max_sequence_length:
        hidden = mx.pad(hidden, [(0, 0), (0, max_sequence_length - length), (0, 0)])
    valid = (np.asarray(attention_mask) > 0).sum(axis=1)
    keep = np.arange(max_sequence_length)[None, :] < valid[:, None]
    return mx.where(mx.array(keep)[..., None], hidden, 0.0).astype(ModelConfig.precision)


def _read_tensors(directory: Path) -> dict[str, mx.array]:
    """The tensors of ``directory``'s safetensors: the shards its index names, else every
    ``*.safetensors`` file in it."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ModelLoadError(f"{index} is unreadable: {error}") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory} has no UMT5 weights (*.safetensors)")
    tensors: dict[str, mx.array] = {}
    for path in files:
        try:
            tensors.update(mx.load(str(path)))
        except (OSError, ValueError, RuntimeError) as error:
            raise ModelLoadError(f"{path} is unreadable: {error}") from None
    return tensors


def _some(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
