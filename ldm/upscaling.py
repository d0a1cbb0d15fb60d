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
"""

from __future__ import annotations

import dataclasses
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
    """

    noise_schedule: ScheduleConfig = field(default_factory=_x4_noise_schedule)
    max_noise_level: int = 350
    noise_level: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.noise_schedule, dict):  # keys not given keep the x4 upscaler's values
            self.noise_schedule = ScheduleConfig.from_dict({**_x4_noise_schedule().to_dict(), **self.noise_schedule})
        if not 0 < self.max_noise_level <= self.noise_schedule.num_train_timesteps:
            raise ValueError(f"max_noise_level must be in 1..{self.noise_schedule.num_train_timesteps}, "
                             f"got {self.max_noise_level}")
        check_noise_level(self.noise_level, self.max_noise_level)

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


__all__ = ["UpscaleConfig", "LowResCondition", "LowResAugmentation", "check_noise_level"]
