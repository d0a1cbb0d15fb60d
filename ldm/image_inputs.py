"""Images given to the pipeline: img2img's starting image, inpainting's mask, and what is done with them.

Everything here is pixel-space bookkeeping around the sampling core, done the way diffusers'
``VaeImageProcessor`` does it (so results equal diffusers' img2img and inpainting pipelines):

- an image becomes ``[1, 3, H, W]`` in ``[-1, 1]``, resized (Lanczos) when its size differs from
  the requested one (:func:`to_pil` / :func:`pil_to_tensor` convert the pipeline's outputs, in ``[0, 1]``);
- a mask becomes ``[1, 1, H, W]`` with values 0 (keep) and 1 (repaint): grey levels >= 0.5 count
  as repaint (white = repaint, as in diffusers and AUTOMATIC1111);
- ``strength`` selects where on the sampling chain to start (SDEdit, Meng et al. 2021): with
  ``steps`` steps, the last ``int(steps * strength)`` of them are run.

AUTOMATIC1111's extras live here too: mask blur (a soft edge for the final composite), "only
masked" (work on a padded crop around the mask at full resolution, paste it back) and
outpainting (extend the canvas, the new border becomes the mask).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from ldm.errors import ImageInputError

logger = logging.getLogger(__name__)

REPAINT_LEVEL = 128  # mask grey levels at or above this repaint (diffusers binarises at 0.5 of white)


# ---------------------------------------------------------------------------------------- conversion


def default_size(image: Image.Image, multiple: int) -> tuple[int, int]:
    """(width, height) of ``image`` rounded down to a multiple of ``multiple`` (the VAE's factor)."""
    width, height = (side - side % multiple for side in image.size)
    if width == 0 or height == 0:
        raise ImageInputError(f"the image ({image.size[0]}x{image.size[1]}) is smaller than {multiple} pixels")
    return width, height


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL image -> ``[1, 3, height, width]`` float32 in [-1, 1] (Lanczos-resized if its size differs)."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return pixels.permute(2, 0, 1)[None] * 2 - 1


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> ``[3, H, W]`` float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` floats in [0, 1] -> list of 8-bit RGB PIL images (round to nearest)."""
    array = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def mask_to_tensor(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL mask -> ``[1, 1, height, width]`` of 0 (keep) / 1 (repaint); grey >= 0.5 (128/255) repaints."""
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), resample=Image.LANCZOS)
    return torch.from_numpy(repaint_pixels(mask)).float()[None, None]


def repaint_pixels(mask: Image.Image) -> np.ndarray:
    """``[H, W]`` bool: where ``mask`` asks for repainting, grey >= :data:`REPAINT_LEVEL` (0.5 of white)."""
    return np.asarray(mask.convert("L")) >= REPAINT_LEVEL


def latent_mask(mask: torch.Tensor, downsample_factor: int) -> torch.Tensor:
    """Pixel mask ``[1, 1, H, W]`` -> latent mask ``[1, 1, H/f, W/f]`` (nearest, as diffusers)."""
    height, width = mask.shape[-2:]
    return F.interpolate(mask, size=(height // downsample_factor, width // downsample_factor))


def steps_to_skip(steps: int, strength: float) -> int:
    """How many of ``steps`` to skip for img2img ``strength`` (diffusers' ``get_timesteps``)."""
    if not 0 < strength <= 1:
        raise ImageInputError(f"strength must be in (0, 1], got {strength:g}")
    run = min(int(steps * strength), steps)
    if run < 1:
        raise ImageInputError(f"strength {strength:g} with {steps} steps leaves no step to run; "
                              "raise --steps or --strength")
    return steps - run


# ---------------------------------------------------------------------------------------- conditions


@dataclass
class ImageCondition:
    """What the sampling core needs from an img2img or inpainting request.

    Attributes:
        image: ``[1 or B, 3, H, W]`` in [-1, 1], the starting image (row ``i`` for batch row ``i``,
            or one image for all rows).
        strength: fraction of the chain to run, in (0, 1]; 1 with a mask starts from pure noise.
        mask: ``[1, 1, H, W]`` 0/1 (1 = repaint) or ``None`` (img2img).
        latents: ``[B, C, h, w]`` scaled latents to start from instead of encoding ``image``
            (the hires fix's latent upscaler); no posterior sample is drawn then.
    """

    image: torch.Tensor | None
    strength: float
    mask: torch.Tensor | None = None
    latents: torch.Tensor | None = None

    @property
    def masked_image(self) -> torch.Tensor:
        """The image with the region to repaint set to 0 (grey): an inpainting U-Net's extra input."""
        return self.image * (self.mask < 0.5)

    @property
    def starts_from_noise(self) -> bool:
        """Inpainting at strength 1 starts from pure noise, as txt2img does (diffusers' ``is_strength_max``)."""
        return self.mask is not None and self.strength == 1.0


def blur_mask(mask: Image.Image, radius: float) -> Image.Image:
    """The mask binarised as sampling sees it (grey >= 128 -> 255), then Gaussian-blurred by ``radius``
    pixels (AUTOMATIC1111's "Mask blur"; 0 leaves it sharp)."""
    sharp = Image.fromarray(repaint_pixels(mask).astype(np.uint8) * 255)
    return sharp.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else sharp


def mask_at_size(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The mask in grey levels (``"L"``), resized to ``size`` when it differs (:func:`check_mask` warns of that)."""
    mask = mask.convert("L")
    return mask if mask.size == size else mask.resize(size)


def check_mask(mask: Image.Image, image: Image.Image) -> None:
    """Refuse an empty mask; warn when the mask's size differs from the image's (it is resized)."""
    if mask.size != image.size:
        logger.warning("the mask is %dx%d but the image is %dx%d: resizing the mask to the image",
                       *mask.size, *image.size)
    if not repaint_pixels(mask).any():
        raise ImageInputError("the mask is empty: nothing is white (white = repaint)")


# ---------------------------------------------------------------------------------------- AUTOMATIC1111 extras

HIRES_UPSCALERS = ("latent", "lanczos")


def upscale_latents(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The hires fix's "Latent" upscaler: bilinear resize of ``[B, C, h, w]`` to ``[B, C, height, width]``
    (AUTOMATIC1111's default latent mode)."""
    return F.interpolate(latents, size=(height, width), mode="bilinear", antialias=False)


def upscale_images(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The hires fix's image upscaler: ``[B, 3, h, w]`` in [0, 1] -> Lanczos-resized ``[B, 3, height, width]``
    in [-1, 1] (via uint8, as an image file would carry it)."""
    return torch.cat([image_to_tensor(image, width, height) for image in to_pil(images)])

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels, right/bottom exclusive


def mask_box(mask: Image.Image) -> Box:
    """The smallest box holding every repaint pixel (grey >= 128) of ``mask``."""
    rows, cols = np.nonzero(repaint_pixels(mask))
    if rows.size == 0:
        raise ImageInputError("the mask is empty: nothing is white (white = repaint)")
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def only_masked_region(mask: Image.Image, padding: int, width: int, height: int) -> Box:
    """AUTOMATIC1111's "Inpaint area: only masked": the mask's box grown by ``padding`` pixels on each
    side, then widened or heightened about its centre to the ``width : height`` aspect of the
    generation size, kept inside the image (shifted, and clipped only when the image is too small)."""
    left, top, right, bottom = mask_box(mask)
    left, top, right, bottom = left - padding, top - padding, right + padding, bottom + padding
    box_width, box_height = right - left, bottom - top
    if box_width * height > box_height * width:  # too wide for the aspect: grow the height
        box_height = math.ceil(box_width * height / width)
    else:
        box_width = math.ceil(box_height * width / height)
    centre_x, centre_y = (left + right) / 2, (top + bottom) / 2
    return _fit_box(centre_x, centre_y, box_width, box_height, mask.size)


def _fit_box(centre_x: float, centre_y: float, box_width: int, box_height: int, size: tuple[int, int]) -> Box:
    left, right = _fit_span(centre_x, box_width, size[0])
    top, bottom = _fit_span(centre_y, box_height, size[1])
    return left, top, right, bottom


def _fit_span(centre: float, length: int, limit: int) -> tuple[int, int]:
    """A span of ``length`` about ``centre``, shifted inside ``[0, limit)`` (clipped if longer than the limit)."""
    length = min(length, limit)
    start = min(max(0, round(centre - length / 2)), limit - length)
    return start, start + length


def paste_into(original: Image.Image, generated: Image.Image, soft_mask: Image.Image, box: Box | None = None
               ) -> Image.Image:
    """``generated`` (resized into ``box``, default the whole image) composited over ``original`` with ``soft_mask``.

    Where ``soft_mask`` is 0 the result's pixels are the original's exactly.
    """
    canvas = original.convert("RGB").copy()
    box = box or (0, 0, *original.size)
    region = generated.convert("RGB")
    size = (box[2] - box[0], box[3] - box[1])
    canvas.paste(region if region.size == size else region.resize(size, Image.LANCZOS), box[:2])
    return Image.composite(canvas, original.convert("RGB"), soft_mask.convert("L"))


def outpaint_canvas(image: Image.Image, left: int, right: int, top: int, bottom: int, *, multiple: int = 8,
                    overlap: int = 8) -> tuple[Image.Image, Image.Image]:
    """Extend ``image`` by the given pixels on each side -> (canvas, mask) for inpainting the new border.

    The new border is filled by repeating the edge pixels (a neutral start for the VAE); the mask
    covers it plus ``overlap`` pixels of the old image on each extended side, so the seam is repainted
    too. Right and bottom grow further if needed to make the canvas a multiple of ``multiple``.
    """
    if min(left, right, top, bottom) < 0 or left + right + top + bottom == 0:
        raise ImageInputError("outpaint needs non-negative pixels per side, at least one of them > 0")
    width, height = image.size
    right += -(width + left + right) % multiple
    bottom += -(height + top + bottom) % multiple
    pixels = np.pad(np.asarray(image.convert("RGB")), ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(pixels.shape[:2], 255, dtype=np.uint8)
    keep_top, keep_left = top + (overlap if top else 0), left + (overlap if left else 0)
    keep_bottom = top + height - (overlap if bottom else 0)
    keep_right = left + width - (overlap if right else 0)
    mask[keep_top:keep_bottom, keep_left:keep_right] = 0
    return Image.fromarray(pixels), Image.fromarray(mask)
