"""Diffusion super-resolution in latent space: the conditioning of Stable Diffusion's x4 upscaler.

A super-resolution U-Net denoises latents of the large image while it sees the small image
directly: the low-resolution RGB image ``[B, 3, h, w]`` (in ``[-1, 1]``, the latents' own spatial size
because the autoencoder downsamples by the upscaling factor) is concatenated to the latents along
channels, so the U-Net has ``latent_channels + 3`` input channels.

The small image is first corrupted with Gaussian noise of a chosen level, *noise conditioning
augmentation* (Ho et al. 2022, "Cascaded Diffusion Models", sec. 4.1; Saharia et al. 2022, Imagen,
sec. 2.5): ``low_noisy = sqrt(abar[level]) * low + sqrt(1 - abar[level]) * noise`` on a DDPM schedule
of its own (scaled-linear betas 1e-4 .. 0.02 in SD's x4 upscaler), and the level enters the U-Net as a class
label (``label_emb``) added to the time embedding. Training draws the level uniformly from
``[0, max_noise_level)``, so that a sampler may later hide the artefacts of a generated low-resolution
image behind a little noise (``noise_level``, 20 by default as in diffusers) that the model knows how to
see through.

Noise alone does not teach a stage what a *generated* small image looks like: the base model's images
are softer than clean renders and carry its autoencoder's blur. Training can therefore degrade the small
image first (:class:`LowResDegradation`): replace it by its round trip through the autoencoder, and blur
it with a Gaussian of random width (Ho et al. 2022, sec. 4.1, blur augmentation for the 64 -> 256 stage).

Diffusion super-resolution also drifts in colour: a small stage redraws flat areas in the colours it saw
most in training rather than the input's. :func:`colour_fix` (the colour correction of StableSR, Wang et
al. 2023, sec. 3.4, with a Gaussian split in place of wavelets) keeps the result's detail and takes its
coarse content, below a chosen scale, from the input enlarged by bicubic interpolation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ldm.config_io import strict_from_dict
from ldm.sampling.schedule import NoiseSchedule, ScheduleConfig


def _x4_noise_schedule() -> ScheduleConfig:
    """The augmentation schedule of SD's x4 upscaler (CompVis ``ImageConcatWithNoiseAugmentation``,
    diffusers' ``low_res_scheduler``): 1000 betas from 1e-4 to 0.02, spaced linearly in sqrt(beta)
    (diffusers' "scaled_linear", which CompVis calls "linear")."""
    return ScheduleConfig(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02)


@dataclass
class UpscaleConfig:
    """The ``upscale`` section of a super-resolution model's config.

    Attributes:
        noise_schedule: the DDPM schedule that noises the low-resolution image (not the latents').
        max_noise_level: training draws levels from ``[0, max_noise_level)``; sampling accepts
            ``[0, max_noise_level]`` (diffusers' ``max_noise_level``, 350 for SD's x4 upscaler).
        noise_level: the default level at sampling time.
        colour_fix: the default :func:`colour_fix` scale, a Gaussian sigma in output pixels (0: off, as SD's
            x4 upscaler and diffusers).
    """

    noise_schedule: ScheduleConfig = field(default_factory=_x4_noise_schedule)
    max_noise_level: int = 350
    noise_level: int = 20
    colour_fix: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.noise_schedule, dict):  # keys not given keep the x4 upscaler's values
            self.noise_schedule = ScheduleConfig.from_dict({**_x4_noise_schedule().to_dict(), **self.noise_schedule})
        if not 0 < self.max_noise_level <= self.noise_schedule.num_train_timesteps:
            raise ValueError(f"max_noise_level must be in 1..{self.noise_schedule.num_train_timesteps}, "
                             f"got {self.max_noise_level}")
        check_noise_level(self.noise_level, self.max_noise_level)
        check_colour_fix(self.colour_fix)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["noise_schedule"] = self.noise_schedule.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UpscaleConfig":
        return strict_from_dict(cls, d)


def check_noise_level(level, max_noise_level: int) -> None:
    """Raise ``ValueError`` unless ``level`` is an integer in ``[0, max_noise_level]``."""
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= max_noise_level:
        raise ValueError(f"noise_level must be an integer in 0..{max_noise_level}, got {level!r}")


