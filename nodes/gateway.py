"""gateway: an OpenAI-compatible HTTP server inside the dataflow, answered by its model nodes.

    POST /v1/chat/completions      (streamed as server-sent events, or whole; messages with
                                    pictures -- image_url parts, inline data URLs of PNG or
                                    JPEG -- go to the node serving vision_language)
    POST /v1/images/generations    (a PNG as b64_json; seed and steps as extensions)
    POST /v1/audio/transcriptions  (multipart upload of a WAV file)
    POST /v1/audio/speech          (WAV, or OpenAI's raw 24 kHz PCM)
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
on their way (the nodes see the gaps in the requests' stream numbers).

Configuration (env):
    HOST, PORT          where to listen (default 127.0.0.1:8000; loopback unless told otherwise)
    API_KEY             when set, requests need `Authorization: Bearer <API_KEY>`
    MAX_BODY_BYTES      larger request bodies get a 413 (default 25 MiB)
    MAX_IMAGE_PIXELS    a larger picture in a chat message gets a 400 (default 4096*4096)
    DEADLINE_S          a request with no complete answer by then gets a 504 (default 150)
    FALLBACK_AFTER_S    a local model with no first result by then is given up for the remote
                        one serving the same task, if the graph has one (default: only when
                        the local model cannot load or times out)
"""

from __future__ import annotations

import logging
import os
import sys
import threading

import uvicorn

from mofa_omni.contract.errors import ContractError
from mofa_omni.gateway.app import Graph, Replies, Reply, Settings, build_app
from mofa_omni.gateway.openai_bodies import MAX_IMAGE_PIXELS
from mofa_omni.gateway.routes import Router, input_sources, routes_from
from mofa_omni.models.catalog import Catalog
from mofa_omni.node.host import dora_node_id
from mofa_omni.node.integrity import CheckedNode
from mofa_omni.scheduler.messages import Status, from_arrow

log = logging.getLogger("gateway")


def settings_from_env() -> Settings:
    env = os.environ.get
    return Settings(deadline_s=float(env("DEADLINE_S", "150")),
                    max_body_bytes=int(env("MAX_BODY_BYTES", str(25 << 20))),
                    api_key=env("API_KEY", ""),
                    fallback_after_s=float(env("FALLBACK_AFTER_S", "0")),
                    max_image_pixels=int(env("MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))))


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    catalog = Catalog.load()
    node = CheckedNode()
    me = dora_node_id("gateway")
    descriptor = node.dataflow_descriptor()
    try:
        router = Router(routes_from(descriptor, me, catalog), catalog)
    except ContractError as error:
        print(f"gateway: {error}", file=sys.stderr)
        return 2
    for route in router.routes:
        log.info("%s -> %s (%s, %s%s)", route.output, route.node, route.task.value, route.model,
                 ", remote" if route.remote else "")
    sending = threading.Lock()

    def send(output: str, value, metadata: dict) -> int:
        with sending:
            return node.send_output(output, value, metadata)

    replies = Replies()
    graph = Graph(router, replies, send, settings_from_env())
    loaded: dict[str, bool] = {}  # node -> holds its model (the scheduler says, or it answered)
    sources = input_sources(descriptor, me)  # input -> (node, output)
    server = uvicorn.Server(uvicorn.Config(
        build_app(graph, catalog, lambda: dict(loaded), node.gaps.lost), host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", "8000")), log_level="warning", lifespan="on"))
    http = threading.Thread(target=server.run, name="http", daemon=True)
    http.start()
    for event in node:
        if event["type"] != "INPUT":
            continue
        source_node, kind = sources.get(event["id"], ("", ""))
        if kind == "status":
            status = from_arrow(event["value"])
            if isinstance(status, Status):
                loaded.update({n.node: n.state in ("ready", "busy") for n in status.nodes})
        elif kind in ("result", "error"):
            metadata = event.get("metadata") or {}
            if kind == "result":
                loaded[source_node] = True
            replies.deliver(str(metadata.get("request_id", "")),
                            Reply(kind, event["value"], metadata))
        elif kind == "lost" and replies.loop is not None:  # dora dropped requests to that node
            metadata = event.get("metadata") or {}
            replies.loop.call_soon_threadsafe(
                graph.resend_lost, source_node, str(metadata.get("lost_input", "")),
                int(metadata.get("lost_first", 0)), int(metadata.get("lost_last", -1)))
    server.should_exit = True
    http.join(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
