"""Tool calling: the prompt a model sees, the contract's checks and Arrow form, the OpenAI
bodies, and real models calling tools on every LLM backend (SmolLM2-135M; Gemma 3 270M
choosing by itself under "auto")."""

from __future__ import annotations

import json

import msgspec
import pytest

from mofa_omni.adapters.chat import StopMatcher
from mofa_omni.adapters.tool_format import fallback_instructions, knows_tools, template_messages
from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import (
    ChatMessage,
    ChatRequest,
    TextChunk,
    Tool,
    ToolCall,
    validate_request,
)
from mofa_omni.gateway.openai_bodies import ChatBody, Completion, decode_body

MULTIPLY = Tool("multiply", "Multiply two numbers",
                json.dumps({"type": "object", "properties": {"a": {"type": "number"},
                                                             "b": {"type": "number"}},
                            "required": ["a", "b"]}))
WEATHER = Tool("get_weather", "Get the current weather in a city",
               json.dumps({"type": "object",
                           "properties": {"city": {"type": "string", "description": "The city"},
                                          "unit": {"enum": ["celsius", "fahrenheit"]},
                                          "days": {"type": "integer"}},  # optional: left out
                           "required": ["city", "unit"]}))
TOOLS = [WEATHER, MULTIPLY]
QUESTION = "What is 123 times 457?"  # SmolLM2 alone says 6018 or 6065: the tool is needed
CALL = ToolCall("call_1", "multiply", '{"a": 123, "b": 457}')


def conversation(*extra: ChatMessage) -> list[ChatMessage]:
    return [ChatMessage("user", QUESTION), *extra]


# --- the prompt -------------------------------------------------------------------------


def test_a_template_without_tools_gets_the_fallback_rendering():
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", QUESTION),
                ChatMessage("assistant", "Let me see.",
                            [CALL, ToolCall("call_2", "get_weather", '{"city": "Oslo"}')]),
                ChatMessage("tool", "56211", tool_call_id="call_1"),
                ChatMessage("tool", "sunny", tool_call_id="call_2"),
                ChatMessage("user", "Thanks!")]
    rendered, tools = template_messages(ChatRequest(messages, tools=TOOLS), native=False)
    assert tools is None
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user", "user"]
    assert rendered[0]["content"] == "Be brief.\n\n" + fallback_instructions(TOOLS)
    assert rendered[2]["content"] == (
        'Let me see.\n<tool_call>\n{"name": "multiply", "arguments": {"a": 123, "b": 457}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
        "</tool_call>")
    assert rendered[3]["content"] == ("The result of multiply is: 56211\nThe result of "
                                      "get_weather is: sunny\nAnswer my question with them.")
    # "none": the tools are not shown (the model answers), earlier calls still are
    plain, _ = template_messages(ChatRequest(messages, tools=TOOLS, tool_choice="none"), False)
    assert plain[0]["content"] == "Be brief." and "<tool_call>" in plain[2]["content"]


def test_a_template_that_knows_tools_gets_them_as_hugging_face_templates_take_them():
    assert knows_tools("{% if tools %}...<tool_call>...{% endif %}")
    assert not knows_tools("{{ messages }}") and not knows_tools(None)
    request = ChatRequest(conversation(ChatMessage("assistant", "", [CALL]),
                                       ChatMessage("tool", "56211", tool_call_id="call_1")),
                          tools=[MULTIPLY])
    rendered, tools = template_messages(request, native=True)
    assert tools == [{"type": "function", "function": {
        "name": "multiply", "description": "Multiply two numbers",
        "parameters": json.loads(MULTIPLY.parameters)}}]
    assert rendered[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "multiply", "arguments": {"a": 123, "b": 457}}}]}
    assert rendered[2] == {"role": "tool", "content": "56211", "tool_call_id": "call_1"}


def test_the_stop_matcher_says_which_stop_ended_the_stream():
    matcher = StopMatcher(["\n\n", "<tool_call>"])
    assert matcher.feed("Sure. <tool_") == ("Sure. ", False)
    assert matcher.feed("call>\n{") == ("", True) and matcher.seen == "<tool_call>"


# --- the contract -----------------------------------------------------------------------


