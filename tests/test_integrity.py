"""Numbered streams, gap detection, payloads checked against the pool; gaps in `omni status`."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mofa_omni.contract.errors import ConfigError
from mofa_omni.node.faults import parse_drops
from mofa_omni.node.integrity import (
    DEFAULT_POOL_BYTES,
    STREAM_SEQ,
    CheckedNode,
    GapDetector,
    PayloadTooLarge,
    payload_bytes,
    pool_bytes,
)
from mofa_omni.scheduler.bookkeeping import Scheduling
from mofa_omni.scheduler.messages import NodeReport
from mofa_omni.scheduler.policy import SchedulerState
from mofa_omni.scheduler.status import render_status

MB = 1 << 20


class RecordingNode:
    """The two calls CheckedNode makes on a dora node, recorded (inputs played back)."""

    def __init__(self, events=(), fail_on: int | None = None):
        self.events, self.sent, self.fail_on = list(events), [], fail_on

    def send_output(self, output, value, metadata):
        if self.fail_on == len(self.sent):
            self.fail_on = None
            raise RuntimeError("dora could not send")
        self.sent.append((output, metadata))

    def next(self, timeout=None):
        return self.events.pop(0) if self.events else None


def numbered(input_id: str, seq: int) -> dict:
    return {"type": "INPUT", "id": input_id, "value": pa.array([seq]),
            "metadata": {STREAM_SEQ: seq}}


def test_gaps_are_counted_per_input_and_restarts_are_not_gaps():
    gaps = GapDetector()
    assert [gaps.check("a", {STREAM_SEQ: s}) for s in (0, 1, 4, 5, 9)] == [0, 0, 2, 0, 3]
    assert gaps.check("b", {STREAM_SEQ: 0}) == 0
    assert gaps.check("b", {}) == 0 and gaps.check("b", None) == 0  # not numbered: not checked
    assert gaps.check("a", {STREAM_SEQ: 0}) == 0  # the sender restarted: numbering begins again
    assert gaps.check("a", {STREAM_SEQ: 2}) == 1
    assert gaps.lost() == {"a": 6}
    assert (gaps.inputs["a"].received, gaps.inputs["a"].restarts) == (7, 1)


def test_outputs_are_numbered_each_on_its_own_and_a_failed_send_keeps_its_number():
    inner = RecordingNode(fail_on=2)
    node = CheckedNode(inner, "n")
    node.send_output("a", pa.array([1]), {"request_id": "r"})
    node.send_output("b", pa.array([1]))
    with pytest.raises(RuntimeError):
        node.send_output("a", pa.array([1]))
    node.send_output("a", pa.array([1]))
    assert inner.sent == [("a", {"request_id": "r", STREAM_SEQ: 0}), ("b", {STREAM_SEQ: 0}),
                          ("a", {STREAM_SEQ: 1})]


def test_a_checked_node_logs_and_counts_what_dora_dropped(caplog):
    node = CheckedNode(RecordingNode([numbered("audio", 0), numbered("audio", 1),
                                      numbered("audio", 5), {"type": "STOP", "id": ""}]), "vad")
    assert [event["type"] for event in node] == ["INPUT"] * 3 + ["STOP"]
    assert node.gaps.lost() == {"audio": 3}
    assert "vad: 3 message(s) lost on input 'audio' before stream_seq 5" in caplog.text


def test_messages_dropped_on_purpose_keep_their_numbers_and_receivers_see_the_gap(monkeypatch):
    monkeypatch.setenv("DROP_MESSAGES", "a:1, result:final:1")
    inner = RecordingNode()
    node = CheckedNode(inner, "n")
    for output, final in [("a", True), ("a", True), ("a", True), ("result", False),
                          ("result", True), ("result", False), ("result", True),
                          ("result", True)]:
        node.send_output(output, pa.array([1]), {"final": final})
    sent = [(output, meta[STREAM_SEQ]) for output, meta in inner.sent]
    # a's second message; the second *final* message on result (its 4th): gone, numbers kept
    assert sent == [("a", 0), ("a", 2), ("result", 0), ("result", 1), ("result", 2),
                    ("result", 4)]
    gaps = GapDetector()
    assert [gaps.check(output, {STREAM_SEQ: seq}) for output, seq in sent] == [0, 1, 0, 0, 0, 1]


@pytest.mark.parametrize("value", ["a", "a:x", "a:last:1", ":1", "a:final:", "a:1:2"])
def test_a_malformed_drop_rule_is_named(value):
    with pytest.raises(ConfigError, match="neither OUTPUT:N nor OUTPUT:final:N"):
        parse_drops(value)


def test_a_payload_bigger_than_the_pool_is_refused_with_the_fix():
    node = CheckedNode(RecordingNode(), "tts")
    node.pool = 4 * MB
    node.send_output("result", pa.array(np.zeros(4 * MB - 64, np.uint8)))
    with pytest.raises(PayloadTooLarge, match=r"'result': a 5.0 MiB payload does not fit this "
                                              r"node's 4.0 MiB shared-memory pool; raise "
                                              r"`shared_memory_pool_size`"):
        node.send_output("result", pa.array(np.zeros(5 * MB, np.uint8)))
    assert len(node.node.sent) == 1


def test_the_pool_comes_from_the_node_config():
    config = "node_id: tts\nrun_config:\n  inputs: {}\n  shared_memory_pool_size: 33554432\n"
    assert pool_bytes(config) == 32 * MB
    assert pool_bytes("node_id: tts\n") == DEFAULT_POOL_BYTES
    assert payload_bytes(pa.array(np.zeros(1000, np.float32))) == 4000


def test_omni_status_shows_the_messages_each_node_lost():
    scheduling = Scheduling(SchedulerState(budget=1000 * MB), ("asr", "tts"), started=0.0)
    scheduling.on_message(NodeReport("asr", "measure", "ready", "whisper", 300 * MB,
                                     lost={"speech_recognition": 4}), 1)
    scheduling.on_message(NodeReport("tts", "measure", "ready", "piper", 200 * MB), 1)
    status = scheduling.status(2, 5000 * MB, 8000 * MB, lost={"tts": 1})
    assert status.nodes[0].lost == {"speech_recognition": 4} and status.lost == {"tts": 1}
    assert "messages lost  asr/speech_recognition 4, scheduler/tts 1 (dora dropped them" in \
        render_status(status)
    clean = Scheduling(SchedulerState(budget=1000 * MB), ("asr",), started=0.0)
    assert "messages lost  none" in render_status(clean.status(1, 0, 0))


def test_a_request_a_later_report_never_saw_is_lost_asked_again_twice_then_given_up():
    from mofa_omni.node.delivery import ARRIVAL_NS, Awaiting
    from mofa_omni.scheduler.messages import Delivery

    awaiting = Awaiting("llm", "request")
    awaiting.sent("reply-1", 0, now_ns=0)
    awaiting.sent("reply-2", 1, now_ns=0)
    awaiting.sent("unnumbered", None, now_ns=0)  # a plain node's send: nothing to check
    assert awaiting.waiting() == ["reply-1", "reply-2"]
    # A report made soon after sending may not have seen them yet: nothing is lost.
    assert awaiting.check(Delivery(ARRIVAL_NS - 1, {"request": 0})) == []
    # A report well after: reply-1 (seq 0) arrived, reply-2 (seq 1) never did.
    (lost,) = awaiting.check(Delivery(ARRIVAL_NS, {"request": 1}))
    assert (lost.request_id, lost.again) == ("reply-2", True)
    assert awaiting.check(Delivery(ARRIVAL_NS, {"request": 1})) == []  # told once per send
    awaiting.arrived("reply-1")
    for attempt, seq in enumerate((2, 3)):
        awaiting.sent("reply-2", seq, now_ns=10 * ARRIVAL_NS * (attempt + 1))
        (lost,) = awaiting.check(Delivery(10 * ARRIVAL_NS * (attempt + 2), {"request": seq}))
        assert lost.again == (attempt == 0)  # sent three times in all: then it is given up
    assert awaiting.waiting() == []
    # A node that has received nothing on that input yet expects its first message.
    first = Awaiting("llm", "request")
    first.sent("reply-1", 0, now_ns=0)
    assert [lost.request_id for lost in first.check(Delivery(ARRIVAL_NS, {"other": 3}))] == \
        ["reply-1"]
