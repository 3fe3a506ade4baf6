"""Video generation: the contract's clip in numbered chunks, MP4 files, the Wan adapter on a
tiny random Wan 2.2 TI2V (mofa_omni.testing.tiny_wan: the real checkpoint layout, written and
read by mlx-gen's and this project's own classes), and `omni video` running the shipped graph.

The weights are random: these tests check sizes, numbering, progress, refusals, cancelling and
files — not what the clips show."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import (
    VideoChunk,
    VideoProgress,
    VideoRequest,
    frames_per_chunk,
    validate_request,
)
from mofa_omni.media.video import Clip, Mp4Writer, mp4_bytes, read_mp4
from mofa_omni.media.video_stream import ClipFiles, read_statuses

pytest.importorskip("av")


def frames(count: int, height: int = 32, width: int = 48, start: int = 0) -> np.ndarray:
    """Frames that differ from each other: a moving bar on a gradient."""
    clip = np.zeros((count, height, width, 3), np.uint8)
    clip[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)
    for t in range(count):
        clip[t, :, (start + t) % width, 1] = 255
    return clip


def chunks_of(clip: np.ndarray, per_chunk: int, fps: int = 8) -> list[VideoChunk]:
    starts = range(0, len(clip), per_chunk)
    return [VideoChunk(clip[s:s + per_chunk], i, s, len(clip), fps, s + per_chunk >= len(clip))
            for i, s in enumerate(starts)]


# --- the contract ---------------------------------------------------------------------------

def test_requests_and_chunks_travel_as_arrow():
    first = frames(1)[0]
    request = VideoRequest("a kite", 9, 8, 64, 96, 2, 5, first)
    back = arrow.decode(arrow.encode(request), VideoRequest)
    assert (back.prompt, back.frames, back.fps, back.width, back.height, back.steps, back.seed) \
        == ("a kite", 9, 8, 64, 96, 2, 5)
    np.testing.assert_array_equal(back.image, first)
    assert arrow.decode(arrow.encode(VideoRequest("no picture")), VideoRequest).image is None
    chunk = chunks_of(frames(5), 2)[1]
    encoded = arrow.encode(chunk)
    decoded = arrow.decode_one_of(encoded, (VideoProgress, VideoChunk))
    np.testing.assert_array_equal(decoded.frames, chunk.frames)
    assert (decoded.index, decoded.first_frame, decoded.total_frames, decoded.final) == (1, 2, 5,
                                                                                         False)
    # read in place: the frames are a view of the message's buffer
    assert not decoded.frames.flags.owndata
    progress = arrow.decode_one_of(arrow.encode(VideoProgress("denoise", 3, 20)),
                                   (VideoProgress, VideoChunk))
    assert progress == VideoProgress("denoise", 3, 20)


@pytest.mark.parametrize("changes, message", [
    ({"frames": 0}, "frames must be 1-1024, got 0"),
    ({"fps": 0}, "fps must be 1-240, got 0"),
    ({"width": 100_000}, "video size 100000x480 is outside 16-4096"),
    ({"prompt": "  "}, "empty prompt"),
    ({"image": np.zeros((4, 4), np.uint8)}, "image must be HWC"),
    ({"image": np.zeros((4, 4, 3), np.float32)}, "image must be uint8"),
])
def test_bad_video_requests_are_refused_by_name(changes, message):
    request = VideoRequest(**{"prompt": "a kite", **changes})
    with pytest.raises(ContractError, match=message):
        arrow.decode(arrow.encode(request), VideoRequest)


def test_a_chunk_holds_what_the_pool_can_carry():
    assert frames_per_chunk(480, 832, 16 << 20) == 14
    assert frames_per_chunk(2160, 3840, 16 << 20) == 1  # one frame, alone, if the pool holds it
    with pytest.raises(ContractError, match="do not lie within the clip's 5"):
        validate_request(VideoChunk(frames(3), 1, 4, 5, 8))


def test_a_clip_is_put_together_in_order_and_a_lost_chunk_is_seen():
    clip = frames(9)
    whole = Clip()
    for chunk in chunks_of(clip, 4):
        whole.add(chunk)
    assert whole.complete and whole.nbytes == clip.nbytes
    np.testing.assert_array_equal(whole.frames(), clip)
    gappy, parts = Clip(), chunks_of(clip, 4)
    gappy.add(parts[0])
    with pytest.raises(ContractError, match="chunk 2 .* arrived where chunk 1 .* a chunk was lost"):
        gappy.add(parts[2])
    with pytest.raises(ContractError, match="incomplete: 4 of 9"):
        gappy.frames()


# --- MP4 ------------------------------------------------------------------------------------

def test_mp4_round_trip():
    clip = frames(9, 64, 96)
    lossless, fps = read_mp4(mp4_bytes(clip, 12, lossless=True))
    np.testing.assert_array_equal(lossless, clip)  # libx264rgb at crf 0: the very frames
    assert fps == 12
    played, _ = read_mp4(mp4_bytes(clip, 12))  # yuv420p, what players and browsers take
    assert played.shape == clip.shape
    assert np.abs(played.astype(int) - clip).mean() < 12
    with pytest.raises(ContractError, match="even width and height"):
        mp4_bytes(frames(2, 33, 48), 8)
    with pytest.raises(ContractError, match="not a readable video"):
        read_mp4(b"not a video at all")
    with pytest.raises(ContractError, match="a frame of 48x16 in a clip of 96x64"):
        with Mp4Writer(Path(os.devnull), 8) as writer:
            writer.add(clip[:1])
            writer.add(frames(1, 16, 48))


def test_clip_files_write_each_clip_as_it_arrives(tmp_path: Path):
    status = tmp_path / "status.json"
    files = ClipFiles(tmp_path / "clips", "clip", status_file=status)
    files.progress("a", VideoProgress("denoise", 1, 2))
    assert read_statuses(status)[0].phase == "denoise"
    clip = frames(9, 32, 48)
    for chunk in chunks_of(clip, 4):
        written = files.chunk("a", chunk)
    assert written.phase == "written" and written.frames == 9
    decoded, fps = read_mp4(Path(written.path))
    assert decoded.shape == clip.shape and fps == 8
    assert Path(written.path).name == "clip-001.mp4"
    lossy = chunks_of(frames(9), 4)
    files.chunk("b", lossy[0])
    with pytest.raises(ContractError, match="a chunk was lost"):
        files.chunk("b", lossy[2])
    failed = files.fail("b", "a chunk was lost")
    assert failed.phase == "failed" and not Path(tmp_path / "clips" / "clip-002.mp4").exists()
    assert [s.phase for s in read_statuses(status)] == ["written", "failed"]


# --- the Wan adapter on a tiny checkpoint ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Wan 2.2 TI2V, and a catalog file naming it (twice: the second with a
    small clip limit)."""
    from mofa_omni.testing.tiny_wan import write_tiny_wan

    root = tmp_path_factory.mktemp("tiny_wan")
    checkpoint = write_tiny_wan(root / "tiny-wan")
    catalog = root / "catalog.toml"
    entry = ('[models.{name}]\nadapter = "mlx_wan"\ntasks = ["video_generation"]\n'
             'format = "diffusers"\nmemory_mb = 100\n'
             'options = {{ guidance = 1.0, max_side = 256, max_frames = 33{more} }}\n'
             f'source = {{{{ path = "{checkpoint}" }}}}\n\n')
    catalog.write_text(entry.format(name="tiny-wan", more="")
                       + entry.format(name="tiny-wan-short", more=", max_clip_mb = 1"))
    return {"checkpoint": checkpoint, "catalog": catalog, "cache": root / "cache"}


