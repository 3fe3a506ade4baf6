"""Shared fixtures. Real weights come from the model cache that the set-up fills
(`omni pull`); a test that needs a model pulls it itself if it is missing."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.catalog import Catalog
from mofa_omni.loading import open_model
from mofa_omni.store import ModelStore


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return Catalog.load([])  # the built-in catalog only: user files must not change test results


@pytest.fixture(scope="session")
def store() -> ModelStore:
    return ModelStore()


@pytest.fixture(scope="session")
def model(catalog: Catalog, store: ModelStore) -> Iterator[Callable[[str], ModelAdapter]]:
    """``model(name)``: the loaded adapter of a catalog model, shared by the whole session."""
    loaded: dict[str, ModelAdapter] = {}

    def get(name: str) -> ModelAdapter:
        if name not in loaded:
            loaded[name] = open_model(name, catalog=catalog, store=store)
        return loaded[name]

    yield get
    for adapter in loaded.values():
        adapter.unload()
