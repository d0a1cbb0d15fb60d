"""Super-resolution (SD's x4 upscaler form): ``pipe.upscale`` against diffusers' StableDiffusionUpscalePipeline
with the same tiny random weights and seed, diffusers folders and original single files of that layout in and
out, the real x4 layout read from its weights' shapes (meta device), and the ``upscale`` command line."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from autoencoder.model import AutoencoderConfig
from ldm.config import PipelineConfig, SamplingDefaults
from ldm.errors import CheckpointError
from ldm.models.builder import perturb_zero_initialised
from ldm.models.text_encoders import TextEncoderConfig
from ldm.models.unet import UNetConfig
from ldm.pipeline import Txt2ImgPipeline
from ldm.sampling.registry import SAMPLER_INFO
from ldm.sampling.schedule import NoiseSchedule, ScheduleConfig
from ldm.upscaling import UpscaleConfig
from tests.test_single_file import full_size_parts, original_keys

diffusers = pytest.importorskip("diffusers")

PROMPT, NEGATIVE = "a red bicycle on a blue background", "blurry"
NOISE_LEVEL = 75  # not the default 20: the level must reach the augmentation and the label embedding
TOLERANCE = 1e-4  # images in [0, 1]; well under one uint8 level
X4_SCHEDULE = ScheduleConfig(beta_start=0.0001, beta_end=0.02, prediction="v")  # x4-upscaling.yaml


def tiny_upscaler_config(scaling_factor: float = 0.08333) -> PipelineConfig:
    """An x4-upscaler-shaped model a CompVis file can carry without a YAML: 7 U-Net input channels, a noise-level
    label embedding, cross-attention in place of self-attention on the first two levels (the context, 128
    wide, differs from those levels' widths, so the weights show it), 8 heads, 32 norm groups, an f=4 VAE, a
    complete OpenCLIP text tower used at its penultimate layer."""
    return PipelineConfig(
        unet=UNetConfig(in_channels=7, model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1,
                        attention_resolutions=(2, 4), num_heads=8, context_dim=128, use_linear_in_transformer=True,
                        upcast_attention=True, num_classes=1000, disable_self_attentions=(True, True, False)),
        vae=AutoencoderConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                              scaling_factor=scaling_factor),
        text_encoder=TextEncoderConfig(kind="openclip", width=128, layers=2, heads=2, act="gelu", layer="penultimate",
                                       pad="zero", projection_dim=128),
        schedule=X4_SCHEDULE,
        sampling=SamplingDefaults(height=64, width=64, steps=4, guidance_scale=5.0, sampler="ddim"),
        upscale=UpscaleConfig(),
    )


def tiny_upscaler(seed: int = 0, **kwargs) -> Txt2ImgPipeline:
    torch.manual_seed(seed)
    pipe = Txt2ImgPipeline.from_config(tiny_upscaler_config(**kwargs))
    perturb_zero_initialised([pipe.unet, pipe.vae])  # real signal through every path
    return pipe


def small_image(seed: int = 0, size: int = 16) -> Image.Image:
    """A smooth random colour field, the small image to enlarge."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)


def upscale_ours(pipe, sampler: str, *, seed: int = 3, noise_level: int = NOISE_LEVEL) -> torch.Tensor:
    return pipe.upscale(small_image(), PROMPT, NEGATIVE, noise_level=noise_level, steps=4, guidance_scale=5.0,
                        sampler=sampler, seed=seed, output_type="pt")


def upscale_diffusers(folder, sampler: str, *, seed: int = 3, load=None) -> torch.Tensor:
    """diffusers' StableDiffusionUpscalePipeline from ``folder`` (or ``load()``), scheduler class of ``sampler``."""
    theirs = load() if load else diffusers.StableDiffusionUpscalePipeline.from_pretrained(folder, local_files_only=True)
    theirs.scheduler = getattr(diffusers, SAMPLER_INFO[sampler].diffusers_class).from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    return theirs(PROMPT, image=small_image(), negative_prompt=NEGATIVE, noise_level=NOISE_LEVEL, num_inference_steps=4,
                  guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(seed), output_type="pt").images


@pytest.fixture(scope="module")
def x4_folder(tmp_path_factory):
    pipe = tiny_upscaler(seed=3)
    folder = tmp_path_factory.mktemp("x4") / "diffusers"
    pipe.save_pretrained(folder, format="diffusers")
    return pipe, folder


# --------------------------------------------------------------------------------------------
# diffusers' StableDiffusionUpscalePipeline as the oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_ancestral", "dpmpp_2m"])
def test_upscale_equals_diffusers(x4_folder, sampler):
    """Guidance 5, noise level 75, 16x16 -> 64x64: the augmentation noise then the latents' noise from one
    generator, the small image concatenated after the sampler's input scaling, the level as class label."""
    pipe, folder = x4_folder
    ours = upscale_ours(pipe, sampler)
    theirs = upscale_diffusers(folder, sampler)
    assert ours.shape == theirs.shape == (1, 3, 64, 64)
    assert (ours - theirs).abs().max().item() < TOLERANCE
    # The comparison can fail: another level or seed moves the image far beyond the tolerance.
    assert (upscale_ours(pipe, sampler, noise_level=20) - ours).abs().max().item() > 100 * TOLERANCE
    assert (upscale_ours(pipe, sampler, seed=4) - ours).abs().max().item() > 100 * TOLERANCE


def test_diffusers_folder_round_trip(x4_folder):
    import json

    pipe, folder = x4_folder
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionUpscalePipeline" and index["max_noise_level"] == 350
    assert json.loads((folder / "low_res_scheduler" / "scheduler_config.json").read_text())["beta_end"] == 0.02
    loaded = Txt2ImgPipeline.from_pretrained(folder)  # the OpenCLIP tower comes back as diffusers' CLIP one
    for section in ("unet", "vae", "schedule", "upscale"):
        assert getattr(loaded.config, section) == getattr(pipe.config, section), section
    for name in ("unet", "vae"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(loaded, name).state_dict().values(),
                                                     getattr(pipe, name).state_dict().values()))
    assert (upscale_ours(loaded, "euler") - upscale_ours(pipe, "euler")).abs().max().item() < TOLERANCE


