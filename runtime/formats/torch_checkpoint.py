"""PyTorch checkpoints (the ``.bin``/``.pt``/``.pth`` files ``torch.save`` writes) read into
numpy without torch, and without running the code a pickle can carry.

A checkpoint is a pickle: a small program for Python's pickle machine, which may call any
importable function -- ``os.system`` as easily as ``torch._utils._rebuild_tensor_v2``. Here that
program runs on a machine that knows only the few names a state dict needs (the tensor-rebuild
functions, the storage classes, ``collections.OrderedDict``), each bound to an inert stand-in
defined in this module. Any other name stops the load with :class:`UnsafeCheckpoint` naming
it, before anything is imported or called. Tensor bytes never go through pickle: the pickle
refers to each storage by a persistent id, ``('storage', torch.FloatStorage, key, location,
numel)``, and the bytes are read from the file, checked against the sizes the pickle claims;
nothing read may claim more bytes than the file holds.

The two containers ``torch.save`` has written:

- the zip archive (torch >= 1.6): ``<name>/data.pkl`` (the pickle), ``<name>/data/<key>`` (each
  storage's raw bytes, stored uncompressed), ``<name>/byteorder`` (``little`` or ``big``;
  absent in old files, which are little-endian) and ``<name>/version``;
- the legacy stream (torch < 1.6, or ``_use_new_zipfile_serialization=False``): five pickles
  in a row -- a magic number, the protocol version 1001, system info, the object, the storage
  keys -- then each storage as an int64 element count and its little-endian bytes.

TorchScript archives (``torch.jit.save``, e.g. Silero VAD's ``silero_vad.jit``; torch tells
them by their ``constants.pkl``) hold their tensors in a tree of ``__torch__.*`` module objects.
There each such object becomes an inert record of its attributes (its code, under ``code/``,
is never read), and its tensors are named the way ``module.state_dict()`` names them.

Dtypes: float64/32/16, bfloat16, int64/32/16/8, uint8/16/32/64, bool, complex64/128, and the
float8 kinds. bfloat16 and float8 arrays use ``ml_dtypes`` (which onnx brings); without it
bfloat16 is widened to float32 (exactly) and float8 is refused.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import re
import reprlib
import struct
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np
from safetensors.numpy import save_file

from mofa_omni.contract.errors import ContractError

try:
    import ml_dtypes
except ImportError:  # bfloat16 is then widened to float32, float8 refused
    ml_dtypes = None

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy checkpoint
LEGACY_PROTOCOL = 1001  # the second
ZIP_MAGIC = b"PK\x03\x04"  # how torch.load tells a zip archive from a legacy stream
# A state dict's pickle takes ~150 bytes a tensor: a data.pkl over 1 GiB (millions of tensors)
# is a crafted file, whose objects could fill the memory.
MAX_PICKLE_BYTES = 1 << 30
# A stride-0 view (``x.expand(...)``) has more elements than its storage, and materializing it
# copies them out. Legitimate ones are small (BERT's ``position_ids``); a crafted one could ask
# for terabytes from a few bytes, so the total growth a checkpoint may ask for is bounded.
MAX_EXPANSION_BYTES = 256 << 20
_CHUNK = 16 << 20
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_]+")  # torch's storage keys are decimal numbers


class CheckpointError(ContractError):
    """A file that is not a readable PyTorch checkpoint: not one at all, corrupt, truncated, or
    of a kind this reader does not cover."""


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint whose pickle reaches beyond a state dict: a global outside the allowed few,
    a persistent id of another shape, a storage key that is not a plain name. Refused before
    anything it names is imported or called."""


def _short(value: object) -> str:
    return reprlib.repr(value)  # bounded: the value comes from the file


# --- what the pickle may name ------------------------------------------------------------
# Everything handed to the pickle is an _Inert: a BUILD opcode on it (which sets attributes,
# the one way a pickle can change an object it did not build) is refused, so a pickle cannot
# rewrite a storage's size after it was checked, nor the tables shared by every load.

