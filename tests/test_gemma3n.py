"""Gemma 3n, the second omni family: sound, pictures and text in, text out (no talker).

No real weights offline: a tiny random-weight Gemma 3n (mofa_omni.testing.tiny_gemma3n)
written and loaded by mlx-vlm's own classes, served by the same mlx_omni adapter as
Qwen3-Omni. Its words are gibberish; the tests check shapes, counts and errors. Its vision
tower is mlx-vlm's fixed-size MobileNet-V5 (~590 MB written, minutes a 768-pixel picture on a
CPU): the checkpoint's image processor reads pictures at 256 pixels, and one picture is
asked about (~20-30 s here)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.loading import open_model
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import OmniRequest, TextChunk
from mofa_omni.models.catalog import Catalog
from mofa_omni.models.store import ModelStore
from mofa_omni.testing.tiny_gemma3n import (
    AUDIO_SEQ_LENGTH,
    IMAGE_SEQ_LENGTH,
    write_tiny_gemma3n,
)
from tests.test_omni import QUESTION, picture, tone

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def gemma3n(tmp_path_factory, smollm2_gguf: Path) -> ModelAdapter:
    """The tiny Gemma 3n through a user catalog entry (adapter mlx_omni), loaded."""
    gguf = smollm2_gguf
    root = tmp_path_factory.mktemp("gemma3n")
    checkpoint = write_tiny_gemma3n(root / "tiny-gemma3n", gguf, picture_side=256)
    user = root / "catalog.toml"
    user.write_text('[models.tiny-gemma3n]\nadapter = "mlx_omni"\n'
                    'tasks = ["omni", "vision_language", "text_generation"]\nformat = "mlx"\n'
                    f'memory_mb = 800\nsource = {{ path = "{checkpoint}" }}\n')
    adapter = open_model("tiny-gemma3n", catalog=Catalog.load([user]),
                         store=ModelStore(root / "cache"))
    yield adapter
    adapter.unload()
    shutil.rmtree(root, ignore_errors=True)  # ~590 MB: not kept among pytest's old tmp dirs


def reply(adapter: ModelAdapter, request: OmniRequest) -> list[TextChunk]:
    chunks = list(adapter.generate_omni(request))
    assert all(isinstance(c, TextChunk) for c in chunks)
    assert chunks[-1].final and not any(c.final for c in chunks[:-1])
    return chunks


def test_a_spoken_question_is_answered_in_text(gemma3n):
    texts = reply(gemma3n, OmniRequest(QUESTION, audio=[tone()], max_tokens=4))
    assert 0 < texts[-1].completion_tokens <= 4
    assert texts[-1].prompt_tokens > AUDIO_SEQ_LENGTH
    again = reply(gemma3n, OmniRequest(QUESTION, audio=[tone()], max_tokens=4))
    assert "".join(c.text for c in again) == "".join(c.text for c in texts)  # greedy
    prompt = gemma3n._prompt(OmniRequest(QUESTION, audio=[tone()]))
    assert prompt.count("<audio_soft_token>") == 1  # expanded by the processor


def test_each_sound_adds_a_fixed_run_of_soft_tokens_to_the_prompt(gemma3n):
    def prompt_tokens(**media) -> int:
        return reply(gemma3n, OmniRequest(QUESTION, max_tokens=1, **media))[-1].prompt_tokens

    text_only = prompt_tokens()
    one_s = prompt_tokens(audio=[tone(1.0)])
    # "\n\n<start_of_audio>" + 188 soft tokens + "<end_of_audio>\n\n", whatever the length
    assert one_s == text_only + AUDIO_SEQ_LENGTH + 4
    assert prompt_tokens(audio=[tone(2.0)]) == one_s
    assert prompt_tokens(audio=[tone(1.0, 44100)], sample_rate=44100) == one_s  # resampled
    # a second clip: its soft tokens and markers (the blank lines between the two clips
    # may merge into fewer tokens)
    two = prompt_tokens(audio=[tone(1.0), tone(0.5)])
    assert one_s + AUDIO_SEQ_LENGTH + 2 <= two <= one_s + AUDIO_SEQ_LENGTH + 4


def test_speech_and_sound_longer_than_it_reads_are_refused_by_name(gemma3n):
    assert gemma3n.voices() == []
    with pytest.raises(ContractError, match="does not speak \\(no talker\\)"):
        list(gemma3n.generate_omni(OmniRequest(QUESTION, audio=[tone()], max_tokens=4,
                                               speak=True)))
    # its feature extractor reads 30 s a clip: a longer one is refused, not cut without a word
    with pytest.raises(ContractError, match="audio 0 is 31.0 s; model 'tiny-gemma3n' hears at "
                                            "most 30 s a clip: split it"):
        list(gemma3n.generate_omni(OmniRequest(QUESTION, audio=[tone(31.0)], max_tokens=2)))
    texts = reply(gemma3n, OmniRequest(QUESTION, audio=[tone()], max_tokens=2))
    assert texts[-1].completion_tokens > 0  # the model serves on


def test_a_picture_becomes_its_soft_tokens_and_is_answered(gemma3n):
    """A picture goes through the MobileNet-V5 vision tower into its fixed run of 256 soft
    tokens between <start_of_image> and <end_of_image>, and is answered in text."""
    texts = reply(gemma3n, OmniRequest(QUESTION, images=[picture()], max_tokens=2))
    assert texts[-1].completion_tokens > 0
    text_only = reply(gemma3n, OmniRequest(QUESTION, max_tokens=1))
    # "\n\n<start_of_image>" + the soft tokens + "<end_of_image>\n\n"
    assert texts[-1].prompt_tokens == text_only[-1].prompt_tokens + IMAGE_SEQ_LENGTH + 4
    assert gemma3n._prompt(OmniRequest(QUESTION, images=[picture()])).count(
        "<image_soft_token>") == 1  # expanded by the processor
