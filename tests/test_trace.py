"""mofa_omni.node.trace: off without MOFA_OMNI_TRACE; several processes append whole lines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mofa_omni.node import trace
from mofa_omni.node.host import MessageMeta


def test_nothing_is_written_when_the_variable_is_unset(tmp_path: Path, monkeypatch):
    monkeypatch.delenv(trace.TRACE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert trace.trace_path() is None
    trace.record("llm", "send", "result", MessageMeta("reply-1", 0, False, 1, 2))
    assert list(tmp_path.iterdir()) == []


def test_a_line_holds_the_message_metadata(tmp_path: Path, monkeypatch):
    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv(trace.TRACE_ENV, str(path))
    trace.record("llm", "send", "result", MessageMeta("reply-1", 3, False, 11, 22), chars=5)
    trace.record("sink", "recv", "audio", {"request_id": "reply-1", "seq": 0, "final": True,
                                          "origin_ns": 11, "sent_ns": 33})
    trace.record("asr", "recv", "speech_recognition", None)
    first, second, third = trace.read(path)
    assert {k: first[k] for k in ("node", "event", "port", "request_id", "seq", "final",
                                  "origin_ns", "sent_ns", "chars")} == {
        "node": "llm", "event": "send", "port": "result", "request_id": "reply-1", "seq": 3,
        "final": False, "origin_ns": 11, "sent_ns": 22, "chars": 5}
    assert first["now_ns"] > 0 and first["now_ns"] <= second["now_ns"]
    assert second["final"] is True and second["sent_ns"] == 33
    assert third["request_id"] is None and third["node"] == "asr"


WRITER = """
import sys
from mofa_omni.node import trace
name = sys.argv[1]
for i in range(int(sys.argv[2])):
    trace.record(name, "send", "result", {"request_id": f"{name}-{i}", "seq": i},
                 padding="x" * 2000)
"""


def test_lines_from_two_processes_land_intact(tmp_path: Path):
    path = tmp_path / "trace.jsonl"
    env = {**os.environ, trace.TRACE_ENV: str(path)}
    lines = 400
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, name, str(lines)], env=env)
               for name in ("a", "b")]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    raw = path.read_text().splitlines()
    assert len(raw) == 2 * lines
    records = trace.read(path)  # every line parses: none was torn or interleaved
    assert len(records) == 2 * lines
    for name in ("a", "b"):
        mine = [r for r in records if r["node"] == name]
        assert [r["seq"] for r in mine] == list(range(lines))
        assert all(r["request_id"] == f"{name}-{r['seq']}" and len(r["padding"]) == 2000
                   for r in mine)