def check_colour_fix(sigma) -> None:
    """Raise ``ValueError`` unless ``sigma`` is a number in ``[0, 64]`` (output pixels)."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma <= 64:  # NaN fails too
        raise ValueError(f"colour_fix must be a Gaussian sigma in 0..64 output pixels (0: off), got {sigma!r}")


def colour_fix(images: Tensor, low_res: Tensor, sigma: float) -> Tensor:
    """The detail of ``images`` on the coarse content of ``low_res``, split by a Gaussian of ``sigma`` pixels:
    ``images - blur(images) + blur(bicubic(low_res))``.

    Args:
        images: ``[B, 3, H, W]`` super-resolved images in ``[0, 1]``.
        low_res: ``[1 or B, 3, h, w]`` the small images they were drawn from, in ``[-1, 1]``.
        sigma: Gaussian sigma in output pixels; 0 returns ``images`` unchanged.
    Returns:
        ``[B, 3, H, W]`` in ``[0, 1]``.
    """
    if sigma == 0:
        return images
    enlarged = torch.nn.functional.interpolate(low_res.to(images), size=images.shape[-2:], mode="bicubic",
                                               align_corners=False).add(1).div(2)
    sigmas = torch.full((len(images),), float(sigma))
    low_pass = gaussian_blur(enlarged.expand_as(images), sigmas)
    return (images - gaussian_blur(images, sigmas) + low_pass).clamp(0, 1)


@dataclass
class LowResCondition:
    """What a super-resolution sampling run is conditioned on: the small images and the augmentation level.

    Attributes:
        images: ``[1 or B, 3, h, w]`` in ``[-1, 1]`` (one image serves every row).
        noise_level: the augmentation level in ``[0, max_noise_level]``.
    """

    images: Tensor
    noise_level: int


class LowResAugmentation:
    """Noise conditioning augmentation of the low-resolution image (module docstring)."""

    def __init__(self, config: UpscaleConfig) -> None:
        self.config = config
        self.alphas_cumprod = NoiseSchedule(config.noise_schedule).alphas_cumprod  # [T] float64

    def __call__(self, low_res: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        """``sqrt(abar[level]) * low_res + sqrt(1 - abar[level]) * noise`` (Ho et al. 2020, eq. 4).

        Args:
            low_res: ``[B, 3, h, w]`` images in ``[-1, 1]``.
            noise: ``[B, 3, h, w]`` standard normal.
            level: ``[B]`` integer noise levels.
        Returns:
            ``[B, 3, h, w]`` in ``low_res``'s dtype.
        """
        abar = self.alphas_cumprod.to(low_res.device)[level.long().to(low_res.device)].to(low_res.dtype)
        abar = abar.view(-1, 1, 1, 1)
        return abar.sqrt() * low_res + (1 - abar).sqrt() * noise

    def training_levels(self, batch: int, *, generator: torch.Generator | None = None,
                        device: torch.device | str = "cpu") -> Tensor:
        """``[batch]`` levels drawn uniformly from ``[0, max_noise_level)`` (CompVis' training draw)."""
        return torch.randint(0, self.config.max_noise_level, (batch,), generator=generator).to(device)


@dataclass
class LowResDegradation:
    """Training-time degradation of the small image (module docstring), drawn per sample.

    Attributes:
        round_trip: probability that a sample's small image is replaced by its autoencoder round trip.
        blur: largest Gaussian blur sigma in small-image pixels; each sample's sigma is uniform in
            ``[0, blur]`` (0: off).
    """

    round_trip: float = 0.0
    blur: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.round_trip <= 1:
            raise ValueError(f"the round-trip probability must be in [0, 1], got {self.round_trip}")
        if not 0 <= self.blur <= 8:
            raise ValueError(f"the largest blur sigma must be in [0, 8] pixels, got {self.blur}")

    @property
    def active(self) -> bool:
        return self.round_trip > 0 or self.blur > 0

    def __call__(self, low_res: Tensor, round_trips: Tensor | None, generator: torch.Generator) -> Tensor:
        """Degrade ``low_res [B, 3, h, w]`` (any range); ``round_trips`` (same shape, needed when
        ``round_trip > 0``) are the same images after the autoencoder. Draws from ``generator``: which
        samples take the round trip, then the blur sigmas."""
        if self.round_trip > 0:
            if round_trips is None:
                raise ValueError("a round-trip degradation needs the round-tripped images")
            chosen = torch.rand(len(low_res), generator=generator) < self.round_trip
            low_res = torch.where(chosen.view(-1, 1, 1, 1).to(low_res.device), round_trips, low_res)
        if self.blur > 0:
            sigmas = torch.rand(len(low_res), generator=generator) * self.blur
            low_res = gaussian_blur(low_res, sigmas)
        return low_res


def paler_colours(images: Tensor, saturation: Tensor, lightening: Tensor) -> Tensor:
    """``images [B, 3, H, W]`` in ``[-1, 1]`` with their colours desaturated towards grey by ``saturation [B]``
    (1: unchanged) and lightened towards white by ``lightening [B]`` (0: unchanged): the paler colours a
    base model draws. Applied alike to a training pair's large and small render, it teaches a
    super-resolution stage to copy colours it was not trained on."""
    x = images.add(1).div(2)
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # ITU-R BT.601 luma
    x = grey + saturation.view(-1, 1, 1, 1) * (x - grey)
    x = x + lightening.view(-1, 1, 1, 1) * (1 - x)
    return x.clamp(0, 1).mul(2).sub(1)


def gaussian_blur(images: Tensor, sigmas: Tensor) -> Tensor:
    """Blur each of ``images [B, C, h, w]`` with its own separable Gaussian of ``sigmas [B]`` pixels
    (sigma 0 leaves an image as it is), borders extended."""
    radius = max(1, math.ceil(3 * float(sigmas.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    widths = sigmas.double().clamp_min(1e-6).view(-1, 1)
    kernels = torch.exp(-0.5 * (offsets / widths) ** 2)
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).to(images.dtype).to(images.device)  # [B, K]
    batch, channels, height, width = images.shape
    x = images.reshape(1, batch * channels, height, width)
    x = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="replicate")
    per_channel = kernels.repeat_interleave(channels, dim=0)  # [B * C, K]
    x = torch.nn.functional.conv2d(x, per_channel.view(-1, 1, 1, 2 * radius + 1), groups=batch * channels)
    x = torch.nn.functional.conv2d(x, per_channel.view(-1, 1, 2 * radius + 1, 1), groups=batch * channels)
    return x.reshape(batch, channels, height, width)


__all__ = ["UpscaleConfig", "LowResCondition", "LowResAugmentation", "LowResDegradation", "gaussian_blur",
           "paler_colours", "colour_fix", "check_noise_level", "check_colour_fix"]
