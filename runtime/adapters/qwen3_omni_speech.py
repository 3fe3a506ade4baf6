"""Qwen3-Omni speaking while it thinks: the talker starts on the reply's first words.

mlx-vlm's ``generate_stream`` writes the thinker's whole reply before the talker's first codec
frame, so the first sound of a spoken reply comes after all of its text. Yet the talker reads
the reply's text one token per codec frame: its prefix is the conversation and the reply's
first token; each later frame adds the next reply token's embedding (``trailing`` below), then
the end-of-speech embedding, then padding. So the two can run interleaved, the thinker kept
just ahead of the talker: each talker frame first lets the thinker write the token that frame
reads. The first sound then comes a few frames after the first words.

:func:`speak_while_thinking` does that with mlx-vlm's own parts (the thinker's language model
and cache, its samplers, the talker's prefill and ``prepare_inputs_for_generation``, code2wav's
chunked decoding) and the same arithmetic, step for step, as ``generate_stream``: given the same
sampling, it yields the same tokens and the same speech, only sooner (tests/test_omni.py checks
them equal with greedy sampling).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

# What a multimodal prompt brings besides its tokens (the thinker's embedding inputs).
MEDIA_INPUTS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw",
                "input_features", "feature_attention_mask", "audio_feature_lengths")


@dataclass(frozen=True, slots=True)
class Said:
    """A token of the reply's text (the end-of-turn token included, last)."""

    token: int


@dataclass(frozen=True, slots=True)
class Sounded:
    """A chunk of the reply's speech: float32 samples at 24 kHz."""

    audio: np.ndarray


class _Thinker:
    """The thinker's greedy or sampled decoding, one token at a time, with what the talker
    reads of the prompt: the accept layer's hidden states and the input embeddings."""

    def __init__(self, model, input_ids, eos: int, max_tokens: int, temperature: float,
                 media: dict[str, Any]):
        from mlx_vlm.models import cache as kv_cache
        from mlx_vlm.sample_utils import make_sampler

        self.model, self.eos, self.max_tokens = model, eos, max_tokens
        self.layer = model.config.talker_config.accept_hidden_layer + 1
        embedded = model.thinker.get_input_embeddings(
            input_ids, **{k: v for k, v in media.items() if k in MEDIA_INPUTS})
        self.prompt_embeds = embedded.inputs_embeds
        lm_kwargs = {k: v for k, v in embedded.to_dict().items()
                     if k != "inputs_embeds" and v is not None}
        lm_kwargs.update({k: v for k, v in media.items()
                          if k in ("image_grid_thw", "video_grid_thw")})
        self._decode_kwargs = {k: v for k, v in lm_kwargs.items() if k != "position_ids"}
        self._cache = kv_cache.make_prompt_cache(model.thinker.language_model)
        self._sample = make_sampler(temp=temperature)
        out = model.thinker.language_model(input_ids, inputs_embeds=self.prompt_embeds,
                                           cache=self._cache,
                                           output_hidden_state_idx=self.layer, **lm_kwargs)
        self.prompt_hidden = out.hidden_states
        self._next = self._first(out.logits[:, -1, :])
        self.tokens: list[int] = []
        self.done = False

    def _first(self, logits):
        token = self._sample(logits)
        return token[:, 0] if token.ndim == 2 else token

    def step(self) -> int:
        """The next token of the reply (the thinker's forward pass on it done, as mlx-vlm
        does even for the last); then ``done`` once it was the end of the turn or the
        ``max_tokens``-th."""
        token = self._next
        token_id = int(token.item())
        self.tokens.append(token_id)
        out = self.model.thinker.language_model(token[:, None], cache=self._cache,
                                                output_hidden_state_idx=self.layer,
                                                **self._decode_kwargs)
        if token_id == self.eos or len(self.tokens) >= self.max_tokens:
            self.done = True
        else:
            self._next = self._first(out.logits[:, -1, :])
        return token_id


