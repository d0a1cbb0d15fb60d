"""Signal-leak sampling: start from the noise level the network was trained on, leak included.

Everaert et al. (2024), "Exploiting the Signal-Leak Bias in Diffusion Models". A schedule whose last
training step keeps some signal (Stable Diffusion's scaled-linear betas: ``sqrt(alpha_bar_T) = 0.068``)
trains the network on ``x_T = sqrt(alpha_bar_T) z + sqrt(1 - alpha_bar_T) eps``. The per-channel
spatial mean of ``x_T`` then still carries the mean of ``z`` (over a 16x16 latent the noise's mean
has std 1/16, the same size as the leaked signal), and the network learns to read the image's
overall colour from it. Sampling from pure noise hands it a mean that no training image had, and
the images come out with too little variety in their global colour and brightness.

The fix needs no training: draw the leak from the training latents' statistics. Per image, a
spatially constant offset ``m ~ N(mu, Sigma)`` (one value per latent channel, ``mu`` and ``Sigma``
the mean and covariance of the training latents' per-channel spatial means) is added to the
starting point; on the sigma scale ``x = z + sigma * eps`` that is ``x_T = m + sigma_max * eps``,
the training distribution of ``x_T`` in its lowest frequency.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ldm.config_io import strict_from_dict


@dataclass
class SignalLeak:
    """Statistics of the training latents' per-channel spatial means (scaled latents, as the U-Net sees them).

    Attributes:
        mean: ``mu``, one value per latent channel ``[C]``.
        covariance: ``Sigma`` ``[C][C]``, symmetric positive definite.
        count: how many latents the statistics were fitted on (for the record).
    """

    mean: list[float]
    covariance: list[list[float]]
    count: int = 0

    def __post_init__(self) -> None:
        self.mean = [float(v) for v in self.mean]
        self.covariance = [[float(v) for v in row] for row in self.covariance]
        channels = len(self.mean)
        if channels == 0 or len(self.covariance) != channels or any(len(r) != channels for r in self.covariance):
            raise ValueError(f"signal_leak: covariance must be {channels}x{channels} for a mean of {channels} values")
        try:
            self.cholesky()
        except RuntimeError:
            raise ValueError("signal_leak: covariance is not symmetric positive definite") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SignalLeak":
        return strict_from_dict(cls, values)

    @classmethod
    def fit(cls, latents: Tensor) -> "SignalLeak":
        """Fit on training latents ``[N, C, H, W]`` (N >= 2): mean and covariance of their ``[N, C]`` spatial means."""
        if latents.ndim != 4 or latents.shape[0] < 2:
            raise ValueError(f"need latents [N >= 2, C, H, W], got shape {tuple(latents.shape)}")
        means = latents.double().mean(dim=(2, 3))
        return cls(mean=means.mean(0).tolist(), covariance=torch.cov(means.T).reshape(len(means[0]), -1).tolist(),
                   count=len(latents))

    def cholesky(self) -> Tensor:
        """``L`` with ``L L^T = Sigma``, float64 ``[C, C]`` (raises RuntimeError when Sigma is not SPD)."""
        covariance = torch.tensor(self.covariance, dtype=torch.float64)
        if not torch.allclose(covariance, covariance.T, rtol=1e-6, atol=1e-12):
            raise RuntimeError("not symmetric")
        return torch.linalg.cholesky(covariance)

    def sample(self, generators: Sequence[torch.Generator]) -> Tensor:
        """One offset ``m = mu + L n``, ``n ~ N(0, I)``, per generator: float32 ``[B, C]`` on the CPU.

        Row ``i`` draws its ``C`` normal numbers from ``generators[i]`` (after whatever that generator
        drew before, e.g. the initial noise), so an image's leak depends only on its own seed.
        """
        channels = len(self.mean)
        normals = torch.cat([torch.randn((1, channels), generator=g, dtype=torch.float64) for g in generators])
        mean = torch.tensor(self.mean, dtype=torch.float64)
        return (mean + normals @ self.cholesky().T).float()
