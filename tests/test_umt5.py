"""The UMT5 encoder on MLX (mofa_omni.adapters.umt5) against a plain NumPy UMT5 written here
from the Hugging Face model's definition, on tiny random weights read back from the
safetensors the encoder saves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mofa_omni.adapters.umt5 import UMT5Config, UMT5Encoder, prompt_embeddings
from mofa_omni.contract.errors import ModelLoadError

CONFIG = UMT5Config(vocab_size=50, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128)
LENGTH = 40  # long enough for the logarithmic buckets (distances from 8 up)


# --- the NumPy reference ----------------------------------------------------------------

def reference_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's bidirectional bucketing, in float64 and written the other way round."""
    half = num_buckets // 2
    exact = half // 2
    out = np.zeros((length, length), dtype=np.int64)
    for query in range(length):
        for key in range(length):
            distance = key - query
            bucket = half if distance > 0 else 0
            distance = abs(distance)
            if distance < exact:
                bucket += distance
            else:
                spread = math.log(distance / exact) / math.log(max_distance / exact)
                bucket += min(exact + int(spread * (half - exact)), half - 1)
            out[query, key] = bucket
    return out


def reference_encode(weights: dict[str, np.ndarray], config: UMT5Config, ids: np.ndarray,
                     mask: np.ndarray, *, shared_bias: bool = False) -> np.ndarray:
    """UMT5EncoderModel's last hidden state, float64. ``shared_bias``: use layer 0's position
    bias in every layer, as T5 (not UMT5) does."""
    w = {name: value.astype(np.float64) for name, value in weights.items()}

    def norm(x, name):
        return w[name] * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True)
                                     + config.layer_norm_epsilon)

    def gelu_tanh(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    batch, length = ids.shape
    buckets = reference_buckets(length, config.relative_attention_num_buckets,
                                config.relative_attention_max_distance)
    padding = np.where(mask > 0, 0.0, -1e30)[:, None, None, :]
    x = w["shared.weight"][ids]
    for i in range(config.num_layers):
        layer = f"encoder.block.{i}.layer"
        h = norm(x, f"{layer}.0.layer_norm.weight")

        def heads(name, h=h, layer=layer):
            projected = h @ w[f"{layer}.0.SelfAttention.{name}.weight"].T
            return projected.reshape(batch, length, config.num_heads, -1).transpose(0, 2, 1, 3)

        bias_layer = 0 if shared_bias else i
        table = w[f"encoder.block.{bias_layer}.layer.0.SelfAttention.relative_attention_bias.weight"]
        scores = heads("q") @ heads("k").transpose(0, 1, 3, 2)  # unscaled
        scores = scores + table[buckets].transpose(2, 0, 1)[None] + padding
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        attention = (scores / scores.sum(axis=-1, keepdims=True)) @ heads("v")
        attention = attention.transpose(0, 2, 1, 3).reshape(batch, length, -1)
        x = x + attention @ w[f"{layer}.0.SelfAttention.o.weight"].T
        h = norm(x, f"{layer}.1.layer_norm.weight")
        dense = f"{layer}.1.DenseReluDense"
        gated = gelu_tanh(h @ w[f"{dense}.wi_0.weight"].T) * (h @ w[f"{dense}.wi_1.weight"].T)
        x = x + gated @ w[f"{dense}.wo.weight"].T
    return norm(x, "encoder.final_layer_norm.weight")


# --- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny float32 UMT5 written by the encoder's own save."""
    mx.random.seed(3)
    encoder = UMT5Encoder(CONFIG)
    for i in range(CONFIG.num_layers):  # T5 norms start at 1: make them matter
        for j in range(2):
            norm = encoder.encoder.block[i].layer[j].layer_norm
            norm.weight = 1.0 + 0.3 * mx.random.normal(norm.weight.shape)
    return encoder.save(tmp_path_factory.mktemp("umt5") / "text_encoder")


@pytest.fixture(scope="module")
def weights(saved: Path) -> dict[str, np.ndarray]:
    return load_file(str(saved / "model.safetensors"))


@pytest.fixture(scope="module")
def encoder(saved: Path) -> UMT5Encoder:
    return UMT5Encoder.from_directory(saved)


def tokens(lengths: list[int], total: int = LENGTH, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded rows of random ids (pad 0, each row ending in </s> = 1), and their mask."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), total), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n - 1] = rng.integers(3, CONFIG.vocab_size, n - 1)
        ids[row, n - 1] = 1
        mask[row, :n] = 1
    return ids, mask


# --- the encoder --------------------------------------------------------------------------

def test_matches_the_numpy_reference(encoder, weights):
    ids, mask = tokens([LENGTH, 23])
    ours = np.array(encoder.encode(ids, mask))
    reference = reference_encode(weights, CONFIG, ids, mask)
    assert ours.dtype == np.float32 and ours.shape == (2, LENGTH, CONFIG.d_model)
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - reference[valid]).max() < 1e-4
    assert np.abs(reference[valid]).max() > 0.5  # not a trivially small output


def test_each_layer_uses_its_own_position_bias(encoder, weights):
    """T5 would reuse layer 0's table in every layer; UMT5 does not, and neither do we."""
    ids, mask = tokens([LENGTH])
    ours = np.array(encoder.encode(ids, mask))
    shared = reference_encode(weights, CONFIG, ids, mask, shared_bias=True)
    own = reference_encode(weights, CONFIG, ids, mask)
    assert np.abs(ours - own).max() < 1e-4
    assert np.abs(ours - shared).max() > 1e-2


def test_bucketing_agrees_with_t5(encoder):
    from mofa_omni.adapters.umt5 import relative_position_buckets

    for length, buckets, distance in [(LENGTH, 32, 128), (300, 32, 128), (70, 16, 32)]:
        assert np.array_equal(relative_position_buckets(length, buckets, distance),
                              reference_buckets(length, buckets, distance))


def test_padding_does_not_change_the_tokens(encoder):
    ids, mask = tokens([17])
    alone = np.array(encoder.encode(ids[:, :17], mask[:, :17]))
    padded = np.array(encoder.encode(ids, mask))
    noisy = ids.copy()
    noisy[0, 17:] = np.arange(17, LENGTH) % CONFIG.vocab_size  # anything under the mask
    noisy_out = np.array(encoder.encode(noisy, mask))
    assert np.abs(padded[0, :17] - alone[0]).max() < 1e-5
    assert np.abs(noisy_out[0, :17] - alone[0]).max() < 1e-5


def test_bfloat16_weights_compute_in_float32(saved, weights, tmp_path):
    """Weights kept in bfloat16 (as Wan stores them), hidden states in float32: the result is
    the float32 model's on the bfloat16-rounded weights."""
    half = UMT5Encoder.from_directory(saved)
    half.set_dtype(mx.bfloat16)
    half.save(tmp_path / "bf16")
    loaded = UMT5Encoder.from_directory(tmp_path / "bf16")
    assert loaded.shared.weight.dtype == mx.bfloat16
    rounded = {name: np.array(value.astype(mx.float32))
               for name, value in mx.load(str(tmp_path / "bf16" / "model.safetensors")).items()}
    ids, mask = tokens([LENGTH, 9])
    ours = np.array(loaded.encode(ids, mask))
    assert ours.dtype == np.float32
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - reference_encode(rounded, CONFIG, ids, mask)[valid]).max() < 1e-4


