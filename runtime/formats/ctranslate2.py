"""CTranslate2 weights without CTranslate2: read ``model.bin`` and convert faster-whisper models to MLX.

``model.bin`` (binary format version 6) is a little-endian stream::

    u32 version (6), string spec name, u32 spec revision, u32 variable count,
    per variable: string name, u8 rank, u32 dims[rank], u8 dtype, u32 byte count, bytes,
    u32 alias count, per alias: string alias, string target

where a string is a u16 length (including a trailing NUL) and its UTF-8 bytes.
Every read is bounds-checked so a truncated or corrupt file raises
:class:`ModelLoadError` naming the file and the variable, never a numpy or
struct error.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mofa_omni.contract.errors import ModelLoadError
from mofa_omni.models.fetching import Progress

BINARY_VERSION = 6
# CTranslate2's DataType enum; int8 weights come with a float32 ``weight_scale`` per output row.
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
BFLOAT16 = 5  # numpy has no bfloat16: widened to float32 by hand
WHISPER_HEAD_DIM = 64  # every Whisper size uses 64-wide heads (used when a spec omits num_heads)


@dataclass(frozen=True, slots=True)
class Ct2Model:
    """The contents of a ``model.bin``: arrays are read-only views into the mapped file."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray]  # aliases included, pointing at the same arrays
    aliases: dict[str, str]


