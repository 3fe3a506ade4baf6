"""omni-node: runs one catalog model as a dora node.

Configuration (env in the dataflow YAML):
    MODEL              catalog name, path or hf:ORG/REPO[:FILE] (detected and registered in the
                       user catalog on first use; default: the catalog's default model for TASK)
    TASK               the task the ``request`` input carries (e.g. text_generation; default:
                       the model's first); without MODEL, the catalog's default model for it
    STAGES             instead of one whole model: stages run in this process, in order, each
                       handing its output to the next as the same object (no copy), e.g.
                       "whisper-tiny.en:log_mel whisper-tiny.en:encode whisper-tiny.en:decode"
                       (see mofa_omni.contract.stages); the input is named after what the first stage
                       takes (``request`` / the task, or ``tensor`` from stages in another node)
    BACKEND            run the model on this backend (mlx, ctranslate2, onnxruntime, ...)
                       instead of the one chosen for this machine (see mofa_omni.adapters.backends)
    REQUEST_TIMEOUT_S  deadline of a request from its arrival (default 120)
    LOAD               start (default): load the model when the node starts (with a scheduler,
                       once it grants the memory); first_request: only when the first request
                       comes (a node standing by, as the cascade of dataflows/voice.omni.yml)
    MAX_BATCH          embedding, rerank and (CTranslate2) transcription requests that queued
                       up while the model was busy are served together, up to this many in one
                       engine call (default 32; 1: one at a time)
    BATCH_WINDOW_MS    how long a lone request of those waits for others to join it (default 0:
                       it waits for none, only requests already queued join)
    PARALLEL           requests served at once, where the model serves several (an LLM on
                       llama.cpp or MLX decodes up to its ``parallel`` option, default 4,
                       together; CTranslate2 in static batches), with a scheduler as many as
                       its budget holds; default 1: one after another. Whoever reads such a
                       node's token stream should read it with ``queue_policy: backpressure``:
                       dora dropped ~0.2 % of the tokens of four streams at once without it
                       (dataflows/server.yml)

Inputs: ``request`` (the model's first task) or one named after each task it serves, and
``cancel`` (request ids, as strings): a cancelled request stops at once and ends with an
``ErrorReport`` of kind ``cancelled``.
Outputs: ``result`` and ``error`` (a result too big for the node's shared-memory pool is
answered with an error of kind ``too_large`` saying how to fix it), and optionally ``lost``:
when dora drops requests on their way here (a gap in their stream numbers), an ErrorReport
of kind ``lost`` whose metadata names the input and the stream_seq range, so that the
requester (the gateway) sends them again. Requests start in order, on a worker thread while
the main thread reads events: one at a time, a batch at a time (mofa_omni.node.batching), or
several alongside where the model decodes them together (an LLM on llama.cpp); on STOP the
node drains what is queued before exiting.

With a scheduler in the graph (an input ``scheduler: <scheduler>/command`` and an output
``memory``), the node loads only what the scheduler grants, reports its memory every
MEMORY_REPORT_S seconds (default 1), unloads or switches variants when told to, between
two requests, and exits once all its request inputs have closed.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from mofa_omni.models.compute import ensure_fast_blas

ensure_fast_blas()

from mofa_omni.config import (  # noqa: E402
    env_choice,
    env_float,
    env_int,
    env_str,
    exit_on_bad_settings,
)
from mofa_omni.contract import arrow  # noqa: E402
from mofa_omni.contract.errors import ErrorKind  # noqa: E402
from mofa_omni.contract.stages import parse_stages  # noqa: E402
from mofa_omni.contract.tasks import ErrorReport, Task  # noqa: E402
from mofa_omni.models.by_name import resolve_model_name  # noqa: E402
from mofa_omni.models.catalog import Catalog  # noqa: E402
from mofa_omni.node import trace  # noqa: E402
from mofa_omni.node.admission import SchedulerLink  # noqa: E402
from mofa_omni.node.host import dora_node_id  # noqa: E402
from mofa_omni.node.integrity import LOST_OUTPUT, CheckedNode, Gap, PayloadTooLarge  # noqa: E402
from mofa_omni.node.residency import ModelSlot  # noqa: E402
from mofa_omni.node.serving import (  # noqa: E402
    BATCH_WINDOW_S,
    CANCEL_INPUT,
    MAX_BATCH,
    RequestWorker,
    cancelled_ids,
)
from mofa_omni.node.stage_host import StageSlot  # noqa: E402
from mofa_omni.scheduler.messages import (  # noqa: E402
    MEMORY_OUTPUT,
    SCHEDULER_INPUT,
    Command,
    Delivery,
    from_arrow,
    to_arrow,
)

log = logging.getLogger("omni-node")

GIL_SWITCH_S = 0.0005
LINGER_S = 1.0  # after the last request input closed: inputs still in flight arrive within it


def slot_from_env(catalog: Catalog) -> ModelSlot | StageSlot:
    """The model (MODEL or TASK) or the stages (STAGES) this node serves."""
    backend = env_str("BACKEND", "") or None
    if stages := env_str("STAGES", ""):
        return StageSlot(parse_stages(stages), catalog, dora_node_id("stages"), backend=backend)
    model, task_name = env_str("MODEL", ""), env_str("TASK", "")
    task = Task.parse(task_name) if task_name else None
    if model:  # a catalog name, or a path / hf: name registered on first use
        spec = resolve_model_name(model, catalog)
        spec = catalog.resolve(spec.name, task) if task else spec
    else:
        spec = catalog.resolve(None, task) if task else catalog.get("")
    return ModelSlot(spec, catalog, dora_node_id(spec.name), backend=backend, task=task)


def main() -> int:
    """Serve until the graph ends, then leave without the interpreter's teardown."""
    code = _serve()
    # MLX's C++ runtime can abort (std::terminate: "terminate called without an active
    # exception") while a process that ran MLX on a worker thread tears down its threads and
    # statics -- seen once in a full test run, after the node had answered every request, which
    # dora then reports as a failed dataflow. Nothing is left to do but write what is buffered.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve() -> int:
    # The main thread wakes for dora events while the worker runs the model; with Python's
    # default 5 ms switch interval the worker can then wait up to 5 ms for the GIL each time
    # (per streamed token for an LLM). See benchmarks/backends.py.
    sys.setswitchinterval(GIL_SWITCH_S)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with exit_on_bad_settings("omni-node"):  # fail fast, before joining the graph
        request_timeout = env_float("REQUEST_TIMEOUT_S", 120)
        memory_report_s = env_float("MEMORY_REPORT_S", 1)
        max_batch = env_int("MAX_BATCH", MAX_BATCH, minimum=1)
        batch_window_s = env_float("BATCH_WINDOW_MS", BATCH_WINDOW_S * 1000) / 1000
        parallel = env_int("PARALLEL", 1, minimum=1)
        load_at_start = env_choice("LOAD", "start", ("start", "first_request")) == "start"
        slot = slot_from_env(Catalog.load())
    node_id = slot.host.node_id

    node = CheckedNode(node_id=node_id)
    inputs = set(node.node_config()["inputs"])
    sending = threading.Lock()  # the workers, the memory reporter and this thread all send

    def send_output(output: str, value, metadata: dict | None = None) -> None:
        with sending:
            node.send_output(output, value, metadata or {})

    def send(out) -> None:
        try:
            send_output(out.output, out.value, out.meta.to_dora())
        except PayloadTooLarge as error:  # answer the request with why, instead of nothing
            out = slot.host.reject(out.meta.to_dora(), ErrorKind.TOO_LARGE, str(error))
            send_output(out.output, out.value, out.meta.to_dora())
        trace.record(node_id, "send", out.output, out.meta)

    if LOST_OUTPUT in node.node_config()["outputs"]:
        request_inputs = inputs - {SCHEDULER_INPUT, CANCEL_INPUT}

        def report_lost(gap: Gap) -> None:  # dora dropped requests: the requester resends them
            if gap.input in request_inputs:
                dropped = gap.last - gap.first + 1
                notice = ErrorReport("", ErrorKind.LOST, f"dora dropped {dropped} message(s) on "
                                     f"input {gap.input!r}", node_id)
                send_output(LOST_OUTPUT, arrow.encode(notice), {
                    "lost_input": gap.input, "lost_first": gap.first, "lost_last": gap.last})

        node.on_gap = report_lost

    link = None
    if SCHEDULER_INPUT in inputs and isinstance(slot, StageSlot):
        print("omni-node: a node running STAGES does not take scheduler commands yet; remove "
              f"its {SCHEDULER_INPUT!r} input", file=sys.stderr)
        return 2
    if SCHEDULER_INPUT in inputs:
        link = SchedulerLink(node_id, slot, lambda message: send_output(MEMORY_OUTPUT,
                                                                        to_arrow(message)),
                             queue_length=lambda: worker.queue_length(), lost=node.gaps.lost,
                             delivery=lambda: Delivery(time.time_ns(), node.gaps.received(),
                                                       worker.answered()))
        link.start_measuring(memory_report_s)
    worker = RequestWorker(slot, send, request_timeout, link, max_batch=max_batch,
                           batch_window_s=batch_window_s, parallel=parallel,
                           load_at_start=load_at_start)
    open_requests = inputs - {SCHEDULER_INPUT, CANCEL_INPUT}
    timeout = None
    # dora may deliver STOP or INPUT_CLOSED before queued inputs: keep reading until the stream
    # ends -- or, with a scheduler (whose commands never close while this node lives), until
    # every request input has closed and nothing more arrived for LINGER_S.
    while (event := node.next(timeout=timeout)) is not None:
        if event["type"] == "ERROR" and timeout is not None:
            break  # nothing arrived for LINGER_S: leave, so that the scheduler can finish too
        if event["type"] == "INPUT_CLOSED":
            open_requests.discard(event["id"])
            if event["id"] == SCHEDULER_INPUT and link:
                log.warning("the scheduler stopped: this node now loads its model on its own")
                link.detached = True
                worker.command(Command(node_id, "load", slot.model, "the scheduler stopped"))
            elif link and not open_requests:
                timeout = LINGER_S
        if event["type"] != "INPUT":
            continue
        if event["id"] == CANCEL_INPUT:
            for request_id in cancelled_ids(event["value"]):
                worker.cancel(request_id)
        elif event["id"] == SCHEDULER_INPUT:
            command = from_arrow(event["value"])
            if isinstance(command, Command) and command.node == node_id:
                worker.command(command)
        else:
            trace.record(node_id, "recv", event["id"], event.get("metadata"))
            worker.submit(event["id"], event["value"], event.get("metadata"))
    worker.drain()
    return 0


if __name__ == "__main__":
    sys.exit(main())