# --- files ----------------------------------------------------------------------------------

def test_config_round_trips_through_transformers(saved):
    from transformers import UMT5Config as HFConfig

    hf = HFConfig.from_pretrained(str(saved))
    assert (hf.d_model, hf.num_layers, hf.num_heads, hf.d_kv) == (32, 2, 2, 16)
    assert hf.dense_act_fn == "gelu_new" and hf.is_gated_act
    assert UMT5Config.from_hf(json.loads((saved / "config.json").read_text())) == CONFIG


def test_sharded_weights_and_the_tied_embedding_name(saved, weights, encoder, tmp_path):
    tensors = dict(weights)
    tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")  # the tied copy's name
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in shards.items():
        save_file({name: tensors[name] for name in part}, str(tmp_path / file), {"format": "pt"})
    weight_map = {name: file for file, part in shards.items() for name in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    sharded = UMT5Encoder.from_directory(tmp_path)
    ids, mask = tokens([LENGTH])
    assert np.array_equal(np.array(sharded.encode(ids, mask)), np.array(encoder.encode(ids, mask)))


@pytest.mark.parametrize("change", ["missing", "shape"])
def test_a_missing_or_misshaped_tensor_is_refused(saved, weights, tmp_path, change):
    name = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
    broken = dict(weights)
    if change == "missing":
        del broken[name]
    else:
        broken[name] = np.zeros((16, 2), dtype=np.float32)
    save_file(broken, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        UMT5Encoder.from_directory(tmp_path)


def test_an_unsupported_config_or_no_weights_is_refused(saved, tmp_path):
    config = json.loads((saved / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "relu"}))
    with pytest.raises(ModelLoadError, match="gated-gelu"):
        UMT5Encoder.from_directory(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))  # and no weights
    with pytest.raises(ModelLoadError, match="no UMT5 weights"):
        UMT5Encoder.from_directory(tmp_path)


# --- what mlx-gen receives ---------------------------------------------------------------------

def mflux_padding(hidden: np.ndarray, mask: np.ndarray, max_sequence_length: int) -> np.ndarray:
    """mlx-gen's torch code in NumPy: each row's first `valid` states, then zeros."""
    rows = []
    for row, valid in zip(hidden, (mask > 0).sum(axis=1)):
        rows.append(np.concatenate([row[:valid],
                                    np.zeros((max_sequence_length - valid, row.shape[1]))]))
    return np.stack(rows)


@pytest.mark.parametrize("total", [LENGTH, 24])
def test_prompt_embeddings_are_zero_padded_as_mflux_does(encoder, total):
    from mflux.models.common.config.model_config import ModelConfig

    ids, mask = tokens([total, 5], total=total)
    embeds = prompt_embeddings(encoder, ids, mask, LENGTH)
    assert embeds.dtype == ModelConfig.precision and embeds.shape == (2, LENGTH, CONFIG.d_model)
    hidden = np.array(encoder.encode(ids, mask))
    expected = mflux_padding(hidden, mask, LENGTH).astype(np.float32)
    expected = np.array(mx.array(expected).astype(ModelConfig.precision).astype(mx.float32))
    assert np.array_equal(np.array(embeds.astype(mx.float32)), expected)
    assert not np.array(embeds[1, 5:].astype(mx.float32)).any()
