"""The tools an agent node may call: each one a node of the graph, declared in the dataflow.

``AGENT_TOOLS`` (YAML, in the agent node's env) lists them::

    - name: search_documents          # what the model calls
      description: Search the project's documents
      kind: rerank                    # a node serving rerank ranks the documents for the query
      output: search                  # the agent output feeding that node's request input
      documents: dataflows/documents  # a folder of .md / .txt files, one document each
      top_n: 2                        # the documents given back to the model
      query: call                     # rank for the model's query (default), or "question":
                                      # for the turn's question and the model's query together
    - name: get_weather
      description: Get the current weather in a city
      kind: call                      # a node taking a ToolCall and answering a ToolResult
      output: weather
      parameters: {type: object, properties: {city: {type: string}}, required: [city]}

The result of a tool comes back on the agent's inputs ``<output>_result`` and its errors on
``<output>_error``. A ``rerank`` tool's parameters are ``{"query": string}``; a ``call``
tool's are its own JSON Schema (the subset tool calls are decoded to). ``query: question``
is for small models, whose queries are often no use (SmolLM2-135M asked "Which port does
the gateway listen on?" searches for "https.httplib2.1"): the documents are then ranked for
the user's question followed by the model's query.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mofa_omni.config import data_path
from mofa_omni.contract.errors import ConfigError, ContractError
from mofa_omni.contract.schema import parse_schema
from mofa_omni.contract.tasks import RerankRequest, RerankResult, Tool, ToolCall, ToolResult

KINDS = ("rerank", "call")
QUERIES = ("call", "question")
QUERY_SCHEMA = {"type": "object", "properties": {"query": {"type": "string", "maxLength": 80,
                                                           "minLength": 1}},
                "required": ["query"]}
DOCUMENT_SUFFIXES = (".md", ".txt")


@dataclass(frozen=True)
class ToolSpec:
    """One tool: what the model sees (name, description, parameters) and the node behind it."""

    name: str
    description: str
    kind: str  # one of KINDS
    output: str
    parameters: dict[str, Any]
    documents: tuple[str, ...] = field(default=(), repr=False)  # rerank: the documents
    top_n: int = 2
    query: str = "call"  # rerank: what the documents are ranked for (QUERIES)

    def tool(self) -> Tool:
        return Tool(self.name, self.description, json.dumps(self.parameters))

    def request(self, call: ToolCall, question: str) -> RerankRequest | ToolCall:
        """The message the tool's node takes for ``call``, made while answering ``question``."""
        if self.kind == "rerank":
            query = json.loads(call.arguments)["query"]
            if self.query == "question":
                query = f"{question} {query}"
            return RerankRequest(query, list(self.documents))
        return call

    def result_text(self, result: RerankResult | ToolResult) -> str:
        """What the model reads back: the best documents, or the node's own answer."""
        if isinstance(result, RerankResult):
            best = np.argsort(-np.asarray(result.scores))[:self.top_n]
            return "\n\n".join(self.documents[i] for i in best)
        return result.content


def parse_tools(text: str, base: Path | None = None) -> list[ToolSpec]:
    """The tools of ``AGENT_TOOLS``; a ConfigError naming the tool and field otherwise.
    Relative document folders are read from ``base``, or by default from where dora was
    started, else from this checkout (:func:`mofa_omni.config.data_path`)."""
    try:
        entries = yaml.safe_load(text) or []
    except yaml.YAMLError as error:
        raise ConfigError(f"AGENT_TOOLS is not YAML: {error}") from None
    if not isinstance(entries, list):
        raise ConfigError("AGENT_TOOLS: a list of tools")
    tools = [_tool(i, entry, base) for i, entry in enumerate(entries)]
    names = [t.name for t in tools]
    if len(set(names)) != len(names) or len({t.output for t in tools}) != len(tools):
        raise ConfigError(f"AGENT_TOOLS: each tool needs its own name and output ({names})")
    return tools


def _tool(index: int, entry: Any, base: Path | None) -> ToolSpec:
    where = f"AGENT_TOOLS[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: a mapping with name, description, kind and output")
    known = {"name", "description", "kind", "output", "parameters", "documents", "top_n", "query"}
    if unknown := sorted(set(entry) - known):
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; fields: "
                          f"{', '.join(sorted(known))}")
    for key in ("name", "description", "kind", "output"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise ConfigError(f"{where}: {key} is missing")
    kind = entry["kind"]
    if kind not in KINDS:
        raise ConfigError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    parameters = entry.get("parameters", QUERY_SCHEMA if kind == "rerank" else None)
    if kind == "rerank" and parameters != QUERY_SCHEMA:
        raise ConfigError(f"{where}: a rerank tool's parameters are its query (leave them out)")
    if not isinstance(parameters, dict):
        raise ConfigError(f"{where}: parameters (a JSON Schema object) are missing")
    try:
        parse_schema(parameters, f"{where} parameters", tool=True)
    except ContractError as error:
        raise ConfigError(str(error)) from None
    documents: tuple[str, ...] = ()
    if kind == "rerank":
        named = str(entry.get("documents", ""))
        folder = base / named if base else data_path(named)
        if not entry.get("documents") or not folder.is_dir():
            raise ConfigError(f"{where}: documents must name a folder of .md/.txt files "
                              f"(got {str(folder)!r})")
        documents = tuple(p.read_text(encoding="utf-8").strip() for p in sorted(folder.iterdir())
                          if p.suffix in DOCUMENT_SUFFIXES)
        if not documents:
            raise ConfigError(f"{where}: no .md or .txt document in {folder}")
    top_n = entry.get("top_n", 2)
    if not isinstance(top_n, int) or top_n < 1:
        raise ConfigError(f"{where}: top_n must be a positive integer")
    query = entry.get("query", "call")
    if query not in QUERIES:
        raise ConfigError(f"{where}: query {query!r} is not one of {', '.join(QUERIES)}")
    return ToolSpec(entry["name"], entry["description"], kind, entry["output"], parameters,
                    documents, top_n, query)
