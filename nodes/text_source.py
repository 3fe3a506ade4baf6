"""text_source: sends written questions into the graph, one per turn.

Configuration (env in the dataflow YAML):
    QUESTIONS        a text file, one question per line (blank lines and # comments skipped);
                     relative: from where dora was started, else from this checkout
    READY_TIMEOUT_S  longest wait for `ready` before the next question is sent (default 120)
    LINGER_S         after the last question, how long to wait for its `ready` (default 30)

Inputs:
    ready     optional, any message: the last question is answered (e.g. agent/turn_done)
Outputs:
    question  the question's text (a string array), request_id `q-N`
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pyarrow as pa

from mofa_omni.config import data_path, env_float, env_path, exit_on_bad_settings
from mofa_omni.contract.errors import ConfigError
from mofa_omni.node.host import MessageMeta
from mofa_omni.node.integrity import CheckedNode
from mofa_omni_nodes.wav_source import Inbox

log = logging.getLogger("text_source")


def questions(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"QUESTIONS: {path} is not a file")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with exit_on_bad_settings("text_source"):
        asked = questions(data_path(env_path("QUESTIONS", Path("questions.txt"))))
        ready_timeout = env_float("READY_TIMEOUT_S", 120)
        linger = env_float("LINGER_S", 30)
    node = CheckedNode()
    inbox = Inbox(node)
    for number, text in enumerate(asked, start=1):
        if number > 1 and inbox.ready_connected and \
                not inbox.wait(ready_timeout, for_ready=True) and not inbox.stopped:
            log.warning("no `ready` after %.0f s; asking the next question anyway", ready_timeout)
        if inbox.stopped:
            break
        now = time.time_ns()
        log.info("q-%d: %s", number, text)
        node.send_output("question", pa.array([text]),
                         MessageMeta(f"q-{number}", 0, True, now, now).to_dora())
    if asked and not inbox.stopped:
        inbox.wait(linger, for_ready=inbox.ready_connected)
    return 0


if __name__ == "__main__":
    main()
