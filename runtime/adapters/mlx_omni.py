"""Omni models served by mlx-vlm: text, pictures and sound in; text, and speech, out.

Qwen3-Omni (``qwen3_omni_moe``): its "thinker" reads the conversation with the pictures, the
video clips (their frames, sampled as mlx_vlm's options say) and the sounds (whisper's log-mel
at 16 kHz) and writes the text; asked to speak, its "talker"
turns the thinker's hidden states into codec codes that "code2wav" voices at 24 kHz, in one
of the model's own speakers. No ASR and no TTS model in the graph: one model, one footprint.

Speaking, the talker starts on the reply's first words and the thinker writes just ahead of
it (:mod:`mofa_omni.adapters.qwen3_omni_speech`): the text streams token by token, the speech
in chunks of a few codec frames, interleaved, the first sound a few frames after the first
words rather than after the whole text. Not speaking, the text streams as any VLM's does.
Closing the stream stops the model between two steps (barge-in).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import numpy as np

from mofa_omni.adapters.mlx_vlm import MlxVlmAdapter, MlxVlmOptions, to_rgb
from mofa_omni.adapters.options import AdapterOptions
from mofa_omni.adapters.qwen3_omni_speech import Sounded, speak_while_thinking
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import (
    AudioChunk,
    OmniRequest,
    Task,
    TextChunk,
    validate_request,
)
from mofa_omni.media.audio import resample

HEARING_RATE = 16_000  # the audio encoder's log-mel, whisper's
SPEECH_RATE = 24_000  # code2wav: 1920 samples per 12.5 Hz codec frame
# The talker may write ~0.3 s of speech (4 codec frames) per text token, plus a short tail: a
# bound for a model that does not end its speech on its own.
FRAMES_PER_TOKEN, EXTRA_FRAMES = 4, 8
CHUNK_FRAMES = 4  # codec frames per spoken chunk: the first sound ~0.3 s of speech in
LEFT_CONTEXT_FRAMES = 2  # frames code2wav reads again before each chunk (no seams)
_MEDIA = ("input_features", "feature_attention_mask", "pixel_values", "image_grid_thw",
          "pixel_values_videos", "video_grid_thw", "video_second_per_grid")


class MlxOmniOptions(MlxVlmOptions):
    """The catalog options of an omni model: mlx-vlm's, and how its talker samples speech."""

    # Qwen3-Omni's own default; 0: greedy, the same speech for the same reply every time
    talker_temperature: float = 0.9


