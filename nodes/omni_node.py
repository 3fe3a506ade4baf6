"""omni-node: runs one catalog model as a dora node.

Configuration (env in the dataflow YAML):
    MODEL   catalog name (default: the catalog's default model for TASK)
    TASK    the task to serve when MODEL is not given (e.g. text_generation)

Inputs: ``request`` (the model's first task) or one named after each task it serves.
Outputs: ``result`` and ``error``. On STOP it drains what is queued before exiting.
"""

from __future__ import annotations

import logging
import os
import sys

from mofa_omni.platform import ensure_fast_blas

ensure_fast_blas()

from dora import Node  # noqa: E402

from mofa_omni.catalog import Catalog  # noqa: E402
from mofa_omni.contract import ContractError, Task  # noqa: E402
from mofa_omni.host import ModelHost, dora_node_id  # noqa: E402
from mofa_omni.loading import open_model  # noqa: E402

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
    adapter = open_model(spec.name, catalog=catalog)
    node = Node()
    host = ModelHost(adapter, dora_node_id(spec.name))
    log.info("serving %s (%s) in %.2f s", spec.name, ", ".join(t.value for t in spec.tasks),
             adapter.load_seconds)
    # dora may deliver STOP before queued inputs: keep reading until the stream ends.
    while (event := node.next()) is not None:
        if event["type"] == "INPUT":
            for out in host.handle(event["id"], event["value"], event.get("metadata")):
                node.send_output(out.output, out.value, out.meta.to_dora())
    adapter.unload()
    return 0


if __name__ == "__main__":
    sys.exit(main())