def test_vae_with_another_scaling_factor_is_rescaled_for_diffusers(tmp_path, caplog):
    """diffusers' pipeline imposes the VAE scaling factor 0.08333: a VAE with another factor is saved with
    latents rescaled to it (same images in diffusers and back here); a folder saying otherwise is corrected."""
    import json

    pipe = tiny_upscaler(seed=5, scaling_factor=0.5)
    pipe.save_pretrained(tmp_path / "folder", format="diffusers")
    ours = upscale_ours(pipe, "euler")
    assert (upscale_diffusers(tmp_path / "folder", "euler") - ours).abs().max().item() < TOLERANCE
    loaded = Txt2ImgPipeline.from_pretrained(tmp_path / "folder")
    assert loaded.config.vae.scaling_factor == 0.08333
    assert (upscale_ours(loaded, "euler") - ours).abs().max().item() < TOLERANCE

    vae_json = tmp_path / "folder" / "vae" / "config.json"
    vae_json.write_text(json.dumps({**json.loads(vae_json.read_text()), "scaling_factor": 0.18215}))
    assert Txt2ImgPipeline.from_pretrained(tmp_path / "folder").config.vae.scaling_factor == 0.08333
    assert "scaling_factor 0.18215 is replaced by 0.08333" in caplog.text


def test_upscaler_folders_with_a_wrong_unet_are_refused(x4_folder, tmp_path):
    import json
    import shutil

    _, folder = x4_folder
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    unet_json = broken / "unet" / "config.json"
    unet_json.write_text(json.dumps({**json.loads(unet_json.read_text()), "num_class_embeds": None}))
    with pytest.raises(CheckpointError, match="x4-upscaler U-Net maps 4 \\+ 3 channels"):
        Txt2ImgPipeline.from_pretrained(broken)


# --------------------------------------------------------------------------------------------
# original single files (x4-upscaler-ema.safetensors layout)
# --------------------------------------------------------------------------------------------