class MlxOmniAdapter(MlxVlmAdapter):
    """Omni models (Qwen3-Omni) through mlx-vlm; also plain chat and pictures-only chat.
    Options (:class:`MlxOmniOptions`): mlx-vlm's, and ``talker_temperature``."""

    supported_tasks: ClassVar[frozenset[Task]] = frozenset({Task.OMNI, Task.VISION_LANGUAGE,
                                                            Task.TEXT_GENERATION})
    Options: ClassVar[type[AdapterOptions]] = MlxOmniOptions
    options: MlxOmniOptions

    def voices(self) -> list[str]:
        """The speakers the model's talker knows (empty: it does not speak)."""
        if self._model is None:
            raise self.not_loaded()
        talker = getattr(self._model.config, "talker_config", None)
        return sorted(getattr(talker, "speaker_id", None) or {})

    def generate_omni(self, request: OmniRequest) -> Iterator[TextChunk | AudioChunk]:
        """The reply to a conversation with pictures and sounds: TextChunks (the last final,
        with its usage), then, when ``request.speak``, AudioChunks at 24 kHz (the last final,
        and the end of the reply: :func:`~mofa_omni.contract.tasks.ends_reply`).
        Sounds at any rate are resampled to the encoder's 16 kHz. Unknown voices, and speech
        from a model without a talker, are refused by name."""
        validate_request(request)
        if self._model is None:
            raise self.not_loaded()
        videos = self._videos(request)  # sampled; refused by name by a model without video
        images = [to_rgb(pixels) for pixels in request.images]
        audio = [resample(clip, request.sample_rate, HEARING_RATE) for clip in request.audio]
        self._check_lengths(audio)
        prompt = self._prompt(request)
        if not request.speak:
            return self._stream(request.messages, images, audio=audio, prompt=prompt,
                                videos=videos, max_tokens=request.max_tokens,
                                temperature=request.temperature)
        return self._spoken(request, images, audio, self._speaker(request.voice), prompt,
                            videos)

    def _check_lengths(self, audio: list[np.ndarray]) -> None:
        """A clip longer than the model's feature extractor reads (30 s for Gemma 3n) is
        refused by name: the extractor would drop the rest without a word."""
        limit = _clip_limit(getattr(self._processor, "feature_extractor", None))
        for i, clip in enumerate(audio):
            if isinstance(limit, int) and clip.size > limit:
                raise ContractError(f"audio {i} is {clip.size / HEARING_RATE:.1f} s; model "
                                    f"{self.spec.name!r} hears at most "
                                    f"{limit / HEARING_RATE:g} s a clip: split it")

    def _prompt(self, request: OmniRequest) -> str:
        """The conversation through the model's chat template, each sound in the turn it was
        said in (``audio_turns``; else the last user turn), the pictures and the video clips
        (their frames only: the clip's own sound is not read) in the last one."""
        from mlx_vlm.prompt_utils import apply_chat_template, get_chat_template

        messages = apply_chat_template(self._processor, self._model.config,
                                       [{"role": m.role, "content": m.content}
                                        for m in request.messages],
                                       num_images=len(request.images), return_messages=True)
        last_user = max(i for i, m in enumerate(request.messages) if m.role == "user") \
            if any(m.role == "user" for m in request.messages) else len(messages) - 1
        for turn in request.audio_turns or [last_user] * len(request.audio):
            content = messages[turn]["content"]
            parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
            messages[turn]["content"] = [{"type": "audio"}, *parts]
        if request.videos:
            content = messages[last_user]["content"]
            parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
            messages[last_user]["content"] = [*({"type": "video"} for _ in request.videos),
                                              *parts]
        return get_chat_template(self._processor, messages, True, enable_thinking=True)

    def _speaker(self, voice: str) -> str:
        voices = self.voices()
        if not voices or not getattr(self._model, "has_talker", False):
            raise ContractError(f"model {self.spec.name!r} does not speak (no talker): ask for "
                                "text only (speak false)")
        if not voice:
            return voices[0]
        if voice.lower() not in voices:
            raise ContractError(f"model {self.spec.name!r} has no voice {voice!r}; its voices: "
                                f"{', '.join(voices)}")
        return voice.lower()

    def _spoken(self, request: OmniRequest, images: list, audio: list[np.ndarray],
                speaker: str, prompt: str, videos: list[tuple[np.ndarray, float]]
                ) -> Iterator[TextChunk | AudioChunk]:
        """TextChunks as the words come and AudioChunks as the speech comes, interleaved; the
        final TextChunk once the text is done, the final AudioChunk last."""
        from mlx_vlm.utils import prepare_inputs

        processor, model = self._processor, self._model
        clips = {"videos": [frames for frames, _ in videos],
                 "fps": [rate for _, rate in videos]} if videos else {}
        inputs = prepare_inputs(processor, images=images or None, audio=audio or None,
                                prompts=prompt, **clips)
        end_of_turn = model.config.eos_token_id
        steps = speak_while_thinking(
            model, inputs["input_ids"], speaker=speaker, eos=end_of_turn,
            max_tokens=request.max_tokens, temperature=request.temperature,
            talker_temperature=self.options.talker_temperature,
            max_frames=FRAMES_PER_TOKEN * request.max_tokens + EXTRA_FRAMES,
            chunk_frames=CHUNK_FRAMES, left_context=LEFT_CONTEXT_FRAMES,
            media={key: inputs[key] for key in _MEDIA if key in inputs})
        prompt_tokens = int(inputs["input_ids"].shape[1])
        words = _Words(processor.tokenizer, end_of_turn)
        spoken: AudioChunk | None = None  # held back one chunk, so the last one is final
        try:
            for step in steps:
                if isinstance(step, Sounded):
                    if spoken is not None:
                        yield spoken
                    spoken = AudioChunk(step.audio, SPEECH_RATE)
                    continue
                if text := words.add(step.token):
                    yield TextChunk(text)
                if words.done or len(words.tokens) >= request.max_tokens:
                    yield TextChunk(words.rest(), final=True, finish_reason="stop" if words.done
                                    else "length", prompt_tokens=prompt_tokens,
                                    completion_tokens=len(words.tokens))
        finally:
            steps.close()
        # A spoken reply ends with its final AudioChunk (empty when nothing was said).
        last = spoken.audio if spoken is not None else np.zeros(0, np.float32)
        yield AudioChunk(last, SPEECH_RATE, final=True)


class _Words:
    """The reply's text as its tokens come: each call gives what the new token adds (nothing
    while a character's bytes are incomplete); the end-of-turn token ends it unsaid."""

    def __init__(self, tokenizer, end_of_turn: int):
        self.tokenizer, self.end_of_turn = tokenizer, end_of_turn
        self.tokens: list[int] = []
        self.done = False
        self._said = ""

    def add(self, token: int) -> str:
        if token == self.end_of_turn:
            self.done = True
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):  # a character cut between tokens: wait for the rest
            return ""
        new, self._said = text[len(self._said):], text
        return new

    def rest(self) -> str:
        """What the tokens say that was not given yet (a character left incomplete)."""
        return self.tokenizer.decode(self.tokens)[len(self._said):]


def _clip_limit(extractor: object) -> int | None:
    """The samples a feature extractor reads of a clip: its ``n_samples`` (whisper's), else its
    call's default ``max_length`` (Gemma 3n's: 480,000); None if it says neither."""
    import inspect

    limit = getattr(extractor, "n_samples", None)
    if isinstance(limit, int) or extractor is None:
        return limit
    try:
        default = inspect.signature(extractor.__call__).parameters["max_length"].default
    except (KeyError, TypeError, ValueError):
        return None
    return default if isinstance(default, int) else None
