"""Signal-leak sampling (ldm/sampling/signal_leak.py, scripts/fit_signal_leak.py): statistics, the starting point, diffusers."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ldm.config import PipelineConfig
from ldm.errors import ConfigError
from ldm.pipeline import Txt2ImgPipeline
from ldm.sampling.samplers import initial_latents
from ldm.sampling.signal_leak import SignalLeak
from tests.conftest import tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent
LEAK = {"mean": [0.5, -0.2, 0.1, 0.3], "covariance": [[0.09, 0.02, 0, 0], [0.02, 0.04, 0, 0], [0, 0, 0.25, -0.1],
                                                       [0, 0, -0.1, 0.16]]}


def leaky_pipeline(seed: int = 0) -> Txt2ImgPipeline:
    pipe = tiny_pipeline(seed=seed)
    pipe.replace_config_sections({"sampling": {"signal_leak": LEAK}})
    return pipe


def test_fit_is_the_mean_and_covariance_of_the_per_channel_spatial_means():
    g = torch.Generator().manual_seed(0)
    offsets = torch.randn(500, 4, generator=g) * torch.tensor([1.0, 0.5, 0.2, 2.0]) + torch.tensor([1.0, 0, -1, 3])
    latents = offsets[:, :, None, None] + torch.randn(500, 4, 8, 8, generator=g) * 0.01
    leak = SignalLeak.fit(latents)
    means = latents.double().mean((2, 3))
    assert leak.count == 500
    assert torch.allclose(torch.tensor(leak.mean, dtype=torch.float64), means.mean(0), atol=1e-9)
    assert torch.allclose(torch.tensor(leak.covariance, dtype=torch.float64), torch.cov(means.T), atol=1e-9)


def test_samples_follow_the_statistics_and_each_row_its_own_generator():
    leak = SignalLeak(**LEAK)
    draws = leak.sample([torch.Generator().manual_seed(i) for i in range(20000)]).double()
    assert torch.allclose(draws.mean(0), torch.tensor(LEAK["mean"], dtype=torch.float64), atol=0.01)
    assert torch.allclose(torch.cov(draws.T), torch.tensor(LEAK["covariance"], dtype=torch.float64), atol=0.01)
    pair = leak.sample([torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)])
    assert torch.equal(pair[1], leak.sample([torch.Generator().manual_seed(6)])[0])


def test_bad_statistics_are_config_errors():
    with pytest.raises(ValueError, match="covariance must be 4x4"):
        SignalLeak(mean=LEAK["mean"], covariance=[[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="not symmetric positive definite"):
        SignalLeak(mean=[0, 0], covariance=[[1, 2], [2, 1]])
    with pytest.raises(ValueError, match="not symmetric positive definite"):
        SignalLeak(mean=[0, 0], covariance=[[1, 0.5], [0, 1]])
    config = tiny_pipeline().config.to_dict()
    config["sampling"]["signal_leak"] = {"mean": [0.0], "covariance": [[-1.0]]}
    with pytest.raises(ConfigError, match="sampling: .*positive definite"):
        PipelineConfig.from_dict(config)
    config["sampling"]["signal_leak"] = {"mean": [0.0], "covarience": [[1.0]]}
    with pytest.raises(ConfigError, match="covarience"):
        PipelineConfig.from_dict(config)


def test_starting_point_is_the_noise_plus_a_spatially_constant_leak():
    pipe = leaky_pipeline()
    options = pipe.sampling_options()
    sigmas = pipe.schedule.sampling_sigmas(options.steps, sampler=options.sampler)
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    x = pipe.starting_point(generators, sigmas, options)
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    noise = pipe.initial_noise(generators, 32, 32)
    leak = SignalLeak(**LEAK).sample(generators)  # the same generators, after the noise
    expected = initial_latents(noise, sigmas, sampler=options.sampler) + leak[:, :, None, None]
    assert torch.equal(x, expected)


def test_pipeline_uses_the_leak_by_default_and_can_turn_it_off():
    pipe, plain = leaky_pipeline(), tiny_pipeline()
    with_leak = pipe("a prompt", seed=1, output_type="pt")
    assert not torch.equal(with_leak, pipe("a prompt", seed=1, signal_leak=False, output_type="pt"))
    assert torch.equal(pipe("a prompt", seed=1, signal_leak=False, output_type="pt"),
                       plain("a prompt", seed=1, output_type="pt"))
    batch = pipe("a prompt", seed=1, num_images=2, output_type="pt")
    assert torch.equal(batch[1:], pipe("a prompt", seed=2, output_type="pt"))
    with pytest.raises(ConfigError, match="no signal-leak statistics"):
        plain("a prompt", signal_leak=True)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler"])
def test_diffusers_draws_the_same_image_from_diffusers_latents(tmp_path, sampler):
    import diffusers

    pipe = leaky_pipeline(seed=2)
    pipe.replace_config_sections({"schedule": {"timestep_spacing": "trailing", "steps_offset": 0},
                                  "sampling": {"sampler": sampler}})
    pipe.save_pretrained(tmp_path / "sd", format="diffusers")
    sd = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True)
    sd.set_progress_bar_config(disable=True)
    ours = pipe("a prompt", seed=7, steps=5, guidance_scale=4.0, output_type="pt")
    theirs = sd("a prompt", num_inference_steps=5, guidance_scale=4.0, height=32, width=32, output_type="pt",
                latents=pipe.diffusers_latents(7, steps=5)).images
    assert (ours - theirs).abs().max().item() < 1e-4


def test_fit_script_writes_and_removes_the_statistics(tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_pipeline().save_pretrained(folder)
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import fit_signal_leak
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert fit_signal_leak.main(["--model", str(folder), "--n", "16"]) == 0
    leak = Txt2ImgPipeline.from_pretrained(folder).config.sampling.signal_leak
    assert leak["count"] == 16 and len(leak["mean"]) == 4
    assert fit_signal_leak.main(["--model", str(folder), "--remove"]) == 0
    assert Txt2ImgPipeline.from_pretrained(folder).config.sampling.signal_leak is None
    assert not list(folder.glob("*.tmp"))
    capsys.readouterr()
    assert fit_signal_leak.main(["--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a model folder" in err


def test_signal_leak_survives_save_and_load(tmp_path):
    pipe = leaky_pipeline()
    pipe.save_pretrained(tmp_path / "m")
    loaded = Txt2ImgPipeline.from_pretrained(tmp_path / "m")
    assert loaded.config.sampling == replace(pipe.config.sampling)
    assert torch.equal(loaded("a prompt", seed=0, output_type="pt"), pipe("a prompt", seed=0, output_type="pt"))