def low_scale_buffers(config: PipelineConfig) -> dict[str, torch.Tensor]:
    """The ``low_scale_model.*`` buffers CompVis' ImageConcatWithNoiseAugmentation saves (float32)."""
    alphas_cumprod = NoiseSchedule(config.upscale.noise_schedule).alphas_cumprod
    return {"low_scale_model.betas": NoiseSchedule(config.upscale.noise_schedule).betas.float(),
            "low_scale_model.alphas_cumprod": alphas_cumprod.float(),
            "low_scale_model.sqrt_alphas_cumprod": alphas_cumprod.sqrt().float(),
            "low_scale_model.sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt().float()}


@pytest.fixture(scope="module")
def x4_file(x4_folder, tmp_path_factory):
    """The tiny upscaler as an original single file without metadata, as Stability's file is."""
    pipe, _ = x4_folder
    path = tmp_path_factory.mktemp("x4-file") / "x4-upscaler-ema.safetensors"
    save_file({**original_keys(pipe), **low_scale_buffers(pipe.config)}, str(path))
    return pipe, path


def test_single_file_is_recognised_from_its_weights(x4_file):
    """No YAML, no metadata: the label embedding and the 7 input channels make it an x4 upscaler."""
    pipe, path = x4_file
    loaded = Txt2ImgPipeline.from_pretrained(path)
    assert loaded.config.unet == pipe.config.unet and loaded.config.vae == pipe.config.vae
    assert loaded.config.schedule == X4_SCHEDULE and loaded.config.upscale == UpscaleConfig()
    assert loaded.config.text_encoder == pipe.config.text_encoder
    assert torch.equal(upscale_ours(loaded, "ddim"), upscale_ours(pipe, "ddim"))


def test_single_file_writer_round_trip_and_a_wrong_augmentation_schedule_warns(x4_file, tmp_path, caplog):
    from ldm.formats.single_file_write import save_single_file

    pipe, path = x4_file
    save_single_file(pipe, tmp_path / "written.safetensors")
    reread = Txt2ImgPipeline.from_single_file(tmp_path / "written.safetensors")
    assert reread.config == pipe.config
    assert all(torch.equal(a, b) for a, b in zip(reread.state_dict().values(), pipe.state_dict().values()))

    state = load_file(str(path))
    state["low_scale_model.alphas_cumprod"] = state["low_scale_model.alphas_cumprod"] ** 2
    save_file(state, str(tmp_path / "odd.safetensors"))
    Txt2ImgPipeline.from_single_file(tmp_path / "odd.safetensors")
    assert "low_scale_model.*): stored alphas_cumprod differ" in caplog.text


def test_single_file_equals_diffusers_from_single_file(x4_file, tmp_path):
    """diffusers reads the file with the component configs of a local folder (configs only, no weights)."""
    pipe, path = x4_file
    pipe.save_pretrained(tmp_path / "configs-only", format="diffusers")
    for weights in (tmp_path / "configs-only").glob("*/*.safetensors"):
        weights.unlink()
    theirs = upscale_diffusers(None, "ddim", load=lambda: diffusers.StableDiffusionUpscalePipeline.from_single_file(
        str(path), config=str(tmp_path / "configs-only"), local_files_only=True))
    ours = upscale_ours(Txt2ImgPipeline.from_pretrained(path), "ddim")
    assert (ours - theirs).abs().max().item() < TOLERANCE


def test_full_size_x4_layout_is_read_from_its_shapes():
    """Stability's x4-upscaler-ema layout on the meta device (no memory): the U-Net of x4-upscaling.yaml
    (X4_PARAMS), its f=4 VAE (ch 128, ch_mult 1, 2, 4) and OpenCLIP ViT-H are read back from the shapes."""
    from ldm.formats.compvis import config_from_compvis, unet_config_from_compvis
    from ldm.formats.single_file_config import infer_config
    from tests.test_unet import X4_PARAMS

    unet = unet_config_from_compvis({**X4_PARAMS, "upcast_attention": True})  # SD 2 code computes it in fp32
    vae = AutoencoderConfig(base_channels=128, channel_mult=(1, 2, 4), scaling_factor=0.08333)
    expected = PipelineConfig(unet=unet, vae=vae, text_encoder=TextEncoderConfig.sd2(), schedule=X4_SCHEDULE,
                              sampling=SamplingDefaults(height=512, width=512), upscale=UpscaleConfig())
    parts = full_size_parts(expected)
    assert parts["unet"]["label_emb.weight"].shape == (1000, 1024)
    assert parts["unet"]["input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"].shape == (512, 1024)
    assert infer_config(parts) == expected
    assert infer_config(parts, prediction="eps").schedule == replace(X4_SCHEDULE, prediction="eps")
    assert config_from_compvis(x4_upscaling_yaml(), parts, source="x4-upscaling.yaml") == expected


def x4_upscaling_yaml() -> dict:
    """What Stability's configs/stable-diffusion/x4-upscaling.yaml says (the keys a reader uses)."""
    from tests.test_unet import X4_PARAMS

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion", "params": {
        "parameterization": "v", "low_scale_key": "lr", "linear_start": 0.0001, "linear_end": 0.02, "timesteps": 1000,
        "image_size": 128, "channels": 4, "conditioning_key": "hybrid-adm", "scale_factor": 0.08333,
        "low_scale_config": {"target": "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation",
                             "params": {"noise_schedule_config": {"linear_start": 0.0001, "linear_end": 0.02},
                                        "max_noise_level": 350}},
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": X4_PARAMS},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                               "params": {"embed_dim": 4, "ddconfig": ddconfig}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                              "params": {"freeze": True, "layer": "penultimate"}},
    }}}


