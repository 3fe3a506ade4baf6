"""Video generation with Wan 2.2 TI2V on MLX (mlx-gen's pipeline): text to video, and image
to video from a first frame.

The checkpoint is the diffusers folder ``Wan-AI/Wan2.2-TI2V-5B-Diffusers`` ships
(``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``); mlx-gen loads the transformer
and the VAE, and the prompt is encoded by this project's own UMT5 encoder on MLX
(:mod:`mofa_omni.adapters.umt5`) where mlx-gen would load it through torch
(:mod:`mofa_omni.adapters.wan_pipeline`).

A clip streams back as :class:`VideoProgress` (each denoising step, then the decode) and
:class:`VideoChunk` s of frames as the VAE decodes them, each chunk small enough for the
node's shared-memory pool (:func:`~mofa_omni.node.integrity.chunk_bytes`). The pipeline runs on the model's own thread
(:mod:`mofa_omni.adapters.engine_thread`), so a cancel or a deadline stops it at the next
step, and the memory of its run is given back before the next request starts.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.engine_thread import EngineThread, Stopped
from mofa_omni.adapters.options import AdapterOptions, Positive
from mofa_omni.contract.errors import ContractError, ServerError
from mofa_omni.contract.tasks import (
    Task,
    VideoChunk,
    VideoProgress,
    VideoRequest,
    frames_per_chunk,
    validate_request,
)
from mofa_omni.models.fetching import Progress
from mofa_omni.models.memory import format_bytes, snapshot
from mofa_omni.models.store import link_or_copy
from mofa_omni.node.integrity import chunk_bytes, pool_bytes

# While the VAE decodes, a clip's frames exist as float32 (4 bytes a value) beside their
# uint8 copy: the working memory of the decode, per byte of the clip (measured order).
DECODE_BYTES_PER_CLIP_BYTE = 5
MAX_SEED = 2**63 - 1


class WanOptions(AdapterOptions):
    """The catalog options of a Wan 2.2 TI2V model."""

    guidance: float = 5.0  # classifier-free guidance (1.0: none, one pass per step)
    max_side: Positive = 1280  # the largest width / height a request may ask for
    max_frames: Positive = 121  # TI2V-5B's longest shot
    max_steps: Positive = 100
    max_clip_mb: Positive = 4096  # the largest clip (frames x height x width x 3 bytes)


class WanVideoAdapter(ModelAdapter):
    """Text (and a first picture) to video with Wan 2.2 TI2V on MLX. Options
    (:class:`WanOptions`): ``guidance``, ``max_side``, ``max_frames``, ``max_steps`` and
    ``max_clip_mb``."""

    supported_tasks: ClassVar[frozenset[Task]] = frozenset({Task.VIDEO_GENERATION})
    formats: ClassVar[frozenset[str]] = frozenset({"diffusers"})
    backend: ClassVar[str] = "mlx"
    requires: ClassVar[tuple[str, ...]] = ("mflux",)
    Options: ClassVar[type[AdapterOptions]] = WanOptions
    options: WanOptions

    def __init__(self, spec):
        super().__init__(spec)
        self._pipeline: Any = None
        self._engine: EngineThread | None = None

    # --- lifecycle -------------------------------------------------------------------

    def prepare(self, source_dir: Path, out_dir: Path, progress: Progress) -> None:
        from mofa_omni.adapters.wan_pipeline import check_layout

        check_layout(source_dir)
        files = sorted(path for path in source_dir.rglob("*") if path.is_file())
        for done, path in enumerate(files, 1):
            link_or_copy(path, out_dir / path.relative_to(source_dir))
            progress("link checkpoint", done, len(files))

    def _load(self, model_dir: Path) -> None:
        from mofa_omni.adapters.wan_pipeline import load_pipeline

        if self._engine is None:
            self._engine = EngineThread(f"wan-{self.spec.name}")
        self._pipeline = self._engine.call(lambda: load_pipeline(model_dir))

    def _unload(self) -> None:
        def drop() -> None:  # on the thread that made the arrays
            self._pipeline = None

        if self._engine is not None:
            self._engine.call(drop)

    # --- serving ---------------------------------------------------------------------

    def check(self, request: VideoRequest) -> None:
        """Refuse what this model cannot make, or what cannot fit, naming the limit and the
        figures — before any work starts."""
        from mofa_omni.adapters.wan_pipeline import check_size

        validate_request(request)
        limits, name = self.options, self.spec.name
        if max(request.width, request.height) > limits.max_side:
            raise ContractError(f"video size {request.width}x{request.height}: at most "
                                f"{limits.max_side} pixels a side for {name}")
        if request.frames > limits.max_frames:
            raise ContractError(f"{request.frames} frames: at most {limits.max_frames} for {name}")
        if not 2 <= request.steps <= limits.max_steps:
            raise ContractError(f"steps must be 2-{limits.max_steps} for {name}, "
                                f"got {request.steps}")
        if request.seed > MAX_SEED:
            raise ContractError(f"seed must be 0-{MAX_SEED}, got {request.seed}")
        check_size(request.width, request.height, request.frames)
        frame = request.width * request.height * 3
        clip = request.frames * frame
        if clip > limits.max_clip_mb << 20:
            raise ContractError(f"a clip of {request.frames} frames at {request.width}x"
                                f"{request.height} is {format_bytes(clip)}; {name} makes at most "
                                f"{format_bytes(limits.max_clip_mb << 20)} (max_clip_mb)")
        pool = pool_bytes()
        if frame > pool:
            raise ContractError(f"one {request.width}x{request.height} frame is "
                                f"{format_bytes(frame)}, more than this node's "
                                f"{format_bytes(pool)} shared-memory pool: raise "
                                "`shared_memory_pool_size` on the node, or ask a smaller size")
        working = clip * DECODE_BYTES_PER_CLIP_BYTE
        available = snapshot().system_available_bytes
        if working > available:
            raise ContractError(f"a clip of {request.frames} frames at {request.width}x"
                                f"{request.height} needs ~{format_bytes(working)} to decode; "
                                f"{format_bytes(available)} is available")

    def generate_video(self, request: VideoRequest) -> Iterator[VideoProgress | VideoChunk]:
        """The clip for ``request``: progress while it denoises, then its frames in chunks
        (uint8 (T, H, W, 3)) as they are decoded; the same request gives the same frames."""
        self.check(request)
        if self._pipeline is None or self._engine is None:
            raise self.not_loaded()
        # Several chunks in the pool at once: the receiver may not have read the last one.
        per_chunk = frames_per_chunk(request.height, request.width, chunk_bytes(pool_bytes()))
        yield from self._engine.stream(
            lambda emit, stop: self._generate(request, per_chunk, emit, stop))

    def _generate(self, request: VideoRequest, per_chunk: int, emit, stop) -> None:
        """On the engine thread: run the pipeline, emitting its progress and its chunks."""
        with tempfile.TemporaryDirectory(prefix="wan-") as scratch:
            image_path = None
            if request.image is not None:  # mlx-gen reads the first frame from a file
                from PIL import Image

                image_path = Path(scratch) / "first.png"
                Image.fromarray(request.image[..., :3] if request.image.shape[2] != 1
                                else request.image[..., 0]).convert("RGB").save(image_path)

            def on_progress(event) -> None:
                if event.phase == "denoise":
                    emit(VideoProgress("denoise", min(event.step, event.total_steps),
                                       event.total_steps))
                elif event.phase == "decode":
                    emit(VideoProgress("decode", 0, request.frames))
                elif stop.is_set():  # no result to send, but a chance to stop
                    raise Stopped

            video = self._pipeline.generate_video(
                seed=request.seed, prompt=request.prompt, num_inference_steps=request.steps,
                height=request.height, width=request.width, num_frames=request.frames,
                fps=request.fps, guidance=self.options.guidance, image_path=image_path,
                canvas_policy="exact-resize" if image_path else None,
                progress_callback=on_progress)
            self._emit_chunks(video, request, per_chunk, emit)

    def _emit_chunks(self, video, request: VideoRequest, per_chunk: int, emit) -> None:
        pending: list[np.ndarray] = []
        sent = index = 0

        def send(final: bool) -> None:
            nonlocal sent, index
            frames = np.stack(pending)
            emit(VideoChunk(frames, index, sent, request.frames, request.fps, final))
            sent, index = sent + len(frames), index + 1
            pending.clear()

        # The pipeline decodes its latents in slices as its frames are read (mlx-gen 0.38,
        # GeneratedVideo._iter_frame_batches): frames leave while later ones decode.
        decoded = 0
        for batch in video._iter_frame_batches():
            decoded += len(batch)
            emit(VideoProgress("decode", min(decoded, request.frames), request.frames))
            for picture in batch:
                frame = np.asarray(picture.convert("RGB"), dtype=np.uint8)
                if frame.shape != (request.height, request.width, 3):
                    raise ServerError(f"the pipeline made a frame of {frame.shape} for "
                                      f"{request.width}x{request.height}")
                pending.append(frame)
                if len(pending) == per_chunk and sent + len(pending) < request.frames:
                    send(False)
        if sent + len(pending) != request.frames:
            raise ServerError(f"the pipeline made {sent + len(pending)} frames; "
                              f"{request.frames} were asked")
        send(True)