class _Inert:
    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        raise UnsafeCheckpoint(f"the pickle sets the state of {self!r}; a state dict never does")


class _DType(_Inert):
    """A torch dtype as numpy reads it; ``widen``: bfloat16 read as its uint16 bits (no
    ml_dtypes), returned as float32."""

    __slots__ = ("name", "numpy", "widen")

    def __init__(self, name: str, numpy: np.dtype, widen: bool = False):
        self.name, self.numpy, self.widen = name, numpy, widen

    def __repr__(self) -> str:
        return f"torch.{self.name}"


def _dtype_table() -> dict[str, _DType]:
    codes = {"float64": "f8", "float32": "f4", "float16": "f2", "int64": "i8", "int32": "i4",
             "int16": "i2", "int8": "i1", "uint8": "u1", "uint16": "u2", "uint32": "u4",
             "uint64": "u8", "bool": "?", "complex64": "c8", "complex128": "c16"}
    table = {name: _DType(name, np.dtype(code)) for name, code in codes.items()}
    if ml_dtypes is not None:
        for name in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                     "float8_e5m2fnuz"):
            table[name] = _DType(name, np.dtype(getattr(ml_dtypes, name)))
    else:
        table["bfloat16"] = _DType("bfloat16", np.dtype("u2"), widen=True)
    return table


_DTYPES = _dtype_table()


class _StorageType(_Inert):
    """``torch.FloatStorage`` and its kin, as named in a persistent id."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: _DType):
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


# The storage classes torch pickles (``TypedStorage._pickle_storage_type``); UntypedStorage
# holds bytes, which _rebuild_tensor_v3 reads as the dtype it is given.
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}


class _Storage(_Inert):
    """One storage of the checkpoint: its dtype and element count (from the persistent id),
    then its bytes (from the file), and whether they are in the other byte order."""

    __slots__ = ("key", "dtype", "numel", "data", "swap")

    def __init__(self, key: str, dtype: _DType, numel: int, swap: bool):
        self.key, self.dtype, self.numel, self.swap = key, dtype, numel, swap
        self.data: bytearray | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.numpy.itemsize

    def __repr__(self) -> str:
        return f"storage {self.key!r} ({self.numel} x {self.dtype!r})"


class _Tensor(_Inert):
    """A tensor as the pickle describes it: a view (offset, shape, strides in elements) of a
    storage, read as ``dtype``. Turned into an array once every storage has its bytes."""

    __slots__ = ("storage", "offset", "shape", "stride", "dtype")

    def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...],
                 stride: tuple[int, ...], dtype: _DType):
        self.storage, self.offset, self.shape, self.stride, self.dtype = (
            storage, offset, shape, stride, dtype)

    def __repr__(self) -> str:
        return f"tensor {self.shape} {self.dtype!r}"


class _Function(_Inert):
    """An allowed global the pickle calls: one of the functions below, under torch's name."""

    __slots__ = ("name", "function")

    def __init__(self, name: str, function: Callable[..., Any]):
        self.name, self.function = name, function

    def __call__(self, *args: Any) -> Any:
        return self.function(*args)

    def __repr__(self) -> str:
        return self.name


