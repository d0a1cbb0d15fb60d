"""img2img and inpainting, with diffusers' Img2Img and Inpaint pipelines as the oracles (tiny random models)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.errors import ImageInputError
from ldm.image_inputs import only_masked_region, outpaint_canvas
from ldm.models.builder import perturb_zero_initialised
from ldm.pipeline import Txt2ImgPipeline
from ldm.sampling.registry import SAMPLER_INFO
from tests.conftest import tiny_pipeline, tiny_pipeline_config

PROMPT = "a red bicycle on a blue background"
NEGATIVE = "blurry"
TOLERANCE = 1e-4  # images in [0, 1]; well under one uint8 level


def make_image(seed: int = 0, size: int = 32) -> Image.Image:
    """A smooth random colour field (what a VAE sees in a photo more than in white noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.BICUBIC)


def box_mask(left: int, top: int, right: int, bottom: int, size: int = 32) -> Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask)


def diffusers_pipeline(kind: str, folder, sampler: str):
    import diffusers

    pipeline_class = {"img2img": diffusers.StableDiffusionImg2ImgPipeline,
                      "inpaint": diffusers.StableDiffusionInpaintPipeline}[kind]
    pipe = pipeline_class.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                          requires_safety_checker=False)
    pipe.scheduler = getattr(diffusers, SAMPLER_INFO[sampler].diffusers_class).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_both(pipe: Txt2ImgPipeline, folder, kind: str, sampler: str, seed: int, steps: int, **inputs):
    """The same request to our pipeline and to diffusers' -> (ours, theirs), ``[1, 3, 32, 32]`` in [0, 1]."""
    ours = pipe(PROMPT, NEGATIVE, sampler=sampler, steps=steps, guidance_scale=5.0, seed=seed, output_type="pt",
                paste_back=False, **inputs) if "mask_image" in inputs else \
        pipe(PROMPT, NEGATIVE, sampler=sampler, steps=steps, guidance_scale=5.0, seed=seed, output_type="pt", **inputs)
    theirs = diffusers_pipeline(kind, folder, sampler)(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=5.0, height=32, width=32,
        generator=torch.Generator("cpu").manual_seed(seed), output_type="pt", **inputs).images
    return ours, theirs


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    pipe = tiny_pipeline(seed=3)
    folder = tmp_path_factory.mktemp("img2img") / "diffusers"
    pipe.save_pretrained(folder, format="diffusers")
    return pipe, folder


@pytest.fixture(scope="module")
def inpainting_folder(tmp_path_factory):
    """A tiny SD-inpainting-shaped model: the U-Net reads 9 channels (latents, mask, masked-image latents)."""
    config = tiny_pipeline_config()
    config = replace(config, unet=replace(config.unet, in_channels=9))
    torch.manual_seed(5)
    pipe = Txt2ImgPipeline.from_config(config)
    perturb_zero_initialised([pipe.unet, pipe.vae])
    folder = tmp_path_factory.mktemp("inpainting") / "diffusers"
    pipe.save_pretrained(folder, format="diffusers")
    return pipe, folder


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_ancestral"])
@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_img2img_equals_diffusers(sd_folder, sampler, strength):
    pipe, folder = sd_folder
    ours, theirs = run_both(pipe, folder, "img2img", sampler, seed=7, steps=6, image=make_image(), strength=strength)
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    assert (ours - theirs).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpainting_with_an_ordinary_model_equals_diffusers(sd_folder, sampler, strength):
    pipe, folder = sd_folder
    ours, theirs = run_both(pipe, folder, "inpaint", sampler, seed=4, steps=4, image=make_image(1),
                            mask_image=box_mask(8, 4, 24, 20), strength=strength)
    assert (ours - theirs).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpainting_model_equals_diffusers(inpainting_folder, sampler, strength):
    pipe, folder = inpainting_folder
    assert pipe.is_inpainting_model
    ours, theirs = run_both(pipe, folder, "inpaint", sampler, seed=2, steps=4, image=make_image(2),
                            mask_image=box_mask(0, 10, 20, 32), strength=strength)
    assert (ours - theirs).abs().max().item() < TOLERANCE