@pytest.fixture(scope="module")
def wan(tiny_wan: dict[str, Path]):
    from mofa_omni.adapters.loading import open_model
    from mofa_omni.models.catalog import Catalog
    from mofa_omni.models.store import ModelStore

    adapter = open_model("tiny-wan", catalog=Catalog.load([tiny_wan["catalog"]]),
                         store=ModelStore(tiny_wan["cache"]))
    yield adapter
    adapter.unload()


def with_pool(monkeypatch, size: int) -> None:
    """The shared-memory pool the node would have (dora passes the node's config)."""
    monkeypatch.setenv("DORA_NODE_CONFIG", f"node_id: video\nshared_memory_pool_size: {size}\n")


def test_a_clip_streams_as_progress_then_numbered_chunks(wan, monkeypatch):
    with_pool(monkeypatch, 180_000)  # a quarter of the pool, less overhead: two frames
    results = list(wan.generate_video(VideoRequest("a red kite", 9, 8, 64, 64, 3, 1)))
    progress = [r for r in results if isinstance(r, VideoProgress)]
    chunks = [r for r in results if isinstance(r, VideoChunk)]
    assert [(p.phase, p.step, p.steps) for p in progress] == [
        ("denoise", 1, 3), ("denoise", 2, 3), ("denoise", 3, 3), ("decode", 0, 9),
        ("decode", 8, 9), ("decode", 9, 9)]  # the VAE decodes eight frames at a time
    assert results.index(progress[3]) < results.index(chunks[0])
    assert [(c.index, c.first_frame, len(c.frames), c.final) for c in chunks] == [
        (0, 0, 2, False), (1, 2, 2, False), (2, 4, 2, False), (3, 6, 2, False), (4, 8, 1, True)]
    clip = Clip()
    for chunk in chunks:
        clip.add(chunk)
    made = clip.frames()
    assert made.shape == (9, 64, 64, 3) and made.dtype == np.uint8 and made.std() > 0
    with_pool(monkeypatch, 64 << 20)
    again = [r for r in wan.generate_video(VideoRequest("a red kite", 9, 8, 64, 64, 3, 1))
             if isinstance(r, VideoChunk)]
    assert len(again) == 1  # the whole clip fits one chunk of a larger pool
    np.testing.assert_array_equal(again[0].frames, made)  # the same request, the same frames


