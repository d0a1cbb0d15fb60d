"""The noise schedule: betas (float64) -> alphas_cumprod -> sigmas, timestep spacing, sigma chains.

Two equivalent views of the forward process are used in this package:

* variance preserving (VP, DDPM):  ``x_vp = sqrt(alphas_cumprod[t]) * z + sqrt(1 - alphas_cumprod[t]) * eps``
* sigma scale (VE, Karras et al. 2022): ``x = z + sigma * eps`` with
  ``sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod)``, so ``x = x_vp * sqrt(1 + sigma^2)``.

The samplers work on the sigma scale; only :class:`ldm.sampling.denoiser.DiscreteDenoiser` converts back
to the VP input and the discrete timestep ``t`` the U-Net was trained with.

Naming trap: the beta schedule CompVis calls ``"linear"`` (a linspace of sqrt(beta), squared) is
what diffusers calls ``"scaled_linear"``; CompVis ``"sqrt_linear"`` is diffusers ``"linear"``.
This module uses the diffusers meaning of the names (``"cosine"`` = diffusers
``"squaredcos_cap_v2"``). The translations of other tools' names live with their formats:
:func:`ldm.formats.compvis.schedule_config_from_compvis` (CompVis YAML) and
:func:`ldm.formats.diffusers_folder.schedule_config_from_diffusers` / ``schedule_config_to_diffusers``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.special
import torch
from torch import Tensor

from ldm.config_io import strict_from_dict
from ldm.sampling.registry import DISCRETISATIONS, SCHEDULE_NAMES, sampler_info

BETA_SCHEDULES = ("scaled_linear", "linear", "cosine")
PREDICTIONS = ("eps", "v")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Which sigma chain each sampler walks; see NoiseSchedule.sampling_sigmas.
#   "ddpm": the strided discrete chain, ending at sigma = 0 (diffusers DDPMScheduler)
#   "ddim": the strided discrete chain, ending at sigma(t=0) (DDIMScheduler, set_alpha_to_one=False)
#   "k":    the Euler-family chain (Euler/EulerAncestral/Heun DiscreteScheduler), ending at 0
#   "dpm":  the DPMSolverMultistepScheduler / UniPCMultistepScheduler chain (its own timestep spacing), ending at 0
#   "lcm":  LCMScheduler's timesteps (a subset of its 50 "original" steps), ending at 0
# (ldm.sampling.registry names the chain of each sampler.)
TERMINAL_ALPHA_BAR = 2.0**-24  # alpha_bar in place of an exact 0 (zero terminal SNR) for sigma = sqrt((1-abar)/abar)


@dataclass
class ScheduleConfig:
    """The training noise schedule and the model's output parameterisation.

    ``beta_schedule`` uses diffusers' meaning of the names: ``"scaled_linear"`` (Stable Diffusion:
    betas = linspace(sqrt(beta_start), sqrt(beta_end))^2), ``"linear"`` (betas = linspace(beta_start,
    beta_end)), ``"cosine"`` (Nichol & Dhariwal 2021, eq. 17; beta_start/beta_end unused).
    ``timestep_spacing`` and ``steps_offset`` choose the inference timesteps exactly as diffusers
    does (SD 1.x/2.x ship ``"leading"`` with ``steps_offset=1``, CompVis's DDIM "uniform" spacing).
    ``rescale_betas_zero_snr`` rescales the betas so that the last step is pure noise (zero terminal
    SNR, Lin et al. 2024, Algorithm 1); it needs the ``"v"`` prediction, since an eps-prediction
    carries no information about the image at zero SNR.
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction: str = "eps"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction", self.prediction, PREDICTIONS)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}")
        if not isinstance(self.rescale_betas_zero_snr, bool):
            raise ValueError(f"rescale_betas_zero_snr must be true or false, got {self.rescale_betas_zero_snr!r}")
        if self.rescale_betas_zero_snr and self.prediction != "v":
            raise ValueError("rescale_betas_zero_snr needs prediction 'v' (at zero SNR the noise says nothing "
                             "about the image)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScheduleConfig":
        return strict_from_dict(cls, d)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def make_betas(config: ScheduleConfig) -> Tensor:
    """Betas ``[T]`` in float64 for the config's beta schedule (rescaled to zero terminal SNR if asked)."""
    n = config.num_train_timesteps
    if config.beta_schedule == "scaled_linear":
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float64) ** 2
    elif config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float64)
    else:
        betas = _cosine_betas(n)
    return rescale_to_zero_terminal_snr(betas) if config.rescale_betas_zero_snr else betas


