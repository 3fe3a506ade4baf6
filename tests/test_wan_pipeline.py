"""Wan 2.2 TI2V through mlx-gen without torch (mofa_omni.adapters.wan_pipeline): a tiny random
checkpoint in the real diffusers layout (mofa_omni.testing.tiny_wan), loaded by mlx-gen's own
loader, the prompt encoded by the project's MLX UMT5.

Its weights are random, so its videos are noise: these tests check sizes, types, determinism,
that the prompt and the first picture reach the model, progress, cancelling, the limits and
the errors - not what is drawn."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mofa_omni.adapters.wan_pipeline import (
    TorchFreeWan,
    check_layout,
    check_size,
    load_pipeline,
    model_config,
)
from mofa_omni.contract.errors import ContractError, ModelLoadError
from mofa_omni.testing.tiny_wan import write_tiny_wan

PROMPT = "a cat walks across a sunny garden"
SIZE = {"width": 64, "height": 64, "num_frames": 5}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_wan(tmp_path_factory.mktemp("wan") / "tiny-wan")


@pytest.fixture(scope="module")
def pipeline(checkpoint: Path) -> TorchFreeWan:
    return load_pipeline(checkpoint)


def generate(pipeline: TorchFreeWan, **changes) -> np.ndarray:
    """The clip as uint8 (frames, height, width, 3), read batch by batch as a server does."""
    request = {"seed": 7, "prompt": PROMPT, "num_inference_steps": 2, "fps": 8, **SIZE,
               **changes}
    video = pipeline.generate_video(**request)
    frames = [np.asarray(picture.convert("RGB"), dtype=np.uint8)
              for batch in video._iter_frame_batches() for picture in batch]
    return np.stack(frames)


def test_the_checkpoint_has_the_real_layout(checkpoint: Path):
    for path in ["model_index.json", "scheduler/scheduler_config.json",
                 "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                 "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/config.json", "text_encoder/model.safetensors",
                 "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]:
        assert (checkpoint / path).is_file(), path
    tensors = mx.load(str(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert tensors["blocks.0.ffn.net.0.proj.weight"].shape == (96, 48)  # diffusers' names
    assert tensors["patch_embedding.weight"].shape == (48, 48, 1, 2, 2)  # and torch layout


def test_the_same_seed_writes_the_same_checkpoint(checkpoint: Path, tmp_path: Path):
    again = write_tiny_wan(tmp_path / "again")
    other = write_tiny_wan(tmp_path / "other", seed=1)
    for path in ["transformer/diffusion_pytorch_model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "tokenizer/tokenizer.json"]:
        assert (again / path).read_bytes() == (checkpoint / path).read_bytes(), path
        if path.endswith(".safetensors"):
            assert (other / path).read_bytes() != (checkpoint / path).read_bytes(), path


def test_the_model_config_comes_from_the_checkpoint(checkpoint: Path):
    config = model_config(checkpoint)
    overrides = config.transformer_overrides
    assert (overrides["num_layers"], overrides["ffn_dim"], overrides["text_dim"]) == (2, 96, 32)
    assert overrides["vae_config"]["base_dim"] == 16
    assert overrides["vae_config"]["temporal_downsample"] == [False, True, True]
    assert overrides["expand_timesteps"] and not overrides["has_transformer_2"]  # TI2V-5B's
    assert config.text_encoder_overrides["d_model"] == 32


def test_frames_of_the_asked_size_and_count(pipeline: TorchFreeWan):
    clip = generate(pipeline)
    assert clip.shape == (5, 64, 64, 3) and clip.dtype == np.uint8
    assert clip.std() > 1  # not one flat colour
    assert "torch" not in sys.modules


def test_the_same_seed_gives_the_same_frames_and_the_prompt_matters(pipeline: TorchFreeWan):
    first = generate(pipeline)
    assert np.array_equal(first, generate(pipeline))
    assert not np.array_equal(first, generate(pipeline, prompt="snow falls over a quiet village"))
    assert not np.array_equal(first, generate(pipeline, seed=8))


def test_image_to_video_from_a_first_picture(pipeline: TorchFreeWan, tmp_path: Path):
    rng = np.random.default_rng(0)
    for name, shape in [("wide.png", (48, 96, 3)), ("dark.png", (64, 64, 3))]:
        pixels = rng.integers(0, 256, shape) if name == "wide.png" else np.zeros(shape)
        Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / name)
    wide = generate(pipeline, image_path=tmp_path / "wide.png", canvas_policy="exact-resize")
    assert wide.shape == (5, 64, 64, 3) and wide.dtype == np.uint8
    # the canvas asked, also when the policy is left to the pipeline
    assert np.array_equal(wide, generate(pipeline, image_path=tmp_path / "wide.png"))
    dark = generate(pipeline, image_path=tmp_path / "dark.png", canvas_policy="exact-resize")
    assert not np.array_equal(wide, dark)  # the picture reaches the model
    assert not np.array_equal(wide, generate(pipeline))


def test_progress_and_cancelling(pipeline: TorchFreeWan):
    events = []
    before = generate(pipeline, progress_callback=events.append)
    phases = [event.phase for event in events]
    assert phases[0] == "start" and "decode" in phases
    assert [(event.step, event.total_steps) for event in events
            if event.phase == "denoise"] == [(1, 2), (2, 2)]

    class Cancelled(Exception):
        pass

    seen = []

    def cancel(event):
        seen.append(event.phase)
        if event.phase == "denoise":
            raise Cancelled

    with pytest.raises(Cancelled):
        generate(pipeline, progress_callback=cancel)
    assert seen == ["start", "denoise"]
    assert np.array_equal(generate(pipeline), before)  # still usable, and unchanged


def test_sizes_it_would_round_are_refused(pipeline: TorchFreeWan):
    with pytest.raises(ContractError, match="multiples of 32 pixels"):
        check_size(70, 64, 5)
    with pytest.raises(ContractError, match="4k\\+1"):
        check_size(64, 64, 6)
    check_size(64, 96, 9)
    with pytest.raises(ContractError, match="multiples of 32 pixels"):
        generate(pipeline, width=70)
    with pytest.raises(ContractError, match="4k\\+1"):
        generate(pipeline, num_frames=6)
    with pytest.raises(ContractError, match="steps"):
        generate(pipeline, num_inference_steps=1)


def test_a_folder_lacking_a_part_is_refused(checkpoint: Path, tmp_path: Path):
    broken = shutil.copytree(checkpoint, tmp_path / "no-vae")
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelLoadError, match="vae/config.json"):
        check_layout(broken)
    with pytest.raises(ModelLoadError, match="vae/config.json"):
        load_pipeline(broken)


@pytest.mark.parametrize(("part", "name", "change"), [
    ("transformer", "blocks.1.attn2.to_k.weight", "missing"),
    ("transformer", "blocks.1.attn2.to_k.weight", "shape"),
    ("vae", "decoder.conv_out.weight", "missing"),
])
def test_a_missing_or_misshaped_weight_is_refused(checkpoint: Path, tmp_path: Path, part, name,
                                                  change):
    """mlx-gen would keep the random initial value of a tensor the files lack."""
    broken = shutil.copytree(checkpoint, tmp_path / "broken")
    path = broken / part / "diffusion_pytorch_model.safetensors"
    tensors = mx.load(str(path))
    if change == "missing":
        del tensors[name]
    else:
        tensors[name] = mx.zeros((48, 32), dtype=mx.bfloat16)
    mx.save_safetensors(str(path), tensors, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=f"{change if change == 'missing' else 'wrong shape'}"
                                             f".*{name.replace('.', '[.]')}"):
        load_pipeline(broken)
