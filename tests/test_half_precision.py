"""Half precision (bfloat16, float16) on the CPU: no dtype crash, and as accurate as diffusers.

The oracle is diffusers' StableDiffusionPipeline in the same dtype on the same weights. Half
precision rounds differently in every layer (our group norms and SD2 attention run in float32, as
CompVis does; diffusers' group norms run in half), so the images are compared with tolerances
measured once (2-core Zen 5, torch 2.14): ours vs diffusers, bf16 max 0.037 / mean 0.0040, fp16
max 0.0042 / mean 0.00046 (pixel values in [0, 1]); and our half-precision error against our own
float32 image is within 1.5x of diffusers' error against the same float32 image.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import tiny_pipeline

PROMPT, NEGATIVE = "a red bicycle on a blue background", "blurry"
# dtype -> (max, mean) allowed difference to diffusers in the same dtype, about 1.5x the measured one
TOLERANCE = {torch.bfloat16: (0.06, 0.006), torch.float16: (0.0065, 0.0007)}


def generate(pipe, **options) -> torch.Tensor:
    return pipe(PROMPT, NEGATIVE, steps=4, seed=11, sampler="euler", output_type="pt", **options)


def diffusers_images(folder, dtype) -> torch.Tensor:
    import diffusers

    sd = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    sd.scheduler = diffusers.EulerDiscreteScheduler.from_config(sd.scheduler.config)
    sd.set_progress_bar_config(disable=True)
    return sd(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=5.0, height=32, width=32,
              generator=torch.Generator("cpu").manual_seed(11), output_type="pt").images.float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("text_kind", ["clip", "openclip"])  # SD1- and SD2-style (attention upcast)
def test_half_precision_matches_diffusers_in_the_same_dtype(tmp_path, dtype, text_kind):
    reference = tiny_pipeline(seed=3, text_kind=text_kind)
    reference.save_pretrained(tmp_path / "diffusers", format="diffusers")
    full = generate(reference)
    ours = generate(copy.deepcopy(reference).to("cpu", dtype))
    theirs = diffusers_images(tmp_path / "diffusers", dtype)
    assert torch.isfinite(ours).all()
    max_allowed, mean_allowed = TOLERANCE[dtype]
    difference = (ours - theirs).abs()
    assert difference.max() < max_allowed and difference.mean() < mean_allowed
    assert (ours - full).abs().mean() < 1.5 * (theirs - full).abs().mean()


@torch.no_grad()
def unet_output(pipe) -> torch.Tensor:
    """One U-Net call on fixed float32 inputs, in the pipeline's dtype: ``[2, 4, 16, 16]`` float32."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    context = pipe.encode_prompt(["a red bicycle", "a blue square"])
    return pipe.unet_prediction(x, torch.tensor([10, 700]), context)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_lora_loads_into_a_half_precision_pipeline(tmp_path, dtype):
    from ldm.formats import lora

    base = tiny_pipeline()
    trained = copy.deepcopy(base)
    lora.add_lora(trained.unet, 4, 4.0, lora.UNET_TARGETS)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in lora.lora_parameters(trained.unet):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    lora.save_lora(tmp_path / "lora.safetensors", unet=trained.unet)

    full = copy.deepcopy(base)
    lora.load_lora(full, tmp_path / "lora.safetensors", 0.8)
    half = copy.deepcopy(base).to("cpu", dtype)
    lora.load_lora(half, tmp_path / "lora.safetensors", 0.8)
    actual = unet_output(half)
    assert torch.isfinite(actual).all()
    # Loading into the half-precision pipeline equals loading in float32 and casting afterwards
    # (a strong random LoRA makes the network itself sensitive to rounding, so compare like with like).
    expected = unet_output(copy.deepcopy(full).to("cpu", dtype))
    assert (actual - expected).norm() < 1e-2 * expected.norm()
    assert (unet_output(full) - unet_output(base)).norm() > 0.5 * unet_output(base).norm()  # the LoRA acts


def test_a_float16_vae_that_overflows_is_decoded_again_in_float32():
    pipe = tiny_pipeline().to("cpu", torch.float16)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.mul_(1e5)  # outputs beyond float16's 65504 -> inf
        pipe.vae.decoder.conv_out.bias.fill_(6e4)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.isfinite(pipe.vae.decode_latents(z.half())).all()
        expected = (copy.deepcopy(pipe.vae).float().decode_latents(z) / 2 + 0.5).clamp(0, 1)
    images = pipe.decode(z)
    assert torch.isfinite(images).all() and torch.equal(images, expected)


def test_default_model_in_bfloat16_draws_nearly_the_float32_image():
    from ldm import Txt2ImgPipeline

    full = Txt2ImgPipeline.from_pretrained()
    half = Txt2ImgPipeline.from_pretrained(dtype=torch.bfloat16)
    a, b = (p("a red bicycle", seed=0, output_type="pt") for p in (full, half))
    assert torch.isfinite(b).all()
    assert (a - b).abs().mean() < 0.03  # measured 0.0017-0.012 over seeds 0-2


def test_channels_last_changes_the_layout_not_the_accuracy():
    """The fast CPU path (bf16 + channels-last) is as close to float32 as contiguous bf16 is (kernels round
    differently, so the two bf16 images are not equal; their distance to float32 is what matters)."""
    pipe = tiny_pipeline(seed=2)
    options = dict(steps=3, seed=4, sampler="euler", output_type="pt")
    reference = pipe("a red bicycle", **options)
    contiguous = pipe.to(dtype=torch.bfloat16)("a red bicycle", **options)
    pipe.to(memory_format=torch.channels_last)
    conv_weight = next(m.weight for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv_weight.is_contiguous(memory_format=torch.channels_last)
    channels_last = pipe("a red bicycle", **options)
    error_contiguous = (contiguous - reference).abs().mean().item()
    error_channels_last = (channels_last - reference).abs().mean().item()
    assert error_channels_last < 1.5 * error_contiguous, (error_channels_last, error_contiguous)