def rescale_to_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. (2024), Algorithm 1: shift and scale sqrt(alpha_bar) so that it is 0 at the last step
    and unchanged at the first, then recover the betas. float64 ``[T]`` -> ``[T]`` (last beta = 1)."""
    sqrt_abar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def _cosine_betas(n: int, offset: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal (2021) eq. 17: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2), betas clipped at 0.999."""
    grid = torch.arange(n + 1, dtype=torch.float64) / n
    alpha_bar = torch.cos((grid + offset) / (1 + offset) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) eq. 5: ``n`` sigmas from sigma_max down to sigma_min, float64 ``[n]``.

    sigma_i = (sigma_max^(1/rho) + i/(n-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    """
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv_rho = sigma_max ** (1 / rho)
    min_inv_rho = sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


LCM_ORIGINAL_STEPS = 50  # diffusers' LCMScheduler ``original_inference_steps`` (the distillation's grid)


def lcm_timesteps(num_steps: int, num_train_timesteps: int, original_steps: int = LCM_ORIGINAL_STEPS) -> np.ndarray:
    """LCMScheduler's timesteps: ``num_steps`` of the distillation grid ``k - 1, 2k - 1, ..., T - 1``
    (``k = T // original_steps``), evenly spaced from the top, descending (``[999, 759, 499, 259]`` for 4)."""
    if num_steps > original_steps:
        raise ValueError(f"LCM takes at most {original_steps} steps (its distillation grid), got {num_steps}")
    k = num_train_timesteps // original_steps
    grid = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    return grid[np.floor(np.linspace(0, original_steps, num_steps, endpoint=False)).astype(np.int64)]


def _compute_dtype(device: torch.device) -> torch.dtype:
    """float64 for schedule arithmetic wherever the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


class NoiseSchedule:
    """A discrete DDPM noise schedule seen on the sigma scale.

    Attributes (CPU, float64, each ``[T]`` indexed by the training step ``t``):
        betas, alphas_cumprod, sigmas (increasing in ``t``), log_sigmas.
    """

    def __init__(self, config: ScheduleConfig) -> None:
        self.config = config
        self.betas = make_betas(config)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)  # alpha_bar_t = prod_{s<=t} (1 - beta_s)
        # Zero terminal SNR makes sigma(T-1) infinite; like diffusers' Euler and DPM-Solver schedulers,
        # the sigma view uses alpha_bar = 2^-24 there (sigma ~ 4096). Training uses the exact zero.
        abar_for_sigmas = self.alphas_cumprod.clamp(min=TERMINAL_ALPHA_BAR)
        self.sigmas = ((1 - abar_for_sigmas) / abar_for_sigmas).sqrt()
        self.log_sigmas = self.sigmas.log()

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    # ------------------------------------------------------------------ t <-> sigma

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous timestep for each sigma: linear interpolation in log-sigma between the two
        neighbouring training steps (k-diffusion / diffusers Euler), clamped to ``[0, T-1]``.

        Args: sigma ``[...]`` (any float dtype/device). Returns t ``[...]`` in sigma's dtype.
        """
        dtype = _compute_dtype(sigma.device)
        log_sigmas = self.log_sigmas.to(sigma.device, dtype)
        log_sigma = sigma.to(dtype).clamp(min=1e-10).log()
        # low = the last training step whose log-sigma is <= log_sigma (log_sigmas is increasing)
        low = (torch.searchsorted(log_sigmas, log_sigma.contiguous(), right=True) - 1).clamp(0, len(log_sigmas) - 2)
        high = low + 1
        w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high])).clamp(0, 1)
        return (low.to(dtype) + w).to(sigma.dtype)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma at continuous timesteps ``t [...]`` in ``[0, T-1]``, log-linear between training
        steps: the exact inverse of :meth:`sigma_to_t`. Returns ``[...]`` in t's float dtype."""
        dtype = _compute_dtype(t.device)
        out_dtype = t.dtype if t.is_floating_point() else torch.float32
        log_sigmas = self.log_sigmas.to(t.device, dtype)
        t = t.to(dtype).clamp(0, len(log_sigmas) - 1)
        low = t.floor().long().clamp(max=len(log_sigmas) - 2)
        w = t - low.to(dtype)
        log_sigma = (1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]
        return log_sigma.exp().to(out_dtype)

    # ------------------------------------------------------------------ inference discretisation

    def timesteps(self, num_steps: int, *, sampler: str = "ddim") -> Tensor:
        """The descending inference timesteps diffusers uses, float64 ``[num_steps]``.

        Follows ``config.timestep_spacing`` / ``steps_offset`` as diffusers' DDIM/DDPM/Euler
        schedulers do; for the ``"dpm"`` discretisation (``sampler="dpmpp_2m"``) as
        DPMSolverMultistepScheduler does (it divides the range into ``num_steps + 1`` parts).
        Values are whole numbers except for Euler-family ``"linspace"`` spacing.
        """
        kind = _discretisation(sampler)
        n_train, spacing, offset = self.num_train_timesteps, self.config.timestep_spacing, self.config.steps_offset
        if not 1 <= num_steps <= n_train:
            raise ValueError(f"num_steps must be in [1, {n_train}], got {num_steps}")
        if kind == "lcm":
            t = lcm_timesteps(num_steps, n_train)
        elif kind == "dpm":
            if spacing == "linspace":
                t = np.linspace(0, n_train - 1, num_steps + 1).round()[::-1][:-1]
            elif spacing == "leading":
                ratio = n_train // (num_steps + 1)
                t = (np.arange(num_steps + 1) * ratio).round()[::-1][:-1] + offset
            else:
                t = np.arange(n_train, 0, -n_train / num_steps).round() - 1
        else:
            if spacing == "linspace":
                t = np.linspace(0, n_train - 1, num_steps)[::-1]
                t = t if kind == "k" else t.round()
            elif spacing == "leading":
                ratio = n_train // num_steps
                t = (np.arange(num_steps) * ratio).round()[::-1] + offset
            else:
                t = np.arange(n_train, 0, -n_train / num_steps).round() - 1
        if kind == "k" and spacing == "linspace":
            t = t.astype(np.float32)  # diffusers' Euler family keeps float32 fractional timesteps
        return torch.tensor(t.tolist(), dtype=torch.float64)

    def sampling_sigmas(self, num_steps: int, *, sampler: str, karras: bool = False,
                        schedule: str = "default") -> Tensor:
        """The descending sigma chain a sampler walks: float32 ``[num_steps + 1]``.

        ``sigmas[i]`` is the noise level before step ``i`` and ``sigmas[i+1]`` after it. With
        ``schedule="default"`` the chain is the one of the diffusers scheduler that matches ``sampler``
        (``discretisation`` in :mod:`ldm.sampling.registry`):

        * ``"ddpm"``: sigma at each inference timestep, then 0 (DDPMScheduler's last step lands on
          alpha_bar = 1).
        * ``"ddim"`` (ddim, plms): sigma at each inference timestep, then sigma(t=0) = sqrt(beta_0 / (1 - beta_0)),
          as DDIMScheduler with ``set_alpha_to_one=False`` (Stable Diffusion's setting). The result
          of such a chain is still noisy at sigma(0) ~ 0.03; :func:`ldm.sampling.samplers.final_latents`
          converts it to diffusers' latent scale. (diffusers' DDIM steps to ``t - T//n``, which is
          the next timestep for "leading" spacing; we always step to the next timestep.)
        * ``"k"`` (euler, euler_ancestral, heun, lms, dpm2, dpm2_ancestral, dpmpp_sde): sigma at each timestep, then 0.
        * ``"dpm"`` (dpmpp_2m, dpmpp_2m_sde, dpmpp_2m_sde_heun, dpmpp_3m_sde, unipc): sigma at DPMSolverMultistep's timesteps, then 0.
        * ``"lcm"``: sigma at LCMScheduler's timesteps (:func:`lcm_timesteps`), then 0.

        The other schedules (AUTOMATIC1111's schedule types) place the ``num_steps`` sigmas
        differently (see :meth:`schedule_sigmas`) and end at 0 for every sampler, as k-diffusion's
        chains do; ``karras=True`` is ``schedule="karras"`` (the config flag of older versions).

        Fractional timesteps (Euler-family "linspace" spacing) get log-linearly interpolated sigmas
        (:meth:`t_to_sigma`); diffusers interpolates sigma linearly there, a difference < 1e-3
        relative.
        """
        if karras and schedule not in ("default", "karras"):
            raise ValueError(f"karras=True contradicts schedule={schedule!r}")
        schedule = "karras" if karras else schedule
        if schedule not in SCHEDULE_NAMES:
            raise ValueError(f"schedule must be one of {SCHEDULE_NAMES}, got {schedule!r}")
        kind = _discretisation(sampler)
        t = self.timesteps(num_steps, sampler=sampler)
        if schedule == "default":
            sigmas = self.t_to_sigma(t)
        else:
            # diffusers' Karras/exponential/beta options span the spaced timesteps' range, except that
            # DPM-Solver and UniPC span the whole training range (as AUTOMATIC1111 always does)
            span = (self.sigma_min, self.sigma_max) if kind == "dpm" else (
                float(self.t_to_sigma(t[-1])), float(self.t_to_sigma(t[0])))
            sigmas = self.schedule_sigmas(schedule, num_steps, *span)
        final = self.sigma_min if kind == "ddim" and schedule == "default" else 0.0
        return torch.cat([sigmas, sigmas.new_tensor([final])]).to(torch.float32)

    def schedule_sigmas(self, schedule: str, n: int, sigma_min: float, sigma_max: float) -> Tensor:
        """``n`` descending sigmas (float64 ``[n]``, no final entry) of one of AUTOMATIC1111's schedule types.

        ``karras``: Karras et al. (2022) eq. 5, rho = 7; ``exponential``: evenly spaced in log sigma;
        ``beta``: sigma_min + q (sigma_max - sigma_min) at the quantiles q = Beta(0.6, 0.6)^-1(1 - i/(n-1))
        (Lee et al. 2024; the web UI's and diffusers' defaults); these three span [sigma_min, sigma_max].
        The rest are defined on the training steps (the web UI's ``inner_model``), whatever the span:
        ``uniform``: t evenly spaced from T-1 to 0 (k-diffusion's ``get_sigmas``); ``sgm_uniform``:
        t = linspace(T-1, 0, n + 1) without its last entry (Stability's sgm); ``simple``: every
        (T/n)-th training sigma from the top.
        """
        top = self.num_train_timesteps - 1
        if schedule == "karras":
            return karras_sigmas(n, sigma_min, sigma_max)
        if schedule == "exponential":
            return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
        if schedule == "beta":
            quantiles = scipy.special.betaincinv(0.6, 0.6, 1 - np.linspace(0, 1, n))
            return torch.tensor(sigma_min + quantiles * (sigma_max - sigma_min), dtype=torch.float64)
        if schedule == "uniform":
            return self.t_to_sigma(torch.linspace(top, 0, n, dtype=torch.float64))
        if schedule == "sgm_uniform":
            return self.t_to_sigma(torch.linspace(top, 0, n + 1, dtype=torch.float64)[:-1])
        if schedule == "simple":
            stride = self.num_train_timesteps / n
            return self.sigmas[[top - int(i * stride) for i in range(n)]]
        raise ValueError(f"schedule must be one of {SCHEDULE_NAMES[1:]}, got {schedule!r}")


def _discretisation(sampler: str) -> str:
    """Map a sampler name (or a discretisation name) to its discretisation."""
    if sampler in DISCRETISATIONS:
        return sampler
    return sampler_info(sampler).discretisation
