"""Reading a dataflow's wiring from its descriptor (mofa_omni.node.wiring), on a shipped graph."""

from __future__ import annotations

from mofa_omni.launch import dataflows
from mofa_omni.node.wiring import input_source, readers, source_node


def test_an_input_reads_the_same_source_in_either_yaml_form():
    assert input_source("llm/result") == input_source({"source": "llm/result",
                                                       "queue_size": 10}) == "llm/result"
    assert source_node({"source": "dora/timer/millis/20"}) == "dora"
    assert source_node("") == "" and input_source({}) == ""


def test_who_reads_the_dialogues_questions_in_the_omni_voice_graph():
    """voice.omni.yml: the omni node reads `chat`, the cascade's LLM `cascade_chat`, the
    cascade's ASR `hear`; the omni node, the LLM and the sink stop on `cancel`."""
    graph = dataflows.load(dataflows.shipped("voice.omni"))
    assert readers(graph, "dialogue/chat") == [("omni", "request")]
    assert readers(graph, "dialogue/cascade_chat") == [("llm", "request")]
    assert readers(graph, "dialogue/hear") == [("asr", "speech_recognition")]
    assert {node for node, _ in readers(graph, "dialogue/cancel")} >= {"omni", "llm"}
    assert readers(graph, "dialogue/nothing") == []
