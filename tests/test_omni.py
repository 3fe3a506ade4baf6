"""An omni model: sound and pictures in, text and speech out, from one model (no ASR, no TTS).

No real omni weights can be had offline: the tests serve a tiny random-weight Qwen3-Omni
(mofa_omni.testing.tiny_omni) written and loaded by mlx-vlm's own classes, through the
mlx_omni adapter and an omni-node in a real dataflow. Its words and sounds are gibberish; the
tests check the shapes, types, order, limits and errors of what it answers."""

from __future__ import annotations

import contextlib
import json
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.loading import open_model
from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import (
    AudioChunk,
    ChatMessage,
    OmniRequest,
    Task,
    TextChunk,
    validate_request,
)
from mofa_omni.launch import dataflows
from mofa_omni.models.catalog import Catalog
from mofa_omni.models.store import ModelStore
from mofa_omni.testing.tiny_omni import write_tiny_qwen3_omni
from tests.dataflow_run import finish, start_dataflow

pytestmark = pytest.mark.slow

QUESTION = [ChatMessage("user", "What did you hear?")]
SOUND = Path(__file__).parent / "dataflows" / "omni_sound.yml"
VOICE_OMNI = Path(__file__).parents[1] / "dataflows" / "voice.omni.yml"


def tone(seconds: float = 1.0, rate: int = 16000, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate), dtype=np.float32) / rate
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def picture() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_gguf: Path) -> dict[str, Path]:
    """The tiny Qwen3-Omni, a catalog file naming it, and a model cache of its own."""
    gguf = smollm2_gguf
    root = tmp_path_factory.mktemp("omni")
    checkpoint = write_tiny_qwen3_omni(root / "tiny-qwen3-omni", gguf)
    user = root / "catalog.toml"
    user.write_text('[models.tiny-qwen3-omni]\nadapter = "mlx_omni"\n'
                    'tasks = ["omni", "vision_language", "text_generation"]\nformat = "mlx"\n'
                    # greedy speech: the talker samples at 0.9 otherwise, and random weights
                    # then end a reply before its first sound now and then
                    'options = { talker_temperature = 0.0 }\n'
                    f'memory_mb = 200\nsource = {{ path = "{checkpoint}" }}\n')
    return {"root": root, "catalog": user, "cache": root / "cache", "checkpoint": checkpoint}


@pytest.fixture(scope="module")
def omni(tiny) -> ModelAdapter:
    adapter = open_model("tiny-qwen3-omni", catalog=Catalog.load([tiny["catalog"]]),
                         store=ModelStore(tiny["cache"]))
    yield adapter
    adapter.unload()


def reply(adapter, request: OmniRequest) -> tuple[list[TextChunk], list[AudioChunk]]:
    chunks = list(adapter.generate_omni(request))
    texts = [c for c in chunks if isinstance(c, TextChunk)]
    sounds = [c for c in chunks if isinstance(c, AudioChunk)]
    assert len(texts) + len(sounds) == len(chunks)
    return texts, sounds


def test_a_spoken_question_is_answered_in_text(omni):
    texts, sounds = reply(omni, OmniRequest(QUESTION, audio=[tone()], max_tokens=6))
    assert sounds == [] and texts[-1].final and not any(c.final for c in texts[:-1])
    assert texts[-1].prompt_tokens > 13  # one second of sound: 13 audio frames in the prompt
    assert 0 < texts[-1].completion_tokens <= 6
    again, _ = reply(omni, OmniRequest(QUESTION, audio=[tone()], max_tokens=6))
    assert "".join(c.text for c in again) == "".join(c.text for c in texts)  # greedy


