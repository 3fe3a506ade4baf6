"""video_request: asks a video generation node for one clip, and waits until it is made.

Configuration (env in the dataflow YAML):
    PROMPT     what the clip shows (required)
    IMAGE      optional: a picture (PNG, JPEG...) to start from (image to video)
    SIZE       WIDTHxHEIGHT (default 832x480); FRAMES (17), FPS (16), STEPS (20), SEED (0)
    WAIT_S     how long to wait for `ready` once asked (default 3600)

Inputs:
    ready    the sink's `done`: the clip is written (or failed); the node then ends
Outputs:
    request  the VideoRequest, request_id `video-1`
"""

from __future__ import annotations

import logging
import time

import numpy as np

from mofa_omni.config import data_path, env_float, env_int, env_str, exit_on_bad_settings
from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ConfigError
from mofa_omni.contract.tasks import VideoRequest, validate_request
from mofa_omni.node.host import MessageMeta
from mofa_omni.node.integrity import CheckedNode
from mofa_omni_nodes.wav_source import Inbox

log = logging.getLogger("video_request")


def parse_size(text: str) -> tuple[int, int]:
    """``832x480`` as (width, height)."""
    width, _, height = text.lower().partition("x")
    try:
        return int(width), int(height)
    except ValueError:
        raise ConfigError(f"SIZE={text!r}: write it WIDTHxHEIGHT, e.g. 832x480") from None


def read_picture(path: str) -> np.ndarray:
    """A picture file as uint8 RGB (H, W, 3)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(data_path(path)) as picture:
            return np.asarray(picture.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as error:
        raise ConfigError(f"IMAGE={path}: not a picture ({error})") from None


def request_from_env() -> VideoRequest:
    prompt = env_str("PROMPT", "")
    if not prompt.strip():
        raise ConfigError("PROMPT is not set: say what the clip shows")
    width, height = parse_size(env_str("SIZE", "832x480"))
    image = env_str("IMAGE", "")
    request = VideoRequest(prompt, env_int("FRAMES", 17, minimum=1), env_int("FPS", 16, minimum=1),
                           width, height, env_int("STEPS", 20, minimum=1), env_int("SEED", 0),
                           read_picture(image) if image else None)
    validate_request(request)
    return request


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with exit_on_bad_settings("video_request"):
        request = request_from_env()
        wait_s = env_float("WAIT_S", 3600)
    node = CheckedNode()
    inbox = Inbox(node)
    now = time.time_ns()
    log.info("video-1: %s (%d frames, %dx%d, %d steps)", request.prompt, request.frames,
             request.width, request.height, request.steps)
    node.send_output("request", arrow.encode(request),
                     MessageMeta("video-1", 0, True, now, now).to_dora())
    if inbox.ready_connected and not inbox.wait(wait_s, for_ready=True) and not inbox.stopped:
        log.error("video-1: no clip after %.0f s", wait_s)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
