"""omni-node: runs one catalog model as a dora node.

Configuration (env in the dataflow YAML):
    MODEL              catalog name (default: the catalog's default model for TASK)
    TASK               the task to serve when MODEL is not given (e.g. text_generation)
    REQUEST_TIMEOUT_S  deadline of a request from its arrival (default 120)

Inputs: ``request`` (the model's first task) or one named after each task it serves, and
``cancel`` (request ids, as strings): a cancelled request stops at once and ends with an
``ErrorReport`` of kind ``cancelled``.
Outputs: ``result`` and ``error``. Requests run one at a time on a worker thread while the
main thread reads events; on STOP the node drains what is queued before exiting.
"""

from __future__ import annotations

import logging
import os
import sys

from mofa_omni.platform import ensure_fast_blas

ensure_fast_blas()

from dora import Node  # noqa: E402

from mofa_omni import trace  # noqa: E402
from mofa_omni.adapters.base import ModelLoadError, create_adapter  # noqa: E402
from mofa_omni.catalog import Catalog  # noqa: E402
from mofa_omni.contract import ContractError, Task  # noqa: E402
from mofa_omni.host import ModelHost, dora_node_id  # noqa: E402
from mofa_omni.loading import open_model  # noqa: E402
from mofa_omni.serving import CANCEL_INPUT, RequestWorker, cancelled_ids  # noqa: E402
from mofa_omni.store import FetchError  # noqa: E402

log = logging.getLogger("omni-node")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    catalog = Catalog.load()
    model, task = os.environ.get("MODEL"), os.environ.get("TASK")
    try:
        spec = catalog.resolve(model, Task.parse(task)) if task else catalog.get(model or "")
    except ContractError as error:  # fail fast, before joining the graph
        print(f"omni-node: {error}", file=sys.stderr)
        return 2

    node_id = dora_node_id(spec.name)

    def make_host() -> ModelHost:  # runs on the worker thread, which then serves the model
        try:
            adapter = open_model(spec.name, catalog=catalog)
        except (ModelLoadError, FetchError) as error:  # keep serving: every request gets this
            log.error("model %s cannot serve: %s", spec.name, error)
            return ModelHost(create_adapter(spec), node_id, unavailable=str(error))
        log.info("serving %s (%s), loaded in %.2f s", spec.name,
                 ", ".join(t.value for t in spec.tasks), adapter.load_seconds)
        return ModelHost(adapter, node_id)

    def send(out) -> None:
        node.send_output(out.output, out.value, out.meta.to_dora())
        trace.record(node_id, "send", out.output, out.meta)

    node = Node()
    worker = RequestWorker(make_host, send, float(os.environ.get("REQUEST_TIMEOUT_S", "120")))
    # dora may deliver STOP before queued inputs: keep reading until the stream ends.
    while (event := node.next()) is not None:
        if event["type"] != "INPUT":
            continue
        if event["id"] == CANCEL_INPUT:
            for request_id in cancelled_ids(event["value"]):
                worker.cancel(request_id)
        else:
            trace.record(node_id, "recv", event["id"], event.get("metadata"))
            worker.submit(event["id"], event["value"], event.get("metadata"))
    worker.drain()
    worker.host.adapter.unload()
    return 0


if __name__ == "__main__":
    sys.exit(main())