def _talker_prefix(model, input_ids, thinker: _Thinker, speaker_id: int, special):
    """The talker's prefill (the conversation's user turns, the reply's header and first
    token) as ``generate_stream`` builds it, with the reply so far being one token."""
    import mlx.core as mx

    config = model.config
    first = model.thinker.language_model.model.embed_tokens(mx.array([thinker.tokens[:1]]))
    embeds = mx.concatenate([thinker.prompt_embeds, first], axis=1)
    prompt = np.array(input_ids[0])
    starts = [*np.where(prompt == config.im_start_token_id)[0].tolist(), embeds.shape[1]]
    media = (input_ids == config.thinker_config.audio_token_id) | \
        (input_ids == config.thinker_config.image_token_id) | \
        (input_ids == config.thinker_config.video_token_id)
    parts = []
    for i, (start, end) in enumerate(zip(starts, starts[1:])):
        role = int(prompt[start + 1])
        if role == config.user_token_id:
            parts.append(model._get_talker_user_parts(start, end, media, thinker.prompt_hidden,
                                                      thinker.prompt_embeds))
        elif role == config.assistant_token_id and i == len(starts) - 2:
            prefix, _, _ = model._get_talker_assistant_parts(
                start, end, speaker_id, embeds, special["pad"], special["bos"], special["eos"])
            parts.append(prefix)
    return mx.concatenate(parts, axis=1)


def speak_while_thinking(model, input_ids, *, speaker: str, eos: int, max_tokens: int,
                         temperature: float, talker_temperature: float, max_frames: int,
                         chunk_frames: int, left_context: int, media: dict[str, Any],
                         talker_top_p: float = 1.0) -> Iterator[Said | Sounded]:
    """Qwen3-Omni's reply to ``input_ids`` (a prompt ending with the assistant's header),
    token by token (:class:`Said`), and its speech in chunks (:class:`Sounded`) as soon as
    the talker has voiced ``chunk_frames`` codec frames, interleaved. ``media``: the
    processor's other inputs (pictures, sound, video)."""
    import mlx.core as mx
    from mlx_vlm.models.cache import KVCache
    from mlx_vlm.sample_utils import top_p_sampling

    config, talker = model.config, model.talker
    speaker_id = config.talker_config.speaker_id[speaker.lower()]
    thinker = _Thinker(model, input_ids, eos, max_tokens, temperature, media)
    yield Said(thinker.step())

    embed = model.thinker.language_model.model.embed_tokens
    specials = talker.text_projection(embed(mx.array(
        [[config.tts_bos_token_id, config.tts_eos_token_id, config.tts_pad_token_id]],
        dtype=input_ids.dtype)))
    special = {"bos": specials[:, 0:1], "eos": specials[:, 1:2], "pad": specials[:, 2:3]}
    read_so_far = [special["pad"][:, :0]]  # what each talker frame reads of the reply, in order

    def read(part) -> None:
        read_so_far[:] = [mx.concatenate([read_so_far[0], part], axis=1)]  # once per token

    if thinker.done:
        read(special["eos"])

    def sample(logits):
        return mx.argmax(logits, axis=-1) if talker_temperature == 0 else \
            top_p_sampling(logits, talker_top_p, talker_temperature)

    cache = [KVCache() for _ in range(config.talker_config.text_config.num_hidden_layers)]
    logits, hidden = talker(input_ids=None,
                            inputs_embeds=_talker_prefix(model, input_ids, thinker, speaker_id,
                                                         special),
                            past_key_values=cache, use_cache=True)
    code = sample(logits[:, -1, :])
    codes: list = []
    decoded = 0
    for step in range(max_frames):
        if int(code.item()) == config.talker_config.codec_eos_token_id:
            break
        while read_so_far[0].shape[1] <= step and not thinker.done:  # the thinker keeps ahead
            token = thinker.step()
            yield Said(token)
            read(talker.text_projection(embed(mx.array([[token]], input_ids.dtype))))
            if thinker.done:
                read(special["eos"])
        inputs, residual = talker.prepare_inputs_for_generation(
            input_ids=code[:, None], past_hidden=hidden[:, -1:],
            trailing_text_hidden=read_so_far[0], tts_pad_embed=special["pad"],
            generation_step=step, temperature=talker_temperature, top_p=0.8)
        logits, hidden = talker(input_ids=None, inputs_embeds=inputs, past_key_values=cache,
                                use_cache=True)
        codes.append(residual)
        if len(codes) >= chunk_frames:
            wav, decoded = model.code2wav.stream_decode(
                mx.stack(codes, axis=1).transpose(0, 2, 1), chunk_frames, left_context, decoded)
            if wav is not None:
                yield Sounded(np.asarray(wav.astype(mx.float32)).reshape(-1))
        code = sample(logits[:, -1, :])
    while not thinker.done:  # the talker is done speaking: the rest of the text
        yield Said(thinker.step())
    if codes:
        wav = model.code2wav.flush_decode(mx.stack(codes, axis=1).transpose(0, 2, 1),
                                          left_context, decoded)
        if wav is not None:
            yield Sounded(np.asarray(wav.astype(mx.float32)).reshape(-1))
