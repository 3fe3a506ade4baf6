"""mofa_omni.formats.gguf_file reads what gguf-py's own writer wrote exactly as gguf-py's own
reader does (every value type, arrays of numbers, strings and arrays, float and quantized
tensors), and refuses files that claim more than they hold."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from mofa_omni.formats.gguf_file import GGUFFile  # noqa: E402


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "every-kind.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint8("test.u8", 200)
    writer.add_int8("test.i8", -5)
    writer.add_uint16("test.u16", 60000)
    writer.add_int16("test.i16", -30000)
    writer.add_uint32("test.u32", 4_000_000_000)
    writer.add_int32("test.i32", -2_000_000_000)
    writer.add_float32("test.f32", 0.25)
    writer.add_uint64("test.u64", 2**63 + 5)
    writer.add_int64("test.i64", -(2**62))
    writer.add_float64("test.f64", 1e-300)
    writer.add_bool("test.bool", True)
    writer.add_string("test.string", "Grüße, GGUF")
    writer.add_array("test.ints", [3, 1, 4, 1, 5])
    writer.add_array("test.floats", [0.5, -1.5])
    writer.add_array("test.strings", ["a", "", "zwölf"])
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_array("test.empty", [])
    rng = np.random.default_rng(0)
    writer.add_tensor("f32", rng.standard_normal((3, 64)).astype(np.float32))
    writer.add_tensor("f16", rng.standard_normal((2, 32)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32),
                              gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("vector", np.arange(7, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_every_key_and_tensor_reads_as_gguf_py_reads_it(written: Path):
    ours, theirs = GGUFFile(written), gguf.GGUFReader(written)
    assert list(ours.fields) == [k for k in theirs.fields if not k.startswith("GGUF.")]
    for key, field in ours.fields.items():
        assert list(field.types) == list(theirs.fields[key].types), key
        if key != "test.nested":  # gguf-py flattens arrays of arrays (a FIXME of its own)
            assert field.contents() == theirs.fields[key].contents(), key
    assert ours.fields["test.nested"].contents() == [[1, 2], [3]]
    assert ours.fields["test.strings"].contents() == ["a", "", "zwölf"]
    assert ours.fields["test.u64"].contents() == 2**63 + 5
    assert [t.name for t in ours.tensors] == ["f32", "f16", "q8", "vector"]
    for mine, reference in zip(ours.tensors, theirs.tensors, strict=True):
        assert (mine.tensor_type, list(mine.shape), mine.n_elements, mine.n_bytes,
                mine.data_offset) == (reference.tensor_type, list(reference.shape),
                                      reference.n_elements, reference.n_bytes,
                                      reference.data_offset), mine.name
        assert mine.data.dtype == reference.data.dtype and mine.data.shape == reference.data.shape
        assert np.array_equal(np.asarray(mine.data), np.asarray(reference.data))
    (q8,) = [t for t in ours.tensors if t.name == "q8"]
    assert gguf.quants.dequantize(q8.data, q8.tensor_type).shape == (4, 64)


def _refusal(path: Path, data: bytes, match: str) -> None:
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match):
        GGUFFile(path)


def test_what_does_not_fit_the_file_is_refused_naming_it(written: Path, tmp_path: Path):
    whole = written.read_bytes()
    bad = tmp_path / "bad.gguf"
    _refusal(bad, b"GGML" + whole[4:], "not a GGUF file")
    _refusal(bad, whole[:4] + struct.pack("<I", 1) + whole[8:], "version 1")
    _refusal(bad, whole[:-100], r"tensor \w+ needs bytes up to \d+, past the end")  # the data cut short
    _refusal(bad, whole[:60], "past the end of the file")  # the metadata cut short
    # A key count, an array length and a string length far beyond the file: refused before
    # anything is allocated or read.
    _refusal(bad, whole[:16] + struct.pack("<Q", 2**40) + whole[24:], "past the end")
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    key = struct.pack("<Q", 3) + b"big"
    _refusal(bad, header + key + struct.pack("<IIQ", 9, 4, 2**60), "claims 1152921504606846976")
    _refusal(bad, header + key + struct.pack("<IIQ", 9, 8, 2**60), "more than the file holds")
    _refusal(bad, header + key + struct.pack("<IQ", 8, 2**62), "past the end")
    _refusal(bad, header + key + struct.pack("<I", 99), "unknown value type 99")
    _refusal(bad, b"GGUF" + struct.pack("<IQQ", 3, 2**50, 0), "claims 1125899906842624 tensors")
