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

Inputs are never modified in place and all randomness comes from ``generator``. The SDE samplers
(``dpmpp_sde``, ``dpmpp_2m_sde``, ``dpmpp_2m_sde_heun``, ``dpmpp_3m_sde``) draw their noise from a
Brownian tree seeded with each generator's ``initial_seed()`` (the image's seed), as AUTOMATIC1111
seeds k-diffusion's, so their noise does not depend on the number of steps taken before.

All samplers integrate the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma``
(Karras et al. 2022, eq. 3 with sigma(t) = t) or its ancestral (SDE) counterpart. In these
coordinates DDIM with eta=0 *is* the Euler method, and DDPM (the lecture's Algorithm 2, posterior
variance "fixed_small") *is* the ancestral Euler step with eta=1; they differ from ``euler`` /
``euler_ancestral`` only in the sigma chain they walk (see :mod:`ldm.sampling.registry`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torchsde
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


class BrownianNoise:
    """Brownian-tree noise (k-diffusion's ``BrownianTreeNoiseSampler`` over ``torchsde.BrownianTree``).

    ``noise(sigma, sigma_next)`` is ``(W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|)``: unit
    Gaussian noise ``[B, ...]`` for one interval of one fixed Brownian path, so noise over nested
    intervals is consistent. With a list of generators, row ``i`` follows its own path seeded with
    ``generator[i].initial_seed()`` (AUTOMATIC1111 seeds one tree per image with the image's seed);
    one generator seeds one path for the whole batch; ``None`` draws a random seed.
    """

    def __init__(self, like: Tensor, sigma_min: float | Tensor, sigma_max: float | Tensor,
                 generator: Generators = None) -> None:
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        self.batched = generator is not None and not isinstance(generator, torch.Generator)
        if self.batched:
            seeds, w0 = [g.initial_seed() for g in generator], torch.zeros_like(like[0])
        else:
            seeds = [torch.randint(0, 2**63 - 1, []).item() if generator is None else generator.initial_seed()]
            w0 = torch.zeros_like(like)
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=seed) for seed in seeds]

    def __call__(self, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
        sigma, sigma_next = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        low, high, sign = (sigma, sigma_next, 1) if sigma < sigma_next else (sigma_next, sigma, -1)
        with warnings.catch_warnings():  # torchsde warns when a chain end lies a rounding error outside; it clamps
            warnings.filterwarnings("ignore", message="Should have", category=UserWarning)
            increments = [tree(low, high) for tree in self.trees]  # W(high) - W(low)
        w = torch.stack(increments) if self.batched else increments[0]
        return sign * w / (high - low).sqrt()


def brownian_noise_for(x: Tensor, sigmas: Tensor, generator: Generators) -> BrownianNoise:
    """The Brownian noise over the chain's positive range ``[min(sigmas > 0), max(sigmas)]``."""
    return BrownianNoise(x, sigmas[sigmas > 0].min(), sigmas.max(), generator)


def lms_coefficients(nodes: Sequence[float], start: float, end: float) -> list[float]:
    """Integrals over ``[start, end]`` of the Lagrange basis polynomials on ``nodes`` (newest first).

    The linear multistep step is ``x += sum_j c_j * d_j`` with ``d_j`` the derivative at ``nodes[j]``;
    the integrands are polynomials of degree < 4, integrated exactly (diffusers and k-diffusion use
    ``scipy.integrate.quad``, exact for them to its tolerance).
    """
    coefficients = []
    for j, node_j in enumerate(nodes):
        basis = np.polynomial.Polynomial([1.0])
        for k, node_k in enumerate(nodes):
            if k != j:
                basis = basis * np.polynomial.Polynomial([-node_k, 1.0]) / (node_j - node_k)
        antiderivative = basis.integ()
        coefficients.append(float(antiderivative(end) - antiderivative(start)))
    return coefficients


def _ancestral_loop(
    denoise: DenoiseFn, x: Tensor, sigmas: Tensor, eta: float, generator: Generators, callback: Callback,
    step: Callable[[Tensor, Tensor, float, float], Tensor] = _euler_step,
) -> Tensor:
    """``step(x, x0, sigma, sigma_down)`` (an Euler step by default), then add sigma_up * fresh noise (drawn at
    every step with noise to add: eta > 0 and not the final step to sigma = 0)."""
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        x0 = denoise(x, _full(x, sigma))
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
        x = step(x, x0, sigma, sigma_down)
        if sigma_up > 0:
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


def sample_lms(
    denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep (Adams-Bashforth on the sigma grid, k-diffusion's ``sample_lms``): the derivative
    is extrapolated by the polynomial through the last ``order`` derivatives and integrated exactly
    over the step. Order ramps up 1, 2, ... over the first steps. Equals diffusers' LMSDiscreteScheduler.
    """
    values = sigmas.tolist()
    derivatives: list[Tensor] = []
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        x0 = denoise(x, _full(x, sigma))
        derivatives = [(x - x0) / sigma, *derivatives][:order]  # newest first
        nodes = values[i::-1][: len(derivatives)]
        coefficients = lms_coefficients(nodes, sigma, sigma_next)
        x = x + sum(c * d for c, d in zip(coefficients, derivatives))
        x = _report(callback, i, x, x0)
    return x


def _dpm2_step(denoise: DenoiseFn, x: Tensor, x0: Tensor, sigma: float, sigma_to: float) -> Tensor:
    """DPM-Solver-2 (midpoint) step from sigma to sigma_to: evaluate the slope at the geometric midpoint
    reached by Euler, then take the whole step with it. A step to sigma_to = 0 is Euler (gives x0)."""
    derivative = (x - x0) / sigma
    if sigma_to == 0:
        return x + derivative * (sigma_to - sigma)
    sigma_mid = math.exp((math.log(sigma) + math.log(sigma_to)) / 2)
    x_mid = x + derivative * (sigma_mid - sigma)
    derivative_mid = (x_mid - denoise(x_mid, _full(x, sigma_mid))) / sigma_mid
    return x + derivative_mid * (sigma_to - sigma)


def sample_dpm2(
    denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None
) -> Tensor:
    """DPM2 (k-diffusion's ``sample_dpm_2``: DPM-Solver-2, Lu et al. 2022, on Karras et al.'s ODE).

    2N - 1 denoiser calls for N steps; equals diffusers' KDPM2DiscreteScheduler.
    """
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        x0 = denoise(x, _full(x, sigma))
        x = _dpm2_step(denoise, x, x0, sigma, sigma_next)
        x = _report(callback, i, x, x0)
    return x


def sample_dpm2_ancestral(
    denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None
) -> Tensor:
    """DPM2 a: a DPM2 step to ``sigma_down``, then fresh noise of std ``sigma_up`` (:func:`ancestral_split`,
    eta = 1). Equals diffusers' KDPM2AncestralDiscreteScheduler (noise drawn after the midpoint call)."""
    def dpm2_step(x: Tensor, x0: Tensor, sigma: float, sigma_down: float) -> Tensor:
        return _dpm2_step(denoise, x, x0, sigma, sigma_down)

    return _ancestral_loop(denoise, x, sigmas, 1.0, generator, callback, step=dpm2_step)


def sample_plms(
    denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None
) -> Tensor:
    """PLMS (pseudo linear multistep, Liu et al. 2022): DDIM steps whose noise estimate is extrapolated
    from the last four with the Adams-Bashforth weights of equal steps; the first step is Heun's
    (the "pseudo improved Euler" start). N + 1 denoiser calls for N steps.

    On the sigma scale the DDIM transfer is an Euler step whose slope is the noise estimate
    ``(x - x0) / sigma``, so this combines slopes. Equals diffusers' PNDMScheduler with
    ``skip_prk_steps=True`` (Stable Diffusion's setting) for eps-prediction models; for v-prediction
    diffusers combines the raw v outputs instead of the noise estimates (CompVis's PLMS combines noise).
    """
    slopes: list[Tensor] = []  # newest last
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        x0 = denoise(x, _full(x, sigma))
        slope = (x - x0) / sigma
        slopes = [*slopes, slope][-4:]
        if len(slopes) == 1 and len(sigmas) > 2:
            x_euler = x + slope * (sigma_next - sigma)
            slope_next = (x_euler - denoise(x_euler, _full(x, sigma_next))) / sigma_next
            slope = (slope + slope_next) / 2
        elif len(slopes) == 2:
            slope = (3 * slopes[-1] - slopes[-2]) / 2
        elif len(slopes) == 3:
            slope = (23 * slopes[-1] - 16 * slopes[-2] + 5 * slopes[-3]) / 12
        elif len(slopes) == 4:
            slope = (55 * slopes[-1] - 59 * slopes[-2] + 37 * slopes[-3] - 9 * slopes[-4]) / 24
        x = x + slope * (sigma_next - sigma)
        x = _report(callback, i, x, x0)
    return x


def _unipc_coefficients(ratios: Sequence[float], h: float) -> tuple[np.ndarray, np.ndarray]:
    """UniPC's linear system ``R rho = b`` with B(h) = e^h - 1 ("bh2"; Zhao et al. 2023, data prediction)
    for the step-size ratios ``ratios = [r_1, ..., 1]``: returns ``(b [K], R [K, K])`` in float64."""
    hh = -h
    phi, factorial = math.expm1(hh) / hh - 1, 1
    b = []
    for k in range(1, len(ratios) + 1):
        b.append(phi * factorial / math.expm1(hh))
        factorial *= k + 1
        phi = phi / hh - 1 / factorial
    matrix = np.array([[r ** (k - 1) for r in ratios] for k in range(1, len(ratios) + 1)])
    return np.array(b), matrix


def _unipc_update(x: Tensor, x0: Tensor, history: list[tuple[float, Tensor]], sigma: float, sigma_to: float,
                  order: int, x0_new: Tensor | None = None) -> Tensor:
    """One UniPC-bh2 update from ``(sigma, x)`` with data estimate ``x0`` to ``sigma_to`` (lambda = -log sigma).

    ``history``: earlier ``(sigma_k, x0_k)``, newest first, for the order-``order`` differences.
    Predictor when ``x0_new`` is None; corrector (UniC) with ``x0_new`` = the estimate at ``sigma_to``.
    """
    if sigma_to == 0:
        return x0  # lambda = inf: the data estimate itself
    h = math.log(sigma) - math.log(sigma_to)
    scale = -math.expm1(-h)  # 1 - sigma_to / sigma
    x_next = (sigma_to / sigma) * x + scale * x0
    ratios = [(math.log(sigma) - math.log(s_k)) / h for s_k, _ in history[: order - 1]]
    differences = [(x0_k - x0) / r for (_, x0_k), r in zip(history, ratios)]
    b, matrix = _unipc_coefficients([*ratios, 1.0], h)
    if x0_new is None:  # predictor: order p uses the p - 1 differences
        if not differences:
            return x_next
        rhos = [0.5] if order == 2 else np.linalg.solve(matrix[:-1, :-1], b[:-1]).tolist()
        return x_next + scale * sum(rho * d for rho, d in zip(rhos, differences))
    rhos = [0.5] if order == 1 else np.linalg.solve(matrix, b).tolist()
    correction = sum((rho * d for rho, d in zip(rhos[:-1], differences)), torch.zeros_like(x))
    return x_next + scale * (correction + rhos[-1] * (x0_new - x0))


def sample_unipc(
    denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None,
    order: int = 2,
) -> Tensor:
    """UniPC (Zhao et al. 2023): multistep predictor (UniP) plus corrector (UniC) on the data estimate,
    B(h) = e^h - 1 ("bh2"), one denoiser call per step; the corrector reuses the next step's call.

    Order ramps up over the first steps and drops to 1 on the last (``lower_order_final``); the
    denoiser sees the predicted point, the corrected point goes on. Equals diffusers'
    UniPCMultistepScheduler with its defaults (``solver_order=2``, ``predict_x0``, ``bh2``).
    """
    steps = _steps(sigmas)
    history: list[tuple[float, Tensor]] = []  # (sigma, x0) of earlier steps, newest first
    previous = None  # (x, x0, sigma, order) of the last predictor step, for the corrector
    for i, (sigma, sigma_next) in enumerate(steps):
        x0 = denoise(x, _full(x, sigma))
        if previous is not None:
            x_prev, x0_prev, sigma_prev, order_prev = previous
            x = _unipc_update(x_prev, x0_prev, history[1:], sigma_prev, sigma, order_prev, x0_new=x0)
        step_order = min(order, len(steps) - i, len(history) + 1)
        history = [(sigma, x0), *history]
        previous = (x, x0, sigma, step_order)
        x = _unipc_update(x, x0, history[1:], sigma, sigma_next, step_order)
        x = _report(callback, i, x, x0)
    return x


def sample_dpmpp_sde(
    denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None
) -> Tensor:
    """DPM++ SDE (k-diffusion's ``sample_dpmpp_sde``, eta = 1, r = 1/2): a stochastic DPM-Solver++
    2nd-order singlestep method. Each step takes an ancestral half step to the geometric midpoint,
    denoises there, and takes the ancestral full step with the midpoint's estimate; noise from the
    Brownian tree (:class:`BrownianNoise`). 2N - 1 denoiser calls; the step to 0 is Euler.
    """
    noise = brownian_noise_for(x, sigmas, generator)
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        x0 = denoise(x, _full(x, sigma))
        if sigma_next == 0:
            x = _euler_step(x, x0, sigma, sigma_next)
        else:
            sigma_from, sigma_mid, sigma_to = _lambda_points(sigma, sigma_next)
            x_mid = _ancestral_dpm_step(x, x0, sigma_from, sigma_mid, noise)
            x0_mid = denoise(x_mid, _full(x, sigma_mid))
            x = _ancestral_dpm_step(x, x0_mid, sigma_from, sigma_to, noise)
        x = _report(callback, i, x, x0)
    return x


def _lambda_points(sigma: float, sigma_next: float) -> tuple[float, float, float]:
    """``(sigma, sqrt(sigma * sigma_next), sigma_next)`` computed through lambda = -log(sigma) in float32, as
    k-diffusion's DPM++ SDE does: its Brownian tree is queried at these times, and a time one float32
    ulp away gives noise that differs by ~1e-4."""
    lam, lam_next = -torch.tensor(sigma).log(), -torch.tensor(sigma_next).log()
    lam_mid = lam + (lam_next - lam) * 0.5
    return float((-lam).exp()), float((-lam_mid).exp()), float((-lam_next).exp())


def _ancestral_dpm_step(x: Tensor, x0: Tensor, sigma: float, sigma_to: float, noise: BrownianNoise) -> Tensor:
    """First-order step to ``sigma_down`` with data estimate ``x0``, plus ``sigma_up`` times the Brownian
    noise of the interval [sigma_to, sigma] (DPM-Solver++ 1 = DDIM on the sigma scale)."""
    sigma_down, sigma_up = ancestral_split(sigma, sigma_to)
    x = x0 + (sigma_down / sigma) * (x - x0)
    return x + noise(sigma, sigma_to).to(x) * sigma_up


def _sde_multistep_terms(
    x0: Tensor, history: Sequence[tuple[float, Tensor]], h: float, solver_type: str
) -> Tensor | float:
    """The higher-order terms of DPM-Solver++(2M/3M) SDE (eta = 1, so the exponential integrator runs over
    ``2h``): built from the data estimates ``x0 [B,C,H,W]`` of this step and ``history`` of earlier steps.

    ``history``: ``(h_k, x0_k)`` of earlier steps, newest first, ``h_k`` that step's lambda increment; its
    length is the step's order minus one (0: first order, no terms). With one entry the divided difference
    ``d = (x0 - x0_1) / r``, ``r = h_1 / h``, enters with weight ``(1 - e^(-2h)) / 2`` for ``"midpoint"``
    (SDE-DPM-Solver++(2M), Lu et al. 2022b) or ``phi_2 = 1 - (1 - e^(-2h)) / (2h)`` for ``"heun"`` (the
    exact integral of the linear Taylor term of x0 in lambda, DPM-Solver's ``solver_type="heun"``);
    with two entries also the quadratic Taylor term: ``phi_2 d1 - phi_3 d2``, ``phi_3 = phi_2 / (2h) - 1/2``
    (k-diffusion's ``sample_dpmpp_3m_sde``).
    """
    if not history:
        return 0.0
    h_eta = 2 * h
    weight = -math.expm1(-h_eta)  # 1 - e^(-2h): the weight of x0 in the first-order step
    phi_2 = 1 - weight / h_eta  # (e^(-2h) - 1) / (2h) + 1
    (h_1, x0_1), *older = history
    r0 = h_1 / h
    d1_0 = (x0 - x0_1) / r0  # first divided difference, in units of h
    if not older:
        return 0.5 * weight * d1_0 if solver_type == "midpoint" else phi_2 * d1_0
    h_2, x0_2 = older[0]
    r1 = h_2 / h
    d1_1 = (x0_1 - x0_2) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)  # first derivative, extrapolated to this step
    d2 = (d1_0 - d1_1) / (r0 + r1)  # second divided difference
    phi_3 = phi_2 / h_eta - 0.5
    return phi_2 * d1 - phi_3 * d2


def _dpmpp_sde_multistep(
    denoise: DenoiseFn, x: Tensor, sigmas: Tensor, generator: Generators, callback: Callback, order: int,
    solver_type: str = "midpoint",
) -> Tensor:
    """The DPM-Solver++(2M/3M) SDE loop (Lu et al. 2022b; k-diffusion's ``sample_dpmpp_2m_sde`` /
    ``sample_dpmpp_3m_sde``, eta = 1) in lambda = -log(sigma), h = lambda_next - lambda.

    Each step ``x [B,C,H,W] -> x'`` is the first-order SDE-DPM-Solver++ step
    ``x' = (sigma_next / sigma) e^(-h) x + (1 - e^(-2h)) x0`` (Lu et al. 2022b, SDE-DPM-Solver++1 on the
    sigma scale x = x_vp / alpha), plus the multistep terms of the last ``order - 1`` estimates
    (:func:`_sde_multistep_terms`; the order ramps up over the first steps), plus Brownian-tree noise of
    std ``sigma_next * sqrt(1 - e^(-2h))``; the step to 0 returns x0.
    """
    noise = brownian_noise_for(x, sigmas, generator)
    history: list[tuple[float, Tensor]] = []  # (h, x0) of earlier steps, newest first
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        x0 = denoise(x, _full(x, sigma))
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma) - math.log(sigma_next)
            weight = -math.expm1(-2 * h)  # 1 - e^(-2h)
            x = (sigma_next / sigma) * math.exp(-h) * x + weight * x0
            x = x + _sde_multistep_terms(x0, history, h, solver_type)
            x = x + noise(sigma, sigma_next).to(x) * sigma_next * math.sqrt(weight)
            history = [(h, x0), *history][: order - 1]
        x = _report(callback, i, x, x0)
    return x


def sample_dpmpp_2m_sde(
    denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None
) -> Tensor:
    """DPM-Solver++(2M) SDE (k-diffusion's ``sample_dpmpp_2m_sde``, eta = 1, midpoint variant; AUTOMATIC1111's
    "DPM++ 2M SDE"); see :func:`_dpmpp_sde_multistep`."""
    return _dpmpp_sde_multistep(denoise, x, sigmas, generator, callback, order=2, solver_type="midpoint")


def sample_dpmpp_2m_sde_heun(
    denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None
) -> Tensor:
    """DPM-Solver++(2M) SDE, Heun variant (k-diffusion's ``sample_dpmpp_2m_sde`` with ``solver_type="heun"``;
    AUTOMATIC1111's "DPM++ 2M SDE Heun"); see :func:`_dpmpp_sde_multistep`."""
    return _dpmpp_sde_multistep(denoise, x, sigmas, generator, callback, order=2, solver_type="heun")


def sample_dpmpp_3m_sde(
    denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None
) -> Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion's ``sample_dpmpp_3m_sde``, eta = 1; AUTOMATIC1111's "DPM++ 3M SDE"):
    first order, then the Heun-type second order, then third order from the third step on; see
    :func:`_dpmpp_sde_multistep`."""
    return _dpmpp_sde_multistep(denoise, x, sigmas, generator, callback, order=3, solver_type="heun")


def sample_lcm(
    denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None
) -> Tensor:
    """Latent consistency sampling (Luo et al. 2023, Algorithm 1): jump to the data estimate, then noise
    it afresh to the next level (``x0 + sigma_next * noise``); the last step returns the estimate.

    Equals diffusers' LCMScheduler up to its boundary-condition scalings c_skip, c_out, which differ
    from (0, 1) by less than 1e-5 at the timesteps it uses (t >= 19 with timestep_scaling=10).
    """
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        x0 = denoise(x, _full(x, sigma))
        x = x0 if sigma_next == 0 else x0 + randn_like_rows(x0, generator) * sigma_next
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
    "lms": sample_lms,
    "dpm2": sample_dpm2,
    "dpm2_ancestral": sample_dpm2_ancestral,
    "unipc": sample_unipc,
    "plms": sample_plms,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "dpmpp_sde": sample_dpmpp_sde,
    "lcm": sample_lcm,
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