@pytest.mark.parametrize("request_, complaint", [
    (ChatRequest(conversation(), tools=[Tool("multiply", parameters='{"type": "array"}')]),
     r"tools\[0\] \(multiply\) parameters: the top level must be"),
    (ChatRequest(conversation(), tools=[Tool("f", parameters=json.dumps(
        {"type": "object", "properties": {"x": {"type": "string", "pattern": "a+"}}}))]),
     r"tools\[0\] \(f\) parameters property 'x': unsupported JSON Schema keyword\(s\) "
     "pattern"),
    (ChatRequest(conversation(), tools=[Tool("bad name")]), "must be 1-64 letters"),
    (ChatRequest(conversation(), tools=[MULTIPLY, MULTIPLY]), "a name is given twice"),
    (ChatRequest(conversation(), tools=TOOLS, tool_choice="required", tool_name="divide"),
     "names the function 'divide', which is not among the tools"),
    (ChatRequest(conversation(), tool_choice="required"), "'required' needs tools"),
    (ChatRequest(conversation(), tools=TOOLS, tool_choice="always"),
     "tool_choice 'always' is not one of"),
    (ChatRequest(conversation(ChatMessage("tool", "56211", tool_call_id="call_9")), tools=TOOLS),
     r"messages\[1\]: a tool message answers tool_call_id 'call_9', which no earlier"),
    (ChatRequest(conversation(ChatMessage("assistant", "", [ToolCall("c", "multiply", "{a: 1")]))),
     r"messages\[1\].tool_calls \(multiply\): the arguments are not JSON"),
    (ChatRequest(conversation(ChatMessage("user", "", [CALL]))), "only an assistant message"),
    (ChatRequest(conversation(), tools=TOOLS, json_schema=MULTIPLY.parameters),
     "cannot be combined"),
])
def test_bad_tools_and_tool_turns_are_refused_by_name(request_, complaint):
    with pytest.raises(ContractError, match=complaint):
        validate_request(request_)


def test_tools_calls_and_results_travel_as_arrow():
    request = ChatRequest(conversation(ChatMessage("assistant", "", [CALL]),
                                       ChatMessage("tool", "56211", tool_call_id="call_1")),
                          tools=TOOLS, tool_choice="required", tool_name="multiply",
                          parallel_tool_calls=False)
    assert arrow.decode(arrow.encode(request), ChatRequest) == request
    chunk = TextChunk("", final=True, finish_reason="tool_calls", tool_calls=[CALL])
    assert arrow.decode(arrow.encode(chunk), TextChunk) == chunk


# --- the OpenAI bodies --------------------------------------------------------------------


def body(**fields) -> ChatBody:
    return decode_body(msgspec.json.encode({"model": "m", "messages": [
        {"role": "user", "content": QUESTION}], **fields}), ChatBody)


def test_openai_tools_become_the_contract_s():
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                               "parameters": json.loads(t.parameters),
                                               "strict": True}} for t in TOOLS]
    request = body(tools=tools, tool_choice={"type": "function", "function": {"name": "multiply"}},
                   parallel_tool_calls=False).to_request()
    assert request.tools == TOOLS
    assert (request.tool_choice, request.tool_name, request.parallel_tool_calls) == \
        ("required", "multiply", False)
    turns = decode_body(msgspec.json.encode({"model": "m", "tools": tools, "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "multiply", "arguments": '{"a": 123, "b": 457}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "56211"}]},
    ]}), ChatBody).to_request()
    assert turns.messages == [ChatMessage("system", "Be brief."), ChatMessage("user", QUESTION),
                              ChatMessage("assistant", "", [CALL]),
                              ChatMessage("tool", "56211", tool_call_id="call_1")]


@pytest.mark.parametrize("fields, complaint", [
    ({"tool_choice": "any"}, "tool_choice: one of"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"},
                                                  "code": "x"}}]}, "unknown field `code`"),
    ({"tools": [{"type": "retrieval"}]}, "Invalid enum value 'retrieval'"),
    ({"functions": []}, "unknown field `functions`"),
    ({"messages": [{"role": "user", "content": "x", "function_call": {"name": "f"}}]},
     "function_call"),
])
def test_unserved_tool_fields_are_refused_by_name(fields, complaint):
    with pytest.raises(Exception, match=complaint):
        body(**fields).to_request()