def _ints(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise UnsafeCheckpoint(f"a tensor's {what} {_short(value)} is not non-negative integers")
    return tuple(value)


def _tensor(storage: object, offset: object, size: object, stride: object,
            dtype: _DType | None = None) -> _Tensor:
    """What torch's rebuild functions do, minus torch: check the view fits in its storage."""
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpoint(f"a tensor is rebuilt from {_short(storage)}, not a storage")
    if type(offset) is not int or offset < 0:
        raise UnsafeCheckpoint(f"a tensor's storage offset {_short(offset)} is not an index")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise CheckpointError(f"a tensor has size {shape} but stride {strides}")
    dtype = dtype or storage.dtype
    if math.prod(n or 1 for n in shape) * dtype.numpy.itemsize >= 1 << 62:
        raise CheckpointError(f"a tensor of size {shape} is larger than any memory")
    available = storage.nbytes // dtype.numpy.itemsize
    if all(shape):  # an empty tensor reads nothing
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
        if last >= available:
            raise CheckpointError(
                f"a tensor of size {shape}, stride {strides}, offset {offset} reaches element "
                f"{last} of {storage!r}, which holds {available}: corrupt or crafted")
    return _Tensor(storage, offset, shape, strides, dtype)


# torch._utils' signatures; requires_grad, hooks and metadata do not matter to the weights.
def _rebuild_tensor(storage: object, offset: object, size: object, stride: object) -> _Tensor:
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(storage: object, offset: object, size: object, stride: object,
                       requires_grad: object = False, hooks: object = None,
                       metadata: object = None) -> _Tensor:
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage: object, offset: object, size: object, stride: object,
                       requires_grad: object, hooks: object, dtype: object,
                       metadata: object = None) -> _Tensor:
    # dtypes without a storage class (uint16, float8, ...): bytes of an UntypedStorage + dtype
    if not isinstance(dtype, _DType):
        raise UnsafeCheckpoint(f"a tensor's dtype {_short(dtype)} is not a torch dtype")
    return _tensor(storage, offset, size, stride, dtype)


def _rebuild_parameter(data: object, requires_grad: object, hooks: object,
                       state: object = None) -> _Tensor:
    if not isinstance(data, _Tensor):
        raise UnsafeCheckpoint(f"a parameter wraps {_short(data)}, not a tensor")
    return data


def _latin1_bytes(text: object, encoding: object) -> bytes:
    # Protocol 2 has no bytes opcode: Python 3 pickles b"..." as _codecs.encode(text, "latin1").
    # Any other codec is refused (some compress, and none is needed for bytes).
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafeCheckpoint(f"_codecs.encode({_short(text)}, {_short(encoding)}) is not how "
                               f"pickle writes bytes")
    return text.encode("latin1")


# TorchScript's list builders only tag a list with its element type.
def _tagged(value: object, type_name: object = None) -> object:
    return value


_GLOBALS: dict[str, object] = {
    "collections.OrderedDict": collections.OrderedDict,  # a C type: a pickle cannot alter it
    "_codecs.encode": _Function("_codecs.encode", _latin1_bytes),
    **{f"torch._utils.{name}": _Function(f"torch._utils.{name}", function) for name, function in [
        ("_rebuild_tensor", _rebuild_tensor), ("_rebuild_tensor_v2", _rebuild_tensor_v2),
        ("_rebuild_tensor_v3", _rebuild_tensor_v3), ("_rebuild_parameter", _rebuild_parameter),
        ("_rebuild_parameter_with_state", _rebuild_parameter)]},
    # CUDA tensors saved by the legacy format name torch.cuda.FloatStorage; read onto the CPU.
    **{f"{module}.{name}": _StorageType(name, _DTYPES[dtype])
       for module in ("torch", "torch.cuda") for name, dtype in _STORAGE_DTYPES.items()
       if dtype in _DTYPES},
    **{f"torch.{name}": dtype for name, dtype in _DTYPES.items()},  # for _rebuild_tensor_v3
}
_TORCHSCRIPT_GLOBALS: dict[str, object] = {
    f"torch.jit._pickle.{name}": _Function(f"torch.jit._pickle.{name}", _tagged)
    for name in ("build_intlist", "build_floatlist", "build_doublelist", "build_boollist",
                 "build_tensorlist", "restore_type_tag")
}


class _ScriptType(type):
    """The class of a TorchScript module record (``NEWOBJ`` needs a class): a pickle cannot
    set attributes on it either."""

    def __setattr__(cls, name: str, value: object) -> None:
        raise UnsafeCheckpoint(f"the pickle sets {name!r} on {cls.__name__}")


