"""Denoisers: a trained noise/velocity network seen as ``D(x, sigma) -> x0``, and classifier-free guidance.

The samplers in :mod:`ldm.sampling.samplers` only know the sigma scale (``x = z + sigma * eps``, Karras et
al. 2022). :class:`DiscreteDenoiser` is the one place that converts to what a DDPM-trained U-Net
expects: the variance-preserving input ``x_vp = x / sqrt(sigma^2 + 1)`` and the discrete training
step ``t``, and back from its eps- or v-prediction to an estimate of the clean latent ``x0``.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch
from torch import Tensor

from ldm.sampling.schedule import PREDICTIONS, NoiseSchedule

# (x [B,C,H,W] on the sigma scale x = z + sigma * eps, sigma [B]) -> x0 estimate [B,C,H,W]
DenoiseFn = Callable[[Tensor, Tensor], Tensor]
# (x_vp [B,C,H,W], t [B] float, context [B,L,D]) -> eps or v prediction [B,C,H,W]
ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """``v [B]`` -> ``[B, 1, ..., 1]`` with ``ndim`` dimensions, for broadcasting against images."""
    return v.reshape(v.shape[0], *([1] * (ndim - 1)))


class DiscreteDenoiser:
    """Wrap ``model(x_vp, t, context)`` trained on a discrete schedule as ``D(x, sigma, context) -> x0``.

    Args:
        model: the network; gets ``x_vp = c_in * x`` ``[B,C,H,W]``, ``t [B]`` float32 and ``context [B,L,D]``.
        schedule: the training noise schedule (converts sigma -> t).
        prediction: ``"eps"`` or ``"v"``; defaults to ``schedule.config.prediction``.
        round_timesteps: give the model ``round(t)`` instead of the interpolated ``t``. diffusers'
            DPMSolverMultistepScheduler does this for Karras sigmas; k-diffusion calls it "quantize".
    """

    def __init__(
        self,
        model: ModelFn,
        schedule: NoiseSchedule,
        prediction: str | None = None,
        *,
        round_timesteps: bool = False,
    ) -> None:
        prediction = schedule.config.prediction if prediction is None else prediction
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.model = model
        self.schedule = schedule
        self.prediction = prediction
        self.round_timesteps = round_timesteps

    def timestep(self, sigma: Tensor) -> Tensor:
        """The model's timestep input ``[B]`` (float32) for noise levels ``sigma [B]``."""
        t = self.schedule.sigma_to_t(sigma)
        return (t.round() if self.round_timesteps else t).to(torch.float32)

    def __call__(self, x: Tensor, sigma: Tensor, context: Tensor) -> Tensor:
        """x0 estimate ``[B,C,H,W]`` from ``x [B,C,H,W]`` on the sigma scale, ``sigma [B]``, ``context [B,L,D]``."""
        s = append_dims(sigma.to(x.dtype), x.ndim)
        c_in = 1 / (s**2 + 1).sqrt()  # x_vp = sqrt(alpha_bar) * x, since alpha_bar = 1 / (1 + sigma^2)
        out = self.model(x * c_in, self.timestep(sigma), context)
        if self.prediction == "eps":
            # x = x0 + sigma * eps  =>  x0 = x - sigma * eps
            return x - s * out
        # v = sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x0 (Salimans & Ho 2022), with
        # sqrt(alpha_bar) = 1/sqrt(sigma^2+1), sqrt(1-alpha_bar) = sigma/sqrt(sigma^2+1):
        #   x0 = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v
        return x / (s**2 + 1) - s * c_in * out


def cfg_denoiser(
    denoiser: Callable[[Tensor, Tensor, Tensor], Tensor],
    cond: Tensor,
    uncond: Tensor | None,
    scale: float,
) -> DenoiseFn:
    """Classifier-free guidance (Ho & Salimans 2022) as a ``DenoiseFn``.

    ``D_guided = D(x, sigma, uncond) + scale * (D(x, sigma, cond) - D(x, sigma, uncond))``, with both
    halves in one batched call on ``[uncond, cond]`` (batch 2B). Guiding x0 equals guiding the
    network's eps/v output, since x0 is affine in that output with the same coefficients for both
    halves. With ``scale == 1`` the unconditional half is skipped (one call of batch B) and
    ``uncond`` may be ``None``.

    Args:
        denoiser: ``D(x, sigma, context) -> x0``, e.g. a :class:`DiscreteDenoiser`.
        cond, uncond: contexts ``[B, L, D]`` (the same batch size B as ``x``), or schedules of them
            (an object with ``shape`` and ``at(call) -> [B, L, D]``, e.g.
            :class:`ldm.models.prompt_encoding.ContextSchedule`: prompt editing), asked once per call.
        scale: guidance scale ``w``; 1 means no guidance.
    """
    cond_at, uncond_at, calls = _per_call(cond), _per_call(uncond), itertools.count()
    if scale == 1:
        return lambda x, sigma: denoiser(x, sigma, cond_at(next(calls)))
    if uncond is None:
        raise ValueError("guidance scale != 1 needs an unconditional context")
    if uncond.shape != cond.shape:
        raise ValueError(f"uncond shape {tuple(uncond.shape)} != cond shape {tuple(cond.shape)}")
    fixed_contexts = torch.cat([uncond, cond]) if isinstance(cond, Tensor) and isinstance(uncond, Tensor) else None

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        call = next(calls)
        both_contexts = fixed_contexts if fixed_contexts is not None else torch.cat([uncond_at(call), cond_at(call)])
        x0_uncond, x0_cond = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), both_contexts).chunk(2)
        return x0_uncond + scale * (x0_cond - x0_uncond)

    return guided


def _per_call(context) -> Callable[[int], Tensor | None]:
    """A context tensor (or None) -> ``call -> it``; a context schedule -> its ``at``."""
    return context.at if hasattr(context, "at") else (lambda _call: context)
