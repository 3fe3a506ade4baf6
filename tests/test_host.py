"""The node host: requests in, results or errors out, never an exception (no dora, no weights)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from mofa_omni.adapters.loading import open_model
from mofa_omni.contract import arrow
from mofa_omni.contract.tasks import ErrorReport, GenericRequest, GenericResult
from mofa_omni.models.store import ModelStore
from mofa_omni.node.host import ModelHost
from tests.conftest import textstats_catalog


@pytest.fixture()
def host(third_party: Path, tmp_path: Path) -> ModelHost:
    catalog = textstats_catalog(tmp_path, ["the"])
    adapter = open_model("textstats-en", catalog=catalog, store=ModelStore(tmp_path / "cache"))
    return ModelHost(adapter, "stats")


def request(texts: list[str]) -> pa.Array:
    return arrow.encode(GenericRequest("text.stats", pa.RecordBatch.from_pydict({"text": texts})))


def test_result_carries_request_metadata(host: ModelHost):
    (out,) = host.handle("request", request(["the cat sat"]), {"request_id": "r1", "origin_ns": 5})
    assert out.output == "result"
    assert arrow.decode(out.value, GenericResult).batch.to_pydict() == {"words": [3], "stopwords": [1]}
    assert (out.meta.request_id, out.meta.seq, out.meta.final, out.meta.origin_ns) == ("r1", 0, True, 5)
    assert out.meta.sent_ns > 0


def test_requests_without_an_id_get_one(host: ModelHost):
    ids = [next(iter(host.handle("generic", request(["a"])))).meta.request_id for _ in range(2)]
    assert ids == ["stats-1", "stats-2"]


@pytest.mark.parametrize(("input_id", "value", "message"), [
    ("request", pa.array([1, 2]), "expected an Arrow struct array"),
    ("speech_recognition", request(["a"]), "does not serve speech_recognition"),
    ("audio", request(["a"]), "input 'audio' names no task; this node's inputs are: request, generic"),
])
def test_bad_requests_become_error_reports_naming_the_request(host, input_id, value, message):
    (out,) = host.handle(input_id, value, {"request_id": "bad-1"})
    assert out.output == "error"
    report = arrow.decode(out.value, ErrorReport)
    assert (report.request_id, report.kind, report.node) == ("bad-1", "bad_request", "stats")
    assert message in report.message
    (good,) = host.handle("request", request(["still serving"]))  # and it keeps serving
    assert good.output == "result"


def test_a_failing_model_is_an_internal_error_not_a_crash(host: ModelHost, monkeypatch):
    def explode(request):
        raise RuntimeError("kernel fault")

    monkeypatch.setattr(host.adapter, "run_generic", explode)
    (out,) = host.handle("request", request(["x"]), {"request_id": "r9"})
    report = arrow.decode(out.value, ErrorReport)
    assert (report.kind, report.message) == ("internal", "RuntimeError: kernel fault")


def test_a_model_that_is_not_loaded_is_the_servers_state_not_a_bad_request(host: ModelHost):
    host.adapter.unload()
    (out,) = host.handle("request", request(["the cat"]), {"request_id": "r1"})
    report = arrow.decode(out.value, ErrorReport)
    assert (out.output, report.kind) == ("error", "unavailable")
    assert "is not loaded" in report.message
