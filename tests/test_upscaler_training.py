"""Training a super-resolution stage on degraded small images (``ldm.upscaling.LowResDegradation``): the
Gaussian blur against scipy, the per-sample draws, the procedural pool's autoencoder round trips and the
run-config checks."""

from __future__ import annotations

import pytest
import torch
from scipy import ndimage

from ldm.errors import ConfigError
from ldm.training.run_config import DataSettings, parse_run_config, run_identity
from ldm.training.trainer import ProceduralLatents
from ldm.upscaling import LowResDegradation, gaussian_blur
from tests.test_upscaler import tiny_upscaler


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_gaussian_blur_equals_scipy(sigma):
    images = torch.rand(2, 3, 20, 24, dtype=torch.float64)
    ours = gaussian_blur(images, torch.full((2,), sigma))
    theirs = ndimage.gaussian_filter(images.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=3.0)
    assert torch.allclose(ours, torch.from_numpy(theirs), atol=1e-10)


def test_gaussian_blur_sigma_zero_is_identity_and_each_image_has_its_own_sigma():
    images = torch.rand(3, 3, 16, 16)
    blurred = gaussian_blur(images, torch.tensor([0.0, 1.0, 2.0]))
    assert torch.equal(blurred[0], images[0])
    assert (blurred[1] - images[1]).abs().mean() < (blurred[2] - images[2]).abs().mean()
    assert torch.allclose(blurred.mean(dim=(1, 2, 3)), images.mean(dim=(1, 2, 3)), atol=2e-2)


def test_degradation_draws_round_trips_per_sample_and_is_reproducible():
    clean, round_trips = torch.zeros(400, 3, 4, 4), torch.ones(400, 3, 4, 4)
    degrade = LowResDegradation(round_trip=0.5)
    out = degrade(clean, round_trips, torch.Generator().manual_seed(0))
    chosen = out[:, 0, 0, 0]
    assert set(chosen.unique().tolist()) == {0.0, 1.0} and 0.4 < chosen.mean() < 0.6
    assert torch.equal(out, degrade(clean, round_trips, torch.Generator().manual_seed(0)))
    assert torch.equal(LowResDegradation(round_trip=1.0)(clean, round_trips, torch.Generator()), round_trips)
    assert not LowResDegradation().active
    with pytest.raises(ValueError, match="round-trip"):
        LowResDegradation(round_trip=1.5)
    with pytest.raises(ValueError, match="round-tripped images"):
        degrade(clean, None, torch.Generator())


def _is_window_of(window: torch.Tensor, images: torch.Tensor) -> bool:
    """Whether ``window [3, k, k]`` (in [-1, 1]) is a square cut of one of ``images [N, 3, h, w]`` (uint8)."""
    k = window.shape[-1]
    patches = images.float().div(127.5).sub(1).unfold(2, k, 1).unfold(3, k, 1)  # [N, 3, h-k+1, w-k+1, k, k]
    return bool(((patches - window[None, :, None, None]).abs().amax(dim=(1, 4, 5)) < 1e-6).any())


def test_procedural_pool_holds_round_trips_and_batches_are_degraded(tmp_path):
    vae = tiny_upscaler().vae
    settings = DataSettings(seed=1, pool_size=4, latent_crop=4, low_res_round_trip=1.0)
    pool = ProceduralLatents.build(vae, settings, tmp_path / "latents.safetensors", 2, "cpu", image_size=32,
                                   with_low_res=True)
    assert pool.low_res.shape == pool.low_res_round_trip.shape == (4, 3, 8, 8)
    assert pool.low_res_round_trip.dtype == torch.uint8
    assert not torch.equal(pool.low_res, pool.low_res_round_trip)
    expected = vae.decode(vae.encode(pool.low_res.float().div(127.5).sub(1)).mode()).clamp(-1, 1)
    assert (pool.low_res_round_trip.float().div(127.5).sub(1) - expected).abs().max() <= 1 / 127.5 + 1e-6
    batch = pool.next_batch(torch.Generator().manual_seed(0))
    assert batch["low_res"].shape == (2, 3, 4, 4) and batch["latents"].shape[-2:] == (4, 4)
    for small in batch["low_res"]:  # every small image is a window of a round trip, none of a clean render
        assert _is_window_of(small, pool.low_res_round_trip) and not _is_window_of(small, pool.low_res)
    clean = ProceduralLatents.build(vae, DataSettings(seed=1, pool_size=4, latent_crop=4),
                                    tmp_path / "clean.safetensors", 2, "cpu", image_size=32, with_low_res=True)
    assert clean.low_res_round_trip is None and torch.equal(clean.low_res, pool.low_res)
    assert all(_is_window_of(small, clean.low_res) for small in clean.next_batch(torch.Generator())["low_res"])
    with pytest.raises(ConfigError, match="super-resolution"):
        ProceduralLatents.build(vae, DataSettings(seed=1, pool_size=4, low_res_blur=1.0), tmp_path / "t2i.safetensors",
                                2, "cpu", image_size=32, with_low_res=False)


