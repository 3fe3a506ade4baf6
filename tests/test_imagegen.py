"""Image generation through mflux: a tiny random FLUX.2-klein (mofa_omni.testing.tiny_imagegen) in the
real checkpoint's diffusers layout, loaded by mflux's own loader, served by the adapter and by
an omni-node in a real dora dataflow.

Its weights are random, so its pictures are noise: these tests check sizes, types,
determinism, the limits and the errors — not what is drawn."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.loading import open_model
from mofa_omni.adapters.mflux_image import check_layout, model_config
from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ContractError, ModelLoadError
from mofa_omni.contract.tasks import Image, ImageRequest, Task
from mofa_omni.models.catalog import Catalog
from mofa_omni.models.memory import snapshot
from mofa_omni.models.store import ModelStore
from mofa_omni.testing.tiny_imagegen import write_tiny_flux2
from tests.dataflow_run import finish, start_dataflow

IMAGEGEN = Path(__file__).parent / "dataflows" / "imagegen.yml"
PROMPT = "a red apple on a wooden table"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoint, a catalog file naming it, and a model cache of its own (so test
    runs leave nothing behind)."""
    root = tmp_path_factory.mktemp("imagegen")
    checkpoint = write_tiny_flux2(root / "tiny-flux2")
    user = root / "catalog.toml"
    user.write_text('[models.tiny-flux2]\nadapter = "mflux_image"\ntasks = ["image_generation"]\n'
                    'format = "diffusers"\nmemory_mb = 400\n'
                    'options = { family = "flux2-klein-4b", max_side = 256, max_steps = 8 }\n'
                    f'source = {{ path = "{checkpoint}" }}\n')
    return {"checkpoint": checkpoint, "catalog": user, "cache": root / "cache"}


@pytest.fixture(scope="module")
def imagegen(tiny: dict[str, Path]) -> ModelAdapter:
    adapter = open_model("tiny-flux2", catalog=Catalog.load([tiny["catalog"]]),
                         store=ModelStore(tiny["cache"]))
    yield adapter
    adapter.unload()


def draw(adapter: ModelAdapter, **changes) -> np.ndarray:
    request = {"prompt": PROMPT, "width": 64, "height": 48, "steps": 2, "seed": 0, **changes}
    return adapter.generate_image(ImageRequest(**request)).pixels


