"""The Realtime node's WebSocket server: ``/v1/realtime`` and the browser page at ``/``.

:class:`Hub` joins the two threads of the node: the dora thread hands it what the graph says
(:meth:`Hub.from_graph`, any thread), the event loop runs the client's connection. The voice
graph holds one conversation (one dialogue, one history): one client talks to it at a time,
and a second one is told so (an ``error`` event ``session_busy``, then a close with code
1013, "try again later"). When a client goes, the next one starts a new conversation.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from mofa_omni.realtime.conversation import (
    Action,
    Conversation,
    Limits,
    Listen,
    Outcome,
    Spoken,
    Tell,
)
from mofa_omni.realtime.protocol import (
    MAX_EVENT_BYTES,
    RATE,
    Dialect,
    ProtocolError,
    SessionConfig,
    error_event,
)

log = logging.getLogger("mofa_omni.realtime")

MAX_QUEUED_EVENTS = 20_000  # a client this far behind reading is disconnected
TRY_AGAIN_LATER = 1013  # the WebSocket close code for a busy server
POLICY_VIOLATION = 1008
KEY_PROTOCOL = "openai-insecure-api-key."  # how a browser sends its key (no headers there)


@dataclass(frozen=True, slots=True)
class GraphPort:
    """How the hub sends into the graph (the node's outputs; callable from any thread)."""

    listen: Callable[[str, int, np.ndarray, bool], None]  # stream id, seq, audio at RATE, final
    tell: Callable[[str, dict[str, Any]], None]  # control event kind, fields
    spoken: Callable[[str], None]  # reply id played out


PAST_IDS = 512  # ids of past sessions' utterances and replies kept, to ignore their echoes


class Hub:
    """The one conversation, if a client is connected, between the graph and the client."""

    def __init__(self, port: GraphPort, config: SessionConfig, limits: Limits,
                 api_key: str = ""):
        self.port, self.config, self.limits, self.api_key = port, config, limits, api_key
        self.loop: asyncio.AbstractEventLoop | None = None
        self.conversation: Conversation | None = None
        self._outbox: asyncio.Queue[dict[str, Any] | None] | None = None
        self._sessions = itertools.count(1)
        self._seq = 0  # of the audio stream of the session
        self._stream_s = 0.0  # audio sent to the VAD so far, all sessions: its clock
        self.sessions_served = 0
        # utterance and reply ids of past sessions (the last few hundred): the graph may still
        # speak of them (a cancel's error, a late transcript) after the next client came
        self._past_ids: collections.deque[str] = collections.deque(maxlen=PAST_IDS)

    # --- from the graph (the dora thread) ----------------------------------------------------

    def from_graph(self, method: str, *args: Any) -> None:
        """Call ``Conversation.<method>(*args)`` on the loop, for the client connected now."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._from_graph, method, args)

    def _from_graph(self, method: str, args: tuple[Any, ...]) -> None:
        conversation = self.conversation
        if conversation is None or (args and args[0] in self._past_ids):
            return  # no one listens, or it is of a past client
        if method in ("reply_audio", "released"):  # they need the time
            args = (*args, self.loop.time())
        self.carry(getattr(conversation, method)(*args))

    # --- to the client and the graph ---------------------------------------------------------

    def carry(self, outcome: Outcome) -> None:
        """Queue the outcome's events for the client; do its actions in the graph."""
        if self._outbox is not None:
            for event in outcome.events:
                self._outbox.put_nowait(event)
            if self._outbox.qsize() > MAX_QUEUED_EVENTS:
                log.error("%s: the client reads too slowly: disconnected",
                          self.conversation.session_id if self.conversation else "?")
                self._outbox.put_nowait(None)
        for action in outcome.actions:
            self._act(action)

    def _act(self, action: Action) -> None:
        match action:
            case Listen(audio=audio, final=final):
                session = self.conversation.session_id if self.conversation else "rt"
                self.port.listen(session, self._seq, audio, final)
                self._seq += 1
                self._stream_s += audio.size / RATE
            case Tell(kind=kind, fields=fields):
                self.port.tell(kind, fields)
            case Spoken(reply_id=reply_id, at=at):
                delay = max(0.0, at - self.loop.time()) if at else 0.0
                self.loop.call_later(delay, self.port.spoken, reply_id)

    # --- the connection ----------------------------------------------------------------------

    async def serve(self, websocket: WebSocket) -> None:
        """One client's connection, from its handshake to its close."""
        offered = [p.strip() for p in websocket.headers.get("sec-websocket-protocol",
                                                            "").split(",") if p.strip()]
        if self.api_key and not self._authorized(websocket, offered):
            await websocket.close(POLICY_VIOLATION, "a valid API key is required")
            return
        await websocket.accept(subprotocol="realtime" if "realtime" in offered else None)
        dialect = Dialect(beta=websocket.headers.get("openai-beta", "").strip() == "realtime=v1")
        if self.conversation is not None:
            busy = ProtocolError("this voice graph holds one conversation at a time and one is "
                                 "going on: try again later", code="session_busy")
            await websocket.send_json(error_event(busy) | {"event_id": "event_1"})
            await websocket.close(TRY_AGAIN_LATER, "busy")
            return
        self.loop = asyncio.get_running_loop()
        conversation = Conversation(f"sess_{next(self._sessions)}", dialect, self.config,
                                    self.limits)
        conversation.stream_offset_s = self._stream_s
        self.conversation, self._outbox, self._seq = conversation, asyncio.Queue(), 0
        log.info("%s: a client connected (%s protocol)", conversation.session_id,
                 "beta" if dialect.beta else "GA")
        writer = asyncio.create_task(self._write(websocket, self._outbox))
        self.carry(conversation.opened())
        try:
            await self._read(websocket, conversation, writer)
        finally:
            self.carry(conversation.closed())
            self._past_ids.extend(conversation.ids() - set(self._past_ids))
            self.conversation, outbox, self._outbox = None, self._outbox, None
            outbox.put_nowait(None)
            with contextlib.suppress(Exception):
                await writer
            self.sessions_served += 1
            log.info("%s: the client left", conversation.session_id)

    async def _read(self, websocket: WebSocket, conversation: Conversation,
                    writer: asyncio.Task) -> None:
        while not writer.done():
            receiving = asyncio.ensure_future(websocket.receive())
            await asyncio.wait({receiving, writer}, return_when=asyncio.FIRST_COMPLETED)
            if not receiving.done():
                receiving.cancel()
                return
            message = receiving.result()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text") if message.get("text") is not None else message.get(
                "bytes", b"")
            self.carry(conversation.receive(text, self.loop.time()))

    async def _write(self, websocket: WebSocket, outbox: asyncio.Queue) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            while (event := await outbox.get()) is not None:
                await websocket.send_json(event)
            if websocket.application_state == WebSocketState.CONNECTED:
                await websocket.close()

    def _authorized(self, websocket: WebSocket, offered: list[str]) -> bool:
        header = websocket.headers.get("authorization", "")
        keys = [header.removeprefix("Bearer ").strip()] + [
            p.removeprefix(KEY_PROTOCOL) for p in offered if p.startswith(KEY_PROTOCOL)]
        return any(hmac.compare_digest(key.encode(), self.api_key.encode()) for key in keys)


def build_app(hub: Hub) -> Starlette:
    """``/v1/realtime`` (WebSocket), the page at ``/``, and ``/health``."""
    page = resources.files("mofa_omni.realtime").joinpath("page.html").read_text()

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"busy": hub.conversation is not None,
                             "sessions_served": hub.sessions_served})

    return Starlette(routes=[Route("/", index), Route("/health", health),
                             WebSocketRoute("/v1/realtime", hub.serve)])


__all__ = ["MAX_EVENT_BYTES", "GraphPort", "Hub", "build_app"]
