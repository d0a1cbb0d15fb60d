"""Classifier guidance: the guidance term's scaling checked analytically on a Gaussian mixture (where the
classifier, the denoiser and the class-conditional denoiser are known in closed form), its use through a
sampler, the noise-aware classifier model itself, and the pipeline/CLI wiring on the shipped model."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.errors import ArgumentError, CheckpointError
from ldm.formats.classifier import load_classifier, save_classifier
from ldm.models.noisy_classifier import ClassifierConfig, NoisyLatentClassifier
from ldm.sampling.classifier_guidance import ClassifierGuidance, classifier_gradient, classifier_guided
from ldm.sampling.denoiser import append_dims
from ldm.sampling.samplers import SAMPLERS
from ldm.sampling.schedule import NoiseSchedule, ScheduleConfig

SCHEDULE = NoiseSchedule(ScheduleConfig())
DATA_STD = 0.5
MEANS = torch.stack([torch.full((2, 2, 2), -1.0), torch.tensor([1.0, 0.5, -0.5, 2.0, 0.0, 1.0, 1.5, -1.0]).view(2, 2, 2)])


def _class_log_likelihoods(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``log N(x; mu_k, (s^2 + sigma^2) I)`` up to a shared constant, ``[B, K]``: x = x0 + sigma * eps."""
    variance = DATA_STD**2 + sigma**2
    distances = ((x[:, None] - MEANS[None]) ** 2).flatten(2).sum(-1)  # [B, K]
    return -distances / (2 * variance[:, None])


