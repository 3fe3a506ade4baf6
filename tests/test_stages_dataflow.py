"""Stages and stream integrity in real dora dataflows (tests/dataflows/stages.yml, gaps.yml)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mofa_omni.media.text import normalize_words
from tests.dataflow_run import finish, start_dataflow

FLOWS = Path(__file__).parent / "dataflows"


@pytest.mark.slow
def test_fused_and_split_stages_answer_the_same(tmp_path: Path):
    report_path = tmp_path / "report.json"
    log = finish(start_dataflow(FLOWS / "stages.yml", {"REPORT": str(report_path)}), 400)
    assert report_path.exists(), log[-5000:]
    report = json.loads(report_path.read_text())
    assert not report.get("timeout"), report
    fused, split = report["asr_fused"], report["asr_split"]
    for wav in report["wavs"]:  # the audio features crossed processes: the same words came out
        assert fused[wav]["text"] == split[wav]["text"], (wav, report)
        assert fused[wav]["model"] == ("whisper-tiny.en:log_mel -> whisper-tiny.en:encode -> "
                                       "whisper-tiny.en:decode")
    assert "capital of france" in " ".join(normalize_words(fused["01-capital-of-france.wav"]["text"]))
    assert fused["too-long"] == {"error": "bad_request"}
    for query, best in report["queries"]:
        scores_fused, scores_split = report["rank_fused"][query], report["rank_split"][query]
        assert scores_fused == pytest.approx(scores_split, abs=1e-6)
        assert max(range(3), key=scores_fused.__getitem__) == best, (query, scores_fused)
    assert report["tiny_pool_error"] == {**{wav: "too_large" for wav in report["wavs"]},
                                         "too-long": "bad_request"}
    [too_large] = {e["message"] for e in report["errors"] if e["kind"] == "too_large"}
    assert "does not fit this node's 512.0 KiB shared-memory pool" in too_large
    assert "shared_memory_pool_size" in too_large
    unexpected = [e for e in report["errors"] if e["kind"] not in ("too_large", "bad_request")]
    assert not unexpected and report["lost"] == {}, report


def test_a_burst_that_dora_thins_out_is_counted_gap_by_gap(tmp_path: Path):
    report_path = tmp_path / "report.json"
    log = finish(start_dataflow(FLOWS / "gaps.yml", {"REPORT": str(report_path)}), 120)
    report = json.loads(report_path.read_text())
    values, lost = report["values"], report["lost"].get("numbers", 0)
    assert values == sorted(values) and values[-1] == 300  # the end mark, sent into an empty queue
    assert lost > 0, "dora dropped nothing: the test did not exercise a gap"
    assert len(values) + lost == 301  # every dropped message was counted, none twice
    assert "message(s) lost on input 'numbers'" in log