def test_the_checkpoint_has_the_real_repositorys_layout(tiny: dict[str, Path]):
    root = tiny["checkpoint"]
    for name, weights in [("transformer", "diffusion_pytorch_model.safetensors"),
                          ("text_encoder", "model.safetensors"),
                          ("vae", "diffusion_pytorch_model.safetensors")]:
        assert (root / name / weights).is_file() and (root / name / "config.json").is_file()
    assert (root / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((root / "model_index.json").read_text())["_class_name"] == "Flux2KleinPipeline"
    transformer = json.loads((root / "transformer" / "config.json").read_text())
    assert transformer["_class_name"] == "Flux2Transformer2DModel"
    assert transformer["num_layers"] == transformer["num_single_layers"] == 1
    # The sizes come from the checkpoint; everything else from mflux's FLUX.2-klein-4B entry.
    config = model_config("flux2-klein-4b", root)
    assert config.transformer_overrides["joint_attention_dim"] == 96
    assert config.text_encoder_overrides["hidden_size"] == 32
    assert config.model_name == "black-forest-labs/FLUX.2-klein-4B"


def test_an_image_of_the_asked_size_comes_back(imagegen: ModelAdapter):
    assert imagegen.spec.adapter == "mflux_image" and imagegen.tasks == (Task.IMAGE_GENERATION,)
    for width, height, steps in [(64, 48, 2), (32, 96, 3), (16, 16, 2)]:
        pixels = draw(imagegen, width=width, height=height, steps=steps)
        assert pixels.dtype == np.uint8 and pixels.shape == (height, width, 3)
        assert pixels.flags.c_contiguous and pixels.std() > 0  # not one flat colour
        np.testing.assert_array_equal(arrow.decode(arrow.encode(Image(pixels)), Image).pixels,
                                      pixels)


def test_the_same_seed_draws_the_same_pixels_and_others_differ(imagegen: ModelAdapter):
    first = draw(imagegen, seed=7)
    np.testing.assert_array_equal(draw(imagegen, seed=7), first)
    assert not np.array_equal(draw(imagegen, seed=8), first)
    assert not np.array_equal(draw(imagegen, seed=7, prompt="a blue sky over green hills"), first)
    assert not np.array_equal(draw(imagegen, seed=7, steps=3), first)
    assert draw(imagegen, seed=2**63 - 1).shape == (48, 64, 3)


@pytest.mark.parametrize(("changes", "message"), [
    ({"prompt": "   "}, "image request has an empty prompt"),
    ({"width": 50}, "image size 50x48: width and height must be multiples of 16 for tiny-flux2"),
    ({"height": 40}, "image size 64x40: width and height must be multiples of 16"),
    ({"width": 272}, "image size 272x48 is outside 16-256 pixels a side for tiny-flux2"),
    ({"width": 8, "height": 8}, "multiples of 16"),
    ({"width": 4}, "image size 4x48 is out of range"),
    ({"steps": 0}, "steps must be at least 1, got 0"),
    ({"steps": 9}, "steps must be 2-8, got 9"),
    ({"steps": 1}, "steps must be 2-8, got 1"),
    ({"seed": -1}, "seed must not be negative, got -1"),
])
def test_bad_requests_are_refused_clearly(imagegen: ModelAdapter, changes, message):
    with pytest.raises(ContractError, match=message):
        draw(imagegen, **changes)


def test_loading_holds_the_weights_in_mlx_memory_and_unloading_frees_them(tiny):
    """What the scheduler sees: the weights are read at load (not lazily at the first request),
    and unloading gives them back."""
    gc.collect()  # what earlier tests dropped must not be freed during the measurement
    before = snapshot().mlx_active_bytes
    adapter = open_model("tiny-flux2", catalog=Catalog.load([tiny["catalog"]]),
                         store=ModelStore(tiny["cache"]))
    weights = sum(p.stat().st_size for p in tiny["checkpoint"].rglob("*.safetensors"))
    loaded = snapshot().mlx_active_bytes
    assert loaded - before >= 0.9 * weights  # bfloat16, as stored: ~170 MB, mostly the VAE
    assert adapter.load_seconds is not None
    adapter.unload()
    assert snapshot().mlx_active_bytes - before < 0.1 * weights


def test_checkpoints_that_cannot_serve_are_named(tiny: dict[str, Path], tmp_path: Path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny["checkpoint"], broken, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ModelLoadError, match=r"not a FLUX.2-klein diffusers checkpoint: "
                                             r"transformer/\*.safetensors, text_encoder"):
        check_layout(broken)
    text = json.loads((broken / "text_encoder" / "config.json").read_text())
    (broken / "text_encoder" / "config.json").write_text(
        json.dumps({**text, "num_hidden_layers": 12}))
    with pytest.raises(ModelLoadError, match="reads text-encoder layers 9, 18, 27; this text "
                                             "encoder has 12"):
        model_config("flux2-klein-4b", broken)


def test_images_are_drawn_in_a_dataflow(tiny: dict[str, Path], tmp_path: Path):
    """An omni-node with the tiny model: images come back as Arrow (read in place, from dora's
    shared memory), the same seed gives the same pixels; a size the model cannot draw and a
    request without steps are answered on `error` naming them, and the node keeps drawing."""
    report_path = tmp_path / "report.json"
    finish(start_dataflow(IMAGEGEN, {"REPORT": str(report_path),
                                     "MOFA_OMNI_CATALOG": str(tiny["catalog"]),
                                     "MOFA_OMNI_CACHE": str(tiny["cache"])}), 300)
    report = json.loads(report_path.read_text())
    assert not report.get("timeout"), report
    assert report["order"][-1] == "apple-seed-4", report  # sent once both errors came back
    images = report["images"]
    assert set(images) == {"apple", "apple-again", "apple-seed-4"}
    for image in images.values():
        assert image["shape"] == [64, 96, 3] and image["dtype"] == "uint8"
        assert image["model"] == "tiny-flux2" and image["in_place"]
    assert images["apple"]["sha256"] == images["apple-again"]["sha256"]
    assert images["apple"]["sha256"] != images["apple-seed-4"]["sha256"]
    errors = report["errors"]
    assert set(errors) == {"odd-size", "no-steps"}
    assert all(e["kind"] == "bad_request" and e["node"] == "imagegen" for e in errors.values())
    assert "image size 100x64: width and height must be multiples of 16" in \
        errors["odd-size"]["message"]
    assert "steps must be at least 1, got 0" in errors["no-steps"]["message"]
