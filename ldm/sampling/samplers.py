"""Samplers: small pure functions that walk a sigma chain with a denoiser ``D(x, sigma) -> x0``.

Every sampler has the signature ``sample_x(denoise, x, sigmas, *, generator=None, callback=None,
**options) -> x``:

* ``denoise``: a :data:`ldm.sampling.denoiser.DenoiseFn` ``(x [B,C,H,W], sigma [B]) -> x0 [B,C,H,W]``;
* ``x``: the starting point ``[B,C,H,W]`` on the sigma scale at ``sigmas[0]`` (see :func:`initial_latents`);
* ``sigmas``: the descending chain ``[N+1]`` from :meth:`ldm.sampling.schedule.NoiseSchedule.sampling_sigmas`;
* ``generator``: ``None``, a ``torch.Generator``, or one generator per batch row (row ``i``'s noise
  then comes only from ``generator[i]``, so an image does not depend on its batch neighbours);
* ``callback(step_index, x, x0)``: called after each step with the new ``x`` and the x0 estimate;
  a tensor it returns replaces ``x`` (inpainting puts the known region back this way, as
  diffusers' inpainting loop does after each scheduler step).

Inputs are never modified in place and all randomness comes from ``generator``.

All samplers integrate the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma``
(Karras et al. 2022, eq. 3 with sigma(t) = t) or its ancestral (SDE) counterpart. In these
coordinates DDIM with eta=0 *is* the Euler method, and DDPM (the lecture's Algorithm 2, posterior
variance "fixed_small") *is* the ancestral Euler step with eta=1; they differ from ``euler`` /
``euler_ancestral`` only in the sigma chain they walk (see :mod:`ldm.sampling.registry`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ldm.sampling.denoiser import DenoiseFn
from ldm.sampling.registry import SAMPLER_INFO, SamplerInfo

Generators = torch.Generator | Sequence[torch.Generator] | None
Callback = Callable[[int, Tensor, Tensor], Tensor | None] | None


# ---------------------------------------------------------------------- shared helpers


def randn_like_rows(like: Tensor, generator: Generators = None) -> Tensor:
    """Unit Gaussian noise shaped like ``like [B, ...]``, drawn as diffusers' ``randn_tensor`` draws it.

    With a list of generators, row ``i`` is drawn (shape ``[1, ...]``) from ``generator[i]`` alone.
    Noise is drawn on the generator's device and moved to ``like.device``.
    """
    if generator is None:
        return torch.randn(like.shape, dtype=like.dtype, device=like.device)
    if isinstance(generator, torch.Generator):
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=generator.device).to(like.device)
    generators = list(generator)
    if len(generators) == 1:  # as diffusers: one generator in a list is that generator
        return randn_like_rows(like, generators[0])
    if len(generators) != like.shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {like.shape[0]}")
    row_shape = (1, *like.shape[1:])
    rows = [torch.randn(row_shape, generator=g, dtype=like.dtype, device=g.device) for g in generators]
    return torch.cat(rows).to(like.device)


def _steps(sigmas: Tensor) -> list[tuple[float, float]]:
    """``[(sigma_i, sigma_{i+1})]`` as Python floats (exactly the chain's float32 values)."""
    values = sigmas.tolist()
    return list(zip(values[:-1], values[1:]))


def _full(x: Tensor, sigma: float) -> Tensor:
    """``sigma`` repeated for each batch row: ``[B]`` float32 (also when x is half precision)."""
    return torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)


def _report(callback: Callback, i: int, x: Tensor, x0: Tensor) -> Tensor:
    """Tell ``callback`` about step ``i``; return the ``x`` to continue from (the callback's, if it returned one)."""
    replaced = callback(i, x, x0) if callback is not None else None
    return x if replaced is None else replaced