def exact_log_prob(target: int):
    """The Bayes classifier log p(y = target | x) with equal priors, read on the U-Net's (x_vp, t) inputs."""

    def log_prob(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = SCHEDULE.t_to_sigma(t)
        x = x_vp * append_dims(1 + sigma**2, x_vp.ndim).sqrt()
        return _class_log_likelihoods(x, sigma).log_softmax(-1)[:, target]

    return log_prob


def conditional_denoiser(x: torch.Tensor, sigma: torch.Tensor, target: int) -> torch.Tensor:
    """``E[x0 | x, y] = mu_y + s^2 / (s^2 + sigma^2) (x - mu_y)``."""
    shrink = append_dims(DATA_STD**2 / (DATA_STD**2 + sigma**2), x.ndim)
    return MEANS[target] + shrink * (x - MEANS[target])


def unconditional_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``E[x0 | x] = sum_k p(k | x) E[x0 | x, k]``."""
    posterior = _class_log_likelihoods(x, sigma).softmax(-1)  # [B, K]
    return sum(append_dims(posterior[:, k], x.ndim) * conditional_denoiser(x, sigma, k) for k in range(len(MEANS)))


@pytest.mark.parametrize("sigma_value", [0.05, 0.7, 3.0, 14.0])
def test_guidance_at_scale_one_is_the_class_conditional_denoiser(sigma_value):
    """With the exact classifier, D + sigma^2 grad log p(y|x) = E[x0 | x, y] (Tweedie): the sigma^2 scaling."""
    g = torch.Generator().manual_seed(0)
    x = MEANS[1] + math.sqrt(DATA_STD**2 + sigma_value**2) * torch.randn(64, 2, 2, 2, generator=g)
    sigma = torch.full((64,), sigma_value, dtype=torch.float32)
    x, sigma = x.double(), sigma.double()
    for target in (0, 1):
        guided = classifier_guided(unconditional_denoiser, exact_log_prob(target), SCHEDULE, 1.0)
        expected = conditional_denoiser(x, sigma, target)
        assert torch.allclose(guided(x, sigma).double(), expected, atol=1e-4 * (1 + sigma_value**2)), target


def test_guidance_is_linear_in_the_scale_and_off_at_zero():
    x = torch.randn(8, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    sigma = torch.full((8,), 1.3)
    d = unconditional_denoiser(x, sigma)
    one = classifier_guided(unconditional_denoiser, exact_log_prob(0), SCHEDULE, 1.0)(x, sigma)
    three = classifier_guided(unconditional_denoiser, exact_log_prob(0), SCHEDULE, 3.0)(x, sigma)
    assert torch.allclose(three - d, 3 * (one - d), atol=1e-5)
    assert classifier_guided(unconditional_denoiser, exact_log_prob(0), SCHEDULE, 0.0) is unconditional_denoiser


def test_gradient_matches_the_closed_form():
    """grad_x log p(y|x) = [(mu_y - x) - sum_k p(k|x)(mu_k - x)] / (s^2 + sigma^2)."""
    x = torch.randn(5, 2, 2, 2, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.1, 0.5, 1.0, 4.0, 9.0])
    gradient = classifier_gradient(exact_log_prob(1), x, sigma, SCHEDULE)
    posterior = _class_log_likelihoods(x, sigma).softmax(-1)
    mixture_mean = sum(append_dims(posterior[:, k], 4) * MEANS[k] for k in range(2))
    expected = (MEANS[1] - mixture_mean) / append_dims(DATA_STD**2 + sigma**2, 4)
    assert torch.allclose(gradient, expected, atol=1e-5)


def _nearest_class(samples: torch.Tensor) -> torch.Tensor:
    return ((samples[:, None] - MEANS[None]) ** 2).flatten(2).sum(-1).argmin(1)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_guided_sampling_draws_the_requested_class(sampler):
    """Through a real sampler, scale 1 turns mixture samples into samples of the requested Gaussian.

    The start is class 0's marginal at sigma_max (the probability-flow ODE maps it onto class 0's data
    distribution exactly; from pure noise N(0, sigma_max^2) the mean would be off by mu * s / sigma_max).
    """
    sigmas = SCHEDULE.sampling_sigmas(40, sampler=sampler)
    g = torch.Generator().manual_seed(3)
    x = MEANS[0] + math.sqrt(DATA_STD**2 + float(sigmas[0]) ** 2) * torch.randn(2000, 2, 2, 2, generator=g)
    guided = classifier_guided(unconditional_denoiser, exact_log_prob(0), SCHEDULE, 1.0)
    samples = SAMPLERS[sampler].fn(guided, x, sigmas, generator=[g])
    assert (_nearest_class(samples) == 0).all()
    assert (samples.mean(0) - MEANS[0]).abs().max() < 0.04  # 3.5 standard errors
    assert abs(samples.std() - DATA_STD) < 0.03
    unguided = SAMPLERS[sampler].fn(unconditional_denoiser, x, sigmas, generator=[g])
    assert 0.3 < (_nearest_class(unguided) == 0).float().mean() < 0.7  # the mixture: both classes


# ---------------------------------------------------------------------- the classifier model

TINY = ClassifierConfig(channels=(16, 32), norm_groups=8, heads={"object": ("bicycle", "car", "tree"),
                                                                  "colour": ("red", "blue")})


def test_classifier_shapes_labels_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = NoisyLatentClassifier(TINY).eval()
    x, t = torch.randn(3, 4, 16, 16), torch.tensor([0.0, 500.5, 999.0])
    logits = model(x, t)
    assert logits["object"].shape == (3, 3) and logits["colour"].shape == (3, 2)
    assert model.labels_for("Blue car") == {"colour": 1, "object": 1}
    assert model.labels_for("tree") == {"object": 2}
    log_p = model.log_prob(x, t, {"colour": 1, "object": 1})
    expected = logits["object"].log_softmax(-1)[:, 1] + logits["colour"].log_softmax(-1)[:, 1]
    assert torch.allclose(log_p, expected, atol=1e-6)
    for bad in ("green car", "red blue", ""):
        with pytest.raises(ArgumentError):
            model.labels_for(bad)
    loaded = load_classifier(save_classifier(model, tmp_path / "clf"))
    assert torch.equal(loaded(x, t)["object"], logits["object"])
    with pytest.raises(ArgumentError, match="not known"):
        ClassifierGuidance(loaded, "purple boat")
    with pytest.raises(CheckpointError, match="no classifier"):
        load_classifier(tmp_path)
