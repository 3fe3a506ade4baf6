"""Video generation through the OpenAI-compatible gateway: OpenAI's video API (a job made in the
background, polled, downloaded as MP4, listed, deleted).

First the parts that need no graph (mofa_omni.gateway.videos: the body, the frame count, the
progress, the bounded job store, a job run on given results); then a real dataflow
(tests/dataflows/gateway_videos.yml: the gateway and an omni-node serving the tiny random Wan
2.2 TI2V) driven by the official `openai` client. The model has random weights: these tests
check what the server does with clips (statuses, progress, shapes, rates, errors), not what
they show."""

from __future__ import annotations

import asyncio
import base64
import re
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from mofa_omni.contract.errors import ContractError, ErrorKind
from mofa_omni.contract.tasks import VideoChunk, VideoProgress, VideoRequest
from mofa_omni.gateway.openai_bodies import ApiError, decode_body, node_error
from mofa_omni.gateway.videos import (
    COMPLETED,
    FAILED,
    IN_PROGRESS,
    QUEUED,
    VideoBody,
    VideoJobs,
    body_from_form,
    clip_frames,
    generate,
    progress_of,
    seconds_text,
    video_object,
)
from mofa_omni.media.png import png_bytes
from mofa_omni.media.video import read_mp4
from tests.test_gateway import Server, serve

# The openai client marks its video methods deprecated (Sora's API ends in 2026); they work.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

GRAPH = Path(__file__).parent / "dataflows" / "gateway_videos.yml"


