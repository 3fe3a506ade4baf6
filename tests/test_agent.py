"""The agent node: its tool loop as a pure state machine (calls, results, tool errors and
timeouts, deadlines, barge-in), its tools' configuration, and real graphs — dataflows/agent.yml
answering from its documents, and a tool too slow to answer read by the model as an error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mofa_omni.agent.loop import Agent, AgentSettings, Answer, AskLLM, CallTool, CancelLLM
from mofa_omni.agent.tools import ToolSpec, parse_tools
from mofa_omni.contract.errors import ConfigError, ContractError
from mofa_omni.contract.tasks import RerankRequest, RerankResult, TextChunk, ToolCall, ToolResult
from mofa_omni_nodes.weather_stub import TABLE, forecast
from tests.dataflow_run import finish, start_dataflow

ROOT = Path(__file__).resolve().parents[1]
WEATHER_YAML = """
- name: get_weather
  description: Get the current weather in a city
  kind: call
  output: weather
  parameters: {type: object, properties: {city: {type: string}}, required: [city]}
"""


@pytest.fixture
def tools(tmp_path: Path) -> list[ToolSpec]:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("The gateway listens on port 8000.")
    (tmp_path / "docs" / "b.txt").write_text("The default voice is Joe.")
    (tmp_path / "docs" / "skipped.png").write_bytes(b"\x89PNG")
    search = ("- {name: search_documents, description: Search the documents, kind: rerank, "
              "output: search, documents: docs, top_n: 1, query: question}")
    return parse_tools(search + WEATHER_YAML, tmp_path)


def call(name: str, arguments: dict, call_id: str = "call_1") -> ToolCall:
    return ToolCall(call_id, name, json.dumps(arguments))


def test_a_question_goes_through_a_tool_to_an_answer(tools):
    agent = Agent(tools, AgentSettings(system="Use the tools."))
    [ask] = agent.ask("q-1", "Which port?", now=0)
    assert isinstance(ask, AskLLM) and ask.request_id == "q-1-llm-1"
    assert ask.request.tool_choice == "required"
    assert [t.name for t in ask.request.tools] == ["search_documents", "get_weather"]
    assert agent.reply("q-1-llm-1", TextChunk("Let me look."), 1) == []
    [sent] = agent.reply("q-1-llm-1", TextChunk("", final=True, finish_reason="tool_calls",
                                                tool_calls=[call("search_documents",
                                                                 {"query": "port"})]), 1)
    # query: question -- ranked for the question and the model's query together
    assert sent == CallTool("search", "q-1-tool-1", RerankRequest(
        "Which port? port", ["The gateway listens on port 8000.", "The default voice is Joe."]))
    text = tools[0].result_text(RerankResult([0.9, 0.1]))
    assert text == "The gateway listens on port 8000."
    [again] = agent.tool_answered("q-1-tool-1", text, 2)
    assert again.request_id == "q-1-llm-2" and again.request.tool_choice == "auto"
    roles = [(m.role, m.content) for m in again.request.messages]
    assert roles == [("system", "Use the tools."), ("user", "Which port?"),
                     ("assistant", "Let me look."), ("tool", text)]
    assert again.request.messages[2].tool_calls[0].name == "search_documents"
    assert agent.reply("q-1-llm-1", TextChunk("late", final=True), 3) == []  # an old request
    [answer] = agent.reply("q-1-llm-2", TextChunk("Port 8000.", final=True), 3)
    assert answer == Answer("q-1", "Port 8000.", steps=2) and not agent.busy


def test_tool_errors_and_timeouts_are_results_the_model_reads(tools):
    agent = Agent(tools, AgentSettings(tool_deadline_s=5, max_steps=2))
    agent.ask("q-1", "Weather in Paris and Atlantis?", now=0)
    sent = agent.reply("q-1-llm-1", TextChunk("", final=True, tool_calls=[
        call("get_weather", {"city": "Paris"}, "c1"),
        call("get_weather", {"city": "Atlantis"}, "c2")]), 1)
    assert [s.request_id for s in sent] == ["q-1-tool-1", "q-1-tool-2"]
    assert isinstance(sent[0].message, ToolCall)
    assert agent.tool_failed("q-1-tool-2", "no weather for 'Atlantis'", 2) == []
    assert agent.expire(5.9) == []
    [again] = agent.expire(6.0)  # the Paris call is past its 5 s
    assert [m.content for m in again.request.messages if m.role == "tool"] == [
        "error: the tool get_weather did not answer within 5 s",
        "error: no weather for 'Atlantis'"]
    assert again.request.tool_choice == "none"  # the last step: the model must answer
    assert agent.tool_answered("q-1-tool-1", "sunny", 7) == []  # too late: ignored


def test_deadlines_and_barge_in_end_the_turn_explicitly(tools):
    agent = Agent(tools, AgentSettings(turn_deadline_s=10))
    agent.ask("q-1", "Which port?", now=0)
    assert agent.ask("q-2", "Which voice?", now=1) == []  # waits for q-1
    ended = agent.expire(10)
    assert ended[:2] == [CancelLLM("q-1-llm-1"),
                         Answer("q-1", "", "no answer within 10 s", steps=1)]
    assert isinstance(ended[2], AskLLM) and ended[2].request_id == "q-2-llm-1"
    assert agent.barge_in(11)[:2] == [CancelLLM("q-2-llm-1"),
                                      Answer("q-2", "", "interrupted", steps=1)]
    assert not agent.busy and agent.reply("q-2-llm-1", TextChunk("x", final=True), 12) == []
    agent.ask("q-3", "?", 13)
    assert agent.llm_failed("q-3-llm-1", "out of memory", 14) == [
        Answer("q-3", "", "the LLM failed: out of memory", steps=1)]


@pytest.mark.parametrize("yaml_text, complaint", [
    ("- {name: f, description: d, kind: shell, output: o}", "kind 'shell' is not one of"),
    ("- {name: f, description: d, kind: call, output: o}", "parameters"),
    ("- {name: f, description: d, kind: rerank, output: o, documents: nowhere}",
     "documents must name a folder"),
    ("- {name: f, description: d, kind: call, output: o, colour: red, parameters: {}}",
     "unknown field.s. colour"),
    ("- {name: f, description: d, kind: call, output: o, parameters: {type: array}}",
     "the top level must be"),
    (WEATHER_YAML + WEATHER_YAML, "its own name and output"),
    ("[unclosed", "not YAML"),
])
def test_bad_tool_declarations_are_named(tmp_path, yaml_text, complaint):
    with pytest.raises(ConfigError, match=complaint):
        parse_tools(yaml_text, tmp_path)


def test_the_weather_stub_answers_known_cities_only():
    assert forecast(call("get_weather", {"city": "Paris"}), TABLE).startswith(
        "The weather in Paris: sunny")
    with pytest.raises(ContractError, match="no weather for 'Atlantis'; known cities"):
        forecast(call("get_weather", {"city": "Atlantis"}), TABLE)
    with pytest.raises(ContractError, match="needs"):
        forecast(ToolCall("c", "get_weather", "[]"), TABLE)
    assert ToolResult("c", "x").content == "x"


@pytest.mark.slow
def test_the_agent_graph_answers_from_its_documents():
    process = start_dataflow(ROOT / "dataflows" / "agent.yml", {})
    log = finish(process, 300)
    assert process.returncode == 0, log[-5000:]
    answers = dict(re.findall(r"agent: agent: (q-\d+): (.*)", log))  # the answers' first lines
    # SmolLM2-135M searched, read the document the rerank node ranked first, and answered;
    # asked about rain in London, it called the weather stub
    assert "8000" in answers["q-1"], log[-5000:]
    assert "light rain" in answers["q-2"] and "get_weather" in log, log[-5000:]
    assert "Joe" in answers["q-3"], log[-5000:]
    assert "Traceback" not in log


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["llama.cpp", "ctranslate2", "mlx"])
def test_a_tool_too_slow_is_an_error_the_model_reads_and_the_turn_ends(backend):
    # BACKEND reaches every node of the graph: only the LLM node reads it
    process = start_dataflow(ROOT / "tests" / "dataflows" / "agent_faults.yml",
                             {"BACKEND": backend})
    log = finish(process, 300)
    assert process.returncode == 0, log[-5000:]
    assert "q-1-llm-2: the tools answered ['error: the tool get_weather did not answer " \
           "within 1 s']" in log, log[-5000:]
    answer = next(line for line in log.splitlines() if "agent: agent: q-1: " in line)
    assert "(2 steps)" in answer and "still calling tools" not in answer
    assert f"loaded smollm2-135m on {backend}" in log
    assert "Traceback" not in log