def test_sound_at_another_rate_is_resampled_and_longer_sound_makes_a_longer_prompt(omni):
    at_44k, _ = reply(omni, OmniRequest(QUESTION, audio=[tone(1.0, 44100)], sample_rate=44100,
                                        max_tokens=2))
    two_s, _ = reply(omni, OmniRequest(QUESTION, audio=[tone(2.0)], max_tokens=2))
    one_s, _ = reply(omni, OmniRequest(QUESTION, audio=[tone(1.0)], max_tokens=2))
    assert at_44k[-1].prompt_tokens == one_s[-1].prompt_tokens
    assert two_s[-1].prompt_tokens == one_s[-1].prompt_tokens + 13


def test_picture_sound_and_text_in_text_and_speech_out(omni):
    request = OmniRequest(QUESTION, images=[picture()], audio=[tone()], max_tokens=4,
                          speak=True, voice="Ethan")
    texts, sounds = reply(omni, request)
    assert texts[-1].final and texts[-1].completion_tokens > 0
    assert sounds and sounds[-1].final and not any(c.final for c in sounds[:-1])
    assert all(c.sample_rate == 24000 and c.audio.dtype == np.float32 and c.audio.ndim == 1
               for c in sounds)
    assert np.isfinite(np.concatenate([c.audio for c in sounds])).all()
    text_only, _ = reply(omni, OmniRequest(QUESTION, audio=[tone()], max_tokens=4))
    assert text_only[-1].prompt_tokens < texts[-1].prompt_tokens  # the picture's tokens


def test_earlier_sounds_stay_in_the_turns_they_were_said_in(omni):
    conversation = [ChatMessage("user", ""), ChatMessage("assistant", "Hello."),
                    ChatMessage("user", "")]
    both = OmniRequest(conversation, audio=[tone(1.0), tone(1.0)], audio_turns=[0, 2],
                       max_tokens=2)
    texts, _ = reply(omni, both)
    last_only, _ = reply(omni, OmniRequest(conversation, audio=[tone(1.0)], max_tokens=2))
    assert texts[-1].prompt_tokens == last_only[-1].prompt_tokens + 13 + 2  # pads + markers
    prompt = omni._prompt(both)
    first_turn, rest = prompt.split("Hello.")
    assert "<|audio_start|>" in first_turn and "<|audio_start|>" in rest
    with pytest.raises(ContractError, match="message 1 is not a user turn"):
        validate_request(OmniRequest(conversation, audio=[tone()], audio_turns=[1]))
    with pytest.raises(ContractError, match="names 1 messages for 2 audio clips"):
        validate_request(OmniRequest(conversation, audio=[tone(), tone()], audio_turns=[0]))


def clip(frames: int, side: int = 48) -> np.ndarray:
    return np.random.default_rng(frames).integers(0, 256, (frames, side, side, 3), np.uint8)


def test_a_video_clip_with_sound_and_text_is_read_and_answered_aloud(omni):
    """A clip's frames go in as the model's video tokens (sampled at the adapter's video_fps),
    in the last user turn beside the sound; the reply is text and speech, as without it."""
    assert omni.reads_video()
    spoken = OmniRequest(QUESTION, audio=[tone()], videos=[clip(8)], video_fps=[4.0],
                         max_tokens=3, speak=True)
    texts, sounds = reply(omni, spoken)
    assert texts[-1].final and sounds and sounds[-1].final
    plain, _ = reply(omni, OmniRequest(QUESTION, audio=[tone()], max_tokens=3))
    assert texts[-1].prompt_tokens > plain[-1].prompt_tokens  # the clip's tokens
    written, _ = reply(omni, OmniRequest(QUESTION, videos=[clip(8)], video_fps=[4.0],
                                         max_tokens=3))
    assert written[-1].prompt_tokens == texts[-1].prompt_tokens - 13 - 2  # no sound
    assert omni._prompt(spoken).count("<|video_pad|>") == 1


@contextlib.contextmanager
def silenced(head, token: int) -> Iterator[None]:
    """``head`` (an output layer) never favours ``token`` meanwhile: its logit is 0, below the
    best of the others'."""
    import mlx.core as mx

    original = head.weight
    weight = mx.array(original)
    weight[token] = 0
    head.weight = weight
    try:
        yield
    finally:
        head.weight = original


