"""The project's errors: one root, whose fault it is, and the kinds nodes answer with."""

from __future__ import annotations

import importlib
import inspect

import pytest

from mofa_omni.contract import arrow
from mofa_omni.contract.errors import (
    AdapterError,
    ConfigError,
    ContractError,
    ErrorKind,
    ModelLoadError,
    ModelNotLoaded,
    OmniError,
    ServerError,
)
from mofa_omni.contract.tasks import ErrorReport
from tests.test_layout import MODULES


def project_exceptions() -> list[type[BaseException]]:
    found = {}
    for name in MODULES:
        if name.startswith("mofa_omni_nodes"):
            continue  # node programs re-exec for OpenBLAS when imported
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == name:
                found[f"{name}.{cls.__qualname__}"] = cls
    return [found[key] for key in sorted(found)]


def test_every_error_of_the_project_derives_from_the_root():
    strays = [f"{cls.__module__}.{cls.__qualname__}" for cls in project_exceptions()
              if not issubclass(cls, OmniError) and not cls.__name__.startswith("_")]
    assert not strays, f"errors outside OmniError: {strays}"


def test_whose_fault_it_is_shows_in_the_hierarchy():
    for caller in (ContractError, ConfigError, AdapterError):
        assert issubclass(caller, ValueError) and caller.kind is ErrorKind.BAD_REQUEST
        assert caller.kind.caller_mistake
    for server in (ModelLoadError, ModelNotLoaded):
        assert issubclass(server, ServerError) and issubclass(server, RuntimeError)
        assert server.kind is ErrorKind.UNAVAILABLE and not server.kind.caller_mistake
    assert not issubclass(ServerError, ContractError)


def test_an_error_report_takes_only_known_kinds():
    assert ErrorReport("r", "timeout", "slow").kind is ErrorKind.TIMEOUT
    assert ErrorReport("r", "timeout", "slow").summary() == "timeout: slow"
    with pytest.raises(ContractError, match="unknown error kind 'timout'; did you mean timeout"):
        ErrorReport("r", "timout", "slow")
    decoded = arrow.decode(arrow.encode(ErrorReport("r", ErrorKind.LOST, "dropped", "llm")),
                           ErrorReport)
    assert decoded == ErrorReport("r", ErrorKind.LOST, "dropped", "llm")
