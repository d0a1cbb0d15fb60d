"""The training objective of latent diffusion (Ho et al. 2020, Algorithm 1, on VAE latents).

All functions are pure: tensors in, tensors out, randomness only through an explicit
``torch.Generator``. Shapes: ``z`` clean latents ``[B, C, H, W]``; ``t`` integer timesteps ``[B]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.sampling.denoiser import append_dims


def sample_timesteps(batch: int, num_train_timesteps: int, *, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> Tensor:
    """Uniform integer timesteps ``t ~ U{0, ..., T-1}`` (Algorithm 1, line 3), ``[batch]``."""
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator).to(device)


def sample_noise(z: Tensor, *, generator: torch.Generator | None = None, offset: float = 0.0) -> Tensor:
    """``eps ~ N(0, I)`` shaped like ``z``; ``offset > 0`` adds ``offset * N(0, 1)`` per (image, channel),
    the "noise offset" trick that lets models learn very dark/bright images (Guttenberg 2023)."""
    eps = torch.randn(z.shape, generator=generator).to(z.device, z.dtype)
    if offset:
        eps = eps + offset * torch.randn((*z.shape[:2], 1, 1), generator=generator).to(z.device, z.dtype)
    return eps


def add_noise(z: Tensor, eps: Tensor, alphas_cumprod_t: Tensor) -> Tensor:
    """``x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps`` (Ho et al. 2020, eq. 4), the U-Net's input scale."""
    abar = append_dims(alphas_cumprod_t.to(z.dtype), z.ndim)
    return abar.sqrt() * z + (1 - abar).sqrt() * eps


def training_target(z: Tensor, eps: Tensor, alphas_cumprod_t: Tensor, prediction: str) -> Tensor:
    """What the U-Net must output: ``eps``, or ``v = sqrt(abar) eps - sqrt(1 - abar) z``
    (Salimans & Ho 2022, Sec. 4)."""
    if prediction == "eps":
        return eps
    if prediction == "v":
        abar = append_dims(alphas_cumprod_t.to(z.dtype), z.ndim)
        return abar.sqrt() * eps - (1 - abar).sqrt() * z
    raise ValueError(f"unknown prediction {prediction!r} (expected 'eps' or 'v')")


def min_snr_weights(alphas_cumprod_t: Tensor, gamma: float | None, prediction: str) -> Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023, eq. 9), ``[B]``.

    ``snr = abar / (1 - abar)``. With an eps target the weight is ``min(snr, gamma) / snr``; with a
    v target, ``min(snr, gamma) / (snr + 1)``. ``gamma=None`` gives all-ones (plain MSE). On a
    zero-terminal-SNR schedule the last step has snr = 0 and so weight 0 (with an eps target the
    weight is undefined there, which is why that schedule requires v).
    """
    if gamma is None:
        return torch.ones_like(alphas_cumprod_t, dtype=torch.float32)
    snr = (alphas_cumprod_t / (1 - alphas_cumprod_t)).float()
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction == "eps" else clipped / (snr + 1)


def diffusion_loss(prediction: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Weighted mean squared error: mean over pixels per sample, then weighted mean over the batch."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights).mean()


def drop_captions(captions: list[str], probability: float, *, generator: torch.Generator | None = None) -> list[str]:
    """Replace each caption by ``""`` with ``probability``, so one model also learns the unconditional
    prediction that classifier-free guidance needs (Ho & Salimans 2022, Algorithm 1)."""
    if probability <= 0:
        return list(captions)
    keep = torch.rand(len(captions), generator=generator) >= probability
    return [c if k else "" for c, k in zip(captions, keep.tolist())]