def test_speech_starts_with_the_first_words_and_is_the_speech_mlx_vlm_gives(omni):
    """The talker speaks while the thinker writes: the first sound comes a few codec frames
    after the first words, not after the last; and it is the same speech, sample for sample,
    and the same text that mlx-vlm's generate_stream gives once the whole text is written
    (greedy thinker and talker). The thinker's end of turn and the talker's end of speech are
    silenced for the test, so that the random model writes all its 12 tokens and speaks all
    its frames on any machine."""
    from mlx_vlm.utils import prepare_inputs

    from mofa_omni.adapters.mlx_omni import (
        _MEDIA,
        CHUNK_FRAMES,
        EXTRA_FRAMES,
        FRAMES_PER_TOKEN,
        LEFT_CONTEXT_FRAMES,
    )

    model = omni._model
    with silenced(model.thinker.language_model.lm_head, model.config.eos_token_id), \
            silenced(model.talker.codec_head, model.config.talker_config.codec_eos_token_id):
        request = OmniRequest(QUESTION, audio=[tone()], max_tokens=12, speak=True)
        chunks = list(omni.generate_omni(request))
        inputs = prepare_inputs(omni._processor, images=None, audio=[tone()],
                                prompts=omni._prompt(request))
        theirs = list(model.generate_stream(
            inputs["input_ids"], speaker=omni._speaker(""), thinker_max_new_tokens=12,
            thinker_eos_token_id=model.config.eos_token_id, thinker_temperature=0.0,
            talker_temperature=0.0, talker_max_new_tokens=FRAMES_PER_TOKEN * 12 + EXTRA_FRAMES,
            chunk_size=CHUNK_FRAMES, left_context_size=LEFT_CONTEXT_FRAMES,
            **{key: inputs[key] for key in _MEDIA if key in inputs}))
    words = [i for i, c in enumerate(chunks) if isinstance(c, TextChunk)]
    sounds = [i for i, c in enumerate(chunks) if isinstance(c, AudioChunk) and c.audio.size]
    assert chunks[words[-1]].final and chunks[words[-1]].completion_tokens == 12
    assert sounds[0] < words[-1] - 4, [type(c).__name__ for c in chunks]  # words still to come
    (kind, tokens), *spoken = theirs
    assert kind == "text" and all(kind == "audio" for kind, _ in spoken)
    text = "".join(chunks[i].text for i in words)
    assert text == omni._processor.tokenizer.decode(tokens)
    ours = np.concatenate([c.audio for c in chunks if isinstance(c, AudioChunk)])
    assert ours.size == 1920 * (FRAMES_PER_TOKEN * 12 + EXTRA_FRAMES)  # never ended: all frames
    assert np.array_equal(ours, np.concatenate([np.asarray(a).reshape(-1) for _, a in spoken]))


def test_closing_the_stream_mid_speech_stops_it(omni):
    stream = omni.generate_omni(OmniRequest(QUESTION, audio=[tone()], max_tokens=8, speak=True))
    kinds = []
    for chunk in stream:
        kinds.append(type(chunk))
        if isinstance(chunk, AudioChunk):
            break
    stream.close()  # barge-in: the rest is never computed
    assert kinds[-1] is AudioChunk and TextChunk in kinds
    texts, sounds = reply(omni, OmniRequest(QUESTION, audio=[tone()], max_tokens=2))
    assert texts[-1].final and not sounds  # the model serves on