def test_image_to_video_starts_from_the_picture(wan):
    def clip(image=None) -> np.ndarray:
        request = VideoRequest("a red kite", 5, 8, 64, 64, 2, 4, image)
        return np.concatenate([r.frames for r in wan.generate_video(request)
                               if isinstance(r, VideoChunk)])

    plain, bright = clip(), clip(np.full((48, 80, 3), 230, np.uint8))
    dark = clip(np.full((48, 80, 3), 20, np.uint8))
    assert plain.shape == bright.shape == dark.shape == (5, 64, 64, 3)
    assert not np.array_equal(bright, plain) and not np.array_equal(bright, dark)
    grey = clip(np.full((48, 80, 1), 128, np.uint8))  # one channel is taken as grey
    assert grey.shape == (5, 64, 64, 3)


@pytest.mark.parametrize("changes, message", [
    ({"frames": 6}, r"6 frames"),
    ({"width": 70}, r"70x64"),
    ({"width": 512}, "at most 256 pixels a side for tiny-wan"),
    ({"frames": 37}, "37 frames: at most 33 for tiny-wan"),
    ({"steps": 1}, "steps must be 2-100 for tiny-wan, got 1"),
])
def test_what_the_model_cannot_make_is_refused_up_front(wan, changes, message):
    request = VideoRequest(**{"prompt": "a kite", "frames": 5, "width": 64, "height": 64,
                              "steps": 2, **changes})
    with pytest.raises(ContractError, match=message):
        next(wan.generate_video(request))


def test_a_clip_beyond_the_limits_is_refused_with_figures(wan, tiny_wan, monkeypatch):
    from mofa_omni.adapters.loading import open_model
    from mofa_omni.models.catalog import Catalog
    from mofa_omni.models.store import ModelStore

    short = open_model("tiny-wan-short", catalog=Catalog.load([tiny_wan["catalog"]]),
                       store=ModelStore(tiny_wan["cache"]), load=False)
    with pytest.raises(ContractError, match=r"a clip of 33 frames at 128x128 is 1.5 MiB; "
                                            r"tiny-wan-short makes at most 1.0 MiB"):
        short.check(VideoRequest("a kite", 33, 8, 128, 128, 2))
    with_pool(monkeypatch, 40_000)
    with pytest.raises(ContractError, match=r"one 128x128 frame is 48.0 KiB, more than this "
                                            r"node's 39.1 KiB shared-memory pool"):
        next(wan.generate_video(VideoRequest("a kite", 5, 8, 128, 128, 2)))