def test_compvis_yaml_of_an_upscaler_round_trips(x4_file, tmp_path):
    """The YAML this package writes for an upscaler (LatentUpscaleDiffusion, hybrid-adm, low_scale_config) is read
    back, beside the file as AUTOMATIC1111 keeps it, into the same config."""
    from ldm.formats.compvis import save_compvis_yaml

    pipe, path = x4_file
    config = replace(pipe.config, upscale=UpscaleConfig(max_noise_level=300))  # what the weights cannot tell
    save_file(load_file(str(path)), str(tmp_path / "model.safetensors"))
    save_compvis_yaml(config, tmp_path / "model.yaml")
    loaded = Txt2ImgPipeline.from_single_file(tmp_path / "model.safetensors")
    assert replace(loaded.config, sampling=config.sampling) == config


# --------------------------------------------------------------------------------------------
# the upscale command line
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_inputs(x4_folder, tmp_path_factory):
    """The tiny upscaler in this package's folder format, a text-to-image model, and two small PNGs."""
    from tests.conftest import tiny_pipeline

    pipe, _ = x4_folder
    root = tmp_path_factory.mktemp("upscale-cli")
    pipe.save_pretrained(root / "upscaler")
    tiny_pipeline().save_pretrained(root / "txt2img")
    for seed, size in ((0, 16), (1, 12)):
        small_image(seed, size).save(root / f"small-{seed}.png")
    return pipe, root


def run_cli(*argv: str) -> int:
    from ldm.cli.upscale import main

    return main(["--quiet", *map(str, argv)])


def test_upscale_cli_writes_numbered_pngs_with_parameters(cli_inputs, tmp_path, capsys):
    pipe, root = cli_inputs
    images = [root / "small-0.png", root / "small-1.png"]
    assert run_cli(*images, "--model", root / "upscaler", "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                   "--noise-level", NOISE_LEVEL, "--steps", 4, "--guidance-scale", 5, "--sampler", "Euler a",
                   "--seed", 7, "--outdir", tmp_path) == 0
    written = [Path(line) for line in capsys.readouterr().out.split()]
    assert [path.name for path in written] == ["00000-7.png", "00001-8.png"]
    expected = [pipe.upscale(Image.open(path), PROMPT, NEGATIVE, noise_level=NOISE_LEVEL, steps=4, guidance_scale=5.0,
                             sampler="euler_ancestral", seed=seed)[0] for path, seed in zip(images, (7, 8))]
    for path, image, side in zip(written, expected, (64, 48)):
        with Image.open(path) as png:
            assert png.size == (side, side)
            assert np.array_equal(np.asarray(png), np.asarray(image))
            parameters = png.info["parameters"]
    assert parameters.startswith(f"{PROMPT}\nNegative prompt: {NEGATIVE}\nSteps: 4, Sampler: Euler a")
    assert "Seed: 8, Size: 48x48, Model: upscaler, Noise level: 75, Upscale input: 12x12" in parameters