def test_bad_omni_requests_are_refused_by_name(omni):
    with pytest.raises(ContractError, match="no voice 'nobody'.*aiden, chelsie, ethan"):
        list(omni.generate_omni(OmniRequest(QUESTION, audio=[tone()], speak=True,
                                            voice="nobody")))
    with pytest.raises(ContractError, match="audio 0 must be float32"):
        validate_request(OmniRequest(QUESTION, audio=[tone().astype(np.float64)]))
    with pytest.raises(ContractError, match="audio 0 is empty"):
        validate_request(OmniRequest(QUESTION, audio=[np.zeros(0, np.float32)]))
    with pytest.raises(ContractError, match="700 s of audio; at most 600"):
        validate_request(OmniRequest(QUESTION, audio=[np.zeros(700 * 1000, np.float32)],
                                     sample_rate=1000))
    with pytest.raises(ContractError, match="image 0 must be uint8"):
        validate_request(OmniRequest(QUESTION, images=[picture().astype(np.float32)]))
    with pytest.raises(ContractError, match="no messages"):
        validate_request(OmniRequest([], audio=[tone()]))


def test_omni_requests_travel_as_arrow():
    request = OmniRequest(QUESTION, images=[picture()], audio=[tone(0.5), tone(0.25, hz=880)],
                          sample_rate=16000, max_tokens=9, speak=True, voice="chelsie")
    back = arrow.decode(arrow.encode(request), OmniRequest)
    assert [c.size for c in back.audio] == [8000, 4000]
    assert np.array_equal(back.audio[1], request.audio[1])
    assert np.array_equal(back.images[0], request.images[0])
    assert (back.max_tokens, back.speak, back.voice) == (9, True, "chelsie")


def test_the_omni_model_is_detected_from_its_files(tiny):
    from mofa_omni.models.detect import detect

    found = detect(tiny["checkpoint"])
    assert found.kind == "omni" and found.spec.adapters == ("mlx_omni",)
    assert found.spec.tasks[0] is Task.OMNI


def test_a_vision_language_request_is_pictures_and_text_only(omni):
    # the same request type, on the vision_language task: sound and speech are refused by name
    with pytest.raises(ContractError, match="sound is for an omni model"):
        list(omni.generate_from_images(OmniRequest(QUESTION, [picture()], [tone()])))
    with pytest.raises(ContractError, match="a spoken reply is for an omni model"):
        list(omni.generate_from_images(OmniRequest(QUESTION, [picture()], speak=True)))
    with pytest.raises(ContractError, match="vision request has no images"):
        list(omni.generate_from_images(OmniRequest(QUESTION)))
    chunks = list(omni.generate_from_images(OmniRequest(QUESTION, [picture()], max_tokens=2)))
    assert chunks[-1].final and all(isinstance(c, TextChunk) for c in chunks)


def test_an_omni_node_answers_sound_with_text_and_speech_and_stops_on_barge_in(tiny, tmp_path):
    """A real dataflow (tests/dataflows/omni_sound.yml): OmniRequests to an omni-node, the
    replies TextChunk and AudioChunk messages on one output, told apart by their schema."""
    report_path = tmp_path / "report.json"
    finish(start_dataflow(SOUND, {"REPORT": str(report_path),
                                  "MOFA_OMNI_CATALOG": str(tiny["catalog"]),
                                  "MOFA_OMNI_CACHE": str(tiny["cache"])}), 300)
    report = json.loads(report_path.read_text())
    assert not report.get("timeout"), report
    heard, looked, barged = report["heard"], report["looked"], report["barged"]
    assert heard["ended"] == "completed" and heard["text_final"] and heard["audio_chunks"] == 0
    assert looked["ended"] == "completed" and looked["text_final"] and looked["audio_final"]
    assert looked["rate"] == 24000 and looked["audio_chunks"] > 0
    # the text first, then the speech; the stream's end is the last spoken chunk
    assert looked["order"] == sorted(looked["order"], key=lambda kind: kind == "audio")
    assert barged["ended"] == "error: cancelled" and barged["audio_chunks"] >= 1
    assert not barged["audio_final"]  # stopped mid-speech
    assert report["bad_voice"]["ended"] == "error: bad_request"
    assert "no voice 'nobody'" in report["bad_voice"]["error"]


