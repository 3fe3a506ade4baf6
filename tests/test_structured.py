"""Structured output: replies constrained to a JSON Schema, on both LLM backends with real
weights; the schema subset's errors; the Arrow and OpenAI request paths."""

from __future__ import annotations

import json

import msgspec
import pytest

from mofa_omni.adapters.structured import Choice, Integer, Text
from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.schema import parse_schema
from mofa_omni.contract.tasks import ChatMessage, ChatRequest, validate_request
from mofa_omni.gateway.openai_bodies import ChatBody

SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string", "maxLength": 20},
                         "country": {"type": "string", "enum": ["France", "Italy", "Spain"]},
                         "population_millions": {"type": "integer", "minimum": 0,
                                                 "maximum": 50},
                         "capital": {"type": "boolean"}},
          "required": ["city", "country", "population_millions", "capital"]}


def ask(question: str, schema: dict = SCHEMA, max_tokens: int = 64) -> ChatRequest:
    return ChatRequest([ChatMessage("system", "Answer with JSON."), ChatMessage("user", question)],
                       max_tokens, json_schema=json.dumps(schema))


def test_the_schema_subset_is_parsed_in_order():
    shape = parse_schema(SCHEMA)
    assert [name for name, _ in shape.fields] == ["city", "country", "population_millions",
                                                  "capital"]
    assert shape.fields[0][1] == Text(20, 0)
    assert shape.fields[1][1] == Choice(("France", "Italy", "Spain"))
    assert shape.fields[2][1] == Integer(0, 50)
    assert shape.fields[3][1] == Choice((True, False))


@pytest.mark.parametrize("schema, complaint", [
    ({"type": "array"}, "top level"),
    ({"type": "object", "properties": {}}, "at least one property"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": []}, "required"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "x+"}}}, "pattern"),
    ({"type": "object", "properties": {"a": {"type": "array"}}}, "'array' is not supported"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "required"),
    ({"type": "object", "properties": {"a": {"enum": []}}}, "enum"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 3, "maximum": 1}}},
     "minimum above maximum"),
    ("{not json", "not JSON"),
])
def test_unsupported_schemas_are_refused_by_name(schema, complaint):
    text = schema if isinstance(schema, str) else json.dumps(schema)
    with pytest.raises(ContractError, match=complaint):
        validate_request(ChatRequest([ChatMessage("user", "hi")], json_schema=text))


def test_the_schema_travels_in_the_arrow_request():
    request = ask("Where is Rome?")
    assert arrow.decode(arrow.encode(request), ChatRequest) == request


def test_openai_response_format_becomes_the_schema():
    body = msgspec.json.decode(json.dumps({
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "city", "schema": SCHEMA}}}), type=ChatBody)
    assert json.loads(body.to_request().json_schema) == SCHEMA
    odd = msgspec.json.decode(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}],'
                              b'"response_format": {"type": "json_object"}}', type=ChatBody)
    with pytest.raises(ContractError, match="response_format"):
        odd.to_request()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ctranslate2", "mlx", "llama.cpp"])
def test_replies_satisfy_the_schema_on_every_backend(model, backend):
    llm = model("smollm2-135m", backend)
    chunks = list(llm.generate(ask("Tell me about Paris, the capital of France.")))
    assert chunks[-1].final and chunks[-1].finish_reason == "stop"
    reply = json.loads("".join(c.text for c in chunks))
    assert list(reply) == ["city", "country", "population_millions", "capital"]
    assert reply["country"] == "France"  # the model's choice among the enum
    assert isinstance(reply["city"], str) and 0 < len(reply["city"]) <= 20
    assert reply["city"].strip() and '"' not in reply["city"]
    assert isinstance(reply["population_millions"], int) and 0 <= reply["population_millions"] <= 50
    assert isinstance(reply["capital"], bool)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ctranslate2", "llama.cpp"])
def test_the_choice_follows_the_question(model, backend):
    llm = model("smollm2-135m", backend)
    schema = {"type": "object", "properties": {"country": {"enum": ["France", "Italy", "Spain"]}}}
    for city, country in [("Rome", "Italy"), ("Madrid", "Spain"), ("Paris", "France")]:
        reply = "".join(c.text for c in llm.generate(ask(f"Which country is {city} in?", schema)))
        assert json.loads(reply) == {"country": country}


@pytest.mark.slow
def test_a_reply_cut_by_max_tokens_says_so(model):
    chunks = list(model("smollm2-135m", "ctranslate2").generate(ask("Paris?", max_tokens=3)))
    assert chunks[-1].final and chunks[-1].finish_reason == "length"
