"""An omni-node whose scheduler leaves before granting it memory (tests/dataflows/
scheduler_gone.yml): the node's `scheduler` input closes while it has loaded nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mofa_omni.adapters.backends import create_adapter
from tests.dataflow_run import finish, start_dataflow

FLOW = Path(__file__).parent / "dataflows" / "scheduler_gone.yml"


@pytest.mark.slow
def test_a_node_whose_scheduler_left_loads_its_model_itself_and_serves(tmp_path: Path,
                                                                       catalog, store):
    store.prepare(create_adapter(catalog.get("minilm-l6")))  # fetched before the graph runs
    report_path = tmp_path / "report.json"
    log = finish(start_dataflow(FLOW, {"REPORT": str(report_path)}), 120)  # every node exited 0
    report = json.loads(report_path.read_text())
    assert not report.get("timeout") and not report.get("node_left"), (report, log[-5000:])
    assert report["errors"] == [] and report["vectors"] == 1, report
    assert report["model"] == "minilm-l6"
    assert "the scheduler stopped: this node now loads its model on its own" in log
    assert "scheduler: load minilm-l6 (the scheduler stopped)" in log  # the node's own command
    assert "Traceback" not in log and "NameError" not in log, log[-5000:]
