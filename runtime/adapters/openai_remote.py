"""A model served by a remote OpenAI-compatible server (another mofa-omni gateway, vLLM,
Ollama, LM Studio, a hosted API): the same contract, answered over HTTP.

Catalog entry (format ``remote``)::

    [models.remote-smollm2]
    tasks = ["text_generation"]
    adapter = "openai_remote"
    format = "remote"
    source = { url = "http://127.0.0.1:8001/v1", model = "smollm2-135m", api_key_env = "" }
    memory_mb = 1

Loading checks that the server answers and lists the model; streaming replies
stop (the connection closes, and the server cancels) when the request is cancelled.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.tool_format import function_schema
from mofa_omni.contract.errors import ContractError, ModelLoadError, ServerError
from mofa_omni.contract.tasks import (
    AudioChunk,
    ChatMessage,
    ChatRequest,
    EmbeddingRequest,
    Embeddings,
    SpeechRequest,
    Task,
    TextChunk,
    ToolCall,
    Transcript,
    TranscriptionRequest,
    refuse_prefix,
    validate_request,
)
from mofa_omni.media.audio import read_wav, wav_bytes
from mofa_omni.models.fetching import Progress
from mofa_omni.models.store import REMOTE_FILE

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 120.0


def chat_body(request: ChatRequest, model: str) -> dict[str, Any]:
    """The request as an OpenAI chat completions body (streamed, with its usage)."""
    body: dict[str, Any] = {
        "model": model, "stream": True, "stream_options": {"include_usage": True},
        "messages": [_message(m) for m in request.messages],
        "max_tokens": request.max_tokens, "temperature": request.temperature,
        "top_p": request.top_p, "stop": request.stop or None}
    if request.json_schema:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "reply", "schema": json.loads(request.json_schema)}}
    if request.tools:
        body["tools"] = [function_schema(tool) for tool in request.tools]
        body["tool_choice"] = ({"type": "function", "function": {"name": request.tool_name}}
                               if request.tool_name else request.tool_choice)
        body["parallel_tool_calls"] = request.parallel_tool_calls
    return body


def _message(message: ChatMessage) -> dict[str, Any]:
    entry: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        entry["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.name, "arguments": c.arguments}}
                               for c in message.tool_calls]
    if message.role == "tool":
        entry["tool_call_id"] = message.tool_call_id
    return entry


class RemoteError(ServerError):
    """The remote server answered with an error."""


class OpenAiRemoteAdapter(ModelAdapter):
    supported_tasks: ClassVar[frozenset[Task]] = frozenset({
        Task.TEXT_GENERATION, Task.EMBEDDING, Task.SPEECH_RECOGNITION, Task.SPEECH_SYNTHESIS})
    formats: ClassVar[frozenset[str]] = frozenset({"remote"})
    backend: ClassVar[str] = "remote"
    requires: ClassVar[tuple[str, ...]] = ("httpx",)

    def __init__(self, spec):
        super().__init__(spec)
        self._client: Any = None
        self._model = ""

    def prepare(self, source_dir: Path, out_dir: Path, progress: Progress) -> None:
        shutil.copy(source_dir / REMOTE_FILE, out_dir / REMOTE_FILE)
        progress("remote endpoint", 1, 1)

    def _load(self, model_dir: Path) -> None:
        import httpx

        remote = json.loads((model_dir / REMOTE_FILE).read_text())
        headers = {}
        if key_env := remote.get("api_key_env"):
            if not os.environ.get(key_env):
                raise ModelLoadError(f"model {self.spec.name!r}: ${key_env} (its API key) is not set")
            headers["Authorization"] = f"Bearer {os.environ[key_env]}"
        client = httpx.Client(base_url=remote["url"].rstrip("/") + "/", headers=headers,
                              timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))
        try:
            listed = client.get("models")
            listed.raise_for_status()
            served = [m["id"] for m in listed.json().get("data", [])]
        except (httpx.HTTPError, ValueError, KeyError) as error:
            client.close()
            raise ModelLoadError(f"model {self.spec.name!r}: the server at {remote['url']} "
                                 f"does not answer /models: {type(error).__name__}: {error}") from error
        if remote["model"] not in served:
            client.close()
            raise ModelLoadError(f"model {self.spec.name!r}: the server at {remote['url']} does "
                                 f"not serve {remote['model']!r} (it serves {', '.join(served)})")
        self._client, self._model = client, remote["model"]

    def _unload(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None

    # --- tasks -----------------------------------------------------------------------

    def generate(self, request: ChatRequest) -> Iterator[TextChunk]:
        """The remote server's streamed reply: structured output and tools are forwarded as
        OpenAI's ``response_format`` and ``tools``; streamed tool calls are put back together
        and given as whole calls at the end."""
        validate_request(request)
        body = chat_body(request, self._model)
        finish, usage = "stop", {}
        calls: dict[int, dict[str, str]] = {}
        with self._client.stream("POST", "chat/completions", json=body) as response:
            self._raise_for(response)
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    raise RemoteError(f"the remote server failed mid-reply: "
                                      f"{event['error'].get('message')}")
                usage = event.get("usage") or usage
                for choice in event.get("choices", []):
                    finish = choice.get("finish_reason") or finish
                    delta = choice.get("delta") or {}
                    if text := delta.get("content"):
                        yield TextChunk(text)
                    for part in delta.get("tool_calls") or []:
                        call = calls.setdefault(part.get("index", 0),
                                                {"id": "", "name": "", "arguments": ""})
                        function = part.get("function") or {}
                        call["id"] = part.get("id") or call["id"]
                        call["name"] = function.get("name") or call["name"]
                        call["arguments"] += function.get("arguments") or ""
        yield TextChunk("", True, finish, usage.get("prompt_tokens", 0),
                        usage.get("completion_tokens", 0),
                        [ToolCall(c["id"], c["name"], c["arguments"])
                         for _, c in sorted(calls.items())])

    def embed(self, request: EmbeddingRequest) -> Embeddings:
        response = self._client.post("embeddings", json={"model": self._model,
                                                         "input": list(request.texts)})
        self._raise_for(response)
        rows = sorted(response.json()["data"], key=lambda row: row["index"])
        return Embeddings(np.asarray([row["embedding"] for row in rows], np.float32))

    def transcribe(self, request: TranscriptionRequest) -> Transcript:
        validate_request(request)
        refuse_prefix(request, self.spec.name)
        files = {"file": ("audio.wav", wav_bytes(request.audio, request.sample_rate),
                          "audio/wav")}
        data = {"model": self._model, "response_format": "json"}
        if request.language:
            data["language"] = request.language
        response = self._client.post("audio/transcriptions", files=files, data=data)
        self._raise_for(response)
        return Transcript(response.json()["text"].strip())

    def synthesize(self, request: SpeechRequest) -> Iterator[AudioChunk]:
        validate_request(request)
        response = self._client.post("audio/speech", json={
            "model": self._model, "input": request.text, "voice": request.voice,
            "speed": request.speed, "response_format": "wav"})
        self._raise_for(response)
        audio, rate = read_wav(response.content)
        yield AudioChunk(audio, rate, True, request.text)

    def _raise_for(self, response) -> None:
        if response.status_code < 400:
            return
        response.read()
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        if response.status_code in (400, 404, 413):
            raise ContractError(f"the remote server refused it ({response.status_code}): {message}")
        raise RemoteError(f"the remote server answered {response.status_code}: {message}")
