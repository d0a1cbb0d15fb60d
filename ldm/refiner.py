"""SDXL's "ensemble of expert denoisers" (Podell et al. 2023, section 2.5): a base model runs the noisy
first part of the sampling chain and a refiner model, trained on the low-noise steps, runs the rest.

It is diffusers' ``StableDiffusionXLPipeline(denoising_end=s, output_type="latent")`` followed by
``StableDiffusionXLImg2ImgPipeline(image=latents, denoising_start=s)``, and AUTOMATIC1111's
"Refiner" / "Switch at", as one chain cut in two: with ``T`` training steps, the steps whose
timestep ``t >= round(T * (1 - s))`` run on the base model and the others on the refiner, from the
same point of the same sigma chain (no noise is added at the switch, and ancestral samplers keep
drawing from the same generators). Nothing here samples: :meth:`ldm.pipeline.Txt2ImgPipeline.__call__`
(``refiner=``, ``refiner_switch=``) runs the one sampling core on each part.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch

from ldm.errors import ArgumentError
from ldm.sampling.schedule import NoiseSchedule

DEFAULT_SWITCH = 0.8  # diffusers' and the web UI's usual hand-over point
TIMESTEP_TOLERANCE = 1e-3  # float32 sigmas give back their timestep to ~1e-5; a switch exactly on one is "before"


@dataclass(frozen=True)
class RefinerHandover:
    """The refiner of one call and where it takes over.

    Attributes:
        pipe: the refiner, a ``Txt2ImgPipeline`` whose latents and noise levels are the base model's.
        switch: the fraction of the training schedule the base model denoises, in (0, 1).
    """

    pipe: Any
    switch: float


def check_switch(switch) -> float:
    """``switch`` as a float in (0, 1); :class:`ArgumentError` otherwise."""
    if not isinstance(switch, numbers.Real) or isinstance(switch, bool) or not 0 < switch < 1:  # NaN fails too
        raise ArgumentError(f"refiner_switch must be a number between 0 and 1 (exclusive), got {switch!r}")
    return float(switch)


def check_compatible(base_config, base_schedule: NoiseSchedule, refiner_config, refiner_schedule: NoiseSchedule) -> None:
    """:class:`ArgumentError` unless the refiner continues the base model's chain: the same latent space
    (channels, VAE factor and scaling) and the same training noise levels, and an ordinary U-Net
    (not an inpainting or super-resolution one)."""
    if refiner_config.is_upscaler or refiner_config.unet.in_channels != refiner_config.vae.latent_channels:
        raise ArgumentError("the refiner must be a text-to-image model (not an inpainting or super-resolution one)")
    base_vae, refiner_vae = base_config.vae, refiner_config.vae
    if (base_vae.latent_channels, len(base_vae.channel_mult), base_vae.scaling_factor) != \
            (refiner_vae.latent_channels, len(refiner_vae.channel_mult), refiner_vae.scaling_factor):
        raise ArgumentError("the refiner's latents are not the base model's (its VAE has other latent channels, "
                            "downsampling or scaling factor)")
    if (base_schedule.num_train_timesteps != refiner_schedule.num_train_timesteps
            or not torch.allclose(base_schedule.sigmas, refiner_schedule.sigmas, rtol=1e-6)):
        raise ArgumentError("the refiner was trained on another noise schedule than the base model: it cannot "
                            "continue its sampling chain")


def steps_before_switch(schedule: NoiseSchedule, sigmas: torch.Tensor, switch: float) -> int:
    """How many steps of the chain ``sigmas [n + 1]`` (descending) the base model runs: those whose
    timestep ``t >= round(T - switch * T)`` (diffusers' ``denoising_end`` / ``denoising_start`` cut-off)."""
    steps = sigmas[:-1].to(torch.float64)
    timesteps = schedule.sigma_to_t(steps)
    cutoff = int(round(schedule.num_train_timesteps - switch * schedule.num_train_timesteps))
    return int((timesteps >= cutoff - TIMESTEP_TOLERANCE).sum())
