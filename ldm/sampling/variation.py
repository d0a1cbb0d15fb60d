"""Variation seeds (AUTOMATIC1111's "Variation seed" and "Variation strength").

The starting noise of an image is moved from its seed's noise towards the noise of a second seed
by spherical interpolation, so that small strengths give small variations of one image. The
interpolation follows the web UI's ``slerp`` exactly, including its unusual axes: for noise
``[C, H, W]`` the angle is taken per (channel, column) over the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def slerp(strength: float, low: Tensor, high: Tensor) -> Tensor:
    """Spherical interpolation from ``low`` (strength 0) to ``high`` (strength 1), both ``[C, H, W]``.

    Angles are per (channel, column), over dim 1, as the web UI computes them; for nearly parallel
    inputs (mean cosine above 0.9995) it blends linearly, in the web UI's order (``low * strength +
    high * (1 - strength)``; random noises are never that close).
    """
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    cosine = (low_unit * high_unit).sum(1)
    if cosine.mean() > 0.9995:
        return low * strength + high * (1 - strength)
    omega = torch.acos(cosine)
    sine = torch.sin(omega)
    return (torch.sin((1.0 - strength) * omega) / sine).unsqueeze(1) * low + \
        (torch.sin(strength * omega) / sine).unsqueeze(1) * high


@dataclass(frozen=True)
class Variation:
    """Variation seeds for a batch: row ``i`` mixes in the noise of ``seeds[i]`` with ``strength``."""

    seeds: tuple[int, ...]
    strength: float

    def mix(self, noise: Tensor, row: int) -> Tensor:
        """One row's noise ``[1, C, H, W]`` -> slerped towards its variation seed's noise (same shape)."""
        generator = torch.Generator("cpu").manual_seed(self.seeds[row])
        other = torch.randn(noise.shape, generator=generator, dtype=noise.dtype)
        return slerp(self.strength, noise[0], other[0])[None]
