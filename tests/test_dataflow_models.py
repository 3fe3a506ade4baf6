"""The default models as omni-nodes in a real dora dataflow (tests/dataflows/chain.yml)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mofa_omni.media.text import word_error_rate

CHAIN = Path(__file__).parent / "dataflows" / "chain.yml"


def run_dataflow(dataflow: Path, env: dict[str, str], timeout: float = 600) -> str:
    """``dora run`` a dataflow with this interpreter's environment first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    full_env = {**os.environ, **env, "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    result = subprocess.run([os.path.join(bin_dir, "dora"), "run", str(dataflow)],
                            env=full_env, capture_output=True, text=True, timeout=timeout)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    return log


@pytest.mark.slow
def test_spoken_question_through_four_model_nodes(tmp_path: Path):
    report_path = tmp_path / "report.json"
    log = run_dataflow(CHAIN, {"REPORT": str(report_path)})
    assert report_path.exists(), log[-5000:]
    report = json.loads(report_path.read_text())
    assert not report.get("timeout"), (report, log[-5000:])

    assert report["sample_rate"] == 22050 and report["speech_chunks"] >= 1
    assert word_error_rate("What is the capital of France?", report["heard"]) < 0.2, report
    assert "paris" in report["reply"].lower(), report
    assert report["reply_chunks"] > 1  # streamed
    metas = report["metadata"]
    assert [m["seq"] for m in metas] == list(range(len(metas)))
    assert [m["final"] for m in metas] == [False] * (len(metas) - 1) + [True]
    assert all(m["request_id"] == "turn-1" and m["origin_ns"] > 0 for m in metas)
    related, unrelated = report["similarity"]
    assert related > unrelated

    errors = {e["request_id"]: e for e in report["errors"]}
    assert set(errors) == {"bad-empty-audio", "bad-float64-audio", "bad-empty-chat"}, errors
    assert "audio is empty" in errors["bad-empty-audio"]["message"]
    assert "must be list<item: float>, got list<item: double>" in \
        errors["bad-float64-audio"]["message"]
    assert "no messages" in errors["bad-empty-chat"]["message"]
    assert {e["kind"] for e in errors.values()} == {"bad_request"}
    assert {e["node"] for e in errors.values()} == {"asr", "llm"}
    assert "loaded whisper-tiny.en on mlx" in log  # BACKEND in the YAML overrides the choice


def test_omni_node_fails_fast_on_an_unknown_model():
    node = Path(__file__).parents[1] / "nodes" / "omni_node.py"
    result = subprocess.run([sys.executable, str(node)], env={**os.environ, "MODEL": "smolm2"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown model 'smolm2'; did you mean smollm2-135m" in result.stderr


def test_a_third_party_task_kind_runs_in_a_dataflow(third_party: Path, tmp_path: Path):
    """omni-textstats (installed into its own directory) adds "text.stats": the omni-node finds
    its adapter through the entry point and serves it like any task."""
    (tmp_path / "stopwords.json").write_text('["the", "and", "a"]')
    catalog = tmp_path / "catalog.toml"
    catalog.write_text('[models.textstats-en]\nadapter = "textstats"\ntasks = ["generic"]\n'
                       f'format = "json"\nsource = {{ path = "{tmp_path / "stopwords.json"}" }}\n')
    report_path = tmp_path / "report.json"
    python_path = os.pathsep.join(filter(None, [str(third_party), os.environ.get("PYTHONPATH")]))
    run_dataflow(Path(__file__).parent / "dataflows" / "new_task.yml",
                 {"REPORT": str(report_path), "MOFA_OMNI_CATALOG": str(catalog),
                  "PYTHONPATH": python_path}, timeout=120)
    report = json.loads(report_path.read_text())
    assert report["results"] == {"two": {"kind": "text.stats", "words": [5, 2],
                                         "stopwords": [3, 1]}}
    assert "unknown generic task kind 'text.sentiment'" in report["errors"]["odd"]
