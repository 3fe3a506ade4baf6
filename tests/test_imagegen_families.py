"""The image families besides FLUX.2 (tests/test_imagegen.py): Z-Image and ERNIE-Image, each a
tiny random checkpoint (mofa_omni.testing.tiny_imagegen) in the real repository's diffusers
layout, loaded by mflux's own loader and served by the mflux_image adapter.

Their weights are random, so their pictures are noise: these tests check sizes, types,
determinism, the limits, detection and the errors — not what is drawn. Images are small: mflux
builds the VAEs at full size, and decoding costs ~0.7 s for 16x16 pixels on a CPU."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.loading import open_model
from mofa_omni.adapters.mflux_image import (
    BY_FAMILY,
    FAMILIES,
    check_layout,
    load_pipeline,
    model_config,
)
from mofa_omni.contract.errors import ContractError, ModelLoadError
from mofa_omni.contract.tasks import ImageRequest, Task
from mofa_omni.models.catalog import Catalog
from mofa_omni.models.detect import detect
from mofa_omni.models.store import ModelStore
from mofa_omni.testing.tiny_imagegen import write_tiny_ernie_image, write_tiny_z_image

PROMPT = "a red apple on a wooden table"


@dataclass(frozen=True)
class Case:
    """One family under test: its registry key, writer and what its checkpoint says."""

    family: str
    write: Callable[..., Path]
    pipeline: str  # model_index.json's _class_name
    title: str  # as the layout check names it
    width_key: str  # the transformer config's width, as model_config carries it
    text_width_key: str  # the transformer config's key for the text encoder's width


CASES = {
    "z-image": Case("z-image-turbo", write_tiny_z_image, "ZImagePipeline", "Z-Image", "dim",
                    "cap_feat_dim"),
    "ernie-image": Case("ernie-image-turbo", write_tiny_ernie_image, "ErnieImagePipeline",
                        "ERNIE-Image", "hidden_size", "text_in_dim"),
}


@pytest.fixture(scope="module", params=list(CASES))
def tiny(request, tmp_path_factory) -> dict[str, Any]:
    """One family's tiny checkpoint (written once), a catalog naming it, and the adapter
    serving it from a model cache of its own."""
    case = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = case.write(root / f"tiny-{request.param}")
    name = f"tiny-{request.param}"
    catalog = root / "catalog.toml"
    catalog.write_text(f'[models.{name}]\nadapter = "mflux_image"\ntasks = ["image_generation"]\n'
                       f'format = "diffusers"\nmemory_mb = 400\n'
                       f'options = {{ family = "{case.family}", max_side = 256, max_steps = 8 }}\n'
                       f'source = {{ path = "{checkpoint}" }}\n')
    adapter = open_model(name, catalog=Catalog.load([catalog]), store=ModelStore(root / "cache"))
    yield {"case": case, "checkpoint": checkpoint, "adapter": adapter, "name": name}
    adapter.unload()


def draw(adapter: ModelAdapter, **changes) -> np.ndarray:
    request = {"prompt": PROMPT, "width": 16, "height": 16, "steps": 2, "seed": 0, **changes}
    return adapter.generate_image(ImageRequest(**request)).pixels


def test_every_family_has_a_description():
    assert set(BY_FAMILY) == set(FAMILIES)


def test_the_checkpoint_has_the_real_repositorys_layout(tiny):
    root, case = tiny["checkpoint"], tiny["case"]
    assert json.loads((root / "model_index.json").read_text())["_class_name"] == case.pipeline
    for name, weights in [("transformer", "diffusion_pytorch_model.safetensors"),
                          ("text_encoder", "model.safetensors"),
                          ("vae", "diffusion_pytorch_model.safetensors")]:
        assert (root / name / weights).is_file() and (root / name / "config.json").is_file()
    assert (root / "tokenizer" / "tokenizer.json").is_file()
    assert (root / "scheduler" / "scheduler_config.json").is_file()
    # The sizes come from the checkpoint; everything else from mflux's registry entry.
    config = model_config(case.family, root)
    assert config.transformer_overrides[case.width_key] == 64
    assert config.transformer_overrides[case.text_width_key] == 32
    assert config.text_encoder_overrides["hidden_size"] == 32
    assert config.model_name in ("Tongyi-MAI/Z-Image-Turbo", "baidu/ERNIE-Image-Turbo")


def test_an_image_of_the_asked_size_comes_back(tiny):
    adapter = tiny["adapter"]
    assert adapter.spec.adapter == "mflux_image" and adapter.tasks == (Task.IMAGE_GENERATION,)
    for width, height in [(32, 16), (16, 48)]:
        pixels = draw(adapter, width=width, height=height)
        assert pixels.dtype == np.uint8 and pixels.shape == (height, width, 3)
        assert pixels.flags.c_contiguous and pixels.std() > 0  # not one flat colour


def test_the_same_seed_draws_the_same_pixels_and_others_differ(tiny):
    adapter = tiny["adapter"]
    first = draw(adapter, seed=7)
    np.testing.assert_array_equal(draw(adapter, seed=7), first)
    assert not np.array_equal(draw(adapter, seed=8), first)
    assert not np.array_equal(draw(adapter, seed=7, prompt="a blue sky over green hills"), first)


@pytest.mark.parametrize(("changes", "message"), [
    ({"width": 24}, "image size 24x16: width and height must be multiples of 16 for tiny-"),
    ({"width": 272}, "image size 272x16 is outside 16-256 pixels a side"),
    ({"steps": 1}, "steps must be 2-8, got 1"),
])
def test_a_request_the_family_cannot_draw_is_refused_naming_the_rule(tiny, changes, message):
    with pytest.raises(ContractError, match=message):
        draw(tiny["adapter"], **changes)


def test_detect_proposes_the_family(tiny):
    found = detect(tiny["checkpoint"])
    assert (found.kind, found.architecture) == ("image", tiny["case"].pipeline)
    assert (found.spec.adapters, found.spec.format) == (("mflux_image",), "diffusers")
    assert found.spec.tasks == (Task.IMAGE_GENERATION,)
    assert found.spec.options == {"family": tiny["case"].family}


def test_a_missing_component_is_named(tiny, tmp_path: Path):
    broken = _linked_copy(tiny["checkpoint"], tmp_path / "broken")
    for weights in (broken / "vae").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelLoadError, match=rf"not a {tiny['case'].title} diffusers checkpoint: "
                                             r"vae/\*.safetensors missing"):
        check_layout(broken, tiny["case"].family)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(ModelLoadError, match=r"vae/\*.safetensors, tokenizer/tokenizer.json"):
        check_layout(broken, tiny["case"].family)


def test_a_config_that_does_not_fit_the_weights_is_named(tiny, tmp_path: Path):
    case = tiny["case"]
    broken = _linked_copy(tiny["checkpoint"], tmp_path / "broken")
    transformer = json.loads((broken / "transformer" / "config.json").read_text())
    _rewrite(broken / "transformer" / "config.json", {**transformer, case.text_width_key: 48})
    with pytest.raises(ModelLoadError, match=f"the transformer's {case.text_width_key} 48 is not "
                                             f"the text encoder's hidden_size 32"):
        model_config(case.family, broken)
    # one layer more than the weights hold: mflux would keep it random (strict=False)
    layers = "n_layers" if case.family.startswith("z-image") else "num_layers"
    _rewrite(broken / "transformer" / "config.json", {**transformer, layers: 2})
    with pytest.raises(ModelLoadError, match=r"the transformer weights do not fit the "
                                             r"transformer mflux builds for this checkpoint's "
                                             r"config: layers.1.\S+ missing"):
        load_pipeline(case.family, broken)


def _linked_copy(source: Path, target: Path) -> Path:
    """A copy of the checkpoint whose files are hard links (the VAE is ~160 MB)."""
    shutil.copytree(source, target, copy_function=os.link)
    return target


def _rewrite(path: Path, value: dict) -> None:
    path.unlink()  # a hard link: writing through it would change the shared checkpoint
    path.write_text(json.dumps(value))
