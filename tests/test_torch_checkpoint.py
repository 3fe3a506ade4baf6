"""PyTorch checkpoints read without torch: files laid out as torch.save writes them (zip and
legacy), a real TorchScript archive from a wheel, and pickles that try to run code -- refused,
their side effects never happening.

torch is not installed, so the checkpoints are written here the way torch.save writes them:
the pure-Python pickler at protocol 2 with torch's persistent ids, its GLOBAL opcodes taught
names (``torch._utils._rebuild_tensor_v2``, ``torch.FloatStorage``) that do not import here.
"""

from __future__ import annotations

import copyreg
import dataclasses
import io
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from mofa_omni.contract.errors import ContractError, ErrorKind
from mofa_omni.formats.torch_checkpoint import (
    MAGIC_NUMBER,
    CheckpointError,
    UnsafeCheckpoint,
    convert_to_safetensors,
    read_state_dict,
)
from mofa_omni.models.catalog import PypiSource

# --- writing checkpoints as torch does -------------------------------------------------------


class Global:
    """A name as torch's pickle refers to it, pickled as a GLOBAL opcode without importing it."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __reduce__(self):
        return self.name  # a string: pickle saves the object as a global

    def __call__(self, *args):  # pickle asks a reduce function to be callable; never called
        raise AssertionError(f"{self.module}.{self.name} called while pickling")


class Call:
    """``function(*args)`` when unpickled (a REDUCE): how a tensor, or a payload, is pickled."""

    def __init__(self, function: Global, *args, state=None):
        self.function, self.args, self.state = function, args, state

    def __reduce__(self):
        return (self.function, self.args) if self.state is None else \
            (self.function, self.args, self.state)

    def __call__(self, *args):  # a call whose result is called: the getattr chain
        raise AssertionError("called while pickling")


class ScriptModule:
    """A TorchScript module object: ``NEWOBJ`` of a ``__torch__.*`` class, then its attributes."""

    torch_module, torch_name = "__torch__", "Module"

    def __init__(self, **attributes):
        self.__dict__.update(attributes)

    def __reduce_ex__(self, protocol):
        return copyreg.__newobj__, (type(self),), dict(self.__dict__)


def script_class(module: str, name: str) -> type:
    return type(name, (ScriptModule,), {"torch_module": module, "torch_name": name})


# torch's storage classes for numpy dtypes, and the dtypes _rebuild_tensor_v3 names instead
STORAGES = {"float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage",
            "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage",
            "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage",
            "bool": "BoolStorage", "complex64": "ComplexFloatStorage"}


class Storage:
    """A torch storage: a flat array. ``untyped``: an UntypedStorage (numel counts bytes)."""

    def __init__(self, array: np.ndarray, untyped: bool = False):
        self.array, self.untyped = np.ascontiguousarray(array).reshape(-1), untyped

    @property
    def type_name(self) -> str:
        return "UntypedStorage" if self.untyped else STORAGES[self.array.dtype.name]

    @property
    def numel(self) -> int:
        return self.array.nbytes if self.untyped else self.array.size


def tensor(storage: Storage, size, stride=None, offset=0, v3_dtype: str | None = None) -> Call:
    """What ``Tensor.__reduce_ex__`` returns: ``_rebuild_tensor_v2(storage, offset, size,
    stride, requires_grad, OrderedDict())``, or ``_v3`` with a dtype after the hooks."""
    if stride is None:
        stride = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
    args = (storage, offset, tuple(size), tuple(stride), False, OrderedDict())
    if v3_dtype:
        return Call(Global("torch._utils", "_rebuild_tensor_v3"), *args, Global("torch", v3_dtype))
    return Call(Global("torch._utils", "_rebuild_tensor_v2"), *args)


def parameter(data: Call) -> Call:
    return Call(Global("torch._utils", "_rebuild_parameter"), data, True, OrderedDict())


class TorchPickler(pickle._Pickler):
    """torch.save's pickler: storages become persistent ids. The pure-Python pickler, because
    its save_global can be taught names that do not import here."""

    def __init__(self, file, protocol: int = 2, legacy: bool = False):
        super().__init__(file, protocol=protocol)
        self.legacy = legacy
        self.storages: dict[str, Storage] = {}
        self.keys: dict[int, str] = {}

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        # the zip format numbers storages in order; the legacy one used their addresses
        key = self.keys.setdefault(id(obj), str(id(obj)) if self.legacy else str(len(self.keys)))
        self.storages[key] = obj
        pid = ("storage", Global("torch", obj.type_name), key, "cpu", obj.numel)
        return pid + (None,) if self.legacy else pid

    def save_global(self, obj, name=None):
        if isinstance(obj, type) and issubclass(obj, ScriptModule):
            obj = Global(obj.torch_module, obj.torch_name)
        if not isinstance(obj, Global):
            return super().save_global(obj, name)
        if self.proto >= 4:
            self.save(obj.module)
            self.save(obj.name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)


def dumps(obj, protocol: int = 2) -> bytes:
    buffer = io.BytesIO()
    TorchPickler(buffer, protocol).dump(obj)
    return buffer.getvalue()


def storage_bytes(storage: Storage, byteorder: str = "little") -> bytes:
    array = storage.array
    if byteorder == "big" and array.dtype.itemsize > 1:
        array = array.astype(array.dtype.newbyteorder(">"))
    return array.tobytes()


def save_zip(path: Path, obj, *, byteorder: str = "little", protocol: int = 2,
             archive: str = "archive", extra: dict[str, bytes] | None = None,
             storage_data: dict[str, bytes] | None = None) -> Path:
    """``torch.save(obj, path)``: data.pkl, then .format_version, .storage_alignment, byteorder,
    data/<key> in sorted order, version and .data/serialization_id, each stored uncompressed at
    an offset aligned to 64 bytes by an "FB" extra field, as torch's zip writer lays them out.
    ``storage_data`` replaces a storage's bytes, ``extra`` adds records (for broken files)."""
    buffer = io.BytesIO()
    pickler = TorchPickler(buffer, protocol)
    pickler.dump(obj)
    records = {"data.pkl": buffer.getvalue(), ".format_version": b"1",
               ".storage_alignment": b"64", "byteorder": byteorder.encode()}
    for key in sorted(pickler.storages):
        data = storage_bytes(pickler.storages[key], byteorder)
        records[f"data/{key}"] = (storage_data or {}).get(key, data)
    records.update({"version": b"3\n", ".data/serialization_id": b"1" * 40, **(extra or {})})
    offset = 0
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records.items():
            info = zipfile.ZipInfo(f"{archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            start = offset + 30 + len(info.filename) + 4  # local header, then the FB header
            padding = -start % 64
            info.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
            zf.writestr(info, data)
            assert info.header_offset == offset
            offset = start + padding + len(data)
    return path


def save_legacy(path: Path, obj) -> Path:
    """``torch.save(obj, path, _use_new_zipfile_serialization=False)``."""
    with path.open("wb") as f:
        for header in (MAGIC_NUMBER, 1001, {"protocol_version": 1001, "little_endian": True,
                                            "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(header, f, protocol=2)
        pickler = TorchPickler(f, legacy=True)
        pickler.dump(obj)
        keys = sorted(pickler.storages)
        pickle.dump(keys, f, protocol=2)
        for key in keys:
            storage = pickler.storages[key]
            f.write(struct.pack("<q", storage.array.size) + storage_bytes(storage))
    return path


# --- a state dict with every case -------------------------------------------------------------

rng = np.random.default_rng(0)
WEIGHT = rng.standard_normal((3, 4)).astype(np.float32)
HALF = rng.standard_normal((5,)).astype(np.float16)
BRAIN = rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16)
COUNTS = np.array([0, -1, 2**40, -(2**62)], np.int64)
FLAGS = np.array([True, False, True])
SHARED = np.arange(10, dtype=np.float32)  # one storage behind two tensors


def state_dict() -> tuple[OrderedDict, dict[str, np.ndarray]]:
    """A state dict as torch pickles it (an OrderedDict with its ``_metadata``), and the arrays
    it should read as."""
    weight, shared = Storage(WEIGHT), Storage(SHARED)
    position_ids = Storage(np.arange(8, dtype=np.int64))
    tensors = OrderedDict([
        ("linear.weight", parameter(tensor(weight, (3, 4)))),
        ("linear.weight_t", tensor(weight, (4, 3), stride=(1, 4))),  # weight.t(): not contiguous
        ("half", tensor(Storage(HALF), (5,))),
        ("brain", tensor(Storage(BRAIN), (2, 3))),
        ("counts", tensor(Storage(COUNTS), (2, 2))),
        ("flags", tensor(Storage(FLAGS), (3,))),
        ("tail", tensor(shared, (3,), offset=5)),  # shared[5:8]: a storage offset
        ("every_other", tensor(shared, (2, 2), stride=(4, 2), offset=1)),  # shared[1::2][:4]
        ("position_ids", tensor(position_ids, (2, 8), stride=(0, 1))),  # expand(2, -1)
        ("empty", tensor(Storage(np.zeros(0, np.float32)), (0, 4))),
        ("scalar", tensor(Storage(np.array([7.5], np.float64)), ())),
    ])
    expected = {
        "linear.weight": WEIGHT, "linear.weight_t": WEIGHT.T, "half": HALF,
        "brain": BRAIN, "counts": COUNTS.reshape(2, 2), "flags": FLAGS, "tail": SHARED[5:8],
        "every_other": SHARED[1::2][:4].reshape(2, 2),
        "position_ids": np.broadcast_to(np.arange(8), (2, 8)),
        "empty": np.zeros((0, 4), np.float32), "scalar": np.array(7.5),
    }
    state = OrderedDict(tensors)
    state._metadata = OrderedDict([("", {"version": 1}), ("linear", {"version": 1})])
    return state, expected


def assert_same(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), name
        assert got.tobytes() == np.ascontiguousarray(want).tobytes(), name  # bit for bit


def test_zip_checkpoint_reads_bit_for_bit(tmp_path):
    state, expected = state_dict()
    arrays = read_state_dict(save_zip(tmp_path / "pytorch_model.bin", state))
    assert list(arrays) == list(expected)  # in the state dict's order
    assert_same(arrays, expected)


def test_legacy_checkpoint_reads_bit_for_bit(tmp_path):
    state, expected = state_dict()
    path = save_legacy(tmp_path / "old.pt", state)
    assert path.read_bytes()[:2] == b"\x80\x02"  # not a zip: the legacy stream
    assert_same(read_state_dict(path), expected)


def test_big_endian_archive_is_swapped(tmp_path):
    arrays = {"f32": WEIGHT, "i64": COUNTS, "f16": HALF,
              "c64": (WEIGHT[0] + 1j * WEIGHT[1]).astype(np.complex64)}
    state = {name: tensor(Storage(a), a.shape) for name, a in arrays.items()}
    path = save_zip(tmp_path / "big.pt", state, byteorder="big")
    assert zipfile.ZipFile(path).read("archive/data/0") == WEIGHT.astype(">f4").tobytes()
    assert_same(read_state_dict(path), arrays)


def test_dtypes_without_a_storage_class_use_rebuild_tensor_v3(tmp_path):
    # torch >= 2.3 saves uint16/32/64 and float8 over an UntypedStorage, naming the dtype
    u16 = np.array([1, 65535, 300], np.uint16)
    f8 = np.array([0.5, -2.0, 448.0], ml_dtypes.float8_e4m3fn)
    state = {"u16": tensor(Storage(u16, untyped=True), (3,), v3_dtype="uint16"),
             "f8": tensor(Storage(f8, untyped=True), (3,), v3_dtype="float8_e4m3fn")}
    assert_same(read_state_dict(save_zip(tmp_path / "v3.pt", state)), {"u16": u16, "f8": f8})


def test_nested_checkpoint_is_flattened_with_dots(tmp_path):
    weight = tensor(Storage(WEIGHT), (3, 4))
    checkpoint = {"model": OrderedDict([("encoder", {"w": weight}), ("tied", weight)]),
                  "epoch": 12, "name": "run-3",
                  "optimizer": {"state": {0: {"exp_avg": tensor(Storage(HALF), (5,))}}}}
    arrays = read_state_dict(save_zip(tmp_path / "train.pt", checkpoint))
    assert list(arrays) == ["model.encoder.w", "model.tied", "optimizer.state.0.exp_avg"]
    assert arrays["model.tied"] is arrays["model.encoder.w"]  # one tensor, read once


def test_bytes_values_and_odd_strides(tmp_path):
    # protocol 2 pickles bytes as _codecs.encode(text, "latin1"); a size-1 dimension's stride
    # is never used, whatever it says; an empty tensor may have any other dimension
    state = {"extra_state": b"\x00\xffabc", "w": tensor(Storage(WEIGHT), (3, 1, 4), (1, 2**40, 3)),
             "none": tensor(Storage(np.zeros(0, np.int8)), (0, 2**40))}
    arrays = read_state_dict(save_zip(tmp_path / "x.pt", state))
    assert_same(arrays, {"w": WEIGHT.reshape(4, 3).T.reshape(3, 1, 4),
                         "none": np.zeros((0, 2**40), np.int8)})
    compressing = {"w": Call(Global("_codecs", "encode"), "a" * 100, "zlib_codec")}
    with pytest.raises(UnsafeCheckpoint, match="is not how pickle writes bytes"):
        read_state_dict(save_zip(tmp_path / "zlib.pt", compressing))


def test_bfloat16_without_ml_dtypes_is_widened_to_float32(tmp_path):
    path = save_zip(tmp_path / "bf16.pt", {"brain": tensor(Storage(BRAIN), (2, 3))})
    script = textwrap.dedent(f"""
        import sys
        sys.modules["ml_dtypes"] = None  # import ml_dtypes now fails
        import numpy as np
        from mofa_omni.formats.torch_checkpoint import read_state_dict
        array = read_state_dict({str(path)!r})["brain"]
        sys.stdout.buffer.write(array.dtype.str.encode() + b"|" + array.tobytes())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True,
                          env={**os.environ, "MOFA_OMNI_NO_OPENBLAS": "1"})
    dtype, data = done.stdout.split(b"|", 1)
    assert dtype == b"<f4"
    assert data == BRAIN.astype(np.float32).tobytes()  # exact: bfloat16 is a truncated float32


def test_convert_to_safetensors(tmp_path):
    state, expected = state_dict()
    out = tmp_path / "out" / "model.safetensors"
    names = convert_to_safetensors(save_zip(tmp_path / "pytorch_model.bin", state), out)
    assert names == list(expected)
    assert_same(load_file(out), expected)
    with safe_open(out, "np") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers asks of a safetensors file
        assert f.get_slice("brain").get_dtype() == "BF16"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.safetensors"]  # no leftovers


# --- a real archive torch wrote ---------------------------------------------------------------

JIT, ONNX = "silero_vad/data/silero_vad.jit", "silero_vad/data/silero_vad.onnx"


@pytest.fixture(scope="session")
def silero_files(catalog, store) -> Path:
    """Silero VAD's TorchScript archive and ONNX graph out of the silero-vad wheel the catalog's
    ``silero-vad`` comes from, fetched once and cached by the store like any source."""
    onnx_entry = catalog.get("silero-vad")
    spec = dataclasses.replace(onnx_entry, name="silero-vad-torchscript", source=PypiSource(
        packages=onnx_entry.source.packages, files=(JIT, ONNX)))
    return store.fetch(spec)


def onnx_initializers(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    found = {}

    def walk(graph) -> None:  # the 16 kHz and 8 kHz models are the two branches of an If
        found.update((t.name, numpy_helper.to_array(t)) for t in graph.initializer)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    walk(attribute.g)
                elif attribute.type == onnx.AttributeProto.TENSOR:  # a Constant's value
                    found[node.output[0]] = numpy_helper.to_array(attribute.t)

    walk(onnx.load(str(path)).graph)
    return found


@pytest.mark.slow
def test_real_torchscript_archive_matches_its_onnx_export(silero_files, tmp_path):
    # silero_vad.jit is a zip torch wrote: data/<key> records, byteorder, version, and a data.pkl
    # of __torch__.* module objects; its ONNX export in the same wheel holds the same weights.
    arrays = read_state_dict(silero_files / "silero_vad.jit")
    assert len(arrays) == 32 and arrays["_model.stft.forward_basis_buffer"].shape == (258, 1, 256)
    onnx_weights = onnx_initializers(silero_files / "silero_vad.onnx")
    branches = {"_model.": "If_0_then_branch__Inline_0__", "_model_8k.": "If_0_else_branch__Inline_0__"}
    compared = 0
    for name, array in arrays.items():
        prefix = next((p for p in branches if name.startswith(p)), None)
        if prefix is None:
            assert array.size == 0, name  # _state, _context: the streaming state, empty
            continue
        assert_same({name: array}, {name: onnx_weights[branches[prefix] + name[len(prefix):]]})
        compared += 1
    assert compared == 30
    names = convert_to_safetensors(silero_files / "silero_vad.jit", tmp_path / "vad.safetensors")
    assert_same(load_file(tmp_path / "vad.safetensors"), {n: arrays[n] for n in names})


def test_torchscript_objects_are_records_only_in_a_torchscript_archive(tmp_path):
    net = script_class("__torch__.model", "Net")(
        training=False, conv=script_class("__torch__.torch.nn.modules.conv", "Conv1d")(
            training=False, weight=tensor(Storage(WEIGHT), (3, 4)), padding=[1]))
    path = save_zip(tmp_path / "net.jit", net, extra={"constants.pkl": dumps(())})
    assert_same(read_state_dict(path), {"conv.weight": WEIGHT})
    with pytest.raises(UnsafeCheckpoint, match=r"refused global __torch__\.model\.Net"):
        read_state_dict(save_zip(tmp_path / "net.pt", net))  # torch.save does not write these


# --- pickles that try to run code ------------------------------------------------------------

def payloads(marker: Path, module: str) -> dict[str, tuple[str, object]]:
    """Each payload (a pickled call that would create ``marker``), and the global it names
    first. ``module``: a module on sys.path that creates the marker when imported."""
    touch = f"open({str(marker)!r}, 'w').close()"
    system = Call(Global("builtins", "getattr"), Call(Global("builtins", "__import__"), "os"),
                  "system")
    return {
        "os.system": ("os.system", Call(Global("os", "system"), f"touch '{marker}'")),
        "posix.system": ("posix.system", Call(Global("posix", "system"), f"touch '{marker}'")),
        "eval": ("builtins.eval", Call(Global("builtins", "eval"), touch)),
        "exec": ("builtins.exec", Call(Global("builtins", "exec"), touch)),
        "python2 eval": ("__builtin__.eval", Call(Global("__builtin__", "eval"), touch)),
        "subprocess": ("subprocess.Popen",
                       Call(Global("subprocess", "Popen"), ["touch", str(marker)])),
        "getattr chain": ("builtins.getattr", Call(system, f"touch '{marker}'")),
        "__import__": ("builtins.__import__", Call(Global("builtins", "__import__"), module)),
        "numpy runstring": ("numpy.testing._private.utils.runstring",
                            Call(Global("numpy.testing._private.utils", "runstring"), touch, {})),
    }


CASES = list(payloads(Path("m"), "m"))


@pytest.fixture()
def marker(tmp_path, monkeypatch) -> tuple[Path, str]:
    """A file the payloads would create, and a module that creates it when imported."""
    marker, module = tmp_path / "pwned", f"payload_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker, module
    sys.modules.pop(module, None)


@pytest.mark.parametrize("case", CASES)
def test_payloads_are_live_under_plain_pickle(case, marker):
    # the control: Python's own unpickler runs each payload, and the marker appears
    path, module = marker
    result = pickle.loads(dumps(payloads(path, module)[case][1]))
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert path.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("case", CASES)
def test_payloads_are_refused_and_never_run(case, legacy, marker, tmp_path):
    path, module = marker
    name, payload = payloads(path, module)[case]
    state = OrderedDict([("weight", tensor(Storage(WEIGHT), (3, 4))), ("config", payload)])
    save = save_legacy if legacy else save_zip
    with pytest.raises(UnsafeCheckpoint, match=rf"refused global {name.replace('.', '[.]')}:"):
        read_state_dict(save(tmp_path / "evil.bin", state))
    assert not path.exists()
    assert module not in sys.modules


@pytest.mark.parametrize("where", ["in a tensor's size", "in a persistent id", "protocol 4",
                                   "as the file itself"])
def test_payload_anywhere_is_refused(where, marker, tmp_path):
    path, _ = marker
    system = Call(Global("os", "system"), f"touch '{path}'")
    file = tmp_path / "evil.bin"
    if where == "in a tensor's size":
        save_zip(file, {"w": Call(Global("torch._utils", "_rebuild_tensor_v2"), Storage(WEIGHT),
                                  0, (system,), (1,), False, OrderedDict())})
    elif where == "in a persistent id":
        class Sneaky(TorchPickler):
            def persistent_id(self, obj):
                return ("storage", system, "0", "cpu", 12) if isinstance(obj, Storage) else None
        buffer = io.BytesIO()
        Sneaky(buffer).dump({"w": tensor(Storage(WEIGHT), (3, 4))})
        save_zip(file, {}, extra={"data.pkl": buffer.getvalue()})
    elif where == "protocol 4":  # STACK_GLOBAL: the names are strings pushed on the stack
        save_zip(file, {"w": system}, protocol=4)
    else:  # a bare pickle named .bin: neither zip nor legacy, still never run
        file.write_bytes(dumps(system))
    with pytest.raises(UnsafeCheckpoint, match=r"refused global os\.system"):
        read_state_dict(file)
    assert not path.exists()


@pytest.mark.parametrize(("module", "name"), [
    ("torch.storage", "_load_from_bytes"),  # torch.load of nested bytes: a pickle in a pickle
    ("torch.nn.modules.linear", "Linear"),  # torch.save(model): code, not a state dict
    ("copyreg", "_reconstructor"),
    ("torch._utils", "_rebuild_qtensor"),
])
def test_other_globals_are_refused_by_name(module, name, tmp_path):
    state = {"w": Call(Global(module, name), "x", 0)}
    with pytest.raises(UnsafeCheckpoint, match=rf"refused global {module}\.{name}:"):
        read_state_dict(save_zip(tmp_path / "x.pt", state))


@pytest.mark.parametrize(("pid", "problem"), [
    (("storage", "FloatStorage", "0", "cpu"), r"is not \('storage', type, key, location, numel\)"),
    ("0", r"is not \('storage'"),
    (("module", Global("torch", "FloatStorage"), "0", "cpu", 12), r"of kind 'module'"),
    (("storage", OrderedDict, "0", "cpu", 12), r"not a storage type"),
    (("storage", Global("torch", "FloatStorage"), "../../etc/passwd", "cpu", 12),
     r"storage key '\.\./\.\./etc/passwd' is not a plain name"),
    (("storage", Global("torch", "FloatStorage"), "0/../../x", "cpu", 12), r"not a plain name"),
    (("storage", Global("torch", "FloatStorage"), "0", "cpu", -1), r"has -1 elements"),
])
def test_persistent_ids_of_another_shape_are_refused(pid, problem, tmp_path):
    class Odd(TorchPickler):
        def persistent_id(self, obj):
            return pid if isinstance(obj, Storage) else None

    buffer = io.BytesIO()
    Odd(buffer).dump({"w": tensor(Storage(WEIGHT), (3, 4))})
    path = save_zip(tmp_path / "odd.pt", {}, extra={"data.pkl": buffer.getvalue(),
                                                     "data/0": WEIGHT.tobytes()})
    with pytest.raises(UnsafeCheckpoint, match=problem):
        read_state_dict(path)


def test_setting_attributes_on_a_tensor_is_refused(tmp_path):
    # BUILD after the rebuild call: a way to change a tensor's offset after it was checked
    rebuilt = tensor(Storage(WEIGHT), (3, 4))
    rebuilt.state = (None, {"offset": 10**9})
    with pytest.raises(UnsafeCheckpoint, match="sets the state of tensor"):
        read_state_dict(save_zip(tmp_path / "x.pt", {"w": rebuilt}))


# --- corrupt and crafted files ----------------------------------------------------------------

def test_storage_smaller_than_its_pickle_claims(tmp_path):
    state = {"w": tensor(Storage(WEIGHT), (3, 4))}
    path = save_zip(tmp_path / "x.pt", state, storage_data={"0": WEIGHT.tobytes()[:20]})
    with pytest.raises(CheckpointError, match=r"archive/data/0 holds 20 bytes, but the pickle "
                                              r"reads it as storage '0' \(12 x torch.float32\)"):
        read_state_dict(path)


@pytest.mark.parametrize(("size", "stride", "offset"), [((4, 4), (4, 1), 0), ((3,), (1,), 10),
                                                        ((3, 4), (1, 5), 0)])
def test_view_beyond_its_storage(size, stride, offset, tmp_path):
    state = {"w": tensor(Storage(WEIGHT), size, stride, offset)}
    with pytest.raises(CheckpointError, match=r"reaches element \d+ of storage '0' \(12 x "
                                              r"torch\.float32\), which holds 12"):
        read_state_dict(save_zip(tmp_path / "x.pt", state))


def test_stride_zero_expansion_bomb(tmp_path):
    # one element repeated 2**40 times: refused before anything is allocated
    state = {"w": tensor(Storage(np.ones(1, np.float32)), (2**40,), (0,))}
    with pytest.raises(CheckpointError, match="repeats its storage's elements"):
        read_state_dict(save_zip(tmp_path / "x.pt", state))
    empty = {"w": tensor(Storage(np.ones(1, np.float32)), (0, 2**61, 2**61))}
    with pytest.raises(CheckpointError, match="larger than any memory"):
        read_state_dict(save_zip(tmp_path / "y.pt", empty))


def test_truncated_and_damaged_archives(tmp_path):
    state, _ = state_dict()
    whole = save_zip(tmp_path / "whole.pt", state).read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(CheckpointError, match="cut.pt is a corrupt zip archive"):
        read_state_dict(tmp_path / "cut.pt")
    offset = whole.index(WEIGHT.tobytes())
    (tmp_path / "flipped.pt").write_bytes(whole[:offset] + b"\xff" + whole[offset + 1:])
    with pytest.raises(CheckpointError, match=r"archive/data/0 is corrupt: Bad CRC-32"):
        read_state_dict(tmp_path / "flipped.pt")


def test_compressed_record_is_refused(tmp_path):
    # torch stores records as they are; a deflated one could claim gigabytes in a few bytes
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", dumps({"w": tensor(Storage(WEIGHT), (3, 4))}))
        zf.writestr("archive/data/0", WEIGHT.tobytes(), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match="archive/data/0 is compressed"):
        read_state_dict(path)


def test_archive_without_data_pkl(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match=r"should hold one <name>/data\.pkl \(none\)"):
        read_state_dict(path)


def test_truncated_legacy_file(tmp_path):
    state, _ = state_dict()
    whole = save_legacy(tmp_path / "whole.pt", state).read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[:-10])
    with pytest.raises(CheckpointError, match=r"cut\.pt is truncated: storage '\d+'"):
        read_state_dict(tmp_path / "cut.pt")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n", bytes(range(256)),
                                     pickle.dumps({"a": 1}, protocol=2)])
def test_not_a_checkpoint(content, tmp_path):
    (tmp_path / "x.bin").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"x\.bin is not a PyTorch checkpoint"):
        read_state_dict(tmp_path / "x.bin")


def test_missing_file_and_error_kinds(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read .*missing.pt: No such file"):
        read_state_dict(tmp_path / "missing.pt")
    # a corrupt or malicious file is the caller's mistake: answered as bad_request
    assert issubclass(UnsafeCheckpoint, CheckpointError)
    assert issubclass(CheckpointError, ContractError) and issubclass(CheckpointError, ValueError)
    assert UnsafeCheckpoint.kind == ErrorKind.BAD_REQUEST
