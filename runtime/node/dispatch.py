"""The event loop of a node that is a state machine over its inputs (the robot's planner, an
agent): each input handled by a function returning the actions to take, deadlines checked
between events, and the node ending once its main input is closed and its work is done."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa

from mofa_omni.contract.errors import ContractError
from mofa_omni.node.host import MessageMeta

Handler = Callable[[MessageMeta, pa.Array, float], Iterable[Any]]


def dispatch(node, handlers: dict[str, Handler], act: Callable[[Iterable[Any]], None], *,
             expire: Callable[[float], Iterable[Any]], last_input: str,
             busy: Callable[[], bool], log: logging.Logger, tick_s: float = 0.5) -> None:
    """Run ``handlers`` over ``node``'s events until its stream ends, or until ``last_input``
    is closed and nothing is ``busy`` (which closes the graph's cycles: every node downstream
    finishes too). ``expire(now)`` is asked at least every ``tick_s``; a message that cannot
    be read is logged and skipped."""
    closed = False
    while (event := node.next(timeout=tick_s)) is not None:
        now = time.monotonic()
        act(expire(now))
        if event["type"] == "INPUT_CLOSED" and event["id"] == last_input:
            closed = True
        elif event["type"] == "INPUT" and event["id"] in handlers:
            meta = MessageMeta.from_dora(event.get("metadata"), event["id"])
            try:
                act(handlers[event["id"]](meta, event["value"], now))
            except ContractError as error:
                log.error("%s %s: %s", event["id"], meta.request_id, error)
        if closed and not busy():
            break