def test_run_config_checks_the_degradation_and_keeps_old_run_identities():
    base = {"model": {"init": "some/model"}, "data": {"kind": "procedural"}}
    assert "data.low_res_blur" not in run_identity(parse_run_config(base))  # runs made before it resume as before
    blurred = parse_run_config({**base, "data": {"kind": "procedural", "low_res_blur": 1.5}})
    assert run_identity(blurred)["data.low_res_blur"] == 1.5
    with pytest.raises(ConfigError, match="low_res"):
        parse_run_config({**base, "data": {"kind": "procedural", "low_res_round_trip": 2.0}})
    with pytest.raises(ConfigError, match="procedural"):
        parse_run_config({**base, "data": {"kind": "folder", "source": "x", "low_res_blur": 1.0}})


def test_paler_colours_desaturate_and_lighten():
    from ldm.upscaling import paler_colours

    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1)  # pure red in [-1, 1]
    assert torch.equal(paler_colours(red, torch.ones(1), torch.zeros(1)), red)
    grey = paler_colours(red, torch.zeros(1), torch.zeros(1)).flatten()
    assert torch.allclose(grey, torch.full((3,), 0.299 * 2 - 1), atol=1e-6)  # its luma, as grey
    white = paler_colours(red, torch.ones(1), torch.ones(1)).flatten()
    assert torch.allclose(white, torch.ones(3))
    pale = paler_colours(red, torch.tensor([0.5]), torch.tensor([0.25])).flatten()
    r, g = 0.299 + 0.5 * 0.701, 0.299 * 0.5  # halfway to grey, then a quarter of the way to white
    expected = torch.tensor([r + 0.25 * (1 - r), g + 0.25 * (1 - g), g + 0.25 * (1 - g)]) * 2 - 1
    assert torch.allclose(pale, expected, atol=1e-6) and pale[0] > pale[1]  # still red, paler


def test_colour_jitter_changes_large_and_small_renders_alike(tmp_path):
    vae = tiny_upscaler().vae
    plain = ProceduralLatents.build(vae, DataSettings(seed=1, pool_size=3), tmp_path / "a.safetensors", 2, "cpu",
                                    image_size=32, with_low_res=True)
    jittered = ProceduralLatents.build(vae, DataSettings(seed=1, pool_size=3, low_res_colour_jitter=0.5),
                                       tmp_path / "b.safetensors", 2, "cpu", image_size=32, with_low_res=True)
    small_plain, small_jittered = (p.low_res.float() for p in (plain, jittered))
    assert (small_jittered - small_plain).abs().mean() > 1  # uint8 levels
    assert small_jittered.std(dim=1).mean() < small_plain.std(dim=1).mean()  # less saturated: channels closer
    assert not torch.equal(plain.latents, jittered.latents)  # the large render changed too
    again = ProceduralLatents.build(vae, DataSettings(seed=1, pool_size=3, low_res_colour_jitter=0.5),
                                    tmp_path / "c.safetensors", 2, "cpu", image_size=32, with_low_res=True)
    assert torch.equal(again.low_res, jittered.low_res)  # drawn per sample from the data seed
    with pytest.raises(ConfigError, match="colour_jitter"):
        parse_run_config({"model": {"init": "m"}, "data": {"kind": "procedural", "low_res_colour_jitter": 1.5}})
