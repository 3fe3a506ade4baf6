"""OpenAI's video API over the graph: a clip takes minutes, so each request becomes a job.

``POST /v1/videos`` answers at once with a Video object (``queued``); the clip is made in the
background by the node serving ``video_generation``, which streams :class:`VideoProgress`
(each denoising step, then the frames decoded) and the frames in numbered
:class:`VideoChunk` s. The job's ``progress`` follows the progress messages (denoising
0-90 %, decoding 90-99 %), its chunks are put together (:class:`Clip`, which sees a lost
one), encoded once as MP4, and let go; ``GET /v1/videos/{id}/content`` answers the MP4.

What does not need HTTP lives here: the request body (:class:`VideoBody`, from JSON or from
multipart fields), the jobs (:class:`VideoJob`) and their bounded store
(:class:`VideoJobs`), the objects OpenAI answers, and :func:`generate`, which runs one job on
the node's results.
"""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
import time
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec
import numpy as np
from starlette.concurrency import run_in_threadpool

from mofa_omni.contract.errors import ContractError, ErrorKind, OmniError
from mofa_omni.contract.tasks import (
    VIDEO_MAX_FPS,
    VideoChunk,
    VideoProgress,
    VideoRequest,
    validate_request,
)
from mofa_omni.gateway.openai_bodies import ApiError, node_error, refused
from mofa_omni.gateway.pictures import decode_picture, picture_from_url
from mofa_omni.media.video import Clip, Mp4Writer

log = logging.getLogger("mofa_omni.gateway.videos")

QUEUED, IN_PROGRESS, COMPLETED, FAILED = "queued", "in_progress", "completed", "failed"
DENOISE_PERCENT = 90  # the share of ``progress`` the denoising steps fill; decoding takes 9 more
DECODE_PERCENT = 9  # (the last per cent is the MP4: a job is 100 once it can be downloaded)
LIST_LIMIT, MAX_LIST_LIMIT = 20, 100  # GET /v1/videos: default and largest page


# --- the request body ----------------------------------------------------------------------------

class ImageReference(msgspec.Struct, forbid_unknown_fields=True):
    """OpenAI's ``input_reference`` object: ``image_url`` (an inline data URL here) or
    ``file_id`` (refused: this server keeps no files)."""

    image_url: str | None = None
    file_id: str | None = None


class VideoBody(msgspec.Struct, forbid_unknown_fields=True):
    """OpenAI's video creation body. ``seconds`` is the clip's length (frames = seconds x fps,
    never rounded here); ``frames``, ``fps``, ``steps`` and ``seed`` are this server's extensions
    (the openai client's ``extra_body``); what is not given takes the contract's defaults, and
    the seed is drawn at random."""

    prompt: str
    model: str
    seconds: str | int | float | None = None
    size: str | None = None  # "WIDTHxHEIGHT"
    input_reference: str | ImageReference | None = None  # the first frame: a data URL
    frames: int | None = None
    fps: int | None = None
    steps: int | None = None
    seed: int | None = None

    def to_request(self, upload: bytes | None = None,
                   max_image_pixels: int = 4096 * 4096) -> VideoRequest:
        """The contract's request; ``upload``: the ``input_reference`` file of a multipart body
        (PNG or JPEG, at most ``max_image_pixels``), which becomes the first frame."""
        defaults = VideoRequest("")
        fps = defaults.fps if self.fps is None else self.fps
        if not 1 <= fps <= VIDEO_MAX_FPS:  # before it divides anything
            raise ContractError(f"fps must be 1-{VIDEO_MAX_FPS}, got {fps}")
        width, height = parse_size(self.size, (defaults.width, defaults.height))
        request = VideoRequest(
            self.prompt, clip_frames(self.seconds, self.frames, fps, defaults.frames), fps,
            width, height, defaults.steps if self.steps is None else self.steps,
            secrets.randbelow(1 << 31) if self.seed is None else self.seed,
            self._first_frame(upload, max_image_pixels))
        validate_request(request)
        return request

    def _first_frame(self, upload: bytes | None, max_pixels: int) -> np.ndarray | None:
        reference = self.input_reference
        if upload is not None:
            if reference is not None:
                raise ContractError("input_reference is given twice (a file and a field)")
            return decode_picture(upload, "input_reference", max_pixels)
        if isinstance(reference, ImageReference):
            if reference.file_id is not None:
                raise refused("input_reference", "this server keeps no files (file_id); send "
                                                 "the picture as an upload or a data URL")
            if reference.image_url is None:
                raise ContractError("input_reference needs image_url (a data URL)")
            reference = reference.image_url
        if reference is None:
            return None
        return picture_from_url(reference, "input_reference", max_pixels)


