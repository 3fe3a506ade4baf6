"""video_sink: writes each generated clip to an MP4 file as its chunks arrive.

Configuration (env in the dataflow YAML):
    VIDEO_OUTPUT  a folder (one file per request: PREFIX-001.mp4, ... in the order clips begin)
                  or a file ending in .mp4 (the one clip to write); default out/video. A
                  relative path is relative to where dora was started.
    PREFIX        file name prefix in a folder (default clip)
    VIDEO_STATUS  optional: a JSON file kept up to date with each clip's progress (phase,
                  denoising step, frames written, path or error); `omni video` draws its
                  progress bar from it

Inputs:
    video   a video generation node's `result`: VideoProgress while it denoises, then the
            numbered VideoChunks (a lost chunk fails the clip, said in the log)
    error   optional, the same node's `error`: the request's clip ends without a file
    cancel  optional, request ids: their clips end, and their later chunks are ignored
Outputs:
    done    event `video.done` (a GenericResult, read it with mofa_omni.voice.events.read_event;
            fields `path`, `frames` and `error`, one of them empty), with the request's id
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mofa_omni.config import env_path, env_str, exit_on_bad_settings, output_path
from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import ErrorReport, VideoChunk, VideoProgress
from mofa_omni.media.video_stream import ClipFiles, ClipStatus
from mofa_omni.node.host import MessageMeta
from mofa_omni.node.integrity import CheckedNode
from mofa_omni.node.serving import CANCEL_INPUT, cancelled_ids
from mofa_omni.voice.events import event

log = logging.getLogger("video_sink")

DONE = "video.done"
ENDED = ("written", "failed", "cancelled")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with exit_on_bad_settings("video_sink"):
        target = output_path(env_path("VIDEO_OUTPUT", Path("out/video")))
        status = env_str("VIDEO_STATUS", "")
        files = ClipFiles(target, env_str("PREFIX", "clip"), single=target.suffix == ".mp4",
                          status_file=output_path(status) if status else None)
    node = CheckedNode()
    cancelled: set[str] = set()

    def done(meta: MessageMeta, clip: ClipStatus) -> None:
        if clip.error:
            log.error("%s: no clip: %s", meta.request_id, clip.error)
        else:
            log.info("%s: %s (%d frames)", meta.request_id, clip.path, clip.frames)
        out = MessageMeta(meta.request_id, 0, True, meta.origin_ns, time.time_ns())
        node.send_output("done", event(DONE, path=clip.path, frames=clip.frames,
                                       error=clip.error), out.to_dora())

    while (incoming := node.next()) is not None:
        if incoming["type"] != "INPUT":
            continue
        meta = MessageMeta.from_dora(incoming.get("metadata"), incoming["id"])
        value = incoming["value"]
        if incoming["id"] == CANCEL_INPUT:
            for request_id in cancelled_ids(value):
                cancelled.add(request_id)
                if request_id in files.statuses and files.statuses[request_id].phase not in ENDED:
                    done(meta, files.fail(request_id, "cancelled", "cancelled"))
            continue
        if meta.request_id in cancelled or \
                files.statuses.get(meta.request_id, ClipStatus("")).phase in ENDED:
            continue
        try:
            if incoming["id"] == "error":
                report = arrow.decode(value, ErrorReport)
                done(meta, files.fail(meta.request_id, report.summary()))
                continue
            message = arrow.decode_one_of(value, (VideoProgress, VideoChunk))
            if isinstance(message, VideoProgress):
                files.progress(meta.request_id, message)
                continue
            clip = files.chunk(meta.request_id, message)
            if clip.phase == "written":
                done(meta, clip)
        except ContractError as error:  # a malformed message or a lost chunk: the clip fails
            done(meta, files.fail(meta.request_id, str(error)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
