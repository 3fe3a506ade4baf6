"""Vision-language models served by mlx-vlm: images and a chat in, streamed text out.

A model is a checkpoint directory in mlx-vlm's own format (config.json, *.safetensors,
tokenizer and processor files), loaded by mlx-vlm's ``load`` — the path a checkpoint pulled
from the Hub takes. The same weights also answer plain chat (``text_generation``): an omni
model, one load, one footprint.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.chat import Piece, stream_reply
from mofa_omni.adapters.options import AdapterOptions, Positive
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import (
    ChatMessage,
    ChatRequest,
    OmniRequest,
    Task,
    TextChunk,
    validate_request,
)
from mofa_omni.media.video import sample_frames
from mofa_omni.models.fetching import Progress
from mofa_omni.models.store import link_model_directory

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class ImageOptionsOnly:
    """An image processor that is handed only the options it declares.

    mlx-vlm 0.7.10's LLaVA processor passes every option of a call -- the tokenizer's
    ``padding`` among them -- on to its image processor, and transformers 5's image processors
    refuse options they do not declare (``ImagesKwargs``). The tokenizer still gets them all."""

    def __init__(self, image_processor):
        self.image_processor = image_processor
        declared = type(image_processor).valid_kwargs  # a TypedDict of the options it takes
        self.declared = set(declared.__required_keys__) | set(declared.__optional_keys__)

    def __call__(self, images, **options):
        return self.image_processor(images, **{name: value for name, value in options.items()
                                               if name in self.declared})

    def __getattr__(self, name: str):  # everything else is the image processor's own
        return getattr(self.image_processor, name)


def to_rgb(pixels: np.ndarray):
    """A contract image (uint8 HWC, 1/3/4 channels) as the RGB PIL image processors expect;
    grey is repeated over the three channels, alpha is dropped."""
    from PIL import Image

    channels = pixels.shape[2]
    image = Image.fromarray(pixels[:, :, 0] if channels == 1 else np.ascontiguousarray(pixels),
                            mode=_MODES[channels])
    return image if image.mode == "RGB" else image.convert("RGB")


class MlxVlmOptions(AdapterOptions):
    """The catalog options of an mlx-vlm model: how video clips are sampled before the model
    reads them (mlx-vlm takes decoded frames as they come)."""

    video_fps: float = 2.0  # frames a second read from a clip (Qwen-VL's default)
    max_video_frames: Positive = 32  # at most this many frames of one clip


class MlxVlmAdapter(ModelAdapter):
    """Vision-language models (SmolVLM, Qwen2-VL, LLaVA, PaliGemma...) through mlx-vlm.
    Options (:class:`MlxVlmOptions`): ``video_fps`` and ``max_video_frames``, the sampling of
    video clips for the models that read video (Qwen2-VL and Qwen2.5-VL)."""

    supported_tasks: ClassVar[frozenset[Task]] = frozenset({Task.VISION_LANGUAGE,
                                                            Task.TEXT_GENERATION})
    formats: ClassVar[frozenset[str]] = frozenset({"mlx"})
    backend: ClassVar[str] = "mlx"
    requires: ClassVar[tuple[str, ...]] = ("mlx_vlm",)
    Options: ClassVar[type[AdapterOptions]] = MlxVlmOptions
    options: MlxVlmOptions

    def __init__(self, spec):
        super().__init__(spec)
        self._model = None
        self._processor = None

    # --- lifecycle -------------------------------------------------------------------

    def prepare(self, source_dir: Path, out_dir: Path, progress: Progress) -> None:
        """Link the checkpoint's files as they are: mlx-vlm reads its own format directly."""
        link_model_directory(self.spec.name, source_dir, out_dir, progress)

    def _load(self, model_dir: Path) -> None:
        from mlx_vlm.utils import load

        # A local directory: mlx-vlm reads it in place and never reaches for the Hub.
        self._model, self._processor = load(str(Path(model_dir).resolve()))
        image_processor = getattr(self._processor, "image_processor", None)
        if type(self._processor).__name__ == "LlavaProcessor" and image_processor is not None:
            self._processor.image_processor = ImageOptionsOnly(image_processor)

    def _unload(self) -> None:
        self._model = None
        self._processor = None

    # --- serving ---------------------------------------------------------------------

    def generate_from_images(self, request: OmniRequest) -> Iterator[TextChunk]:
        """Stream the answer about ``request.images``; the last chunk is final and carries the
        usage. Greedy at temperature 0; stops at EOS or ``max_tokens`` (finish_reason
        "length"). The images go with the last user message; each is uint8 HWC with 1, 3 or 4
        channels. Closing the generator stops the computation. Sound and speech are an omni
        request's (``omni``): refused here by name."""
        validate_request(request)
        if not request.images and not request.videos:
            raise ContractError("vision request has no images or videos")
        if request.audio or request.speak:
            raise ContractError(f"a vision_language request holds pictures and text: "
                                f"{'sound' if request.audio else 'a spoken reply'} is for an "
                                f"omni model (task omni)")
        images = [to_rgb(pixels) for pixels in request.images]
        videos = self._videos(request)
        return self._stream(request.messages, images, max_tokens=request.max_tokens,
                            temperature=request.temperature, videos=videos)

    def reads_video(self) -> bool:
        """Whether the loaded model takes video clips: a video token in its config and a
        video processor beside its image processor."""
        if self._model is None:
            raise self.not_loaded()
        configs = [self._model.config]
        configs += [c for c in [getattr(self._model.config, "thinker_config", None)] if c]  # omni
        token = next((getattr(c, name) for c in configs
                      for name in ("video_token_id", "video_token_index")
                      if getattr(c, name, None) is not None), None)
        return token is not None and getattr(self._processor, "video_processor", None) is not None

    def _videos(self, request: OmniRequest) -> list[tuple[np.ndarray, float]]:
        """Each clip sampled as the options say, as the (T, C, H, W) frames mlx-vlm takes, with
        its sampled rate; clips for a model that does not read video are refused by name."""
        if not request.videos:
            return []
        if not self.reads_video():
            raise ContractError(f"model {self.spec.name!r} does not read video (no video token "
                                "or video processor): send pictures instead")
        sampled = [sample_frames(frames, rate, self.options.video_fps,
                                 self.options.max_video_frames)
                   for frames, rate in zip(request.videos, request.video_fps)]
        return [(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)), rate)
                for frames, rate in sampled]

    def generate(self, request: ChatRequest) -> Iterator[TextChunk]:
        """Plain chat with the same weights (no image); stop sequences are never emitted."""
        validate_request(request)
        if getattr(request, "json_schema", ""):
            raise ContractError(f"model {self.spec.name!r} (mlx_vlm) does not do structured "
                                "output (json_schema)")
        return self._stream(request.messages, [], max_tokens=request.max_tokens,
                            temperature=request.temperature, top_p=request.top_p,
                            stop=request.stop)

    def _stream(self, messages: list[ChatMessage], images: list, *, stop: list[str] = (),
                audio: list[np.ndarray] = (), prompt: str | None = None,
                videos: list[tuple[np.ndarray, float]] = (),
                **sampling) -> Iterator[TextChunk]:
        from mlx_vlm.generate import stream_generate
        from mlx_vlm.prompt_utils import apply_chat_template

        if self._model is None:
            raise self.not_loaded()
        if prompt is None:  # the pictures (and sounds) go with the last user message
            media = {"num_audios": len(audio)} if audio else {}
            if videos:  # one video part each in the last user message, before its text
                media |= {"video": [f"video-{i}" for i in range(len(videos))],
                          "fps": [rate for _, rate in videos]}
            prompt = apply_chat_template(self._processor, self._model.config,
                                         [{"role": m.role, "content": m.content}
                                          for m in messages],
                                         num_images=len(images), **media)
        if audio:  # 16 kHz mono float32: mlx-vlm resamples files only, not arrays
            sampling["audio"] = list(audio)
        if videos:  # decoded frames: mlx-vlm samples files only, so they come sampled
            sampling["video"] = [frames for frames, _ in videos]
            sampling["fps"] = [rate for _, rate in videos]
        responses = stream_generate(self._model, self._processor, prompt, image=images or None,
                                    **sampling)
        prompt_tokens = [0]

        def pieces() -> Generator[Piece, None, None]:
            # mlx-vlm ends with a result of its own (finish_reason set) that flushes the
            # detokenizer: its text belongs to tokens already counted.
            try:
                for r in responses:
                    prompt_tokens[0] = r.prompt_tokens
                    yield Piece(r.text, token=r.finish_reason is None,
                                end=r.finish_reason == "stop")
            finally:
                responses.close()

        for chunk in stream_reply(pieces(), list(stop), 0):
            yield replace(chunk, prompt_tokens=prompt_tokens[0]) if chunk.final else chunk

