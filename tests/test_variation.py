"""Variation seeds: the web UI's slerp of two noises, and the pipeline's use of it."""

import math

import pytest
import torch

from ldm.errors import ArgumentError
from ldm.sampling.variation import slerp
from tests.conftest import tiny_pipeline


def test_slerp_ends_at_its_inputs_and_rotates_per_column():
    low, high = torch.randn(4, 8, 6, generator=torch.Generator().manual_seed(0)), \
        torch.randn(4, 8, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(slerp(0.0, low, high), low)
    torch.testing.assert_close(slerp(1.0, low, high), high)
    middle = slerp(0.5, low, high)
    # On the great circle through two columns of equal norm, the midpoint's norm stays between theirs.
    norms = [t.norm(dim=1) for t in (low, high, middle)]
    assert bool(((norms[2] >= torch.minimum(norms[0], norms[1]) * 0.99)).all())
    # Analytic case: orthogonal unit columns -> cos/sin weights.
    a, b = torch.zeros(1, 2, 1), torch.zeros(1, 2, 1)
    a[0, 0, 0], b[0, 1, 0] = 1.0, 1.0
    torch.testing.assert_close(slerp(1 / 3, a, b)[0, :, 0], torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))


def test_strength_zero_is_the_seed_and_strength_changes_the_image_little_then_more():
    pipe = tiny_pipeline(seed=3)
    options = dict(steps=3, seed=5, sampler="euler", output_type="pt")
    plain = pipe("a red bicycle", **options)
    assert torch.equal(pipe("a red bicycle", subseed=9, subseed_strength=0.0, **options), plain)
    small = pipe("a red bicycle", subseed=9, subseed_strength=0.1, **options)
    large = pipe("a red bicycle", subseed=9, subseed_strength=0.9, **options)
    assert 0 < (small - plain).abs().mean() < (large - plain).abs().mean()
    batch = pipe("a red bicycle", subseed=9, subseed_strength=0.5, num_images=2, **options)
    second = pipe("a red bicycle", subseed=10, subseed_strength=0.5, **{**options, "seed": 6})
    assert torch.equal(batch[1], second[0])  # image i uses seed + i and subseed + i
    with pytest.raises(ArgumentError, match="subseed_strength"):
        pipe("x", subseed=1, subseed_strength=1.5, steps=1)