def test_a_wan_checkpoint_is_known_by_its_own_files(tiny_wan):
    from mofa_omni.contract.tasks import Task
    from mofa_omni.models.detect import detect

    found = detect(tiny_wan["checkpoint"], "my-wan")
    assert (found.kind, found.spec.adapter, found.spec.tasks, found.spec.format) == (
        "video", "mlx_wan", (Task.VIDEO_GENERATION,), "diffusers")


def test_a_cancelled_clip_stops_and_gives_its_memory_back(wan):
    import mlx.core as mx

    request = VideoRequest("a long kite flight", 33, 8, 128, 128, 20, 2)
    idle = mx.get_active_memory()
    run = wan.generate_video(request)
    assert next(run) == VideoProgress("denoise", 1, 20)
    run.close()  # what the node does on a cancel or past the deadline
    assert mx.get_active_memory() - idle < 1 << 20
    after = [r for r in wan.generate_video(VideoRequest("a kite", 5, 8, 64, 64, 2))
             if isinstance(r, VideoChunk)]
    assert after[-1].final and after[-1].total_frames == 5


# --- `omni video`: the shipped graph -----------------------------------------------------------

def test_omni_video_writes_the_clip_through_the_graph(tiny_wan, tmp_path: Path):
    """`omni video` pulls the model, runs dataflows/video.yml (request -> omni-node -> sink) and
    leaves an MP4 of the asked frames, size and rate; image to video from --image."""
    from PIL import Image

    from tests.dataflow_run import omni

    picture = tmp_path / "first.png"
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(picture)
    env = {"MOFA_OMNI_CATALOG": str(tiny_wan["catalog"]),
           "MOFA_OMNI_CACHE": str(tiny_wan["cache"]), "MOFA_OMNI_RUNS": str(tmp_path / "runs")}
    clip = tmp_path / "kite.mp4"
    done = omni("video", "a red kite over green hills", "-o", str(clip), "--model", "tiny-wan",
                "--size", "96x64", "--frames", "9", "--fps", "12", "--steps", "2",
                "--image", str(picture), timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{clip} (9 frames)" in done.stdout
    assert "decode: 100%" in done.stderr  # the progress bar (denoising: too quick to see)
    frames_back, fps = read_mp4(clip)
    assert frames_back.shape == (9, 64, 96, 3) and fps == 12
    refused = omni("video", "a kite", "-o", str(tmp_path / "no.mp4"), "--model", "tiny-wan",
                   "--size", "96x64", "--frames", "6", timeout=240, env=env)
    assert refused.returncode != 0
    assert "6 frames" in refused.stderr and not (tmp_path / "no.mp4").exists()
    assert not list((tmp_path / "runs").glob("*/run.json"))  # nothing left running


# --- clips read by a vision-language model -----------------------------------------------------

def test_chat_requests_carry_video_clips_as_arrow():
    from mofa_omni.contract.tasks import ChatMessage, OmniRequest

    asked = [ChatMessage("user", "What happens?")]
    clips = [frames(4, 16, 24), frames(2, 8, 8)]
    back = arrow.decode(arrow.encode(OmniRequest(asked, videos=clips, video_fps=[8.0, 2.5])),
                        OmniRequest)
    assert back.video_fps == [8.0, 2.5]
    for sent, received in zip(clips, back.videos):
        np.testing.assert_array_equal(received, sent)
    for videos, rates, message in [
        ([frames(2)], [], "1 videos with 0 frame rates"),
        ([frames(2).astype(np.float32)], [8.0], "video 0 must be uint8 frames"),
        ([frames(2)], [0.0], "video 0: frame rate 0.0 is outside"),
        ([frames(1025, 2, 2)], [8.0], "1025 video frames; at most 1024"),
    ]:
        with pytest.raises(ContractError, match=message):
            validate_request(OmniRequest(asked, videos=videos, video_fps=rates))
