"""The gateway's settings: how long a request may take, how large it may be, who may ask, and
how many video jobs it keeps."""

from __future__ import annotations

from dataclasses import dataclass

from mofa_omni.gateway.openai_bodies import MAX_IMAGE_PIXELS


@dataclass(frozen=True, slots=True)
class Settings:
    """What the dora bridge (deadline, fallback) and the HTTP app (limits, key) hold to."""

    deadline_s: float = 150.0  # a request with no complete answer by then gets a 504
    max_body_bytes: int = 25 << 20  # larger bodies get a 413 (OpenAI's own audio limit)
    api_key: str = ""  # when set, requests must carry `Authorization: Bearer <key>`
    fallback_after_s: float = 0.0  # > 0: no first result from a local model by then -> remote
    max_image_pixels: int = MAX_IMAGE_PIXELS  # a larger picture in a chat message gets a 400
    max_wait_for_restart_s: float = 60.0  # the most a client may ask to wait for a restart
    video_deadline_s: float = 3600.0  # a video job not finished by then fails (a clip takes minutes)
    max_videos: int = 16  # video jobs kept, running and finished; the oldest finished goes first
    video_keep_s: float = 3600.0  # a finished video job (and its MP4) is kept this long
