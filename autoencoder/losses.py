"""Training loss of the autoencoder: reconstruction plus a small KL term.

``L = |x - x_hat|_1 + |x - x_hat|_2^2 + kl_weight * KL(q(z|x) || N(0, I))``, each term averaged
per element (KL per latent element). The tiny KL weight only keeps the latent scale in check,
as in Rombach et al. 2022 (Sec. 3 and App. G), where the KL term is weighted ~1e-6.
"""

from __future__ import annotations

import torch
from torch import Tensor

from autoencoder.model import DiagonalGaussian


def reconstruction_terms(images: Tensor, reconstruction: Tensor) -> tuple[Tensor, Tensor]:
    """Mean absolute and mean squared error (scalars) of ``[B, C, H, W]`` images in [-1, 1]."""
    error = reconstruction - images
    return error.abs().mean(), error.pow(2).mean()


def autoencoder_loss(
    images: Tensor, reconstruction: Tensor, posterior: DiagonalGaussian, *, kl_weight: float = 1e-6
) -> tuple[Tensor, dict[str, float]]:
    """Scalar loss and its parts for logging; ``images``/``reconstruction`` are ``[B, C, H, W]`` in [-1, 1]."""
    l1, mse = reconstruction_terms(images, reconstruction)
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    loss = l1 + mse + kl_weight * kl
    return loss, {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}


def psnr(images: Tensor, reconstruction: Tensor) -> Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2), ``[B]``."""
    mse = (reconstruction.clamp(-1, 1) - images).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))
