"""Classifier guidance (Dhariwal & Nichol 2021): steer any sampler with a noise-aware classifier's gradient.

Conditioning on a class ``y`` adds the classifier's log-likelihood gradient to the score (Bayes' rule;
Dhariwal & Nichol, sec. 4.1 and eq. 10-13):

    grad log p(x | y) = grad log p(x) + grad log p(y | x)

On the sigma scale the samplers here use (``x = x0 + sigma * eps``), Tweedie's formula links the
denoiser and the score, ``D(x, sigma) = x + sigma^2 * grad log p(x)``, so guiding the score by
``s * grad log p(y | x)`` turns the denoised estimate into

    D_guided(x, sigma) = D(x, sigma) + s * sigma^2 * grad_x log p(y | x)

which is Dhariwal & Nichol's Algorithm 2 (``eps_guided = eps - sqrt(1 - abar) * s * grad_{x_t} log p(y |
x_t)``) rewritten for ``x = x_t / sqrt(abar)``: ``grad_x = sqrt(abar) grad_{x_t}`` and ``sigma =
sqrt(1 - abar) / sqrt(abar)``. With ``s = 1`` and an exact classifier, ``D_guided`` is exactly the
class-conditional denoiser ``E[x0 | x, y]`` (tests/test_classifier_guidance.py checks this on Gaussian
data); ``s > 1`` sharpens the class distribution (``p(y | x)^s``).

The guider wraps a ``DenoiseFn`` (any sampler's view of the model, classifier-free guidance included),
so it composes with every sampler and with classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor

from ldm.sampling.denoiser import DenoiseFn, append_dims
from ldm.sampling.schedule import NoiseSchedule

# (x_vp [B, C, h, w], t [B] float) -> log p(y | x_vp, t) [B] for the requested class y
LogProbFn = Callable[[Tensor, Tensor], Tensor]


def classifier_gradient(log_prob: LogProbFn, x: Tensor, sigma: Tensor, schedule: NoiseSchedule) -> Tensor:
    """``grad_x log p(y | x)`` ``[B, C, h, w]`` at ``x`` on the sigma scale (``sigma [B]``).

    The classifier reads what the U-Net reads: ``x_vp = x / sqrt(1 + sigma^2)`` and the continuous
    timestep ``t(sigma)``; autograd differentiates through that scaling, so the gradient is with
    respect to ``x`` itself.
    """
    with torch.enable_grad():
        x = x.detach().float().requires_grad_(True)
        x_vp = x / append_dims(1 + sigma.float() ** 2, x.ndim).sqrt()
        t = schedule.sigma_to_t(sigma.float())
        (gradient,) = torch.autograd.grad(log_prob(x_vp, t).sum(), x)
    return gradient


def classifier_guided(denoise: DenoiseFn, log_prob: LogProbFn, schedule: NoiseSchedule, scale: float) -> DenoiseFn:
    """``D_guided(x, sigma) = D(x, sigma) + scale * sigma^2 * grad_x log p(y | x)`` (module docstring)."""
    if scale == 0:
        return denoise

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        x0 = denoise(x, sigma)
        gradient = classifier_gradient(log_prob, x, sigma, schedule)
        return x0 + scale * append_dims(sigma.float() ** 2, x.ndim).to(x0.dtype) * gradient.to(x0.dtype)

    return guided


@dataclass
class ClassifierGuidance:
    """What to guide towards: a noise-aware classifier (:class:`ldm.models.noisy_classifier.NoisyLatentClassifier`,
    or anything with its ``labels_for(text)`` and ``log_prob(x_vp, t, labels)``) and the class, as text
    ("red bicycle") or ``{family: index}``. The labels are resolved at construction, so an unknown class
    fails before any sampling.

    ``pipe(prompt, classifier_guidance=ClassifierGuidance(load_classifier(folder), "red bicycle"),
    classifier_scale=4)``.
    """

    classifier: torch.nn.Module
    target: str | Mapping[str, int]

    def __post_init__(self) -> None:
        self.labels()

    def labels(self) -> dict[str, int]:
        return self.classifier.labels_for(self.target) if isinstance(self.target, str) else dict(self.target)

    def log_prob_fn(self, device: torch.device) -> LogProbFn:
        """``log p(target | x_vp, t)`` on ``device`` (the classifier is moved there, float32)."""
        classifier = self.classifier.to(device, torch.float32).eval()
        labels = self.labels()
        return lambda x_vp, t: classifier.log_prob(x_vp, t, labels)


__all__ = ["classifier_gradient", "classifier_guided", "ClassifierGuidance", "LogProbFn"]
