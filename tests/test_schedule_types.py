"""Schedule types (AUTOMATIC1111's "Schedule type"): sigma chains against diffusers' options and their
definitions, names and labels, and the pipeline's ``schedule=``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.sampling.registry import SCHEDULE_LABELS, resolve_schedule_name
from ldm.sampling.schedule import NoiseSchedule, ScheduleConfig
from tests.test_samplers import _compare_with_diffusers, _diffusers_scheduler

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]


@pytest.mark.parametrize("schedule", ["exponential", "beta", "karras"])
@pytest.mark.parametrize("name,spacing", [("euler", "leading"), ("euler", "trailing"), ("dpmpp_2m", "leading"),
                                          ("unipc", "leading"), ("lms", "leading")])
def test_schedule_sigmas_match_diffusers_options(schedule, name, spacing):
    config = ScheduleConfig(timestep_spacing=spacing)
    scheduler = _diffusers_scheduler(name, config, schedule)
    scheduler.set_timesteps(12)
    ours = NoiseSchedule(config).sampling_sigmas(12, sampler=name, schedule=schedule)
    assert torch.allclose(ours, scheduler.sigmas.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", ["exponential", "beta"])
@pytest.mark.parametrize("name", ["euler", "lms", "dpm2"])
def test_samplers_on_exponential_and_beta_sigmas_match_diffusers(name, schedule):
    # (diffusers' DPM-Solver and UniPC truncate these schedules' fractional timesteps to integers before
    # calling the network; their sigma chains match ours, tested above)
    assert _compare_with_diffusers(name, "eps", "leading", karras=schedule, steps=10) < 1e-4


def test_schedules_defined_on_the_training_steps():
    schedule = NoiseSchedule(ScheduleConfig())
    sigmas, n = schedule.sigmas, 10
    t = schedule.sigma_to_t(schedule.sampling_sigmas(n, sampler="euler", schedule="sgm_uniform")[:-1].double())
    assert torch.allclose(t, torch.linspace(999, 0, n + 1, dtype=torch.float64)[:-1], atol=1e-3)
    t = schedule.sigma_to_t(schedule.sampling_sigmas(n, sampler="euler", schedule="uniform")[:-1].double())
    assert torch.allclose(t, torch.linspace(999, 0, n, dtype=torch.float64), atol=1e-3)
    simple = schedule.sampling_sigmas(n, sampler="euler", schedule="simple")
    assert torch.equal(simple, torch.cat([sigmas[[999 - 100 * i for i in range(n)]], torch.zeros(1, dtype=torch.float64)]).float())
    exponential = schedule.sampling_sigmas(n, sampler="dpmpp_2m", schedule="exponential")[:-1].double()
    assert torch.allclose(exponential.log().diff(), exponential.log().diff()[:1].expand(n - 1), rtol=1e-4)
    assert exponential[0].item() == pytest.approx(schedule.sigma_max, rel=1e-6)
    assert exponential[-1].item() == pytest.approx(schedule.sigma_min, rel=1e-6)
    beta = schedule.sampling_sigmas(n, sampler="dpmpp_2m", schedule="beta")[:-1].double()
    # Beta(0.6, 0.6) is symmetric: the quantiles of u and 1 - u add up to 1
    assert torch.allclose(beta + beta.flip(0), torch.full((n,), schedule.sigma_min + schedule.sigma_max,
                                                          dtype=torch.float64), rtol=1e-5)
    assert (beta.diff() < 0).all()


def test_every_schedule_ends_like_its_discretisation_and_descends():
    schedule = NoiseSchedule(ScheduleConfig())
    for name in SCHEDULE_LABELS:
        for sampler in ("euler", "ddim", "lcm"):
            sigmas = schedule.sampling_sigmas(6, sampler=sampler, schedule=name)
            final = float(schedule.sigmas[0]) if (sampler, name) == ("ddim", "default") else 0.0
            assert sigmas.shape == (7,) and (sigmas.diff() < 0).all(), (name, sampler)
            assert sigmas[-1].item() == pytest.approx(final, rel=1e-6), (name, sampler)


def test_karras_flag_is_the_karras_schedule():
    schedule = NoiseSchedule(ScheduleConfig())
    assert torch.equal(schedule.sampling_sigmas(8, sampler="euler", karras=True),
                       schedule.sampling_sigmas(8, sampler="euler", schedule="karras"))
    with pytest.raises(ValueError, match="contradicts"):
        schedule.sampling_sigmas(8, sampler="euler", karras=True, schedule="beta")
    with pytest.raises(ValueError, match="schedule must be one of"):
        schedule.sampling_sigmas(8, sampler="euler", schedule="cosine")


@pytest.mark.parametrize("given,sampler,ours", [("Karras", None, "karras"), ("SGM Uniform", None, "sgm_uniform"),
                                                ("exponential", None, "exponential"), ("Automatic", "dpmpp_2m", "karras"),
                                                ("Automatic", "dpmpp_2m_sde", "exponential"),
                                                ("automatic", "euler", "uniform"), ("Beta", "euler", "beta")])
def test_schedule_names_as_automatic1111_writes_them(given, sampler, ours):
    assert resolve_schedule_name(given, sampler) == ours


def test_unknown_schedule_name_lists_the_choices():
    with pytest.raises(ValueError, match="unknown schedule 'cosine'.*sgm_uniform \\(SGM Uniform\\)"):
        resolve_schedule_name("cosine")


# ---------------------------------------------------------------------- pipeline, PNG parameters, command line


def test_pipeline_schedule_changes_the_sigmas_and_karras_is_kept(pipe):
    from ldm.errors import ConfigError

    default = pipe("a red ball", steps=4, seed=1, output_type="pt")
    karras_flag = pipe("a red ball", steps=4, seed=1, karras=True, output_type="pt")
    assert torch.equal(karras_flag, pipe("a red ball", steps=4, seed=1, schedule="Karras", output_type="pt"))
    assert not torch.equal(default, karras_flag)
    beta = pipe("a red ball", steps=4, seed=1, schedule="beta", output_type="pt")
    assert not torch.equal(beta, karras_flag)
    assert pipe.sampling_options(sampler="dpmpp_2m", schedule="Automatic").schedule == "karras"
    assert pipe.sampling_options(sampler="euler", schedule="Automatic").schedule == "uniform"
    assert pipe.sampling_options(karras=True).schedule == "karras"
    with pytest.raises(ConfigError, match="unknown schedule 'cosine'"):
        pipe("a red ball", steps=2, schedule="cosine")
    with pytest.raises(ConfigError, match="contradicts"):
        pipe("a red ball", steps=2, karras=True, schedule="exponential")


def test_png_parameters_name_the_schedule_as_automatic1111_does():
    from ldm.images import a1111_parameters, read_a1111_parameters

    common = dict(steps=4, sampler="dpmpp_2m", guidance_scale=5.0, seed=1, width=32, height=32)
    fields = read_a1111_parameters(a1111_parameters("a cat", "", schedule="sgm_uniform", **common))
    assert fields["Sampler"] == "DPM++ 2M" and fields["Schedule type"] == "SGM Uniform"
    # our default chain is none of the web UI's schedule types, and its "Automatic" would mean Karras here
    assert "Schedule type" not in read_a1111_parameters(a1111_parameters("a cat", "", schedule="default", **common))


def test_from_png_reads_the_schedule_back_and_regenerates_the_image(tmp_path):
    from PIL import Image

    from ldm.cli import txt2img
    from ldm.images import read_a1111_parameters
    from tests.conftest import tiny_pipeline

    model = tmp_path / "model"
    tiny_pipeline(seed=7).save_pretrained(model)
    assert txt2img.main(["a red ball", "--model", str(model), "--steps", "3", "--sampler", "DPM++ 2M SDE",
                         "--schedule", "SGM Uniform", "--seed", "3", "--outdir", str(tmp_path / "first"),
                         "--quiet"]) == 0
    first = next((tmp_path / "first").glob("*.png"))
    fields = read_a1111_parameters(Image.open(first).info["parameters"])
    assert fields["Sampler"] == "DPM++ 2M SDE" and fields["Schedule type"] == "SGM Uniform"
    assert txt2img.main(["--from-png", str(first), "--model", str(model), "--outdir", str(tmp_path / "again"),
                         "--quiet"]) == 0
    again = next((tmp_path / "again").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))
    assert txt2img.main(["--from-png", str(first), "--schedule", "karras", "--model", str(model),
                         "--outdir", str(tmp_path / "other"), "--quiet"]) == 0  # a flag given wins
    other = next((tmp_path / "other").glob("*.png"))
    assert "Schedule type: Karras" in Image.open(other).info["parameters"]
    assert not np.array_equal(np.asarray(Image.open(other)), np.asarray(Image.open(first)))


def test_unknown_schedule_on_the_command_line_is_one_line(capsys):
    from ldm.cli import txt2img

    with pytest.raises(SystemExit) as exit_info:
        txt2img.main(["a cat", "--schedule", "cosine"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "unknown schedule 'cosine'" in error[0]


# ---------------------------------------------------------------------- seed resize (AUTOMATIC1111's variation option)


def test_seed_resize_from_pastes_the_old_sizes_noise_in_the_centre(pipe):
    generators = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    plain = pipe.initial_noise(generators(), 32, 32)
    assert torch.equal(pipe.initial_noise(generators(), 32, 32, seed_resize_from=(32, 32)), plain)
    old = pipe.initial_noise(generators(), 16, 24)  # latents [B, C, 8, 12] (f = 2)
    resized = pipe.initial_noise(generators(), 32, 32, seed_resize_from=(16, 24))  # [B, C, 16, 16]
    assert torch.equal(resized[..., 4:12, 2:14], old)  # centred: rows (16 - 8) / 2 = 4, columns (16 - 12) / 2 = 2
    outside = torch.ones_like(plain, dtype=torch.bool)
    outside[..., 4:12, 2:14] = False
    assert torch.equal(resized[outside], plain[outside])  # the border: the seed's own noise at the new size
    # larger old size: its centre is cropped (odd surplus: the web UI loses one more column)
    cropped = pipe.initial_noise(generators(), 32, 32, seed_resize_from=(32, 40))  # old [.., 16, 20]
    wide = pipe.initial_noise(generators(), 32, 40)
    assert torch.equal(cropped, wide[..., :, 2:18])
    odd = pipe.initial_noise(generators(), 32, 32, seed_resize_from=(32, 42))  # old [.., 16, 21]
    wider = pipe.initial_noise(generators(), 32, 42)
    assert torch.equal(odd[..., :, :15], wider[..., :, 3:18]) and torch.equal(odd[..., :, 15:], plain[..., :, 15:])
    with pytest.raises(ValueError, match="seed_resize_from"):
        pipe("a cat", steps=1, seed_resize_from=(0, 32))


def test_seed_resize_with_variation_slerps_at_the_old_size(pipe):
    from ldm.sampling.variation import Variation

    generators = lambda: [torch.Generator().manual_seed(5)]  # noqa: E731
    variation = Variation((9,), 0.3)
    old = pipe.initial_noise(generators(), 16, 16, variation)
    resized = pipe.initial_noise(generators(), 32, 32, variation, seed_resize_from=(16, 16))
    assert torch.equal(resized[..., 4:12, 4:12], old)


def test_seed_resize_from_on_the_command_line_round_trips_through_the_png(tmp_path):
    from PIL import Image

    from ldm.cli import txt2img
    from ldm.images import read_a1111_parameters
    from tests.conftest import tiny_pipeline

    model = tmp_path / "model"
    tiny_pipeline(seed=7).save_pretrained(model)
    common = ["--model", str(model), "--steps", "2", "--quiet"]
    assert txt2img.main(["a red ball", *common, "--W", "40", "--H", "32", "--seed-resize-from", "32x24",
                         "--outdir", str(tmp_path / "first")]) == 0
    first = next((tmp_path / "first").glob("*.png"))
    assert read_a1111_parameters(Image.open(first).info["parameters"])["Seed resize from"] == "32x24"
    assert txt2img.main(["--from-png", str(first), *common, "--outdir", str(tmp_path / "again")]) == 0
    again = next((tmp_path / "again").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))
    assert txt2img.main(["a red ball", *common, "--W", "40", "--H", "32", "--outdir", str(tmp_path / "plain")]) == 0
    plain = next((tmp_path / "plain").glob("*.png"))
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(first)))
