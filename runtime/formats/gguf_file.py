"""A GGUF file's metadata and tensor index, read in one bounds-checked pass.

gguf-py's ``GGUFReader`` makes a NumPy view of every value it meets: the 49,152 strings and
merges of SmolLM2's tokenizer alone took ~2 s on this machine's CPU (a 150k vocabulary
takes several times that), paid each time a llama.cpp node loads its model (the file is
checked whole first) and each time a GGUF is converted or detected. This reader walks the same
layout with ``struct`` over a memory map (tens of ms for SmolLM2) and offers the part of
``GGUFReader``'s interface the project uses: ``fields[key].contents()`` and ``.types``, and
``tensors`` with ``name``, ``tensor_type``, ``shape`` (GGUF order), ``n_elements``,
``n_bytes``, ``data_offset`` and ``data`` (a view of the mapped file shaped as
``GGUFReader`` shapes it, so ``gguf.quants.dequantize`` reads it as it is).

Every length and count is checked against the file before it is used: a truncated or
malicious file raises ``ValueError`` naming what did not fit, never reads past the end or
allocates what the file claims.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 8  # ggml's GGML_MAX_DIMS is 4; anything far beyond is a corrupt header
MAX_ARRAY_DEPTH = 4  # arrays of arrays of ...: none of the format's writers nests deeper

_SCALARS: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"), GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"), GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"), GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"), GGUFValueType.BOOL: np.dtype("?"),
    GGUFValueType.UINT64: np.dtype("<u8"), GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
# Tensor types whose data GGUFReader gives as typed values (the rest: raw bytes per block row)
_PLAIN_TENSORS = {
    GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True, slots=True)
class Field:
    """One metadata key: its value types (``[ARRAY, item type]`` for an array) and value."""

    name: str
    types: list[GGUFValueType]
    value: Any  # str, int, float, bool; an array: np.ndarray of numbers or a list

    def contents(self) -> Any:
        """The value as Python data (an array as a list), as ``GGUFReader``'s ``contents()``."""
        return _plain(self.value)