def ancestral_split(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma -> sigma_next into a deterministic part (to ``sigma_down``) and fresh noise
    (std ``sigma_up``), with ``sigma_down^2 + sigma_up^2 = sigma_next^2``.

    ``sigma_up = eta * sigma_next * sqrt(sigma^2 - sigma_next^2) / sigma`` is the std of the DDPM
    posterior q(x_next | x, x0) on the sigma scale (Ho et al. 2020 eq. 7, "fixed_small"), so eta=1
    is DDPM and eta=0 is DDIM (Song et al. 2021 eq. 16).
    """
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    return sigma_down, sigma_up


def _euler_step(x: Tensor, x0: Tensor, sigma: float, sigma_to: float) -> Tensor:
    """One Euler step of dx/dsigma = (x - x0) / sigma from sigma to sigma_to."""
    derivative = (x - x0) / sigma
    return x + derivative * (sigma_to - sigma)


def _ancestral_loop(
    denoise: DenoiseFn, x: Tensor, sigmas: Tensor, eta: float, generator: Generators, callback: Callback
) -> Tensor:
    """Euler step to sigma_down, then add sigma_up * fresh noise (noise drawn at every step when eta > 0)."""
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        x0 = denoise(x, _full(x, sigma))
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
        x = _euler_step(x, x0, sigma, sigma_down)
        if eta > 0:
            x = x + randn_like_rows(x, generator) * sigma_up
        x = _report(callback, i, x, x0)
    return x


# ---------------------------------------------------------------------- samplers


def sample_ddpm(
    denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2; the lecture's Algorithm 2) on the strided chain.

    Each step samples the posterior q(x_next | x, x0 = D(x)) with variance "fixed_small"; equals
    diffusers' ``DDPMScheduler`` (``variance_type="fixed_small"``, ``clip_sample=False``).
    """
    return _ancestral_loop(denoise, x, sigmas, 1.0, generator, callback)


def sample_ddim(
    denoise: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    callback: Callback = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): deterministic for ``eta=0``, DDPM-like noise for ``eta=1``.

    Equals diffusers' ``DDIMScheduler`` (``clip_sample=False``) stepping along the same chain.
    """
    return _ancestral_loop(denoise, x, sigmas, eta, generator, callback)


def sample_euler(
    denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None
) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        x0 = denoise(x, _full(x, sigma))
        x = _euler_step(x, x0, sigma, sigma_next)
        x = _report(callback, i, x, x0)
    return x


def sample_euler_ancestral(
    denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None
) -> Tensor:
    """Ancestral Euler (k-diffusion's ``sample_euler_ancestral``, eta=1); diffusers' EulerAncestralDiscreteScheduler."""
    return _ancestral_loop(denoise, x, sigmas, 1.0, generator, callback)


def sample_heun(
    denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None
) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1); the last step, to sigma = 0, is Euler.

    Uses 2N - 1 denoiser calls for N steps, as diffusers' HeunDiscreteScheduler.
    """
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        x0 = denoise(x, _full(x, sigma))
        derivative = (x - x0) / sigma
        x_euler = x + derivative * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:
            # trapezoidal correction: average the slopes at both ends of the step
            derivative_next = (x_euler - denoise(x_euler, _full(x, sigma_next))) / sigma_next
            x = x + (derivative + derivative_next) / 2 * (sigma_next - sigma)
        x = _report(callback, i, x, x0)
    return x


def sample_dpmpp_2m(
    denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in the time variable lambda = -log(sigma).

    First step 1st order (= DDIM), then 2nd-order multistep using the previous x0 estimate; a step
    to sigma = 0 returns x0 (1st order). Equals diffusers' DPMSolverMultistepScheduler
    (``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``final_sigmas_type="zero"``).
    """
    x0_prev, h_prev = None, None
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        x0 = denoise(x, _full(x, sigma))
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma) - math.log(sigma_next)  # lambda_next - lambda
            if x0_prev is None:
                x0_mix = x0
            else:
                # linear extrapolation of x0 to the step's midpoint in lambda: r = h_prev / h
                r = h_prev / h
                x0_mix = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            # x_next = (sigma_next / sigma) * x - (exp(-h) - 1) * x0_mix   (Lu et al. 2022, eq. 9 on the sigma scale)
            x = (sigma_next / sigma) * x - math.expm1(-h) * x0_mix
            h_prev = h
        x0_prev = x0
        x = _report(callback, i, x, x0)
    return x


# ---------------------------------------------------------------------- registry


@dataclass(frozen=True)
class SamplerSpec(SamplerInfo):
    """A registry entry (:class:`ldm.sampling.registry.SamplerInfo`) plus its sampling function ``fn``."""

    fn: Callable[..., Tensor] | None = None


_FUNCTIONS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}
assert set(_FUNCTIONS) == set(SAMPLER_INFO), "every registered sampler needs a function and vice versa"
SAMPLERS: dict[str, SamplerSpec] = {
    name: SamplerSpec(**dataclasses.asdict(info), fn=_FUNCTIONS[name]) for name, info in SAMPLER_INFO.items()
}


# ---------------------------------------------------------------------- start and end of a chain


def initial_latents(noise: Tensor, sigmas: Tensor, *, sampler: str, timestep_spacing: str = "leading") -> Tensor:
    """The starting point ``x [B,C,H,W]`` at ``sigmas[0]`` from unit Gaussian ``noise``, as diffusers scales it.

    The VP prior ``x_vp = noise`` is ``x = noise * sqrt(1 + sigma_0^2)`` on the sigma scale; that is
    diffusers' start for DDPM/DDIM/DPM-Solver (``init_noise_sigma = 1`` on the VP scale) and for the
    Euler family with "leading" spacing. For "linspace"/"trailing" spacing diffusers' Euler-family
    schedulers start at ``noise * sigma_0`` instead; we follow them so latents match exactly.
    """
    sigma_0 = float(sigmas[0])
    if SAMPLER_INFO[sampler].discretisation == "k" and timestep_spacing in ("linspace", "trailing"):
        return noise * sigma_0
    return noise * math.sqrt(1 + sigma_0**2)


def final_latents(x: Tensor, sigmas: Tensor, *, sampler: str | None = None) -> Tensor:
    """Sampler output -> diffusers' latent scale: ``x / sqrt(1 + sigma_last^2)`` (identity when the chain
    ends at 0; DDIM's chain ends at sigma(t=0) > 0, where diffusers returns the VP-scale latent).
    ``sampler`` is accepted for symmetry with :func:`initial_latents`; only ``sigmas[-1]`` matters."""
    sigma_last = float(sigmas[-1])
    return x if sigma_last == 0 else x / math.sqrt(1 + sigma_last**2)