@pytest.mark.parametrize("case, expected", [
    ("not-an-upscaler", "not a super-resolution model"),
    ("odd-size", "the image to upscale is 18x18; its sides must be multiples of 4"),
    ("noise-too-high", "noise_level must be an integer in 0..350, got 351"),
    ("noise-negative", "--noise-level must be >= 0, got -1"),
    ("missing-image", "IMAGE file not found"),
    ("colour-fix-negative", "--colour-fix must be a sigma in 0..64 output pixels, got -1"),
])
def test_upscale_cli_bad_inputs_are_one_line_errors(cli_inputs, tmp_path, capsys, case, expected):
    _, root = cli_inputs
    small_image(2, 18).save(tmp_path / "odd.png")
    model, image, extra = root / "upscaler", root / "small-0.png", []
    if case == "not-an-upscaler":
        model = root / "txt2img"
    elif case == "odd-size":
        image = tmp_path / "odd.png"
    elif case == "missing-image":
        image = tmp_path / "nowhere.png"
    elif case == "colour-fix-negative":
        extra = ["--colour-fix", -1]
    else:
        extra = ["--noise-level", {"noise-too-high": 351, "noise-negative": -1}[case]]
    assert exit_code(image, "--model", model, "--steps", 1, "--outdir", tmp_path / "out", *extra) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("upscale.py: error: ") and expected in error
    assert not (tmp_path / "out").exists()  # nothing written, no folder left behind


def exit_code(*argv) -> int:
    """The command's exit status: usage errors exit from argparse, errors found after loading are returned."""
    try:
        return run_cli(*argv)
    except SystemExit as exit_:
        return exit_.code


def test_colour_fix_takes_coarse_content_from_the_input_and_keeps_detail():
    from ldm.upscaling import colour_fix

    small = torch.full((1, 3, 8, 8), -0.5)  # a flat grey input, [-1, 1]
    detail = 0.1 * (torch.arange(32).view(1, 1, 1, 32) % 2 * 2 - 1).expand(1, 3, 32, 32)  # 1-px stripes
    drifted = 0.8 + detail  # the output drew a brighter flat colour, with detail, [0, 1]
    fixed = colour_fix(drifted, small, 3.0)
    assert torch.equal(colour_fix(drifted, small, 0), drifted)
    assert abs(float(fixed.mean()) - 0.25) < 1e-3  # the input's colour: (-0.5 + 1) / 2
    stripes = fixed - fixed.mean()
    assert float((stripes * detail).sum() / (detail * detail).sum()) > 0.95  # the stripes survive


def test_upscale_colour_fix_is_applied_to_the_decoded_image(x4_folder, tmp_path):
    from ldm.errors import ArgumentError, ConfigError
    from ldm.image_inputs import image_to_tensor
    from ldm.upscaling import colour_fix
    from tests.conftest import tiny_pipeline

    pipe, _ = x4_folder
    plain = upscale_ours(pipe, "ddim")
    fixed = pipe.upscale(small_image(), PROMPT, NEGATIVE, noise_level=NOISE_LEVEL, steps=4, guidance_scale=5.0,
                         sampler="ddim", seed=3, output_type="pt", colour_fix=2.0)
    assert torch.allclose(fixed, colour_fix(plain, image_to_tensor(small_image(), 16, 16), 2.0), atol=1e-6)
    assert (fixed - plain).abs().max() > 1e-2
    with pytest.raises(ArgumentError, match="colour_fix"):
        pipe.upscale(small_image(), PROMPT, colour_fix=float("nan"), steps=1)
    pipe.save_pretrained(tmp_path / "model")  # a model's own default: the upscale section of its config
    loaded = Txt2ImgPipeline.from_pretrained(tmp_path / "model")
    loaded.replace_config_sections({"upscale": {"colour_fix": 2.0}})
    default = loaded.upscale(small_image(), PROMPT, NEGATIVE, noise_level=NOISE_LEVEL, steps=4, guidance_scale=5.0,
                             sampler="ddim", seed=3, output_type="pt")
    assert torch.allclose(default, fixed, atol=1e-5)
    with pytest.raises(ConfigError, match="super-resolution"):
        tiny_pipeline().replace_config_sections({"upscale": {"colour_fix": 2.0}})
    with pytest.raises(ValueError, match="colour_fix"):
        UpscaleConfig(colour_fix=-1.0)