@dataclass(frozen=True, slots=True)
class Tensor:
    """One tensor of the index, its data a view of the mapped file."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # dimensions in GGUF order (the fastest-varying first)
    n_elements: int
    n_bytes: int
    data_offset: int  # from the start of the file
    data: np.ndarray


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


class _Cursor:
    """Reads little-endian values from ``buffer`` at ``offset``, never past its end."""

    def __init__(self, buffer: np.ndarray):
        # a memoryview: slicing one costs far less than slicing a NumPy memmap
        self.buffer, self.size, self.offset = memoryview(buffer), len(buffer), 0

    def take(self, count: int, what: str) -> int:
        """Reserve ``count`` bytes; the offset where they start."""
        if count < 0 or self.offset + count > self.size:
            raise ValueError(f"{what} needs {count} bytes at offset {self.offset}, past the end "
                             f"of the file ({self.size} bytes)")
        start, self.offset = self.offset, self.offset + count
        return start

    def unpack(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buffer, start)[0]

    def string(self, what: str) -> str:
        length = self.unpack("<Q", f"the length of {what}")
        start = self.take(length, what)
        return str(self.buffer[start:start + length], "utf-8", errors="replace")

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.unpack("<I", f"the type of {what}")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise ValueError(f"{what} has an unknown value type {raw}") from None

    def value(self, kind: GGUFValueType, what: str, depth: int = 0) -> tuple[Any, list]:
        """A value of ``kind``, and its types (for an array, its item type follows)."""
        if kind == GGUFValueType.STRING:
            return self.string(what), [kind]
        if kind in _SCALARS:
            dtype = _SCALARS[kind]
            start = self.take(dtype.itemsize, what)
            return np.frombuffer(self.buffer, dtype, 1, start)[0].item(), [kind]
        if depth >= MAX_ARRAY_DEPTH:
            raise ValueError(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
        item_kind = self.value_type(f"the items of {what}")
        count = self.unpack("<Q", f"the length of {what}")
        if item_kind in _SCALARS:
            dtype = _SCALARS[item_kind]
            if count > (self.size - self.offset) // dtype.itemsize:
                raise ValueError(f"{what} claims {count} items, more than the file holds")
            start = self.take(count * dtype.itemsize, what)
            return np.frombuffer(self.buffer, dtype, count, start), [kind, item_kind]
        # strings or arrays: at least 8 bytes each (a length), so the count is bounded too
        if count > (self.size - self.offset) // 8:
            raise ValueError(f"{what} claims {count} items, more than the file holds")
        items, item_types = [], [item_kind]
        for index in range(count):
            item, item_types = self.value(item_kind, f"{what}[{index}]", depth + 1)
            items.append(item)
        return items, [kind, *item_types]


class GGUFFile:
    """The metadata (``fields``) and tensor index (``tensors``) of a little-endian GGUF file
    (version 2 or 3); tensor data stays in the mapped file until read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.data = np.memmap(self.path, mode="r")  # uint8, the whole file
        cursor = _Cursor(self.data)
        cursor.take(len(MAGIC), "the magic number")
        if bytes(self.data[:4]) != MAGIC:
            raise ValueError(f"not a GGUF file (it starts with {bytes(self.data[:4])!r})")
        self.version = cursor.unpack("<I", "the version")
        if self.version not in (2, 3):
            raise ValueError(f"GGUF version {self.version} is not read here (2 and 3 are; a "
                             f"big-endian file reads as a huge version)")
        tensor_count = cursor.unpack("<Q", "the tensor count")
        field_count = cursor.unpack("<Q", "the key count")
        self.fields: dict[str, Field] = {}
        for index in range(field_count):
            key = cursor.string(f"key {index}")
            value, types = cursor.value(cursor.value_type(key), key)
            self.fields[key] = Field(key, types, value)
        alignment = self.fields.get("general.alignment")
        align = int(alignment.value) if alignment is not None else DEFAULT_ALIGNMENT
        if align <= 0 or align & (align - 1):
            raise ValueError(f"general.alignment {align} is not a power of two")
        if tensor_count > (cursor.size - cursor.offset) // 24:  # name length, type, offset
            raise ValueError(f"the file claims {tensor_count} tensors, more than it holds")
        index_entries = [self._tensor_info(cursor, i) for i in range(tensor_count)]
        data_start = -(-cursor.offset // align) * align
        self.tensors: list[Tensor] = []
        seen: set[str] = set()
        for name, dims, ggml_type, offset in index_entries:
            if name in seen:
                raise ValueError(f"tensor {name} appears twice")
            seen.add(name)
            self.tensors.append(self._tensor(name, dims, ggml_type, data_start + offset))

    @staticmethod
    def _tensor_info(cursor: _Cursor, index: int) -> tuple[str, np.ndarray, int, int]:
        name = cursor.string(f"the name of tensor {index}")
        n_dims = cursor.unpack("<I", f"the dimensions of {name}")
        if n_dims > MAX_DIMS:
            raise ValueError(f"tensor {name} claims {n_dims} dimensions")
        start = cursor.take(8 * n_dims, f"the shape of {name}")
        dims = np.frombuffer(cursor.buffer, "<u8", n_dims, start).copy()
        ggml_type = cursor.unpack("<I", f"the type of {name}")
        offset = cursor.unpack("<Q", f"the data offset of {name}")
        return name, dims, ggml_type, offset

    def _tensor(self, name: str, dims: np.ndarray, raw_type: int, offset: int) -> Tensor:
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ValueError(f"tensor {name} has an unknown type {raw_type}") from None
        n_elements = int(np.prod(dims, dtype=object)) if len(dims) else 1
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        n_bytes = n_elements * type_size // block
        if offset + n_bytes > len(self.data):
            raise ValueError(f"tensor {name} needs bytes up to {offset + n_bytes}, past the end "
                             f"of the file ({len(self.data)} bytes)")
        shape = tuple(int(d) for d in reversed(dims.tolist()))
        raw = self.data[offset:offset + n_bytes]
        if ggml_type in _PLAIN_TENSORS:
            data = raw.view(_PLAIN_TENSORS[ggml_type]).reshape(shape)
        else:
            data = raw.reshape(quant_shape_to_byte_shape(shape, ggml_type))
        return Tensor(name, ggml_type, dims, n_elements, n_bytes, offset, data)