def test_inpainting_model_loads_from_its_diffusers_folder(inpainting_folder):
    pipe, folder = inpainting_folder
    loaded = Txt2ImgPipeline.from_pretrained(folder)
    assert loaded.config.unet.in_channels == 9 and loaded.is_inpainting_model
    options = dict(image=make_image(), mask_image=box_mask(4, 4, 12, 12), seed=1, steps=3, sampler="euler",
                   guidance_scale=5.0, output_type="pt")
    assert torch.equal(pipe(PROMPT, **options), loaded(PROMPT, **options))


def test_full_mask_at_strength_one_is_txt2img_from_the_same_noise(sd_folder):
    """Everything repainted from pure noise: the txt2img image from that noise (diffusers' StableDiffusionPipeline
    given it as ``latents``). An ordinary model's inpainting draws the image's posterior sample first, then the noise."""
    import diffusers

    pipe, folder = sd_folder
    inpainted = pipe(PROMPT, NEGATIVE, image=make_image(), mask_image=box_mask(0, 0, 32, 32), strength=1.0, paste_back=False,
                     sampler="euler", steps=4, guidance_scale=5.0, seed=9, output_type="pt")
    generator = torch.Generator("cpu").manual_seed(9)
    latent_shape = (1, 4, 16, 16)
    torch.randn(latent_shape, generator=generator)  # the posterior sample
    noise = torch.randn(latent_shape, generator=generator)
    txt2img = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    txt2img.set_progress_bar_config(disable=True)
    theirs = txt2img(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=5.0, height=32, width=32,
                     latents=noise, output_type="pt").images
    assert (inpainted - theirs).abs().max().item() < TOLERANCE


def test_paste_back_keeps_every_unmasked_pixel_exactly(sd_folder):
    pipe, _ = sd_folder
    image, mask = make_image(3), box_mask(20, 2, 30, 14)
    result = np.asarray(pipe(PROMPT, image=image, mask_image=mask, steps=3, seed=0)[0])
    outside = np.asarray(mask) == 0
    assert np.array_equal(result[outside], np.asarray(image)[outside])
    assert not np.array_equal(result[~outside], np.asarray(image)[~outside])


def test_mask_blur_softens_only_the_composite(sd_folder):
    pipe, _ = sd_folder
    image, mask = make_image(3), box_mask(8, 8, 24, 24)
    sharp = pipe(PROMPT, image=image, mask_image=mask, steps=3, seed=0, output_type="pt")
    soft = pipe(PROMPT, image=image, mask_image=mask, steps=3, seed=0, mask_blur=1.5, output_type="pt")
    unpasted = pipe(PROMPT, image=image, mask_image=mask, steps=3, seed=0, paste_back=False, output_type="pt")
    centre, corner = (slice(None), slice(None), slice(14, 18), slice(14, 18)), (slice(None), slice(None), 0, 0)
    torch.testing.assert_close(soft[centre], unpasted[centre], atol=0.51 / 255, rtol=0)  # inside: generated (uint8)
    torch.testing.assert_close(soft[corner], sharp[corner])  # far outside: the original
    assert not torch.equal(soft, sharp)


def test_bad_inputs_are_one_line_errors(sd_folder, inpainting_folder):
    pipe, _ = sd_folder
    with pytest.raises(ImageInputError, match="strength must be in"):
        pipe(PROMPT, image=make_image(), strength=1.5, steps=3)
    with pytest.raises(ImageInputError, match="leaves no step"):
        pipe(PROMPT, image=make_image(), strength=0.1, steps=3)
    with pytest.raises(ImageInputError, match="mask is empty"):
        pipe(PROMPT, image=make_image(), mask_image=box_mask(0, 0, 0, 0), steps=3)
    with pytest.raises(ImageInputError, match="need an image"):
        pipe(PROMPT, mask_image=box_mask(0, 0, 8, 8), steps=3)
    inpainting, _ = inpainting_folder
    with pytest.raises(ImageInputError, match="needs a mask_image"):
        inpainting(PROMPT, image=make_image(), steps=3)


