"""SDXL inpainting (a 9-channel SDXL U-Net: latents, mask, masked-image latents) through the pipeline's image
modes, against diffusers' ``StableDiffusionXLInpaintPipeline`` with the same random weights; its diffusers
folder and its original single file (9 input channels read from the weights) in and out."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ldm.errors import ImageInputError
from ldm.models.builder import perturb_zero_initialised
from ldm.pipeline import Txt2ImgPipeline
from tests.test_image_conditioning import box_mask, make_image
from tests.test_sdxl import NEGATIVE, PROMPT, inferable_sdxl_config, tiny_sdxl_config

diffusers = pytest.importorskip("diffusers")


def inpainting(config):
    """``config`` with a U-Net that reads 2 * 4 + 1 = 9 channels."""
    return dataclasses.replace(config, unet=dataclasses.replace(config.unet, in_channels=9))


def seeded_pipeline(config, seed: int) -> Txt2ImgPipeline:
    torch.manual_seed(seed)
    pipe = Txt2ImgPipeline.from_config(config)
    perturb_zero_initialised([pipe.unet, pipe.vae])
    return pipe


@pytest.fixture(scope="module")
def xl_inpainting_folder(tmp_path_factory):
    pipe = seeded_pipeline(inpainting(tiny_sdxl_config()), seed=5)
    folder = tmp_path_factory.mktemp("xl-inpaint") / "diffusers"
    pipe.save_pretrained(folder, format="diffusers")
    return pipe, folder


def diffusers_xl_inpaint(source, sampler: str = "euler", **single_file):
    """diffusers' SDXL inpainting pipeline from a folder (or a single file with ``config=folder``)."""
    from ldm.sampling.registry import SAMPLER_INFO

    cls = diffusers.StableDiffusionXLInpaintPipeline
    load = cls.from_single_file if single_file else cls.from_pretrained
    xl = load(source, local_files_only=True, add_watermarker=False, **single_file)
    xl.scheduler = getattr(diffusers, SAMPLER_INFO[sampler].diffusers_class).from_config(xl.scheduler.config)
    xl.set_progress_bar_config(disable=True)
    return xl


INPUTS = dict(image=make_image(2), mask_image=box_mask(0, 10, 20, 32))


def ours_inpainted(pipe, sampler: str, strength: float, seed: int) -> torch.Tensor:
    """Our inpainting of the test image, ``[1, 3, 32, 32]`` in [0, 1], not pasted back (diffusers does not)."""
    return pipe(PROMPT, NEGATIVE, sampler=sampler, steps=4, guidance_scale=5.0, seed=seed, output_type="pt",
                paste_back=False, strength=strength, **INPUTS)


def diffusers_inpainted(xl, strength: float, seed: int) -> torch.Tensor:
    """The same request to diffusers' pipeline ``xl``."""
    return xl(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=5.0, height=32, width=32,
              generator=torch.Generator().manual_seed(seed), output_type="pt", strength=strength, **INPUTS).images


@pytest.mark.parametrize("sampler, strength", [("euler", 1.0), ("euler", 0.75), ("dpmpp_2m", 1.0)])
def test_sdxl_inpainting_matches_diffusers(xl_inpainting_folder, sampler, strength):
    pipe, folder = xl_inpainting_folder
    assert pipe.is_inpainting_model
    ours = ours_inpainted(pipe, sampler, strength, seed=2)
    theirs = diffusers_inpainted(diffusers_xl_inpaint(folder, sampler), strength, seed=2)
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_sdxl_inpainting_folder_round_trip(xl_inpainting_folder, tmp_path):
    pipe, folder = xl_inpainting_folder
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInpaintPipeline" and "requires_aesthetics_score" not in index
    options = dict(image=make_image(), mask_image=box_mask(4, 4, 20, 12), seed=1, steps=3, sampler="euler",
                   guidance_scale=5.0, output_type="pt")
    expected = pipe(PROMPT, NEGATIVE, **options)
    loaded = Txt2ImgPipeline.from_pretrained(folder)
    assert loaded.config.unet == pipe.config.unet and loaded.is_inpainting_model
    assert torch.equal(loaded(PROMPT, NEGATIVE, **options), expected)
    diffusers_xl_inpaint(folder).save_pretrained(tmp_path / "by-diffusers")  # the folder as diffusers writes it
    assert torch.equal(Txt2ImgPipeline.from_pretrained(tmp_path / "by-diffusers")(PROMPT, NEGATIVE, **options), expected)
    with pytest.raises(ImageInputError, match="needs a mask_image"):
        loaded(PROMPT, image=make_image(), steps=2)


def test_sdxl_inpainting_single_file_is_read_from_its_weights(tmp_path):
    """9 input channels read from a bare original file; diffusers' own from_single_file (configs from our
    folder) draws the same image from that file."""
    from safetensors.torch import load_file, save_file

    from ldm.formats.single_file_write import save_single_file

    config = inpainting(inferable_sdxl_config())
    pipe = seeded_pipeline(config, seed=6)
    save_single_file(pipe, tmp_path / "ours.safetensors")
    weights = load_file(str(tmp_path / "ours.safetensors"))
    assert weights["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9
    save_file(weights, str(tmp_path / "bare.safetensors"))  # no stored config
    loaded = Txt2ImgPipeline.from_single_file(tmp_path / "bare.safetensors")
    assert loaded.config == config and loaded.is_inpainting_model
    pipe.save_pretrained(tmp_path / "configs", format="diffusers")
    xl = diffusers_xl_inpaint(tmp_path / "bare.safetensors", config=str(tmp_path / "configs"))
    ours = ours_inpainted(loaded, "euler", 1.0, seed=4)
    assert (ours - diffusers_inpainted(xl, 1.0, seed=4)).abs().max().item() < 1e-4
    assert torch.equal(ours, ours_inpainted(pipe, "euler", 1.0, seed=4))