class _ScriptObject(metaclass=_ScriptType):
    """A ``__torch__.*`` object: its pickled state (a module's attributes), and nothing else."""

    __slots__ = ("state",)

    def __setstate__(self, state: object) -> None:
        self.state = state


# --- the unpickler ------------------------------------------------------------------------

class _Unpickler(pickle.Unpickler):
    """Looks names up in the tables above only; storages come from ``storage(persistent_id)``."""

    def __init__(self, file: IO[bytes], storage: Callable[[object], _Storage],
                 torchscript: bool):
        super().__init__(file, encoding="utf-8")
        self._storage = storage
        self._torchscript = torchscript
        self._script_types: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> object:
        qualified = f"{module}.{name}"
        found = _GLOBALS.get(qualified)
        if found is None and self._torchscript:
            found = _TORCHSCRIPT_GLOBALS.get(qualified)
            if found is None and module.split(".")[0] == "__torch__":
                found = self._script_types.get(qualified)
                if found is None:
                    found = _ScriptType(qualified, (_ScriptObject,), {"__slots__": ()})
                    self._script_types[qualified] = found
        if found is None:
            raise UnsafeCheckpoint(
                f"refused global {qualified}: a state dict needs only tensors, storages and "
                f"OrderedDict, and this pickle would import and call {qualified} (nothing in "
                f"it was run; save model.state_dict(), or convert the file where it is trusted)")
        return found

    def persistent_load(self, pid: object) -> _Storage:
        return self._storage(pid)


def _no_storage(pid: object) -> _Storage:
    raise UnsafeCheckpoint(f"persistent id {_short(pid)} where the format has no storage")


def _unpickle(path: Path, file: IO[bytes], storage: Callable[[object], _Storage],
              torchscript: bool = False) -> object:
    try:
        return _Unpickler(file, storage, torchscript).load()
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"{path}: its pickle is nested too deeply") from None
    except Exception as error:  # whatever the pickle machine trips on, the file is at fault
        raise CheckpointError(f"{path}: its pickle is corrupt ({type(error).__name__}: "
                              f"{error})") from None


def _storage_reference(pid: object, legacy: bool) -> tuple[_StorageType, str, int]:
    """``(storage type, key, numel)`` of a persistent id, checked field by field."""
    fields = "('storage', type, key, location, numel" + (", view)" if legacy else ")")
    if type(pid) is not tuple or len(pid) != (6 if legacy else 5):
        raise UnsafeCheckpoint(f"persistent id {_short(pid)} is not {fields}")
    kind, storage_type, key, location, numel = pid[:5]
    kind = kind.decode("ascii", "replace") if isinstance(kind, bytes) else kind  # Python 2
    key = key.decode("ascii", "replace") if isinstance(key, bytes) else key
    if kind != "storage":
        raise UnsafeCheckpoint(f"persistent id of kind {_short(kind)}: only storages are loaded")
    if not isinstance(storage_type, _StorageType):
        raise UnsafeCheckpoint(f"persistent id names {_short(storage_type)}, not a storage type")
    if not isinstance(key, str) or not _PLAIN_KEY.fullmatch(key):
        raise UnsafeCheckpoint(f"storage key {_short(key)} is not a plain name: it could reach "
                               f"outside the archive's data/ folder")
    if not isinstance(location, (str, bytes)):
        raise UnsafeCheckpoint(f"storage location {_short(location)} is not a device name")
    if type(numel) is not int or numel < 0:
        raise UnsafeCheckpoint(f"storage {key!r} has {_short(numel)} elements")
    if legacy and pid[5] is not None:  # storage views: written only by torch before 1.0
        raise CheckpointError(f"storage {key!r} is a view of another ({_short(pid[5])}): "
                              f"checkpoints of torch < 1.0 are not supported")
    return storage_type, key, numel