def test_only_masked_region_grows_by_padding_to_the_aspect_and_stays_inside():
    mask = box_mask(20, 4, 28, 10, size=64)
    assert only_masked_region(mask, 4, 32, 32) == (16, 0, 32, 16)  # 16x14 -> 16x16, shifted down into the image
    assert only_masked_region(mask, 4, 64, 32) == (10, 0, 38, 14)  # 16x14 -> 28x14 for 2:1
    assert only_masked_region(box_mask(0, 0, 64, 64, size=64), 32, 32, 32) == (0, 0, 64, 64)  # clipped


def test_only_masked_generates_the_padded_crop_and_pastes_it_in_place(sd_folder):
    """An off-centre mask: the crop around it is generated at full size and lands exactly where it came from."""
    pipe, _ = sd_folder
    image = make_image(4, size=64)
    mask = box_mask(30, 40, 46, 50, size=64)
    region = only_masked_region(mask, 8, 32, 32)
    assert region == (22, 29, 54, 61)
    options = dict(steps=3, seed=6, height=32, width=32)
    result = np.asarray(pipe(PROMPT, image=image, mask_image=mask, only_masked=True, only_masked_padding=8,
                             **options)[0])
    direct = np.asarray(pipe(PROMPT, image=image.crop(region), mask_image=mask.crop(region), paste_back=False,
                             **options)[0])
    assert result.shape == (64, 64, 3)
    inside = np.asarray(mask) > 0
    assert np.array_equal(result[~inside], np.asarray(image)[~inside])
    inside_crop = inside[region[1]:region[3], region[0]:region[2]]
    assert np.array_equal(result[region[1]:region[3], region[0]:region[2]][inside_crop], direct[inside_crop])


def test_outpaint_canvas_extends_the_chosen_sides_and_masks_the_border():
    image = make_image(5, size=32)
    canvas, mask = outpaint_canvas(image, 16, 0, 0, 5, multiple=8, overlap=4)
    assert canvas.size == (48, 40)  # bottom 5 -> 8 for a multiple of 8
    pixels, repaint = np.asarray(canvas), np.asarray(mask) > 0
    assert np.array_equal(pixels[0:32, 16:48], np.asarray(image))  # the old image, unmoved
    assert repaint[:, :20].all() and repaint[28:, :].all()  # new border plus a 4-pixel overlap
    assert not repaint[:28, 20:].any()
    with pytest.raises(ImageInputError, match="outpaint"):
        outpaint_canvas(image, 0, 0, 0, 0)


def test_outpainting_keeps_the_old_image_and_fills_the_new_border(sd_folder):
    pipe, _ = sd_folder
    image = make_image(6, size=32)
    canvas, mask = outpaint_canvas(image, 0, 16, 0, 0, overlap=4)
    result = np.asarray(pipe(PROMPT, image=canvas, mask_image=mask, steps=3, seed=1)[0])
    assert result.shape == (32, 48, 3)
    assert np.array_equal(result[:, :28], np.asarray(image)[:, :28])
    assert not np.array_equal(result[:, 32:], np.asarray(canvas)[:, 32:])