def test_the_voice_agent_on_one_omni_model_answers_spoken_turns_aloud(tiny, tmp_path):
    """dataflows/voice.omni.yml as shipped, its `qwen3-omni` the tiny model (a user catalog
    entry of that name): two spoken questions -> VAD -> dialogue -> one omni node -> WAV replies
    at 24 kHz and a transcript; the cascade's ASR, LLM and TTS nodes stand by unloaded."""
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(tiny["catalog"].read_text().replace("[models.tiny-qwen3-omni]",
                                                           "[models.qwen3-omni]"))
    out = tmp_path / "voice"
    log = finish(start_dataflow(VOICE_OMNI, {"MOFA_OMNI_CATALOG": str(catalog),
                                             "MOFA_OMNI_CACHE": str(tiny["cache"]),
                                             "VOICE_OUTPUT": str(out), "MAX_TOKENS": "6"}), 300)
    lines = (out / "transcript.txt").read_text().splitlines()
    users = [line for line in lines if line.startswith("user: ")]
    answers = [line for line in lines if line.startswith("assistant: ")]
    assert len(users) == 2 and all(line.startswith("user: [spoken, ") for line in users)
    assert len(answers) == 2 and not any("[error" in line for line in answers)
    for name in ("reply-001.wav", "reply-002.wav"):
        with wave.open(str(out / name)) as reply:
            # (seen once in a loaded CI run: a reply of no frames; the transcript says more)
            assert reply.getframerate() == 24000 and reply.getnframes() > 0, (name, lines)
    nodes = {node["id"]: node for node in dataflows.load(VOICE_OMNI)["nodes"]}
    assert nodes["omni"]["env"]["TASK"] == "omni"
    # the cascade stood by and loaded nothing: the omni model served every turn
    for stand_in in ("asr", "llm", "tts"):
        assert f"{stand_in}: mofa_omni.node.serving: scheduler: load" not in log, \
            "\n".join(line for line in log.splitlines() if "stdout" in line)


def test_the_cascade_answers_when_no_omni_variant_fits_the_budget(tiny, tmp_path):
    """dataflows/voice.omni.yml with an omni model the scheduler can never admit (its catalog
    entry says 100 GB): its refusal sends the first turn's sound to the cascade (whisper, then
    SmolLM2, then Piper), which answers it aloud; the second turn goes straight there. The
    cascade's first utterance and first question are dropped on their way (as dora drops
    messages): the cascade ASR's and LLM's delivery reports show it, and each is sent again."""
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(tiny["catalog"].read_text()
                       .replace("[models.tiny-qwen3-omni]", "[models.qwen3-omni]")
                       .replace("memory_mb = 200", "memory_mb = 100000"))
    out = tmp_path / "voice"
    log = finish(start_dataflow(VOICE_OMNI, {"MOFA_OMNI_CATALOG": str(catalog),
                                             "VOICE_OUTPUT": str(out),
                                             "DROP_MESSAGES": "hear:0,cascade_chat:0"}),
                 300)
    lines = (out / "transcript.txt").read_text().splitlines()
    assert lines[0].startswith("user: [spoken, "), lines
    assert "the scheduler refused qwen3-omni" in lines[1] and \
        lines[1].endswith("; the cascade answers]"), lines
    assert lines[2] == "user: What is the capital of France?", lines
    assert lines[3].startswith("assistant: ") and "[" not in lines[3], lines
    assert lines[4].startswith("user: ") and "italy" in lines[4].lower(), lines
    assert lines[5].startswith("assistant: ") and "[" not in lines[5] and len(lines) == 6, lines
    for name in ("reply-001.wav", "reply-002.wav"):  # spoken by Piper
        with wave.open(str(out / name)) as reply:
            assert reply.getframerate() == 22050 and reply.getnframes() > 0, (name, lines)
    assert "utt-1: the cascade hears it (omni cannot serve" in log, log[-3000:]
    # the omni model's refused question was reply-1; the cascade's is the next
    assert "reply-2: llm never received the question (dora dropped it): asked again" in log, \
        log[-3000:]
    assert "utt-1: asr never received the utterance (dora dropped it): sent again" in log, \
        log[-3000:]
