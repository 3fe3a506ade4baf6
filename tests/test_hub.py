"""The store's Hugging Face Hub path, through huggingface_hub's real HTTP code, against a Hub
on loopback (tests/hub_server.py): files, resuming a cut-off download, revisions, and the
errors for a missing repo, file or revision; and `omni pull` of a real voice from it."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mofa_omni.models.catalog import Catalog, HubSource, ModelSpec
from mofa_omni.models.fetching import FetchError
from mofa_omni.models.store import ModelStore, source_key
from tests.hub_server import LocalHub

OMNI = str(Path(sys.executable).with_name("omni"))
REPO = "tiny-org/tiny-model"
MB = 1 << 20


def hub_spec(catalog: Catalog, files: tuple[str, ...] = (), revision: str = "main",
             repo: str = REPO) -> ModelSpec:
    return dataclasses.replace(catalog.get("piper-joe"), name="hub-model",
                               source=HubSource(repo, files, revision))


def blob(size: int, seed: bytes) -> bytes:
    """``size`` bytes that differ everywhere between seeds (a resumed file spliced from the
    wrong offset would not match)."""
    out, counter = bytearray(), 0
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(8, "little")).digest() * 64
        counter += 1
    return bytes(out[:size])


def test_fetch_gives_the_repo_files_once(local_hub: LocalHub, catalog: Catalog,
                                         tmp_path: Path) -> None:
    files = {"config.json": b'{"a": 1}', "weights/model.bin": blob(300_000, b"w"),
             "README.md": b"not wanted"}
    local_hub.add(REPO, files)
    store = ModelStore(tmp_path)
    spec = hub_spec(catalog, ("config.json", "weights/*.bin"))
    seen: list[tuple[str, int, int]] = []

    directory = store.fetch(spec, lambda stage, done, total: seen.append((stage, done, total)))

    got = {str(p.relative_to(directory)): p.read_bytes()
           for p in directory.rglob("*") if p.is_file()}
    assert got == {name: data for name, data in files.items() if name != "README.md"}
    assert ("download weights/model.bin", 300_000, 300_000) in seen
    assert not (tmp_path / "downloads" / directory.name).exists()  # nothing left half-done
    before = len(local_hub.log)
    assert store.fetch(spec) == directory
    assert len(local_hub.log) == before  # fetched once: the manifest vouches for the files


def test_cut_off_download_resumes_on_the_next_fetch(local_hub: LocalHub, catalog: Catalog,
                                                    tmp_path: Path) -> None:
    # huggingface_hub writes in 10 MiB chunks: the cut must come after the first one
    data = blob(24 * MB, b"big")
    local_hub.add(REPO, {"model.bin": data})
    local_hub.interrupt(REPO, "model.bin", after=13 * MB, then_fail=1)
    store = ModelStore(tmp_path)
    spec = hub_spec(catalog, ("model.bin",))

    with pytest.raises(FetchError) as failed:
        store.fetch(spec)
    assert REPO in str(failed.value) and "model.bin" in str(failed.value)
    assert "Traceback" not in str(failed.value)
    partial = list((tmp_path / "downloads").rglob("model.bin.incomplete"))
    assert len(partial) == 1
    kept = partial[0].stat().st_size
    assert 0 < kept < len(data)
    first_attempt = len(local_hub.requests("model.bin"))

    directory = store.fetch(spec)

    assert (directory / "model.bin").read_bytes() == data
    resumed = local_hub.requests("model.bin")[first_attempt:]
    assert [(r.range, r.status) for r in resumed] == [(f"bytes={kept}-", 206)]
    assert not partial[0].exists()


def test_a_changed_revision_is_fetched_anew(local_hub: LocalHub, catalog: Catalog,
                                            tmp_path: Path) -> None:
    local_hub.add(REPO, {"config.json": b'{"v": 1}'})
    commit = local_hub.add(REPO, {"config.json": b'{"v": 2}'}, revision="v2")
    store = ModelStore(tmp_path)
    first = hub_spec(catalog, ("config.json",))
    second = hub_spec(catalog, ("config.json",), revision="v2")
    pinned = hub_spec(catalog, ("config.json",), revision=commit)

    assert source_key(first) != source_key(second)
    assert (store.fetch(first) / "config.json").read_bytes() == b'{"v": 1}'
    assert (store.fetch(second) / "config.json").read_bytes() == b'{"v": 2}'
    assert (store.fetch(pinned) / "config.json").read_bytes() == b'{"v": 2}'
    assert (store.fetch(first) / "config.json").read_bytes() == b'{"v": 1}'  # both kept


@pytest.mark.parametrize(("repo", "files", "revision", "expected"), [
    ("tiny-org/absent", (), "main", "'tiny-org/absent' does not exist"),
    (REPO, ("config.json", "tokenizer.json"), "main", "has no file 'tokenizer.json'"),
    (REPO, ("config.json",), "v9", f"{REPO!r} has no revision 'v9'"),
])
def test_a_missing_repo_file_or_revision_is_named(local_hub: LocalHub, catalog: Catalog,
                                                  tmp_path: Path, repo: str,
                                                  files: tuple[str, ...], revision: str,
                                                  expected: str) -> None:
    local_hub.add(REPO, {"config.json": b"{}"})
    with pytest.raises(FetchError, match="Hugging Face repository") as failed:
        ModelStore(tmp_path).fetch(hub_spec(catalog, files, revision, repo))
    assert expected in str(failed.value)
    assert not any((tmp_path / "sources").glob("*.manifest.json"))  # nothing taken as fetched


def test_an_unreachable_hub_is_named(catalog: Catalog, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{unused.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(FetchError, match=f"cannot fetch {REPO}@main on {endpoint}: ConnectError"):
        ModelStore(tmp_path).fetch(hub_spec(catalog))


@pytest.mark.slow
def test_omni_pull_of_a_hub_voice(local_hub: LocalHub, catalog: Catalog, store: ModelStore,
                                  tmp_path: Path) -> None:
    """`omni pull` of a user catalog entry naming a Hub repo: the real Piper voice (from the
    set-up's cache) served by the loopback Hub, fetched and prepared in a real process."""
    voice = store.fetch(catalog.get("piper-joe"))
    files = {f"en/en_US/joe/medium/{p.name}": p for p in sorted(voice.iterdir())}
    local_hub.add("rhasspy/piper-voices", files, revision="v1.0.0")
    (tmp_path / "catalog.toml").write_text(
        '[models.hub-joe]\nadapter = "piper"\ntasks = ["speech_synthesis"]\nformat = "onnx"\n'
        'memory_mb = 170\nsource = { hf = "rhasspy/piper-voices", revision = "v1.0.0", '
        f'files = {list(files)!r} }}\n'.replace("'", '"'))
    env = {**os.environ, "MOFA_OMNI_CATALOG": str(tmp_path / "catalog.toml"),
           "MOFA_OMNI_CACHE": str(tmp_path / "cache"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "HF_ENDPOINT": local_hub.url}
    env.pop("HF_HUB_OFFLINE", None)

    result = subprocess.run([OMNI, "pull", "hub-joe"], capture_output=True, text=True,
                            timeout=300, env=env)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "hub-joe: ready" in result.stdout
    assert "download en/en_US/joe/medium/en_US-joe-medium.onnx" in result.stderr  # its bar
    model_dir = tmp_path / "cache" / "models" / "hub-joe"
    for path in files.values():
        assert (model_dir / path.name).read_bytes() == path.read_bytes()
    downloaded = {r.path.rsplit("/", 1)[-1] for r in local_hub.log
                  if r.method == "GET" and "/resolve/" in r.path}
    assert downloaded == {p.name for p in files.values()}
