"""agent: answers questions with an LLM that calls tools, each tool a node of the graph.

Configuration (env in the dataflow YAML):
    AGENT_TOOLS        the tools, as YAML (see mofa_omni.agent.tools): name, description,
                       kind (rerank: documents ranked by a rerank node; call: a node answering
                       a ToolCall), output, and documents / top_n / parameters
    SYSTEM_PROMPT      the model's system message (default: use the tools to answer)
    MAX_TOKENS         per LLM request (default 96)
    MAX_STEPS          LLM requests per question (default 4)
    FIRST_TOOL_CHOICE  required (default: small models then use their tools) or auto
    TOOL_DEADLINE_S    a tool silent this long is a tool error the model sees (default 30)
    TURN_DEADLINE_S    a question not answered within this ends in an error (default 120)

Inputs:
    question     a question: text (a string array) or a Transcript (an ASR node's `result`)
    reply        the LLM node's TextChunk stream; llm_error its ErrorReport
    <output>_result / <output>_error   each tool node's results and errors
    barge_in     optional, any message: the user spoke over the agent, the turn ends
Outputs:
    llm          ChatRequest with the tools (request_id `<question>-llm-<step>`)
    llm_cancel   the request id to cancel on the LLM node (its `cancel` input)
    <output>     each tool's request (RerankRequest or ToolCall; request_id `<question>-tool-N`)
    answer       the answer, one final TextChunk per question (request_id: the question's)
    error        ErrorReport for a question that ended without an answer
    turn_done    the question is over (connect it to the source's `ready`)

Relative document folders are read from where dora was started, else from this checkout.
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa

from mofa_omni.agent.loop import Agent, AgentSettings, Answer, AskLLM, CallTool, CancelLLM
from mofa_omni.agent.tools import parse_tools
from mofa_omni.config import env_choice, env_float, env_int, env_str, exit_on_bad_settings
from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import (
    ErrorReport,
    RerankResult,
    TextChunk,
    ToolResult,
    Transcript,
)
from mofa_omni.node.dispatch import dispatch
from mofa_omni.node.host import MessageMeta
from mofa_omni.node.integrity import CheckedNode

log = logging.getLogger("agent")


def question_text(value: pa.Array) -> str:
    """A question as text: a string array's first value, or a Transcript's text."""
    if pa.types.is_string(value.type) or pa.types.is_large_string(value.type):
        if len(value) != 1 or not value[0].is_valid:
            raise ContractError("question: expected one string")
        return value[0].as_py()
    return arrow.decode(value, Transcript).text


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with exit_on_bad_settings("agent"):  # fail fast, before joining the graph
        tools = parse_tools(env_str("AGENT_TOOLS", ""))
        defaults = AgentSettings()
        settings = AgentSettings(
            env_str("SYSTEM_PROMPT", defaults.system), env_int("MAX_TOKENS", defaults.max_tokens),
            env_int("MAX_STEPS", defaults.max_steps),
            env_float("TOOL_DEADLINE_S", defaults.tool_deadline_s, minimum=0.1),
            env_float("TURN_DEADLINE_S", defaults.turn_deadline_s, minimum=1),
            env_choice("FIRST_TOOL_CHOICE", "required", ("required", "auto")))
    agent = Agent(tools, settings)
    by_output = {tool.output: tool for tool in tools}
    node = CheckedNode()

    def act(actions) -> None:
        for action in actions:
            now = time.time_ns()
            match action:
                case AskLLM(request_id, request):
                    results = []  # the tool messages the model reads this step
                    for message in reversed(request.messages):
                        if message.role != "tool":
                            break
                        results.insert(0, message.content)
                    if results:
                        log.info("%s: the tools answered %s", request_id, results)
                    node.send_output("llm", arrow.encode(request),
                                     MessageMeta(request_id, 0, True, now, now).to_dora())
                case CallTool(output, request_id, message):
                    log.info("%s: %s", request_id, message)
                    node.send_output(output, arrow.encode(message),
                                     MessageMeta(request_id, 0, True, now, now).to_dora())
                case CancelLLM(request_id):
                    node.send_output("llm_cancel", pa.array([request_id]),
                                     MessageMeta(request_id, 0, True, now, now).to_dora())
                case Answer(question_id, text, error, steps, kind):
                    meta = MessageMeta(question_id, 0, True, now, now).to_dora()
                    if error:
                        log.warning("%s: %s (after %d steps)", question_id, error, steps)
                        report = ErrorReport(question_id, kind, error, "agent")
                        node.send_output("error", arrow.encode(report), meta)
                    else:
                        log.info("%s: %s (%d steps)", question_id, text, steps)
                        node.send_output("answer", arrow.encode(TextChunk(text, final=True)),
                                         meta)
                    node.send_output("turn_done", pa.array([question_id]), meta)

    def on_tool(input_id: str, meta: MessageMeta, value: pa.Array, now: float):
        output, _, what = input_id.rpartition("_")
        spec = by_output[output]
        if what == "error":
            return agent.tool_failed(meta.request_id, arrow.decode(value, ErrorReport).summary(),
                                     now)
        result = arrow.decode(value, RerankResult if spec.kind == "rerank" else ToolResult)
        return agent.tool_answered(meta.request_id, spec.result_text(result), now)

    handlers = {
        "question": lambda meta, value, now: agent.ask(meta.request_id, question_text(value),
                                                       now),
        "reply": lambda meta, value, now: agent.reply(meta.request_id,
                                                      arrow.decode(value, TextChunk), now),
        "llm_error": lambda meta, value, now: agent.llm_failed(
            meta.request_id, arrow.decode(value, ErrorReport).summary(), now),
        "barge_in": lambda meta, value, now: agent.barge_in(now),
    }
    for output in by_output:
        for suffix in ("result", "error"):
            handlers[f"{output}_{suffix}"] = \
                lambda meta, value, now, name=f"{output}_{suffix}": on_tool(name, meta, value, now)
    dispatch(node, handlers, act, expire=agent.expire, last_input="question",
             busy=lambda: agent.busy, log=log)


if __name__ == "__main__":
    main()
