"""A call's image mode, from its arguments: img2img, inpainting, "only masked", the hires fix, and
super-resolution inputs. Each function checks its arguments (one-line
:class:`~ldm.errors.ImageInputError`) and turns them into what the sampling core takes: an
:class:`~ldm.image_inputs.ImageCondition` or a second pass's sampling options; :func:`paste_back_results`
composites the results over the input afterwards.

The pixel work itself (tensors, masks, crops, upscalers) is in :mod:`ldm.image_inputs`; where sampling
starts from these conditions is in :mod:`ldm.starting_points`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
from PIL import Image

from ldm.errors import ArgumentError, ImageInputError
from ldm.image_inputs import (HIRES_UPSCALERS, Box, ImageCondition, blur_mask, check_mask, image_to_tensor,
                              mask_at_size, mask_to_tensor, only_masked_region, paste_into, steps_to_skip, to_pil,
                              upscale_images, upscale_latents)
from ldm.sampling_options import SamplingOptions, validate_sampling_options


def image_condition(image: Image.Image | None, mask_image: Image.Image | None, strength: float | None,
                    options: SamplingOptions, *, inpainting_model: bool) -> ImageCondition | None:
    """The img2img / inpainting inputs at the generation size (``None`` for txt2img); ``strength`` defaults
    to 0.75 (img2img) or 1.0 (inpainting). An inpainting model (``inpainting_model``) needs a mask."""
    if image is None:
        if mask_image is not None or strength is not None:
            raise ImageInputError("mask_image and strength need an image")
        return None
    strength = (1.0 if mask_image is not None else 0.75) if strength is None else strength
    steps_to_skip(options.steps, strength)  # validates strength
    if inpainting_model and mask_image is None:
        raise ImageInputError("this is an inpainting model: it needs a mask_image")
    tensor = image_to_tensor(image, options.width, options.height)
    if mask_image is None:
        return ImageCondition(tensor, strength)
    check_mask(mask_image, image)
    return ImageCondition(tensor, strength, mask_to_tensor(mask_image, options.width, options.height))


def only_masked_crop(image: Image.Image | None, mask_image: Image.Image | None, padding: int,
                     options: SamplingOptions) -> tuple[Image.Image, Box]:
    """"Only masked": the mask at the image's size and the box to work on (see :func:`only_masked_region`)."""
    if image is None or mask_image is None:
        raise ImageInputError("only_masked needs an image and a mask_image")
    check_mask(mask_image, image)
    mask_image = mask_at_size(mask_image, image.size)
    return mask_image, only_masked_region(mask_image, padding, options.width, options.height)


def paste_back_results(images: torch.Tensor, image: Image.Image, mask_image: Image.Image, mask_blur: float,
               region: Box | None) -> list[Image.Image]:
    """Generated ``images [B, 3, H, W]`` composited over ``image`` with the blurred mask, in uint8 so that
    pixels outside the mask are the input's exactly; ``region``: where an only-masked crop goes."""
    soft_mask = blur_mask(mask_at_size(mask_image, image.size), mask_blur)
    return [paste_into(image, generated, soft_mask, region) for generated in to_pil(images)]


def hires_options(scale: float | None, strength: float, upscaler: str, steps: int | None, options: SamplingOptions,
                  condition: ImageCondition | None, *, downsample_factor: int) -> SamplingOptions | None:
    """The hires fix's second-pass sampling options (size scaled, rounded down to the VAE's factor), or
    ``None`` without ``scale``."""
    if scale is None:
        return None
    if condition is not None:
        raise ImageInputError("the hires fix is for text-to-image; img2img a larger image instead")
    if scale <= 1:
        raise ImageInputError(f"hires_scale must be > 1, got {scale:g}")
    if upscaler not in HIRES_UPSCALERS:
        raise ImageInputError(f"hires_upscaler must be one of {', '.join(HIRES_UPSCALERS)}, got {upscaler!r}")
    multiple = max(8, downsample_factor)
    hires = replace(options, height=int(options.height * scale) // multiple * multiple,
                    width=int(options.width * scale) // multiple * multiple, steps=steps or options.steps)
    steps_to_skip(hires.steps, strength)  # validates strength
    validate_sampling_options(hires, downsample_factor)
    return hires


def hires_condition(z: torch.Tensor, hires: SamplingOptions, upscaler: str, strength: float, *,
                    decode: Callable[[torch.Tensor], torch.Tensor], downsample_factor: int) -> ImageCondition:
    """First-pass latents ``z [B, C, h, w]`` -> the second pass's img2img start: the latents resized
    (``"latent"``), or the images ``decode(z) [B, 3, H, W]`` in [0, 1] resized (``"lanczos"``)."""
    if upscaler == "latent":
        latents = upscale_latents(z, hires.height // downsample_factor, hires.width // downsample_factor)
        return ImageCondition(None, strength, latents=latents)
    return ImageCondition(upscale_images(decode(z), hires.height, hires.width), strength)


def check_low_res_sizes(images: list[Image.Image], output_type: str, factor: int) -> None:
    """Super-resolution inputs: every image's sides are multiples of ``factor`` (the U-Net's downsampling;
    checked before any sampling); one tensor output needs one size."""
    for image in images:
        width, height = image.size
        if height % factor or width % factor:
            raise ImageInputError(f"the image to upscale is {width}x{height}; its sides must be multiples "
                                  f"of {factor}")
    if output_type == "pt" and len({image.size for image in images}) > 1:
        raise ArgumentError("output_type='pt' needs images of one size (PIL output takes any sizes)")