def test_a_call_is_answered_and_streamed_as_openai_does():
    completion = Completion("chatcmpl-1", "m", 0)
    whole = completion.whole("", "tool_calls", {}, [CALL])["choices"][0]
    assert whole["finish_reason"] == "tool_calls"
    assert whole["message"] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "multiply", "arguments": '{"a": 123, "b": 457}'}}]}
    head, arguments = (c["choices"][0]["delta"]["tool_calls"][0]
                       for c in completion.call_chunks(CALL, 2))
    assert head == {"index": 2, "id": "call_1", "type": "function",
                    "function": {"name": "multiply", "arguments": ""}}
    assert arguments == {"index": 2, "function": {"arguments": '{"a": 123, "b": 457}'}}


# --- real models ------------------------------------------------------------------------

BACKENDS = ["llama.cpp", "ctranslate2", "mlx"]


def ask(llm, messages: list[ChatMessage], **options) -> tuple[str, list[ToolCall], str]:
    chunks = list(llm.generate(ChatRequest(messages, options.pop("max_tokens", 48),
                                           tools=options.pop("tools", TOOLS), **options)))
    assert chunks[-1].final and not any(c.tool_calls for c in chunks if c.final and c.text)
    return ("".join(c.text for c in chunks), [call for c in chunks for call in c.tool_calls],
            chunks[-1].finish_reason)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_required_call_names_the_right_tool_with_valid_arguments(model, backend):
    llm = model("smollm2-135m", backend)
    text, calls, finish = ask(llm, conversation(), tool_choice="required")
    assert (text, finish) == ("", "tool_calls")
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("multiply", {"a": 123, "b": 457})]
    assert calls[0].id.startswith("call_")
    # a named function is called, its arguments fitting its own schema
    _, calls, _ = ask(llm, conversation(), tool_choice="required", tool_name="get_weather",
                      parallel_tool_calls=False)
    assert len(calls) == 1 and calls[0].name == "get_weather"
    arguments = json.loads(calls[0].arguments)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")
    # "none" never calls
    text, calls, finish = ask(llm, conversation(), tool_choice="none")
    assert text and not calls and finish in ("stop", "length")


@pytest.fixture(scope="module")
def float32_ct2(catalog, store):
    """SmolLM2 on CTranslate2 computing in float32. In int8 (the default) the greedy choice
    after a tool's result, answer or call again, is a near tie that the CPU's int8 kernels
    decide: on a CPU with AVX-512 VNNI and AMX it calls the tool again, in float32 (and with
    llama.cpp's Q4 weights) it answers."""
    import dataclasses

    from mofa_omni.adapters.loading import create_adapter

    spec = catalog.get("smollm2-135m")
    llm = create_adapter(dataclasses.replace(spec, options={**spec.options,
                                                            "compute_type": "float32"}),
                         "ctranslate2")
    llm.load(store.prepare(llm))
    yield llm
    llm.unload()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["llama.cpp", "ctranslate2"])
def test_the_tool_s_result_makes_the_answer(model, float32_ct2, backend):
    llm = float32_ct2 if backend == "ctranslate2" else model("smollm2-135m", backend)
    text, calls, _ = ask(llm, conversation(), tool_choice="required")
    result = conversation(ChatMessage("assistant", text, calls),
                          ChatMessage("tool", "56211", tool_call_id=calls[0].id))
    answer, more, finish = ask(llm, result)  # "auto": the model answers
    assert "56211" in answer and not more and finish == "stop"


@pytest.mark.slow
def test_under_auto_the_model_chooses_between_calling_and_answering(model):
    llm = model("gemma-3-270m", "llama.cpp")
    _, calls, finish = ask(llm, conversation())
    assert finish == "tool_calls"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("multiply", {"a": 123, "b": 457})]
    text, calls, finish = ask(llm, [ChatMessage("user", "Hello! How are you?")], max_tokens=12)
    assert text and not calls and finish != "tool_calls"


# --- the Responses API --------------------------------------------------------------------


