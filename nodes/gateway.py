"""gateway: an OpenAI-compatible HTTP server inside the dataflow, answered by its model nodes.

    POST /v1/chat/completions      (streamed as server-sent events, or whole; messages with
                                    pictures -- image_url parts, inline data URLs of PNG or
                                    JPEG -- go to the node serving vision_language)
    POST /v1/images/generations    (a PNG as b64_json; seed and steps as extensions)
    POST /v1/audio/transcriptions  (multipart upload of a WAV file)
    POST /v1/audio/speech          (WAV, or OpenAI's raw 24 kHz PCM)
    POST /v1/videos                (a video job, answered at once as OpenAI's Video object; JSON,
                                    or multipart with an input_reference picture: image to
                                    video; frames, fps, steps, seed as extensions)
    GET  /v1/videos[/{id}]         (the jobs; one job: its status and progress)
    GET  /v1/videos/{id}/content   (the MP4, once completed)
    DELETE /v1/videos/{id}         (cancels a running job on its node; drops its MP4)
    POST /v1/embeddings
    POST /v1/rerank                (Cohere/Jina-style: query + documents -> scored indices)
    GET  /v1/models                (the catalog, with the nodes serving each and what is loaded)
    GET  /stats                    (responses by status, requests in flight, replies that came
                                    after their request was given up, messages dora dropped)

Wiring (see dataflows/server.yml): each output of this node feeds one model node's request
input (``request`` or a task's name; the node's MODEL/TASK says what it serves), an optional
output feeds the nodes' ``cancel`` inputs, and the nodes' ``result`` and ``error`` outputs come
back on inputs of any name. An input from ``<scheduler>/status`` tells which models are loaded;
inputs from the nodes' ``lost`` outputs let the gateway send again the requests dora dropped
on their way (the nodes see the gaps in the requests' stream numbers); the status also says
what each node received and answered, which finds a lost last request or a reply's lost end.

Configuration (env):
    HOST, PORT          where to listen (default 127.0.0.1:8000; loopback unless told otherwise)
    API_KEY             when set, requests need `Authorization: Bearer <API_KEY>`
    MAX_BODY_BYTES      larger request bodies get a 413 (default 25 MiB)
    MAX_IMAGE_PIXELS    a larger picture in a chat message gets a 400 (default 4096*4096)
    DEADLINE_S          a request with no complete answer by then gets a 504 (default 150)
    FALLBACK_AFTER_S    a local model with no first result by then is given up for the remote
                        one serving the same task, if the graph has one (default: only when
                        the local model cannot load or times out)
    MAX_WAIT_FOR_RESTART_S  the longest a client may ask to wait (X-Omni-Wait-For-Restart:
                        SECONDS) for a node restarting after a crash, instead of a 503 at
                        once (default 60)
    VIDEO_DEADLINE_S    a video job not finished by then fails (default 3600; the video node's
                        own REQUEST_TIMEOUT_S must be as long)
    MAX_VIDEOS          video jobs kept, running and finished (default 16): the oldest finished
                        goes to make room; a new one when all are running gets a 429
    VIDEO_KEEP_S        a finished video job, and its MP4, is kept this long (default 3600)
A bad value stops the node at start with a line naming the variable (exit status 2).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Mapping

import uvicorn

from mofa_omni.config import env_float, env_int, env_str, exit_on_bad_settings, listen_address
from mofa_omni.gateway.app import build_app
from mofa_omni.gateway.bridge import Graph, HeldReplies, Replies, Reply
from mofa_omni.gateway.routes import Router, input_sources, routes_from
from mofa_omni.gateway.settings import Settings
from mofa_omni.models.catalog import Catalog
from mofa_omni.node.host import dora_node_id
from mofa_omni.node.integrity import CheckedNode
from mofa_omni.scheduler.messages import Status, from_arrow

log = logging.getLogger("gateway")
HOLD_S = 0.005  # the longest a reply is held to be handed over with those queued behind it


def settings_from_env(env: Mapping[str, str] | None = None) -> Settings:
    """The gateway's settings from ``env`` (default: the process environment); a bad value
    raises :class:`ConfigError` naming the variable."""
    default = Settings()
    return Settings(
        deadline_s=env_float("DEADLINE_S", default.deadline_s, env),
        max_body_bytes=env_int("MAX_BODY_BYTES", default.max_body_bytes, env, minimum=1),
        api_key=env_str("API_KEY", default.api_key, env),
        fallback_after_s=env_float("FALLBACK_AFTER_S", default.fallback_after_s, env),
        max_image_pixels=env_int("MAX_IMAGE_PIXELS", default.max_image_pixels, env, minimum=1),
        max_wait_for_restart_s=env_float("MAX_WAIT_FOR_RESTART_S",
                                         default.max_wait_for_restart_s, env),
        video_deadline_s=env_float("VIDEO_DEADLINE_S", default.video_deadline_s, env),
        max_videos=env_int("MAX_VIDEOS", default.max_videos, env, minimum=1),
        video_keep_s=env_float("VIDEO_KEEP_S", default.video_keep_s, env))


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with exit_on_bad_settings("gateway"):
        settings = settings_from_env()
        host, port = listen_address(8000)
        catalog = Catalog.load()
    node = CheckedNode()
    me = dora_node_id("gateway")
    descriptor = node.dataflow_descriptor()
    with exit_on_bad_settings("gateway"):  # the graph's routes: an unknown model or task
        router = Router(routes_from(descriptor, me, catalog), catalog)
    for route in router.routes:
        log.info("%s -> %s (%s, %s%s)", route.output, route.node, route.task.value, route.model,
                 ", remote" if route.remote else "")
    sending = threading.Lock()

    def send(output: str, value, metadata: dict) -> int:
        with sending:
            return node.send_output(output, value, metadata)

    replies = Replies()
    graph = Graph(router, replies, send, settings)
    loaded: dict[str, bool] = {}  # node -> holds its model (the scheduler says, or it answered)
    sources = input_sources(descriptor, me)  # input -> (node, output)
    server = uvicorn.Server(uvicorn.Config(
        build_app(graph, catalog, lambda: dict(loaded), node.gaps.lost), host=host, port=port,
        log_level="warning", lifespan="on"))
    http = threading.Thread(target=server.run, name="http", daemon=True)
    http.start()
    model_nodes = {route.node for route in router.routes}
    held = HeldReplies(HOLD_S)  # replies passed on together, in order
    # while replies are held, the next event is awaited briefly: dora's "more queued" could
    # name an event it does not hand out (a timeout ends the wait as an ERROR event)
    while (event := node.next(timeout=held.wait_s(time.monotonic()))) is not None:
        source_node, kind = sources.get(event["id"], ("", "")) if event["type"] == "INPUT" \
            else ("", "")
        if kind not in ("result", "error") and held.replies:
            replies.deliver_all(held.take())  # before anything else reaches the event loop
        if event["type"] in ("NODE_RESTARTED", "NODE_FAILED") and event["id"] in model_nodes \
                and replies.loop is not None:  # a model node crashed: dora restarts it, or not
            replies.loop.call_soon_threadsafe(
                lambda crashed=event["id"], for_good=event["type"] == "NODE_FAILED":
                graph.node_crashed(crashed, for_good=for_good))
        if event["type"] != "INPUT":
            continue
        if kind == "status":
            status = from_arrow(event["value"])
            if isinstance(status, Status):
                loaded.update({n.node: n.state in ("ready", "busy") for n in status.nodes})
                if replies.loop is not None:  # requests, or replies' ends, dora dropped
                    replies.loop.call_soon_threadsafe(graph.check_delivery, status.nodes)
        elif kind in ("result", "error"):
            metadata = event.get("metadata") or {}
            if kind == "result":
                loaded[source_node] = True
            now = time.monotonic()
            held.add(str(metadata.get("request_id", "")), Reply(kind, event["value"], metadata),
                     now)
            if held.due(now, more_queued=not node.is_empty()):
                replies.deliver_all(held.take())
        elif kind == "lost" and replies.loop is not None:  # dora dropped requests to that node
            metadata = event.get("metadata") or {}
            replies.loop.call_soon_threadsafe(
                graph.resend_lost, source_node, str(metadata.get("lost_input", "")),
                int(metadata.get("lost_first", 0)), int(metadata.get("lost_last", -1)))
    replies.deliver_all(held.take())
    server.should_exit = True
    http.join(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