class _Reader:
    """A bounds-checked cursor over the file's bytes; errors name the file and the current item."""

    def __init__(self, path: Path, data: memoryview):
        self.path, self.data, self.pos = path, data, 0
        self.context = "the header"

    def fail(self, problem: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {problem} (in {self.context}, at byte {self.pos}); "
                              "the file is truncated or not a CTranslate2 model.bin")

    def take(self, count: int) -> memoryview:
        available = len(self.data) - self.pos
        if count > available:
            raise self.fail(f"ends after {max(available, 0)} of {count} bytes")
        chunk = self.data[self.pos:self.pos + count]
        self.pos += count
        return chunk

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.unpack("H")))
        if not raw.endswith(b"\0"):
            raise self.fail("a string is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("a string is not UTF-8") from None


def read_model_bin(path: Path | str, progress: Progress | None = None) -> Ct2Model:
    """Read a CTranslate2 ``model.bin`` into numpy arrays (zero-copy views of a memory map)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            empty = os.fstat(handle.fileno()).st_size == 0  # an empty file cannot be mapped
            mapped = b"" if empty else mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as error:
        raise ModelLoadError(f"{path}: cannot read: {error}") from error
    reader = _Reader(path, memoryview(mapped))
    total = len(mapped)

    version = reader.unpack("I")
    if version != BINARY_VERSION:
        raise reader.fail(f"binary version is {version}, this reader knows {BINARY_VERSION}")
    spec = reader.string()
    revision = reader.unpack("I")
    count = reader.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for index in range(count):
        reader.context = f"variable {index + 1} of {count}"
        name = reader.string()
        reader.context = f"variable {name}"
        shape = tuple(reader.unpack("I") for _ in range(reader.unpack("B")))
        variables[name] = _array(reader, shape, reader.unpack("B"))
        if progress:
            progress("read model.bin", reader.pos, total)
    reader.context = "the aliases"
    aliases = {}
    for _ in range(reader.unpack("I")):
        alias, target = reader.string(), reader.string()
        if target not in variables:
            raise reader.fail(f"alias {alias} points at unknown variable {target}")
        aliases[alias] = target
        variables[alias] = variables[target]
    if progress:
        progress("read model.bin", total, total)
    return Ct2Model(spec, revision, variables, aliases)


def _array(reader: _Reader, shape: tuple[int, ...], code: int) -> np.ndarray:
    size = reader.unpack("I")
    if code not in DTYPES and code != BFLOAT16:
        raise reader.fail(f"unknown dtype code {code}")
    itemsize = 2 if code == BFLOAT16 else np.dtype(DTYPES[code]).itemsize
    expected = int(np.prod(shape, dtype=np.int64)) * itemsize
    if size != expected:
        raise reader.fail(f"holds {size} bytes but shape {shape} needs {expected}")
    raw = reader.take(size)
    if code == BFLOAT16:
        widened = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
        return widened.view(np.float32).reshape(shape)
    return np.frombuffer(raw, DTYPES[code]).reshape(shape)


# --- faster-whisper -> mlx_whisper ------------------------------------------------------

_LAYER = re.compile(r"(encoder|decoder)/layer_(\d+)/(.+)")
_NORM = {"gamma": "weight", "beta": "bias"}
# CTranslate2 sub-module -> mlx_whisper sub-module (fused projections are split separately)
_BLOCK = {
    "self_attention/layer_norm": "attn_ln",
    "self_attention/linear_1": "attn.out",
    "attention/layer_norm": "cross_attn_ln",
    "attention/linear_0": "cross_attn.query",
    "attention/linear_2": "cross_attn.out",
    "ffn/layer_norm": "mlp_ln",
    "ffn/linear_0": "mlp1",
    "ffn/linear_1": "mlp2",
}
_FUSED = {  # fused projection -> the parts it stacks along the output axis
    "self_attention/linear_0": ("attn.query", "attn.key", "attn.value"),
    "attention/linear_1": ("cross_attn.key", "cross_attn.value"),
}
_TOP = {
    "encoder/conv1": "encoder.conv1",
    "encoder/conv2": "encoder.conv2",
    "encoder/layer_norm": "encoder.ln_post",
    "decoder/layer_norm": "decoder.ln",
    "decoder/embeddings": "decoder.token_embedding",
}
# Parts of the spec mlx_whisper computes itself or does not use.
_SKIPPED = ("encoder/position_encodings/encodings", "decoder/projection/weight")


def whisper_weights(model: Ct2Model, progress: Progress | None = None) -> dict[str, np.ndarray]:
    """mlx_whisper parameter name -> float32 array, from a CTranslate2 WhisperSpec."""
    tensors = {name: value for name, value in model.variables.items() if value.ndim > 0}
    _check_tied_projection(model)
    out: dict[str, np.ndarray] = {}
    names = sorted(tensors)
    for done, name in enumerate(names, 1):
        if progress:
            progress("convert weights", done, len(names))
        if name.endswith("/weight_scale"):
            continue  # consumed with its int8 weight
        value = _dequantized(model, name)
        module, _, leaf = name.rpartition("/")
        if name in _SKIPPED:
            pass
        elif name == "decoder/position_encodings/encodings":
            out["decoder.positional_embedding"] = value
        elif module in _TOP:
            if module.startswith("encoder/conv") and leaf == "weight":
                value = value.transpose(0, 2, 1)  # (out, in, kernel) -> MLX's (out, kernel, in)
            out[f"{_TOP[module]}.{_NORM.get(leaf, leaf)}"] = value
        elif match := _LAYER.fullmatch(module):
            side, index, sub = match.groups()
            prefix = f"{side}.blocks.{index}."
            if sub in _FUSED:
                parts = _FUSED[sub]
                for part, piece in zip(parts, np.split(value, len(parts), axis=0)):
                    if part.endswith(".key") and leaf == "bias":
                        continue  # Whisper's key projection has no bias (CTranslate2 stores zeros)
                    out[f"{prefix}{part}.{leaf}"] = piece
            elif sub in _BLOCK:
                out[f"{prefix}{_BLOCK[sub]}.{_NORM.get(leaf, leaf)}"] = value
            else:
                raise ModelLoadError(f"unexpected CTranslate2 whisper variable {name}")
        else:
            raise ModelLoadError(f"unexpected CTranslate2 whisper variable {name}")
    return {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in out.items()}


def _dequantized(model: Ct2Model, name: str) -> np.ndarray:
    value = model.variables[name]
    if value.dtype == np.int8:
        scale_name = name.rpartition("/")[0] + "/weight_scale"
        if scale_name not in model.variables:
            raise ModelLoadError(f"int8 variable {name} has no {scale_name}")
        scale = model.variables[scale_name].astype(np.float32)
        return value.astype(np.float32) / scale.reshape(-1, *([1] * (value.ndim - 1)))
    if value.dtype.kind != "f":
        raise ModelLoadError(f"variable {name} has dtype {value.dtype}, expected floating point")
    return value


def _check_tied_projection(model: Ct2Model) -> None:
    # mlx_whisper projects with the token embedding (as_linear): a separate projection would be lost.
    projection = model.variables.get("decoder/projection/weight")
    embedding = model.variables.get("decoder/embeddings/weight")
    if projection is not None and projection is not embedding and not np.array_equal(projection, embedding):
        raise ModelLoadError("decoder/projection/weight differs from decoder/embeddings/weight; "
                             "mlx_whisper only supports a tied output projection")


def whisper_dimensions(model: Ct2Model) -> dict[str, int]:
    """mlx_whisper ``ModelDimensions`` derived from the tensor shapes and the spec's scalars."""
    v = model.variables
    try:
        n_audio_state = v["encoder/conv1/weight"].shape[0]
        n_text_state = v["decoder/embeddings/weight"].shape[1]
        return {
            "n_mels": v["encoder/conv1/weight"].shape[1],
            "n_audio_ctx": v["encoder/position_encodings/encodings"].shape[0],
            "n_audio_state": n_audio_state,
            "n_audio_head": _scalar(v, "encoder/num_heads", n_audio_state // WHISPER_HEAD_DIM),
            "n_audio_layer": _count_layers(v, "encoder"),
            "n_vocab": v["decoder/embeddings/weight"].shape[0],
            "n_text_ctx": v["decoder/position_encodings/encodings"].shape[0],
            "n_text_state": n_text_state,
            "n_text_head": _scalar(v, "decoder/num_heads", n_text_state // WHISPER_HEAD_DIM),
            "n_text_layer": _count_layers(v, "decoder"),
        }
    except KeyError as error:
        raise ModelLoadError(f"not a whisper model: variable {error.args[0]} is missing") from None


def _scalar(variables: dict[str, np.ndarray], name: str, default: int) -> int:
    return int(variables[name]) if name in variables else default


def _count_layers(variables: dict[str, np.ndarray], side: str) -> int:
    indices = {int(m.group(2)) for name in variables if (m := _LAYER.fullmatch(name.rpartition("/")[0]))
               and m.group(1) == side}
    return max(indices) + 1 if indices else 0


def convert_whisper(source_dir: Path, out_dir: Path, progress: Progress | None = None) -> None:
    """Convert a faster-whisper directory (model.bin + config.json) into an mlx_whisper directory.

    Writes ``config.json`` (ModelDimensions), ``weights.safetensors`` (float32) and,
    when the CTranslate2 config lists them, ``alignment_heads.json`` (the
    [layer, head] pairs for ``Whisper.set_alignment_heads``; mlx_whisper's
    config.json cannot carry them).
    """
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    model = read_model_bin(source_dir / "model.bin", progress)
    if not model.spec.startswith("Whisper"):
        raise ModelLoadError(f"{source_dir / 'model.bin'}: a {model.spec}, not a whisper model")
    dims = whisper_dimensions(model)
    weights = whisper_weights(model, progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(out_dir / "weights.safetensors", weights, progress)
    (out_dir / "config.json").write_text(json.dumps({"model_type": "whisper", **dims}, indent=1))
    heads = _alignment_heads(source_dir / "config.json", dims)
    if heads:
        (out_dir / "alignment_heads.json").write_text(json.dumps(heads))


def _alignment_heads(config_path: Path, dims: dict[str, int]) -> list[list[int]]:
    if not config_path.is_file():
        return []
    try:
        heads = json.loads(config_path.read_text()).get("alignment_heads") or []
        pairs = [[int(layer), int(head)] for layer, head in heads]
    except (ValueError, TypeError, AttributeError) as error:
        raise ModelLoadError(f"{config_path}: malformed alignment_heads: {error}") from error
    for layer, head in pairs:
        if not (0 <= layer < dims["n_text_layer"] and 0 <= head < dims["n_text_head"]):
            raise ModelLoadError(f"{config_path}: alignment head {[layer, head]} is out of range")
    return pairs


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], progress: Progress | None = None) -> None:
    """Write float32/float16 arrays as a safetensors file, streaming (progress in bytes)."""
    codes = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
    header, offset = {}, 0
    for name, array in tensors.items():
        header[name] = {"dtype": codes[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8-byte alignment
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        written = 0
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())
            written += array.nbytes
            if progress:
                progress("write weights.safetensors", written, offset)