def form_fields(items: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Multipart text fields as the JSON object they stand for: ``input_reference[image_url]``
    (how the openai client writes a nested object) becomes ``{"input_reference":
    {"image_url": ...}}``. A field given twice is refused."""
    fields: dict[str, Any] = {}
    for name, value in items:
        outer, bracket, inner = name.partition("[")
        if bracket and inner.endswith("]") and "[" not in inner:
            target, name = fields.setdefault(outer, {}), inner[:-1]
            if not isinstance(target, dict):
                raise ContractError(f"{outer} is given both as a value and as an object")
        else:
            target = fields
        if name in target:
            raise ContractError(f"{name} is given twice")
        target[name] = value
    return fields


def body_from_form(items: Iterable[tuple[str, str]]) -> VideoBody:
    """The body of a multipart request's text fields (numbers arrive as text); a 400 naming
    what is wrong, an unknown field by its name."""
    try:
        return msgspec.convert(form_fields(items), VideoBody, strict=False)
    except msgspec.ValidationError as error:
        raise ApiError(ErrorKind.BAD_REQUEST, f"invalid request body: {error}") from None


def parse_size(size: str | None, default: tuple[int, int]) -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` in pixels; ``default`` when absent."""
    if size is None:
        return default
    width, x, height = size.lower().partition("x")
    if not (x and width.isdigit() and height.isdigit()):
        raise ContractError(f"size {size!r}: expected WIDTHxHEIGHT in pixels (e.g. 832x480)")
    return int(width), int(height)


def clip_frames(seconds: str | float | None, frames: int | None, fps: int, default: int) -> int:
    """The clip's frame count: ``frames``, or ``seconds`` x ``fps`` (a whole number of frames:
    never rounded, so that the model refuses a length it cannot make instead of making
    another); ``default`` when neither is given."""
    if seconds is None:
        return default if frames is None else frames
    try:
        length = Decimal(str(seconds))
    except InvalidOperation:
        raise ContractError(f"seconds {seconds!r}: expected a number of seconds, e.g. \"4\"") \
            from None
    if not length.is_finite() or length <= 0:
        raise ContractError(f"seconds must be positive, got {seconds!r}")
    count = length * fps
    if count != count.to_integral_value():
        raise ContractError(f"seconds {seconds} at {fps} fps is {count.normalize()} frames: send "
                            "a length of a whole number of frames, or frames")
    if frames is not None and frames != int(count):
        raise ContractError(f"seconds {seconds} at {fps} fps is {int(count)} frames, and frames "
                            f"says {frames}: send one of them")
    return int(count)


def seconds_text(frames: int, fps: int) -> str:
    """A clip's length as OpenAI writes ``seconds``: ``"4"``, ``"1.0625"``."""
    return f"{frames / fps:.4f}".rstrip("0").rstrip(".")


# --- jobs ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class JobError:
    """Why a job failed: the node's error kind (or the gateway's code), and its message."""

    code: str
    message: str


@dataclass(eq=False)
class VideoJob:
    """One clip being made, or made: what was asked, how far it is, and its MP4 once done."""

    id: str
    model: str
    request: VideoRequest  # as asked, without its first frame (let go once sent)
    created_at: int
    keep_s: float  # kept this long once finished
    image_to_video: bool = False
    status: str = QUEUED
    progress: int = 0  # 0-100
    completed_at: int | None = None  # when it finished (completed or failed)
    error: JobError | None = None
    mp4: bytes | None = None
    task: asyncio.Task[None] | None = None  # what makes it, while it runs

    @property
    def finished(self) -> bool:
        return self.status in (COMPLETED, FAILED)

    @property
    def expires_at(self) -> int | None:
        return None if self.completed_at is None else int(self.completed_at + self.keep_s)

    def advance(self, step: VideoProgress) -> None:
        """The node reports how far the clip has come."""
        self.status = IN_PROGRESS
        self.progress = max(self.progress, progress_of(step))

    def complete(self, mp4: bytes, now: float) -> None:
        self.status, self.progress, self.mp4 = COMPLETED, 100, mp4
        self.completed_at = int(now)

    def fail(self, code: str, message: str, now: float) -> None:
        self.status, self.error, self.completed_at = FAILED, JobError(code, message), int(now)

    def stop(self) -> None:
        """Cancel the generation if it runs (the node is told), and let go of the MP4."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.mp4 = None


def progress_of(step: VideoProgress) -> int:
    """A progress message as a percentage: denoising fills 0-90, decoding 90-99."""
    done = step.step / step.steps if step.steps > 0 else 0.0
    if step.phase == "denoise":
        return round(DENOISE_PERCENT * done)
    return DENOISE_PERCENT + int(DECODE_PERCENT * done)


def video_object(job: VideoJob) -> dict[str, Any]:
    """The job as OpenAI's Video object, with this server's extensions (frames, fps, steps,
    seed)."""
    request = job.request
    return {"id": job.id, "object": "video", "created_at": job.created_at,
            "status": job.status, "model": job.model, "progress": job.progress,
            "prompt": request.prompt, "seconds": seconds_text(request.frames, request.fps),
            "size": f"{request.width}x{request.height}", "completed_at": job.completed_at,
            "expires_at": job.expires_at, "remixed_from_video_id": None,
            "error": None if job.error is None else {"code": job.error.code,
                                                     "message": job.error.message},
            "frames": request.frames, "fps": request.fps, "steps": request.steps,
            "seed": request.seed, "image_to_video": job.image_to_video}


def deleted_object(job: VideoJob) -> dict[str, Any]:
    """What OpenAI answers a DELETE with."""
    return {"id": job.id, "object": "video.deleted", "deleted": True}


class VideoJobs:
    """The jobs this gateway holds, at most ``capacity``: a finished job goes ``keep_s`` after
    it finished, or sooner (the oldest first) to make room for a new one; a new job when every
    one held still runs is refused (429). ``clock``: seconds since the epoch."""

    def __init__(self, capacity: int, keep_s: float, clock: Callable[[], float] = time.time):
        self.capacity, self.keep_s, self.clock = capacity, keep_s, clock
        self._jobs: dict[str, VideoJob] = {}  # in the order they were made

    def __len__(self) -> int:
        return len(self._jobs)

    def create(self, model: str, request: VideoRequest) -> VideoJob:
        """A new job for ``request``, queued; a 429 when the store is full of running jobs."""
        self.expire()
        if len(self._jobs) >= self.capacity:
            oldest = next((job for job in self._jobs.values() if job.finished), None)
            if oldest is None:
                raise ApiError(ErrorKind.UNAVAILABLE,
                               f"this server holds {self.capacity} video jobs, all still "
                               "running: wait for one to finish, or delete one",
                               status=429, error_type="rate_limit_error",
                               code="too_many_videos")
            self._drop(oldest.id)
        job = VideoJob(f"video_{secrets.token_hex(16)}", model, replace(request, image=None),
                       int(self.clock()), self.keep_s, image_to_video=request.image is not None)
        self._jobs[job.id] = job
        return job

    def get(self, video_id: str) -> VideoJob:
        """The job, or a 404."""
        self.expire()
        job = self._jobs.get(video_id)
        if job is None:
            raise ApiError(ErrorKind.BAD_REQUEST, f"no video {video_id!r} here (it never was, "
                                                  "was deleted, or expired)",
                           status=404, code="video_not_found", param="video_id")
        return job

    def remove(self, video_id: str) -> VideoJob:
        """Take the job out, cancelling it if it runs; a 404 when there is none."""
        job = self.get(video_id)
        self._drop(video_id)
        return job

    def page(self, after: str | None = None, limit: int = LIST_LIMIT,
             order: str = "desc") -> dict[str, Any]:
        """OpenAI's list of jobs: newest first (``desc``) or oldest first, from the one after
        ``after``, at most ``limit``."""
        self.expire()
        jobs = list(self._jobs.values())
        if order == "desc":
            jobs.reverse()
        if after is not None:
            ids = [job.id for job in jobs]
            if after not in ids:
                raise ApiError(ErrorKind.BAD_REQUEST, f"after: no video {after!r} here",
                               param="after")
            jobs = jobs[ids.index(after) + 1:]
        shown = jobs[:limit]
        return {"object": "list", "data": [video_object(job) for job in shown],
                "first_id": shown[0].id if shown else None,
                "last_id": shown[-1].id if shown else None, "has_more": len(jobs) > limit}

    def expire(self) -> None:
        """Drop the finished jobs kept past their time."""
        now = self.clock()
        for job in list(self._jobs.values()):
            if job.expires_at is not None and job.expires_at <= now:
                self._drop(job.id)

    def stop_all(self) -> list[asyncio.Task[None]]:
        """Cancel every running job (the server stops); their tasks, to wait for."""
        tasks = [job.task for job in self._jobs.values() if job.task and not job.task.done()]
        for job in list(self._jobs.values()):
            self._drop(job.id)
        return tasks

    def _drop(self, video_id: str) -> None:
        self._jobs.pop(video_id).stop()


# --- making a clip -------------------------------------------------------------------------------

async def generate(job: VideoJob, results: AsyncIterable[VideoProgress | VideoChunk],
                   clock: Callable[[], float] = time.time) -> None:
    """Run ``job`` on the node's results: progress as it comes, the chunks put together, the
    MP4 encoded (off the event loop) once the last has come; the node's error, a lost chunk,
    or a deadline passed fail the job with its message. The frames are let go as soon as the
    MP4 is made, or the job ends otherwise (cancelled: the node is told by ``results``)."""
    clip = Clip()
    try:
        async for result in results:
            if isinstance(result, VideoProgress):
                job.advance(result)
            else:
                job.status = IN_PROGRESS
                _add(clip, result)
        if not clip.complete:
            raise node_error(ErrorKind.LOST, f"the reply ended after {clip.frames_so_far} of "
                                             f"the clip's {job.request.frames} frames")
        mp4 = await run_in_threadpool(encode_clip, list(clip.chunks), clip.fps)
        job.complete(mp4, clock())
    except ApiError as error:
        job.fail(error.code or str(error.kind), error.message, clock())
    except OmniError as error:  # e.g. a request larger than the gateway's pool
        job.fail(str(error.kind), str(error), clock())
    except Exception as error:  # a bug: the job says so rather than running for ever
        log.exception("video job %s failed", job.id)
        job.fail(str(ErrorKind.INTERNAL), f"{type(error).__name__}: {error}", clock())
    finally:
        clip.chunks.clear()


def _add(clip: Clip, chunk: VideoChunk) -> None:
    try:
        clip.add(chunk)
    except ContractError as error:  # out of order: dora dropped one on the way
        raise node_error(ErrorKind.LOST, str(error)) from None


def encode_clip(chunks: list[np.ndarray], fps: int) -> bytes:
    """The MP4 (H.264, yuv420p) of a clip's chunks, written chunk by chunk: the frames are
    never copied into one array."""
    buffer = io.BytesIO()
    with Mp4Writer(buffer, fps) as writer:
        for frames in chunks:
            writer.add(frames)
    return buffer.getvalue()