def picture(height: int, width: int, level: int = 128) -> np.ndarray:
    """A flat picture with a bright square in it: uint8, HWC, RGB."""
    pixels = np.full((height, width, 3), level, np.uint8)
    pixels[height // 4: height // 2, width // 4: width // 2] = 250
    return pixels


def data_url(pixels: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(pixels)).decode()


# --- the body, the frame count, the progress ---------------------------------------------------

@pytest.mark.parametrize("seconds, frames, fps, expected", [
    (None, None, 16, 17),  # the contract's default clip
    (None, 9, 16, 9),
    ("0.5625", None, 16, 9),
    (4, None, 16, 64),  # OpenAI's 4 s: the model may refuse 64 frames; it is not rounded here
    ("4", 64, 16, 64),  # both, agreeing
])
def test_the_frame_count_comes_from_frames_or_seconds_times_fps(seconds, frames, fps, expected):
    assert clip_frames(seconds, frames, fps, 17) == expected


@pytest.mark.parametrize("seconds, frames, message", [
    ("0.3", None, r"seconds 0.3 at 16 fps is 4.8 frames: send a length of a whole number"),
    ("4", 17, r"seconds 4 at 16 fps is 64 frames, and frames says 17: send one of them"),
    ("soon", None, r"seconds 'soon': expected a number of seconds"),
    ("-1", None, r"seconds must be positive"),
])
def test_a_length_that_is_not_a_whole_number_of_frames_is_refused(seconds, frames, message):
    with pytest.raises(ContractError, match=message):
        clip_frames(seconds, frames, 16, 17)


def test_seconds_are_written_as_openai_writes_them():
    assert [seconds_text(*c) for c in ((64, 16), (17, 16), (9, 24), (5, 15))] == \
        ["4", "1.0625", "0.375", "0.3333"]


def test_progress_fills_90_percent_denoising_and_9_decoding():
    steps = [VideoProgress("denoise", s, 4) for s in range(1, 5)] + \
        [VideoProgress("decode", f, 9) for f in (0, 8, 9)]
    assert [progress_of(s) for s in steps] == [22, 45, 68, 90, 90, 98, 99]


def test_a_json_body_becomes_a_video_request():
    body = decode_body(b'{"model": "tiny-wan", "prompt": "a kite", "seconds": "0.5625", '
                       b'"size": "96x64", "fps": 16, "steps": 3, "seed": 7, '
                       b'"input_reference": "' + data_url(picture(8, 8)).encode() + b'"}',
                       VideoBody)
    request = body.to_request()
    assert (request.prompt, request.frames, request.fps, request.width, request.height,
            request.steps, request.seed) == ("a kite", 9, 16, 96, 64, 3, 7)
    assert request.image.shape == (8, 8, 3)
    drawn = decode_body(b'{"model": "m", "prompt": "a kite"}', VideoBody).to_request()
    assert (drawn.frames, drawn.fps, drawn.width, drawn.height, drawn.steps) == \
        (17, 16, 832, 480, 20)  # the contract's defaults
    assert drawn.seed >= 0 and drawn.image is None  # a seed drawn at random


def test_multipart_fields_become_the_same_body():
    body = body_from_form([("model", "tiny-wan"), ("prompt", "a kite"), ("frames", "5"),
                           ("fps", "8"), ("input_reference[image_url]", data_url(picture(4, 4)))])
    request = body.to_request()
    assert (request.frames, request.fps) == (5, 8) and request.image.shape == (4, 4, 3)
    uploaded = body_from_form([("model", "m"), ("prompt", "a kite")]).to_request(
        png_bytes(picture(6, 10)))
    assert uploaded.image.shape == (6, 10, 3)


@pytest.mark.parametrize("fields, upload, message", [
    ([("quality", "high")], None, r"unknown field `quality`"),
    ([("frames", "many")], None, r"Expected `int \| null`, got `str` - at `\$.frames`"),
    ([("frames", "5"), ("frames", "9")], None, r"frames is given twice"),
    ([("input_reference[file_id]", "file-1")], None, r"input_reference: this server keeps no "
                                                      r"files"),
    ([("input_reference", data_url(picture(4, 4)))], png_bytes(picture(4, 4)),
     r"input_reference is given twice"),
    ([], b"not a picture", r"input_reference: not a PNG or JPEG picture"),
    ([("size", "big")], None, r"size 'big': expected WIDTHxHEIGHT"),
    ([("fps", "0")], None, r"fps must be 1-240, got 0"),
    ([("frames", "0")], None, r"frames must be 1-1024, got 0"),
    ([("prompt", " ")], None, r"empty prompt"),
])
def test_bad_bodies_are_refused_by_name(fields, upload, message):
    given = dict(fields)
    base = [(k, v) for k, v in (("model", "m"), ("prompt", "a kite")) if k not in given]
    with pytest.raises((ApiError, ContractError), match=message):
        body_from_form(base + fields).to_request(upload)


# --- the job store -----------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_jobs_are_kept_bounded_the_oldest_finished_going_first():
    clock = Clock()
    jobs = VideoJobs(3, keep_s=60, clock=clock)
    a, b, c = (jobs.create("tiny-wan", VideoRequest(p)) for p in "abc")
    assert video_object(a)["status"] == QUEUED and a.id.startswith("video_")
    b.complete(b"mp4", clock.now)
    a.fail("bad_request", "no", clock.now)
    d = jobs.create("tiny-wan", VideoRequest("d"))  # full: the oldest finished (a) goes
    assert [v["id"] for v in jobs.page()["data"]] == [d.id, c.id, b.id]
    c.complete(b"mp4", clock.now)
    e = jobs.create("tiny-wan", VideoRequest("e"))  # then b, then c
    f = jobs.create("tiny-wan", VideoRequest("f"))
    assert [v["id"] for v in jobs.page()["data"]] == [f.id, e.id, d.id]
    assert b.mp4 is None and c.mp4 is None  # their MP4s went with them


def test_a_full_store_of_running_jobs_refuses_a_new_one_with_429():
    jobs = VideoJobs(2, keep_s=60, clock=Clock())
    first = jobs.create("m", VideoRequest("a"))
    jobs.create("m", VideoRequest("b"))
    with pytest.raises(ApiError, match="holds 2 video jobs, all still running") as full:
        jobs.create("m", VideoRequest("c"))
    assert full.value.status == 429 and full.value.code == "too_many_videos"
    jobs.remove(first.id)  # a deleted one makes room
    jobs.create("m", VideoRequest("c"))


def test_finished_jobs_expire_and_unknown_ones_are_404():
    clock = Clock()
    jobs = VideoJobs(4, keep_s=60, clock=clock)
    job = jobs.create("m", VideoRequest("a", image=picture(4, 4)))
    assert job.request.image is None and job.image_to_video  # the picture is not kept
    job.complete(b"mp4", clock.now)
    assert video_object(job)["expires_at"] == 1060 and video_object(job)["progress"] == 100
    clock.now += 59
    assert jobs.get(job.id) is job
    clock.now += 1
    with pytest.raises(ApiError, match="no video") as gone:
        jobs.get(job.id)
    assert gone.value.status == 404 and gone.value.code == "video_not_found"
    with pytest.raises(ApiError, match="no video 'video_nope'"):
        jobs.remove("video_nope")


def test_the_list_pages_newest_first_or_oldest_first():
    jobs = VideoJobs(8, keep_s=60, clock=Clock())
    made = [jobs.create("m", VideoRequest(p)).id for p in "abcde"]
    page = jobs.page(limit=2)
    assert [v["id"] for v in page["data"]] == made[:-3:-1] and page["has_more"]
    assert (page["object"], page["first_id"], page["last_id"]) == ("list", made[4], made[3])
    rest = jobs.page(after=page["last_id"], limit=10)
    assert [v["id"] for v in rest["data"]] == made[2::-1] and not rest["has_more"]
    assert [v["id"] for v in jobs.page(order="asc", limit=3)["data"]] == made[:3]
    with pytest.raises(ApiError, match="after: no video 'video_x'"):
        jobs.page(after="video_x")


# --- a job run on given results ----------------------------------------------------------------

def chunks_of(frames: np.ndarray, per_chunk: int, fps: int) -> list[VideoChunk]:
    starts = range(0, len(frames), per_chunk)
    return [VideoChunk(frames[s:s + per_chunk], i, s, len(frames), fps,
                       s + per_chunk >= len(frames)) for i, s in enumerate(starts)]


async def replies(*results, wait: asyncio.Event | None = None, ended: list | None = None):
    try:
        for result in results:
            if isinstance(result, Exception):
                raise result
            yield result
        if wait is not None:
            await wait.wait()
    finally:
        if ended is not None:
            ended.append(True)  # what Answer does here: tell the node to stop


def test_a_job_follows_progress_and_ends_with_the_mp4_of_its_chunks():
    frames = np.random.default_rng(0).integers(0, 255, (9, 32, 48, 3), np.uint8)
    job = VideoJobs(4, 60, Clock()).create("m", VideoRequest("a", 9, 12, 48, 32))
    seen = []

    async def results():
        for step in range(1, 4):
            yield VideoProgress("denoise", step, 3)
            seen.append((job.status, job.progress))
        for chunk in chunks_of(frames, 4, 12):
            yield chunk

    asyncio.run(generate(job, results(), clock=lambda: 2000.0))
    assert seen == [(IN_PROGRESS, 30), (IN_PROGRESS, 60), (IN_PROGRESS, 90)]
    assert (job.status, job.progress, job.completed_at, job.error) == (COMPLETED, 100, 2000, None)
    back, fps = read_mp4(job.mp4)
    assert back.shape == frames.shape and fps == 12


@pytest.mark.parametrize("results, code, message", [
    ([VideoProgress("denoise", 1, 2), node_error("bad_request", "video: 6 frames: no")],
     "bad_request", "video: 6 frames: no"),
    ([VideoProgress("denoise", 1, 2), ApiError(ErrorKind.TIMEOUT, "video did not answer",
                                               code="timeout")], "timeout", "did not answer"),
    (chunks_of(np.zeros((6, 16, 16, 3), np.uint8), 2, 8)[::2], "lost",
     "chunk 2 .* arrived where chunk 1 .* was due"),
    (chunks_of(np.zeros((6, 16, 16, 3), np.uint8), 2, 8)[:2], "lost",
     "the reply ended after 4 of the clip's 6 frames"),
])
def test_a_job_fails_with_the_nodes_message_or_a_lost_chunk(results, code, message):
    job = VideoJobs(4, 60, Clock()).create("m", VideoRequest("a", 6, 8, 16, 16))
    asyncio.run(generate(job, replies(*results)))
    assert job.status == FAILED and job.error.code == code and job.mp4 is None
    assert re.search(message, job.error.message), job.error.message
    assert video_object(job)["error"] == {"code": code, "message": job.error.message}


def test_a_deleted_job_stops_its_generation_and_lets_go_of_its_frames():
    jobs = VideoJobs(4, 60, Clock())
    job = jobs.create("m", VideoRequest("a", 6, 8, 16, 16))
    ended: list = []

    async def run() -> None:
        chunk = chunks_of(np.zeros((6, 16, 16, 3), np.uint8), 2, 8)[0]
        job.task = asyncio.create_task(generate(
            job, replies(VideoProgress("denoise", 2, 2), chunk, wait=asyncio.Event(),
                         ended=ended)))
        await asyncio.sleep(0.05)
        assert job.status == IN_PROGRESS and job.progress == 90
        jobs.remove(job.id)
        with pytest.raises(asyncio.CancelledError):
            await job.task

    asyncio.run(run())
    assert ended == [True] and not job.finished and len(jobs) == 0


# --- through the graph -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    """The graph, with a catalog file naming the tiny Wan and a model cache of its own."""
    from mofa_omni.testing.tiny_wan import write_tiny_wan

    root = tmp_path_factory.mktemp("gateway_videos")
    checkpoint = write_tiny_wan(root / "tiny-wan")
    user = root / "catalog.toml"
    user.write_text('[models.tiny-wan]\nadapter = "mlx_wan"\ntasks = ["video_generation"]\n'
                    'format = "diffusers"\nmemory_mb = 100\n'
                    'options = { guidance = 1.0, max_side = 256, max_frames = 33 }\n'
                    f'source = {{ path = "{checkpoint}" }}\n')
    running = serve(GRAPH, [], MOFA_OMNI_CATALOG=str(user), MOFA_OMNI_CACHE=str(root / "cache"))
    yield running
    stats = running.stats()
    log = running.stop()
    assert "Traceback" not in log, log[-5000:]
    assert stats["in_flight"] == 0 and stats["lost"] == {}, stats


def polled(client: openai.OpenAI, video_id: str, timeout: float = 90) -> list:
    """The job as retrieved again and again until it is finished."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(client.videos.retrieve(video_id))
        if seen[-1].status in ("completed", "failed"):
            return seen
        time.sleep(0.05)
    pytest.fail(f"{video_id} did not finish within {timeout} s: {seen[-1]}")


def downloaded(client: openai.OpenAI, video_id: str) -> tuple[np.ndarray, float]:
    return read_mp4(client.videos.download_content(video_id).content)


def test_a_clip_is_made_in_the_background_and_downloaded_as_mp4(server: Server):
    client = server.client()
    video = client.videos.create(model="tiny-wan", prompt="a red kite over green hills",
                                 seconds="1.0625", size="64x64",  # 17 frames
                                 extra_body={"fps": 16, "steps": 8, "seed": 3})
    assert video.id.startswith("video_") and video.object == "video"
    assert video.status in ("queued", "in_progress") and video.progress < 100
    assert (video.model, video.seconds, video.size, video.error) == ("tiny-wan", "1.0625",
                                                                     "64x64", None)
    seen = polled(client, video.id)
    progress = [v.progress for v in seen]
    assert progress == sorted(progress) and any(0 < p < 100 for p in progress), progress
    done = seen[-1]
    assert (done.status, done.progress) == ("completed", 100), done
    assert done.created_at <= done.completed_at < done.expires_at
    frames, fps = downloaded(client, video.id)
    assert frames.shape == (17, 64, 64, 3) and fps == 16 and frames.std() > 0
    with httpx.Client(base_url=server.url, timeout=30) as http:  # JSON, as OpenAI also takes
        made = http.post("/videos", json={"model": "tiny-wan", "prompt": "a kite", "frames": 5,
                                          "fps": 8, "size": "96x64", "steps": 2}).json()
        assert (made["seconds"], made["size"], made["frames"]) == ("0.625", "96x64", 5), made
        assert polled(client, made["id"])[-1].status == "completed"
        raw = http.get(f"/videos/{made['id']}/content")
    assert raw.headers["content-type"] == "video/mp4"
    frames, fps = read_mp4(raw.content)
    assert frames.shape == (5, 64, 96, 3) and fps == 8
    models = {m.id: m.model_dump() for m in client.models.list()}
    assert models["tiny-wan"]["served_by"] == ["video"]
    assert models["tiny-wan"]["tasks"] == ["video_generation"] and models["tiny-wan"]["loaded"]


def test_image_to_video_from_an_upload_or_a_data_url(server: Server):
    client = server.client()
    clip = {"model": "tiny-wan", "prompt": "a red kite", "size": "64x64"}
    extra = {"frames": 5, "fps": 8, "steps": 2, "seed": 1}
    first = picture(48, 80, 20)
    made = {
        "upload": client.videos.create(**clip, extra_body=extra,
                                       input_reference=("first.png", png_bytes(first),
                                                        "image/png")).id,
        "text": client.videos.create(**clip, extra_body=extra).id}
    with httpx.Client(base_url=server.url, timeout=30) as http:  # (the client sends no objects)
        for way, reference in (("json", data_url(first)),
                               ("object", {"image_url": data_url(first)})):
            made[way] = http.post("/videos", json={**clip, **extra,
                                                   "input_reference": reference}).json()["id"]
    clips = {}
    for way, video_id in made.items():
        assert polled(client, video_id)[-1].status == "completed", way
        clips[way], fps = downloaded(client, video_id)
        assert clips[way].shape == (5, 64, 64, 3) and fps == 8, way
    assert np.array_equal(clips["upload"], clips["object"])  # the same first frame, seed
    assert np.array_equal(clips["upload"], clips["json"])
    assert not np.array_equal(clips["upload"], clips["text"])  # the picture made a difference


@pytest.mark.parametrize("create, status, message", [
    ({"extra_body": {"quality": "high"}}, 400, r"unknown field `quality`"),
    ({"extra_body": {"frames": 0}}, 400, r"frames must be 1-1024, got 0"),
    ({"seconds": "0.3"}, 400, r"seconds 0.3 at 16 fps is 4.8 frames"),
    ({"input_reference": ("notes.txt", b"a kite, flying", "text/plain")}, 400,
     r"input_reference: not a PNG or JPEG picture"),
    ({"model": "smollm2-135m"}, 404, r"no node of this graph serves 'smollm2-135m' for "
                                     r"video_generation; it serves tiny-wan"),
    ({"model": "sora-2"}, 404, r"the model 'sora-2' does not exist"),
])
def test_bad_requests_are_refused_at_once_by_name(server: Server, create, status, message):
    arguments = {"model": "tiny-wan", "prompt": "a kite", "size": "64x64",
                 "extra_body": {"frames": 5, "steps": 2}}
    arguments.update({k: ({**arguments["extra_body"], **v} if k == "extra_body" else v)
                      for k, v in create.items()})
    with pytest.raises(openai.APIStatusError, match=message) as refused:
        server.client().videos.create(**arguments)
    assert refused.value.status_code == status


@pytest.mark.parametrize("size, frames, message", [
    ("512x512", 5, r"^video: video size 512x512: at most 256 pixels a side for tiny-wan$"),
    ("64x64", 6, r"6 frames"),
    ("64x64", 37, r"37 frames: at most 33 for tiny-wan"),
])
def test_what_the_model_cannot_make_fails_the_job_with_the_nodes_message(server: Server, size,
                                                                         frames, message):
    client = server.client()
    video = client.videos.create(model="tiny-wan", prompt="a kite", size=size,
                                 extra_body={"frames": frames, "steps": 2})
    failed = polled(client, video.id)[-1]
    assert failed.status == "failed" and failed.error.code == "bad_request", failed
    assert re.search(message, failed.error.message), failed.error.message
    with pytest.raises(openai.ConflictError, match=r"is failed: .*; its content comes once it "
                                                   r"is completed"):
        client.videos.download_content(video.id)


@pytest.mark.parametrize("body, message", [
    ({"input_reference": {"file_id": "file-abc"}}, r"this server keeps no files"),
    ({"input_reference": "https://example.com/kite.png"}, r"does not fetch image URLs"),
    ({"seconds": [4]}, r"Expected `int \| float \| str \| null`, got `array` - at `\$.seconds`"),
    ({"n": 2}, r"unknown field `n`"),
])
def test_bad_json_bodies_are_refused_by_name(server: Server, body, message):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        refused = http.post("/videos", json={"model": "tiny-wan", "prompt": "a kite", **body})
    assert refused.status_code == 400, refused.text
    assert re.search(message, refused.json()["error"]["message"]), refused.json()


def test_unknown_videos_are_404_everywhere(server: Server):
    client = server.client()
    for call in (client.videos.retrieve, client.videos.download_content, client.videos.delete):
        with pytest.raises(openai.NotFoundError, match="no video 'video_nope' here"):
            call("video_nope")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        listed = http.get("/videos", params={"colour": "red"})
        assert listed.status_code == 400 and "'colour'" in listed.json()["error"]["message"]
        assert http.get("/videos", params={"limit": 0}).status_code == 400


def test_deleting_a_running_job_cancels_it_and_the_node_serves_on(server: Server):
    client = server.client()
    cancelled_before = server.stats()["cancelled_by_node"]
    long = client.videos.create(model="tiny-wan", prompt="a long kite flight", size="128x128",
                                extra_body={"frames": 33, "steps": 100})  # seconds of work
    deadline = time.monotonic() + 60
    while (running := client.videos.retrieve(long.id)).progress == 0:
        assert running.status in ("queued", "in_progress") and time.monotonic() < deadline
        time.sleep(0.05)
    assert running.status == "in_progress" and running.progress < 90, running
    with pytest.raises(openai.ConflictError, match=r"is in_progress \(\d+% done\)"):
        client.videos.download_content(long.id)
    with pytest.raises(openai.BadRequestError, match="variant 'thumbnail'"):
        client.videos.download_content(long.id, variant="thumbnail")
    deleted = client.videos.delete(long.id)
    assert deleted.model_dump(exclude_none=True) == {"id": long.id, "object": "video.deleted",
                                                     "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(long.id)
    assert long.id not in {v.id for v in client.videos.list()}
    short = client.videos.create(model="tiny-wan", prompt="a kite", size="64x64",
                                 extra_body={"frames": 5, "steps": 2})
    assert polled(client, short.id)[-1].status == "completed"  # the node serves on
    # The node confirmed the cancel (an error `cancelled` for a request nobody waits for): it
    # stopped the clip rather than finishing it.
    assert server.stats()["cancelled_by_node"] == cancelled_before + 1
    assert server.stats()["in_flight"] == 0


def test_the_jobs_are_listed_newest_first(server: Server):
    client = server.client()
    made = [client.videos.create(model="tiny-wan", prompt=f"kite {i}", size="64x64",
                                 extra_body={"frames": 5, "steps": 2}).id for i in range(2)]
    listed = [v.id for v in client.videos.list()]
    assert listed[:2] == made[::-1]
    page = client.videos.list(limit=1)
    assert [v.id for v in page.data] == [made[1]] and page.has_more
    assert [v.id for v in client.videos.list(limit=1, after=made[1]).data] == [made[0]]
    assert [v.id for v in client.videos.list(order="asc")][-2:] == made
    for video_id in made:
        assert polled(client, video_id)[-1].status == "completed"
    assert server.stats()["in_flight"] == 0
