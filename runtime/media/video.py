"""Video clips: MP4 files from uint8 (T, H, W, 3) frames and back, and a clip put together
from its numbered chunks.

MP4s are H.264 through PyAV (its wheel ships FFmpeg with libx264): ``yuv420p`` by default,
which every player and browser plays; ``lossless`` writes RGB exactly (libx264rgb, crf 0),
for a clip that must decode back to the very frames it was made of.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import VideoChunk

MP4_QUALITY_CRF = 18  # x264's "visually lossless" end of its scale


def _require_av():
    try:
        import av
    except ImportError:
        raise ContractError("writing or reading MP4 needs PyAV: "
                            "pip install 'mofa-omni[video]'") from None
    return av


class Mp4Writer:
    """An H.264 MP4 written frame batch by frame batch, as a clip's chunks arrive: open it on
    a path or a binary file, :meth:`add` (T, H, W, 3) or (H, W, 3) uint8 frames of one size,
    :meth:`close` (or use it as a context manager). yuv420p, the default pixel format, needs
    an even width and height; ``lossless`` keeps RGB exactly."""

    def __init__(self, target: str | Path | BinaryIO, fps: int, *, lossless: bool = False):
        self._av = _require_av()
        self.fps, self.lossless, self.frames = fps, lossless, 0
        self._container = self._av.open(str(target) if isinstance(target, Path) else target,
                                        mode="w", format="mp4")
        self._stream = None

    def add(self, frames: np.ndarray) -> None:
        frames = frames[None] if frames.ndim == 3 else frames
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
            raise ContractError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} "
                                f"{frames.shape}")
        height, width = frames.shape[1:3]
        if self._stream is None:
            self._stream = self._open_stream(height, width)
        elif (height, width) != (self._stream.height, self._stream.width):
            raise ContractError(f"a frame of {width}x{height} in a clip of "
                                f"{self._stream.width}x{self._stream.height}")
        for frame in frames:
            picture = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            self._container.mux(self._stream.encode(picture))
            self.frames += 1

    def _open_stream(self, height: int, width: int):
        if not self.lossless and (height % 2 or width % 2):
            raise ContractError(f"an MP4 of {width}x{height}: yuv420p needs an even width and "
                                "height (or lossless RGB)")
        stream = self._container.add_stream("libx264rgb" if self.lossless else "libx264",
                                            rate=Fraction(self.fps))
        stream.width, stream.height = width, height
        stream.pix_fmt = "rgb24" if self.lossless else "yuv420p"
        stream.options = {"crf": "0" if self.lossless else str(MP4_QUALITY_CRF)}
        return stream

    def close(self) -> None:
        """Flush the encoder's delayed frames and finish the file (an empty clip is refused)."""
        try:
            if self._stream is None:
                raise ContractError("no frames to write")
            self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.close()
        else:
            self._container.close()


def mp4_bytes(frames: np.ndarray, fps: int, *, lossless: bool = False) -> bytes:
    """The MP4 of ``frames`` (T, H, W, 3) as bytes."""
    buffer = io.BytesIO()
    with Mp4Writer(buffer, fps, lossless=lossless) as writer:
        writer.add(frames)
    return buffer.getvalue()


def read_mp4(source: str | Path | bytes, *, max_frames: int | None = None,
             max_pixels: int | None = None) -> tuple[np.ndarray, float]:
    """The frames of a video file (a path or its bytes; MP4, WebM, ... whatever FFmpeg reads)
    as uint8 (T, H, W, 3), and its frame rate. A frame larger than ``max_pixels`` is refused
    from the stream's header, before any decoding; more than ``max_frames`` frames as soon as
    one too many is decoded (a clip's declared length is not trusted)."""
    av = _require_av()
    handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    frames = []
    try:
        with av.open(handle, mode="r") as container:
            if not container.streams.video:
                raise ContractError("the file holds no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if max_pixels is not None and width * height > max_pixels:
                raise ContractError(f"the video's frames are {width}x{height} ({width * height}"
                                    f" pixels), over this server's limit of {max_pixels}")
            for frame in container.decode(stream):
                if max_frames is not None and len(frames) == max_frames:
                    raise ContractError(f"the video has more than {max_frames} frames, this "
                                        "server's limit")
                frames.append(frame.to_ndarray(format="rgb24"))
            rate = float(stream.average_rate or stream.base_rate or 0)
    except av.error.FFmpegError as error:
        raise ContractError(f"not a readable video: {error}") from None
    if not frames:
        raise ContractError("the video holds no frames")
    if not rate > 0:
        raise ContractError("the video does not say its frame rate")
    return np.stack(frames), rate


def sample_frames(frames: np.ndarray, fps: float, target_fps: float, max_frames: int
                  ) -> tuple[np.ndarray, float]:
    """A clip's frames at ``target_fps`` (never more than it has), at most ``max_frames`` of
    them spread evenly over the whole clip; with the rate they then stand for."""
    duration = len(frames) / fps
    count = max(1, min(len(frames), max_frames, round(duration * min(target_fps, fps))))
    picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
    return frames[picks], count / duration


def check_next(chunk: VideoChunk, index: int, first_frame: int) -> None:
    """Refuse a chunk that is not the one due (chunk ``index``, from frame ``first_frame``):
    one before it was lost on the way."""
    if chunk.index != index or chunk.first_frame != first_frame:
        raise ContractError(f"video chunk {chunk.index} (frames from {chunk.first_frame}) "
                            f"arrived where chunk {index} (frames from {first_frame}) was due: "
                            "a chunk was lost")


@dataclass
class Clip:
    """A generated clip put together from its chunks as they arrive: it refuses a chunk out of
    order (one was lost on the way) or one that does not fit the frames so far."""

    chunks: list[np.ndarray] = field(default_factory=list)
    frames_so_far: int = 0
    total_frames: int = 0
    fps: int = 0
    complete: bool = False

    def add(self, chunk: VideoChunk) -> None:
        if self.complete:
            raise ContractError(f"video chunk {chunk.index} arrived after the clip's last")
        check_next(chunk, len(self.chunks), self.frames_so_far)
        if self.chunks and (chunk.total_frames, chunk.fps) != (self.total_frames, self.fps):
            raise ContractError(f"video chunk {chunk.index} says {chunk.total_frames} frames at "
                                f"{chunk.fps} fps; the clip has {self.total_frames} at {self.fps}")
        if self.chunks and chunk.frames.shape[1:] != self.chunks[0].shape[1:]:
            raise ContractError(f"video chunk {chunk.index} has frames of "
                                f"{chunk.frames.shape[1:]}, the clip {self.chunks[0].shape[1:]}")
        self.total_frames, self.fps = chunk.total_frames, chunk.fps
        self.chunks.append(np.array(chunk.frames))  # its own copy: the message's buffer is lent
        self.frames_so_far += len(chunk.frames)
        if chunk.final:
            if self.frames_so_far != self.total_frames:
                raise ContractError(f"the clip ended after {self.frames_so_far} of its "
                                    f"{self.total_frames} frames")
            self.complete = True

    def frames(self) -> np.ndarray:
        """The whole clip, (T, H, W, 3)."""
        if not self.complete:
            raise ContractError(f"the clip is incomplete: {self.frames_so_far} of "
                                f"{self.total_frames} frames")
        return np.concatenate(self.chunks)

    @property
    def nbytes(self) -> int:
        return sum(chunk.nbytes for chunk in self.chunks)