def _read_exactly(path: Path, file: IO[bytes], nbytes: int, what: str) -> bytearray:
    data = bytearray(nbytes)
    view, done = memoryview(data), 0
    while done < nbytes:  # in chunks: a zip record's readinto goes through a temporary bytes
        count = file.readinto(view[done:done + _CHUNK])
        if not count:
            raise CheckpointError(f"{path} is truncated: {what} ends after {done} of "
                                  f"{nbytes} bytes")
        done += count
    return data


# --- the zip archive -------------------------------------------------------------------------

def _record(path: Path, archive: zipfile.ZipFile, name: str, file_size: int) -> zipfile.ZipInfo:
    """The entry ``name``, checked to be stored uncompressed (as torch writes every record) and
    to lie within the file, so that reading it can never allocate more than the file holds."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise CheckpointError(f"{path}: the archive has no {name}") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{path}: {name} is compressed; torch.save stores records as "
                              f"they are, and a compressed one could expand without bound")
    if info.header_offset + info.file_size > file_size:
        raise CheckpointError(f"{path} is truncated: {name} claims {info.file_size} bytes past "
                              f"the end of the file")
    return info


def _archive_prefix(path: Path, archive: zipfile.ZipFile) -> str:
    pickles = [name for name in archive.namelist()
               if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        found = f"{len(pickles)} of them" if pickles else "none"
        raise CheckpointError(f"{path} is a zip archive but not one torch.save wrote: it should "
                              f"hold one <name>/data.pkl ({found})")
    return pickles[0].split("/")[0]


def _load_zip(path: Path, file: IO[bytes]) -> object:
    file_size = os.fstat(file.fileno()).st_size
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is a corrupt zip archive: {error}") from None
    with archive:
        prefix = _archive_prefix(path, archive)
        byteorder = b"little"  # files from before the byteorder record are little-endian
        if f"{prefix}/byteorder" in archive.namelist():
            info = _record(path, archive, f"{prefix}/byteorder", file_size)
            byteorder = archive.read(info) if info.file_size <= 8 else b"?"
            if byteorder not in (b"little", b"big"):
                raise CheckpointError(f"{path}: unknown byte order {byteorder!r}")
        swap = byteorder.decode() != sys.byteorder
        storages: dict[str, _Storage] = {}

        def storage(pid: object) -> _Storage:
            storage_type, key, numel = _storage_reference(pid, legacy=False)
            known = storages.get(key)
            if known is not None:
                if (known.dtype, known.numel) != (storage_type.dtype, numel):
                    raise CheckpointError(f"{path}: storage {key!r} is named both as {known!r} "
                                          f"and as {numel} x {storage_type.dtype!r}")
                return known
            found = _Storage(key, storage_type.dtype, numel, swap)
            name = f"{prefix}/data/{key}"
            info = _record(path, archive, name, file_size)
            if info.file_size != found.nbytes:
                raise CheckpointError(
                    f"{path}: {name} holds {info.file_size} bytes, but the pickle reads it as "
                    f"{found!r} = {found.nbytes} bytes: corrupt or crafted")
            try:
                with archive.open(info) as record:
                    found.data = _read_exactly(path, record, found.nbytes, name)
            except zipfile.BadZipFile as error:  # a bad local header, a CRC mismatch
                raise CheckpointError(f"{path}: {name} is corrupt: {error}") from None
            storages[key] = found
            return found

        data_pkl = _record(path, archive, f"{prefix}/data.pkl", file_size)
        if data_pkl.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{path}: data.pkl is {data_pkl.file_size} bytes, more than "
                                  f"any state dict's pickle")
        torchscript = f"{prefix}/constants.pkl" in archive.namelist()  # as torch.load tells
        try:
            with archive.open(data_pkl) as pickled:
                return _unpickle(path, pickled, storage, torchscript)
        except zipfile.BadZipFile as error:  # e.g. a CRC mismatch in a record
            raise CheckpointError(f"{path} is a corrupt zip archive: {error}") from None


# --- the legacy stream -----------------------------------------------------------------------

def _load_legacy(path: Path, file: IO[bytes]) -> object:
    file_size = os.fstat(file.fileno()).st_size
    try:
        magic = _unpickle(path, file, _no_storage)
    except UnsafeCheckpoint:  # a pickle, but a malicious one: say what it names
        raise
    except CheckpointError:
        magic = None
    if magic != MAGIC_NUMBER:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: neither a zip archive nor "
                              f"torch's legacy format")
    protocol = _unpickle(path, file, _no_storage)
    if protocol != LEGACY_PROTOCOL:
        raise CheckpointError(f"{path}: legacy protocol {_short(protocol)}, not "
                              f"{LEGACY_PROTOCOL}")
    info = _unpickle(path, file, _no_storage)
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise CheckpointError(f"{path}: legacy checkpoints from big-endian machines "
                              f"({_short(info)}) are not supported")
    storages: dict[str, _Storage] = {}

    def storage(pid: object) -> _Storage:
        storage_type, key, numel = _storage_reference(pid, legacy=True)
        known = storages.setdefault(key, _Storage(key, storage_type.dtype, numel, swap=False))
        if (known.dtype, known.numel) != (storage_type.dtype, numel):
            raise CheckpointError(f"{path}: storage {key!r} is named both as {known!r} and as "
                                  f"{numel} x {storage_type.dtype!r}")
        return known

    root = _unpickle(path, file, storage)
    keys = _unpickle(path, file, _no_storage)
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
        raise CheckpointError(f"{path}: the storage list {_short(keys)} does not match the "
                              f"storages the pickle uses ({_short(sorted(storages))})")
    for key in keys:  # the bytes follow in the list's order: an int64 count, then the elements
        found = storages[str(key)]
        (numel,) = struct.unpack("<q", _read_exactly(path, file, 8, f"storage {key!r}'s size"))
        if numel != found.numel:
            raise CheckpointError(f"{path}: storage {key!r} holds {numel} elements, but the "
                                  f"pickle reads it as {found!r}")
        if found.nbytes > file_size - file.tell():
            raise CheckpointError(f"{path} is truncated: {found!r} needs {found.nbytes} bytes, "
                                  f"{file_size - file.tell()} are left")
        found.data = _read_exactly(path, file, found.nbytes, f"storage {key!r}")
    return root


# --- from the pickled tree to named arrays ---------------------------------------------------

def _tensors(path: Path, root: object) -> dict[str, _Tensor]:
    """Every tensor of the tree, named by its path of keys, attributes and indices joined with
    dots (``encoder.0.weight``); numbers, strings and other leaves are left out."""
    if isinstance(root, _Tensor):
        raise CheckpointError(f"{path} holds a single tensor, not a state dict")
    found: dict[str, _Tensor] = {}

    def visit(node: object, name: str, ancestors: frozenset[int]) -> None:
        if isinstance(node, _Tensor):
            if name in found:
                raise CheckpointError(f"{path}: two tensors are named {name!r}")
            found[name] = node
            return
        children: Iterable[tuple[object, object]]
        if isinstance(node, dict):
            children = node.items()
        elif isinstance(node, (list, tuple)):
            children = enumerate(node)
        elif isinstance(node, _ScriptObject):
            children = [("", getattr(node, "state", None))]  # attributes at the object's level
        else:
            return
        if id(node) in ancestors:
            raise CheckpointError(f"{path}: the pickle's containers hold themselves ({name!r})")
        for key, child in children:
            if type(key) is int:
                key = str(key)
            if not isinstance(key, str):
                raise CheckpointError(f"{path}: {name or 'the state dict'} has a key "
                                      f"{_short(key)} that is not a name")
            visit(child, f"{name}.{key}" if name and key else name or key,
                  ancestors | {id(node)})

    try:
        visit(root, "", frozenset())
    except RecursionError:
        raise CheckpointError(f"{path}: its containers are nested too deeply") from None
    return found


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for n, s in zip(reversed(shape), reversed(stride)):
        if n != 1 and s != expected:  # a size-1 dimension's stride is never used
            return False
        expected *= n
    return True


def _array(tensor: _Tensor) -> np.ndarray:
    """The tensor's values: a view of its storage when it is laid out contiguously, else a copy
    of its strided elements."""
    storage, dtype = tensor.storage, tensor.dtype.numpy
    raw = np.frombuffer(storage.data, np.uint8)
    raw = raw[:len(raw) - len(raw) % dtype.itemsize]
    if storage.swap and dtype.itemsize > 1:  # complex numbers swap each of their two halves
        unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
        flat = raw.view(f"u{unit}").byteswap().view(dtype)
    else:
        flat = raw.view(dtype)
    count = math.prod(tensor.shape)
    if count == 0:
        array = np.zeros(tensor.shape, dtype)
    elif _contiguous(tensor.shape, tensor.stride):
        array = flat[tensor.offset:tensor.offset + count].reshape(tensor.shape)
    else:  # e.g. a transposed weight: gather its elements (bounds checked in _tensor)
        strides = [s * dtype.itemsize if n > 1 else 0 for n, s in zip(tensor.shape, tensor.stride)]
        array = np.lib.stride_tricks.as_strided(flat[tensor.offset:], tensor.shape, strides,
                                                writeable=False).copy()
    if tensor.dtype.widen:  # bfloat16 is the top half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _checkpoint(path: str | os.PathLike[str]) -> tuple[Path, object]:
    path = Path(path)
    try:
        with path.open("rb") as file:
            is_zip = file.read(4) == ZIP_MAGIC
            file.seek(0)
            return path, (_load_zip if is_zip else _load_legacy)(path, file)
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The tensors of the PyTorch checkpoint at ``path``, by name, as numpy arrays.

    Reads ``torch.save``'s zip archives and legacy files, and TorchScript archives, without
    torch and without running any code the pickle names: a global beyond a state dict's few,
    or a storage reference of another shape, raises :class:`UnsafeCheckpoint`; a corrupt or
    truncated file raises :class:`CheckpointError` (both ``ContractError``s: the file is the
    caller's). Nested containers are flattened with dots (``{"model": {"w": t}}`` gives
    ``model.w``), their other values (epoch numbers, strings) left out. Arrays of tensors that
    shared a storage in torch (tied weights) may share memory here too.
    """
    path, root = _checkpoint(path)
    arrays: dict[str, np.ndarray] = {}
    by_tensor: dict[int, np.ndarray] = {}  # a tensor listed twice is read once
    expansion = 0
    for name, tensor in _tensors(path, root).items():
        if id(tensor) not in by_tensor:
            itemsize = tensor.dtype.numpy.itemsize
            expansion += max(0, math.prod(tensor.shape) * itemsize - tensor.storage.nbytes)
            if expansion > MAX_EXPANSION_BYTES:
                raise CheckpointError(
                    f"{path}: tensor {name!r} ({tensor.shape}, stride {tensor.stride}) repeats "
                    f"its storage's elements beyond {MAX_EXPANSION_BYTES} bytes: crafted")
            by_tensor[id(tensor)] = _array(tensor)
        arrays[name] = by_tensor[id(tensor)]
    return arrays


def convert_to_safetensors(path: str | os.PathLike[str],
                           out_path: str | os.PathLike[str]) -> list[str]:
    """Write the tensors of the PyTorch checkpoint at ``path`` (see :func:`read_state_dict`) as
    the safetensors file ``out_path``; returns their names.

    The file appears whole or not at all (written beside ``out_path``, then renamed), so the
    caller can cache it and convert once. Its metadata says ``format: pt``, which transformers
    asks of a safetensors file. bfloat16 stays bfloat16 where ml_dtypes is installed.
    """
    tensors = read_state_dict(path)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(handle)
    try:
        save_file(tensors, partial, metadata={"format": "pt"})
        os.replace(partial, out)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return list(tensors)
