"""Pictures through the OpenAI API's bodies (no I/O): chat messages with image_url parts become
vision requests, image generation bodies become image requests answered as PNG, and every
bad picture or option gets an error naming it."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import PIL.Image
import pytest

from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import ChatMessage, ChatRequest, ImageRequest, OmniRequest, Task
from mofa_omni.gateway.openai_bodies import ApiError, ChatBody, ImageBody, decode_body, images_body
from mofa_omni.gateway.pictures import decode_picture, picture_from_url
from mofa_omni.gateway.routes import Route, Router
from mofa_omni.media.png import png_bytes
from mofa_omni.models.catalog import Catalog


def gradient(height: int, width: int, channels: int = 3) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    planes = [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256,
              x % 7 * 30]
    return np.stack(planes[:channels], axis=-1).astype(np.uint8)


def encoded(picture: PIL.Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    picture.save(out, fmt, **options)
    return out.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def chat(*parts: dict, **options) -> bytes:
    return json.dumps({"model": "m", "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": list(parts)}], **options}).encode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}


# --- pictures in ---------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_pictures_decode_to_their_exact_pixels(channels: int):
    pixels = gradient(30, 41, channels)
    decoded = picture_from_url(data_url(png_bytes(pixels)), "picture", 10_000)
    assert decoded.dtype == np.uint8 and decoded.flags.c_contiguous
    assert np.array_equal(decoded, pixels)


def test_jpeg_palette_and_16_bit_pictures_become_uint8_hwc():
    pixels = gradient(40, 56)
    jpeg = picture_from_url(data_url(encoded(PIL.Image.fromarray(pixels), "JPEG", quality=95),
                                     "image/jpeg"), "picture", 10_000)
    assert jpeg.shape == (40, 56, 3) and np.abs(jpeg.astype(int) - pixels).mean() < 4
    palette = PIL.Image.fromarray(pixels).convert("P", palette=PIL.Image.Palette.ADAPTIVE)
    assert decode_picture(encoded(palette, "PNG"), "p", 10_000).shape == (40, 56, 3)
    grey16 = PIL.Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    assert grey16.mode.startswith("I")
    decoded = decode_picture(encoded(grey16, "PNG"), "p", 10_000)
    assert decoded.shape == (8, 8, 1) and decoded[7, 7, 0] == (63 * 1000) >> 8
    cmyk = PIL.Image.fromarray(pixels).convert("CMYK")
    assert decode_picture(encoded(cmyk, "JPEG"), "p", 10_000).shape == (40, 56, 3)


def test_a_jpeg_is_turned_upright_by_its_exif_orientation():
    picture = PIL.Image.fromarray(gradient(20, 50))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # the camera was turned: show it rotated 90 degrees clockwise
    upright = decode_picture(encoded(picture, "JPEG", exif=exif.tobytes()), "p", 10_000)
    assert upright.shape == (50, 20, 3)


@pytest.mark.parametrize("url, message", [
    ("https://example.com/cat.png", "does not fetch image URLs; send the picture inline"),
    ("HTTP://example.com/cat.png", "does not fetch image URLs"),
    ("ftp://example.com/cat.png", "expected a data URL"),
    ("data:image/png;base64", "no ','"),
    ("data:image/gif;base64,R0lGODlh", "image/png or image/jpeg, got 'image/gif'"),
    ("data:image/png,rawbytes", "must be base64-encoded"),
    ("data:image/png;base64,@@@@", "base64 data is malformed"),
    (data_url(b"GIF89a" + bytes(30)), "not a PNG or JPEG picture"),
    (data_url(encoded(PIL.Image.new("RGB", (8, 8)), "GIF")), "not a PNG or JPEG picture"),
    (data_url(png_bytes(gradient(20, 20))[:60]), "PNG data could not be decoded"),
    (data_url(png_bytes(gradient(101, 100))),
     r"100x101 \(10100 pixels\), over this server's limit of 10000 pixels"),
])
def test_bad_pictures_are_refused_with_the_reason(url: str, message: str):
    with pytest.raises(ContractError, match=f"^picture: .*{message}"):
        picture_from_url(url, "picture", 10_000)


# --- chat with pictures --------------------------------------------------------------------

def test_a_chat_with_pictures_becomes_a_vision_request():
    first, second = gradient(12, 16), gradient(9, 5, 4)
    body = decode_body(chat({"type": "text", "text": "What differs "},
                            image_part(data_url(png_bytes(first))),
                            {"type": "text", "text": "between these?"},
                            {"type": "image_url", "image_url": data_url(png_bytes(second))},
                            max_completion_tokens=7, temperature=0.5, stream=True), ChatBody)
    assert body.has_images
    request = body.to_request()
    assert isinstance(request, OmniRequest)
    assert request.messages == [ChatMessage("system", "Answer briefly."),
                                ChatMessage("user", "What differs between these?")]
    assert [p.shape for p in request.images] == [(12, 16, 3), (9, 5, 4)]
    assert np.array_equal(request.images[0], first) and np.array_equal(request.images[1], second)
    assert (request.max_tokens, request.temperature) == (7, 0.5)
    text = decode_body(chat({"type": "text", "text": "Hi"}), ChatBody)
    assert not text.has_images and isinstance(text.to_request(), ChatRequest)


@pytest.mark.parametrize("parts, options, message", [
    ([{"type": "image_url"}], {},
     r"messages\[1\].content\[0\]: an image_url part needs image_url.url"),
    ([{"type": "text", "text": "x"}, image_part("https://example.com/a.png")], {},
     r"messages\[1\].content\[1\] \(image_url\): this server does not fetch image URLs"),
    ([image_part(data_url(b"not a picture"))], {},
     r"messages\[1\].content\[0\] \(image_url\): not a PNG or JPEG"),
    ([image_part(data_url(png_bytes(gradient(300, 300))))], {}, "over this server's limit"),
    ([{"type": "input_audio", "input_audio": {}}], {},
     r"messages\[1\].content\[0\] \(input_audio\): needs input_audio.data \(base64\)"),
    ([{"type": "input_video", "input_video": {}}], {},
     r"messages\[1\].content\[0\]: content of type 'input_video' is not served"),
    ([image_part(data_url(png_bytes(gradient(4, 4))))], {"stop": "END"}, "stop sequences"),
    ([image_part(data_url(png_bytes(gradient(4, 4))))], {"top_p": 0.5}, "top_p must be 1"),
    ([image_part(data_url(png_bytes(gradient(4, 4))))],
     {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "structured output is not served"),
    ([image_part(data_url(png_bytes(gradient(4, 4))))], {"max_tokens": 0},
     "max_tokens must be positive"),
    ([image_part(data_url(png_bytes(gradient(4, 4))))], {"n": 2}, "n must be 1"),
])
def test_bad_chats_with_pictures_are_named(parts, options, message):
    with pytest.raises(ContractError, match=message):
        decode_body(chat(*parts, **options), ChatBody).to_request(max_image_pixels=50_000)


def test_pictures_go_to_a_model_that_reads_them(catalog: Catalog):
    vlm = Catalog.load([])  # the packaged catalog: smolvlm-256m-instruct reads pictures
    assert Task.VISION_LANGUAGE in vlm.get("smolvlm-256m-instruct").tasks
    routes = [Route("llm", "chat", "request", Task.TEXT_GENERATION, "smollm2-135m"),
              Route("vlm", "look", "vision_language", Task.VISION_LANGUAGE,
                    "smolvlm-256m-instruct")]
    router = Router(routes, catalog)
    assert router.choose_for_images("smolvlm-256m-instruct").primary.node == "vlm"
    with pytest.raises(ApiError, match="'smollm2-135m' does not read images .*text_generation.*"
                                       "models of this graph that do: smolvlm-256m-instruct") \
            as text_only:
        router.choose_for_images("smollm2-135m")
    assert (text_only.value.status, text_only.value.code) == (400, "model_not_multimodal")
    with pytest.raises(ApiError, match="no model of this graph does"):
        Router(routes[:1], catalog).choose_for_images("smollm2-135m")
    with pytest.raises(ApiError, match="does not exist") as unknown:
        router.choose_for_images("gpt-4o")
    assert unknown.value.status == 404
    with pytest.raises(ApiError, match="no node of this graph serves 'qwen2-vl-2b-instruct' for "
                                       "vision_language") as missing:
        router.choose_for_images("qwen2-vl-2b-instruct")
    assert missing.value.status == 404


# --- image generation ----------------------------------------------------------------------

def test_image_bodies_become_image_requests():
    body = decode_body(b'{"model": "m", "prompt": "a red apple", "size": "96x64", "n": 1,'
                       b'"response_format": "b64_json", "seed": 7, "steps": 3,'
                       b'"quality": "standard"}', ImageBody)
    assert body.to_request() == ImageRequest("a red apple", 96, 64, 3, 7)
    plain = ImageBody("m", "a red apple").to_request()
    defaults = ImageRequest("")
    assert (plain.width, plain.height, plain.steps) == (defaults.width, defaults.height,
                                                        defaults.steps)
    seeds = {ImageBody("m", "x", size="auto").to_request().seed for _ in range(8)}
    assert len(seeds) > 1  # no seed asked: each request draws another picture


@pytest.mark.parametrize("fields, message", [
    ({"n": 2}, "n must be 1: one image per request, got 2"),
    ({"response_format": "url"}, "response_format 'url': images are answered as b64_json"),
    ({"output_format": "jpeg"}, "output_format 'jpeg': images are PNG"),
    ({"size": "large"}, "size 'large': expected WIDTHxHEIGHT"),
    ({"size": "64x"}, "expected WIDTHxHEIGHT"),
    ({"size": "-64x64"}, "expected WIDTHxHEIGHT"),
    ({"size": "4x4"}, "image size 4x4 is out of range"),
    ({"prompt": "  "}, "empty prompt"),
    ({"steps": 0}, "steps must be at least 1"),
    ({"seed": -1}, "seed must not be negative"),
])
def test_bad_image_bodies_are_named(fields: dict, message: str):
    with pytest.raises(ContractError, match=message):
        ImageBody(**{"model": "m", "prompt": "a red apple", **fields}).to_request()
    with pytest.raises(ApiError, match=r"Expected `int \| null`, got `str` - at `\$.seed`"):
        decode_body(b'{"model": "m", "prompt": "x", "seed": "seven"}', ImageBody)


def test_images_are_answered_as_base64_png_of_the_pixels():
    pixels = gradient(48, 64)
    body = images_body(pixels, 5)
    assert set(body) == {"created", "data"} and body["data"][0]["seed"] == 5
    png = base64.b64decode(body["data"][0]["b64_json"])
    with PIL.Image.open(io.BytesIO(png)) as picture:
        assert (picture.format, picture.size) == ("PNG", (64, 48))
        assert np.array_equal(np.asarray(picture), pixels)
