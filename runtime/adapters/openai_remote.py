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
from mofa_omni.contract.errors import ContractError, ModelLoadError, ServerError
from mofa_omni.contract.tasks import (
    AudioChunk,
    ChatRequest,
    EmbeddingRequest,
    Embeddings,
    SpeechRequest,
    Task,
    TextChunk,
    Transcript,
    TranscriptionRequest,
    validate_request,
)
from mofa_omni.media.audio import read_wav, wav_bytes
from mofa_omni.models.fetching import Progress
from mofa_omni.models.store import REMOTE_FILE

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 120.0


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
        validate_request(request)
        body = {"model": self._model, "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": m.role, "content": m.content} for m in request.messages],
                "max_tokens": request.max_tokens, "temperature": request.temperature,
                "top_p": request.top_p, "stop": request.stop or None}
        finish, usage = "stop", {}
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
                    if text := (choice.get("delta") or {}).get("content"):
                        yield TextChunk(text)
        yield TextChunk("", True, finish, usage.get("prompt_tokens", 0),
                        usage.get("completion_tokens", 0))

    def embed(self, request: EmbeddingRequest) -> Embeddings:
        response = self._client.post("embeddings", json={"model": self._model,
                                                         "input": list(request.texts)})
        self._raise_for(response)
        rows = sorted(response.json()["data"], key=lambda row: row["index"])
        return Embeddings(np.asarray([row["embedding"] for row in rows], np.float32))

    def transcribe(self, request: TranscriptionRequest) -> Transcript:
        validate_request(request)
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