def test_inpainting_model_round_trips_through_single_files(tmp_path):
    """9 input channels are read from the weights alone (no metadata, as files come in the wild), and the
    CompVis YAML we write for it (LatentInpaintDiffusion, "hybrid") loads back to the same images."""
    import safetensors.torch

    from ldm.config_io import write_yaml
    from ldm.formats.compvis import compvis_yaml
    from ldm.formats.single_file_write import original_state_dict
    from tests.test_single_file import oracle_config

    config = oracle_config("clip", "eps")
    torch.manual_seed(8)
    pipe = Txt2ImgPipeline.from_config(replace(config, unet=replace(config.unet, in_channels=9)))
    perturb_zero_initialised([pipe.unet, pipe.vae])
    state, _ = original_state_dict(pipe.config, {n: getattr(pipe, n).state_dict() for n in ("unet", "vae",
                                                                                            "text_encoder")})
    safetensors.torch.save_file(state, str(tmp_path / "bare.safetensors"))
    inferred = Txt2ImgPipeline.from_single_file(tmp_path / "bare.safetensors")
    assert inferred.config.unet.in_channels == 9 and inferred.is_inpainting_model
    yaml_path = tmp_path / "bare.yaml"
    write_yaml(compvis_yaml(pipe.config), yaml_path)
    model = compvis_yaml(pipe.config)["model"]
    assert model["target"].endswith("LatentInpaintDiffusion") and model["params"]["conditioning_key"] == "hybrid"
    from_yaml = Txt2ImgPipeline.from_single_file(tmp_path / "bare.safetensors", yaml_path)
    options = dict(image=make_image(), mask_image=box_mask(4, 4, 20, 12), seed=1, steps=3, sampler="euler",
                   guidance_scale=5.0, output_type="pt")
    assert torch.equal(from_yaml(PROMPT, **options), pipe(PROMPT, **options))


def test_inpainting_folder_is_marked_for_diffusers_and_other_pipelines_are_refused(tmp_path, inpainting_folder,
                                                                                    sd_folder):
    import json
    import shutil

    from ldm.errors import CheckpointError

    _, folder = inpainting_folder
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    _, plain = sd_folder
    depth = tmp_path / "depth"
    shutil.copytree(plain, depth)
    index = json.loads((depth / "model_index.json").read_text())
    (depth / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionDepth2ImgPipeline"}))
    with pytest.raises(CheckpointError, match="StableDiffusionDepth2ImgPipeline folder"):
        Txt2ImgPipeline.from_pretrained(depth)
    unet_config = json.loads((plain / "unet" / "config.json").read_text())
    upscaler = tmp_path / "odd-unet"
    shutil.copytree(plain, upscaler)
    (upscaler / "unet" / "config.json").write_text(json.dumps({**unet_config, "in_channels": 7}))
    with pytest.raises(CheckpointError, match="x4 upscaler"):
        Txt2ImgPipeline.from_pretrained(upscaler)


def test_hires_fix_with_an_image_upscaler_is_txt2img_then_img2img_of_the_resized_image(sd_folder):
    pipe, _ = sd_folder
    options = dict(sampler="euler_ancestral", steps=4, seed=3, guidance_scale=5.0)
    hires = pipe(PROMPT, hires_scale=2, hires_upscaler="lanczos", hires_strength=0.5, **options)[0]
    base = pipe(PROMPT, **options)[0]
    by_hand = pipe(PROMPT, image=base.resize((64, 64), Image.LANCZOS), strength=0.5, **options)[0]
    assert hires.size == (64, 64)
    assert np.array_equal(np.asarray(hires), np.asarray(by_hand))


def test_hires_fix_in_latent_space_counts_both_passes(sd_folder):
    pipe, _ = sd_folder
    seen = []
    images = pipe(PROMPT, hires_scale=1.5, hires_steps=6, hires_strength=0.5, steps=4, seed=1,
                  progress=lambda done, total: seen.append((done, total)), output_type="pt")
    assert images.shape == (1, 3, 48, 48)
    assert seen[-1] == (4 + 3, 4 + 3) and [d for d, _ in seen] == list(range(1, 8))
    with pytest.raises(ImageInputError, match="hires_scale must be > 1"):
        pipe(PROMPT, hires_scale=1.0, steps=2)
    with pytest.raises(ImageInputError, match="for text-to-image"):
        pipe(PROMPT, image=make_image(), hires_scale=2.0, steps=2)