def test_responses_input_items_become_the_conversation():
    from mofa_omni.gateway.responses import ResponsesBody

    body = msgspec.json.decode(json.dumps({
        "model": "m", "instructions": "Be brief.", "tool_choice": {"type": "function",
                                                                   "name": "multiply"},
        "tools": [{"type": "function", "name": "multiply", "description": "Multiply two numbers",
                   "parameters": json.loads(MULTIPLY.parameters), "strict": True}],
        "input": [{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
                  {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                   "content": [{"type": "output_text", "text": "Let me see.", "annotations": []}]},
                  {"type": "function_call", "call_id": "call_1", "name": "multiply",
                   "arguments": '{"a": 123, "b": 457}'},
                  {"type": "function_call_output", "call_id": "call_1", "output": "56211"}]}),
        type=ResponsesBody)
    request = body.to_request()
    assert request.messages == [ChatMessage("system", "Be brief."), ChatMessage("user", QUESTION),
                                ChatMessage("assistant", "Let me see.", [CALL]),
                                ChatMessage("tool", "56211", tool_call_id="call_1")]
    assert (request.tools, request.tool_choice, request.tool_name) == \
        ([MULTIPLY], "required", "multiply")


@pytest.mark.parametrize("fields, complaint", [
    ({"store": True}, "store: this server keeps no responses"),
    ({"reasoning": {"effort": "low"}}, "reasoning: the models here do not reason"),
    ({"include": ["reasoning.encrypted_content"]}, "include: nothing more can be included"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input items of type 'reasoning'"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     r"input\[0\].content\[0\]: parts of type 'input_image'"),
    ({"input": [{"role": "user", "content": "x", "weight": 2}]}, r"input\[0\]: unknown field"),
    ({"modalities": ["text"]}, "unknown field `modalities`"),
])
def test_responses_fields_not_served_are_refused_by_name(fields, complaint):
    from mofa_omni.gateway.responses import ResponsesBody

    with pytest.raises(Exception, match=complaint):
        decode_body(msgspec.json.encode({"model": "m", "input": "hi", **fields}),
                    ResponsesBody).to_request()


def test_a_streamed_response_opens_and_closes_each_item():
    from mofa_omni.gateway.responses import ResponseBuilder, ResponsesBody

    built = ResponseBuilder("1", "m", ResponsesBody("m", "hi"))
    raw = b"".join([*built.opening(), *built.stream(TextChunk("Let me see.")),
                    *built.stream(TextChunk("", tool_calls=[CALL])),
                    *built.stream(TextChunk("", final=True, finish_reason="tool_calls"))])
    events = [json.loads(line[6:]) for line in raw.decode().splitlines()
              if line.startswith("data: ")]
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    done = events[-1]["response"]
    assert [item["type"] for item in done["output"]] == ["message", "function_call"]
    assert done["output"][1]["call_id"] == "call_1" and events[8]["output_index"] == 1


# A Hermes-style template written for this test (the models here have none that knows tools).
HERMES_TEMPLATE = """
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}
{% endif %}# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and tools %}
{%- elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.mark.slow
def test_a_template_that_knows_tools_renders_them_and_the_calls_still_fit(model):
    from mofa_omni.adapters.chat import chat_prompt_tokens

    llm = model("smollm2-135m", "llama.cpp")
    hf = llm._tokenizer._tokenizer
    saved = hf.chat_template
    hf.chat_template = HERMES_TEMPLATE
    try:
        request = ChatRequest(conversation(ChatMessage("assistant", "", [CALL]),
                                           ChatMessage("tool", "56211", tool_call_id="call_1")),
                              tools=[MULTIPLY])
        text = hf.decode(chat_prompt_tokens(llm._tokenizer, request))
        assert '{"type": "function", "function": {"name": "multiply"' in text
        assert '<tool_call>\n{"name": "multiply", "arguments": {"a": 123, "b": 457}}' in text
        assert "<tool_response>\n56211\n</tool_response>" in text
        assert "Answer my question" not in text  # not the fallback
        _, calls, finish = ask(llm, conversation(), tool_choice="required")
        assert finish == "tool_calls" and calls[0].name == "multiply"
        assert set(json.loads(calls[0].arguments)) == {"a", "b"}
    finally:
        hf.chat_template = saved
