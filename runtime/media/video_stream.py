"""Generated clips written to MP4 files as their chunks arrive, one file per request, and a
status file saying how far each has come (what `omni video` draws its progress bar from)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from mofa_omni.contract.tasks import VideoChunk, VideoProgress
from mofa_omni.media.video import Mp4Writer, check_next


class ClipStatus(msgspec.Struct):
    """How far a request's clip has come; ``path`` once written, ``error`` if it failed."""

    request_id: str
    phase: str = "queued"  # queued, denoise, decode, written, failed, cancelled
    step: int = 0
    steps: int = 0
    frames: int = 0  # written so far
    total_frames: int = 0
    path: str = ""
    error: str = ""


@dataclass
class _Open:
    path: Path
    writer: Mp4Writer | None = None
    next_index: int = 0


@dataclass
class ClipFiles:
    """The MP4 files of the clips being received: ``target`` is a folder (one numbered file
    per request, ``PREFIX-001.mp4`` ...) or, with ``single``, the one file to write."""

    target: Path
    prefix: str = "clip"
    single: bool = False
    status_file: Path | None = None
    statuses: dict[str, ClipStatus] = field(default_factory=dict)
    _open: dict[str, _Open] = field(default_factory=dict)
    _count: int = 0

    def progress(self, request_id: str, progress: VideoProgress) -> ClipStatus:
        status = self._status(request_id)
        status.phase, status.step, status.steps = progress.phase, progress.step, progress.steps
        if progress.phase == "decode":  # its steps are the clip's frames
            status.total_frames = progress.steps
        self._save()
        return status

    def chunk(self, request_id: str, chunk: VideoChunk) -> ClipStatus:
        """Write a chunk's frames; a chunk out of order (one lost) fails the clip."""
        status = self._status(request_id)
        opened = self._open.get(request_id)
        if opened is None:
            opened = self._open[request_id] = _Open(self._next_path())
        check_next(chunk, opened.next_index, status.frames)
        if opened.writer is None:
            opened.path.parent.mkdir(parents=True, exist_ok=True)
            opened.writer = Mp4Writer(opened.path, chunk.fps)
        opened.writer.add(chunk.frames)
        opened.next_index += 1
        status.phase, status.frames, status.total_frames = "decode", status.frames + len(
            chunk.frames), chunk.total_frames
        if chunk.final:
            del self._open[request_id]
            opened.writer.close()
            status.phase, status.path = "written", str(opened.path)
        self._save()
        return status

    def fail(self, request_id: str, message: str, phase: str = "failed") -> ClipStatus:
        """End a request's clip without a file: the model's error, a lost chunk, a cancel."""
        status = self._status(request_id)
        opened = self._open.pop(request_id, None)
        if opened is not None and opened.writer is not None:
            try:
                opened.writer.close()
            except Exception:  # a half-written file goes anyway  # noqa: BLE001
                pass
            opened.path.unlink(missing_ok=True)
        status.phase, status.error = phase, message
        self._save()
        return status

    def _status(self, request_id: str) -> ClipStatus:
        return self.statuses.setdefault(request_id, ClipStatus(request_id))

    def _next_path(self) -> Path:
        self._count += 1
        return self.target if self.single else self.target / f"{self.prefix}-{self._count:03d}.mp4"

    def _save(self) -> None:
        """Replace the status file at once (readers never see half of it)."""
        if self.status_file is None:
            return
        self.status_file.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=self.status_file.parent, suffix=".tmp")
        with os.fdopen(handle, "wb") as out:
            out.write(msgspec.json.encode(list(self.statuses.values())))
        os.replace(name, self.status_file)


def read_statuses(path: Path) -> list[ClipStatus]:
    """The statuses a :class:`ClipFiles` saved (none yet: an empty list)."""
    try:
        return msgspec.json.decode(path.read_bytes(), type=list[ClipStatus])
    except (OSError, msgspec.DecodeError):
        return []
