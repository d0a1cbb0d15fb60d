"""The samplers AUTOMATIC1111 offers beyond diffusers' oracle: k-diffusion's own functions as oracle
(the Brownian-noise SDE samplers, and LMS / DPM2 / DPM2 a as the web UI runs them), Brownian-tree
noise properties, and analytic Gaussian checks.

k-diffusion (PyPI ``k-diffusion``, a test-only dependency) is loaded as its two modules
``k_diffusion.utils`` and ``k_diffusion.sampling``: the package's ``__init__`` imports CLIP, wandb
and an image-metrics stack that the samplers do not use (and that fail to import without
setuptools' ``pkg_resources``).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import sys
import types

import diffusers
import pytest
import torch
from diffusers.schedulers import KarrasDiffusionSchedulers

from ldm.formats.diffusers_folder import (DIFFUSERS_OPTION_DEFAULTS, FALLBACK_SAMPLER, NO_ZERO_SNR_SUPPORT,
                                         SUBSTITUTE_SAMPLERS, sampler_for_scheduler, schedule_config_to_diffusers,
                                         scheduler_json)
from ldm.sampling.denoiser import DiscreteDenoiser
from ldm.sampling.registry import resolve_sampler_name, resolve_schedule_name
from ldm.sampling.samplers import SAMPLERS, BrownianNoise, final_latents, initial_latents, randn_like_rows
from ldm.sampling.schedule import NoiseSchedule, ScheduleConfig
from tests.conftest import tiny_pipeline_config
from tests.test_pipeline import NEGATIVE, PROMPT, diffusers_images, saved_diffusers  # noqa: F401 (a fixture)
from tests.test_samplers import CHANNELS, CONTEXT_DIM, ToyNetwork, _diffusers_scheduler, _gaussian_denoiser, _run_diffusers

pytestmark = [pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Should have:UserWarning")]  # torchsde, inside k-diffusion

SEEDS = (11, 12)


@pytest.fixture(scope="module")
def k_sampling():
    """k-diffusion's ``sampling`` module, imported without running the package's ``__init__``."""
    spec = importlib.util.find_spec("k_diffusion")
    assert spec is not None, "k-diffusion is a test dependency: pip install -e '.[test]'"
    folder = spec.submodule_search_locations[0]
    names = ("k_diffusion", "k_diffusion.utils", "k_diffusion.sampling")
    saved = {name: sys.modules.get(name) for name in names}
    package = types.ModuleType("k_diffusion")
    package.__path__ = [folder]
    sys.modules["k_diffusion"] = package
    try:
        for name in ("utils", "sampling"):
            module_spec = importlib.util.spec_from_file_location(f"k_diffusion.{name}", f"{folder}/{name}.py")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[f"k_diffusion.{name}"] = module
            module_spec.loader.exec_module(module)
            setattr(package, name, module)
        yield package.sampling
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _toy_denoise(prediction: str = "eps"):
    schedule = NoiseSchedule(ScheduleConfig(prediction=prediction))
    denoiser = DiscreteDenoiser(ToyNetwork(prediction), schedule)
    context = torch.randn(len(SEEDS), 5, CONTEXT_DIM, generator=torch.Generator().manual_seed(2))
    return schedule, lambda x, sigma: denoiser(x, sigma, context)


def _start(sigmas):
    return torch.randn(len(SEEDS), CHANNELS, 8, 8, generator=torch.Generator().manual_seed(3)) * float(sigmas[0])


# ---------------------------------------------------------------------- against k-diffusion


# our name -> k-diffusion's function and its options, as AUTOMATIC1111 calls them
K_DIFFUSION_SDE = {"dpmpp_2m_sde": ("sample_dpmpp_2m_sde", {}), "dpmpp_sde": ("sample_dpmpp_sde", {}),
                   "dpmpp_2m_sde_heun": ("sample_dpmpp_2m_sde", {"solver_type": "heun"}),
                   "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", {})}


@pytest.mark.parametrize("name", list(K_DIFFUSION_SDE))
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_sde_samplers_match_k_diffusion_with_the_web_uis_brownian_seeds(k_sampling, name, karras, prediction):
    """AUTOMATIC1111 gives k-diffusion one Brownian tree per image, seeded with the image's seed."""
    k_name, k_options = K_DIFFUSION_SDE[name]
    schedule, denoise = _toy_denoise(prediction)
    sigmas = schedule.sampling_sigmas(10, sampler=name, karras=karras)
    x = _start(sigmas)
    ours = SAMPLERS[name].fn(denoise, x, sigmas, generator=[torch.Generator().manual_seed(s) for s in SEEDS])
    noise = k_sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=list(SEEDS))
    theirs = getattr(k_sampling, k_name)(denoise, x, sigmas, disable=True, noise_sampler=noise, **k_options)
    assert (ours - theirs).abs().max() < 1e-5


def test_the_sde_multistep_samplers_differ_from_each_other():
    """The three share one loop: the options must still select three different updates."""
    schedule, denoise = _toy_denoise()
    sigmas = schedule.sampling_sigmas(8, sampler="dpmpp_3m_sde")
    x = _start(sigmas)
    outs = [SAMPLERS[name].fn(denoise, x, sigmas, generator=torch.Generator().manual_seed(5))
            for name in ("dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde")]
    assert min((a - b).abs().max() for a, b in [(outs[0], outs[1]), (outs[1], outs[2]), (outs[0], outs[2])]) > 1e-3


# ---------------------------------------------------------------------- DPM-Solver++ SDE against diffusers


class _ThirdOrderSignFixed(diffusers.DPMSolverMultistepScheduler):
    """diffusers' DPMSolverMultistepScheduler (0.42) with its third-order ``sde-dpmsolver++`` update corrected.

    diffusers weights D2 by ``((1 - e^(-2h) - 2h) / (2h)^2 - 1/2)``; the exact integral of the quadratic
    Taylor term (and k-diffusion, and diffusers' own ``dpmsolver++`` branch with h -> 2h) has ``+ 1/2``:
    ``-phi_3 = -((e^(-2h) - 1 + 2h) / (2h)^2 - 1/2)``. This adds the missing ``alpha_t * D2``.
    """

    def multistep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        x_t = super().multistep_dpm_solver_third_order_update(model_output_list, *args, sample=sample, noise=noise,
                                                              **kwargs)
        i = self.step_index
        alphas_sigmas = [self._sigma_to_alpha_sigma_t(self.sigmas[j]) for j in (i + 1, i, i - 1, i - 2)]
        lambdas = [torch.log(alpha) - torch.log(sigma) for alpha, sigma in alphas_sigmas]
        h, h_0, h_1 = (lambdas[k] - lambdas[k + 1] for k in range(3))
        r0, r1 = h_0 / h, h_1 / h
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        d2 = ((m0 - m1) / r0 - (m1 - m2) / r1) / (r0 + r1)
        return x_t + alphas_sigmas[0][0] * d2


def _run_diffusers_sde(name, prediction, karras, steps, *, fix_third_order=False, **scheduler_options):
    """Ours and diffusers' DPMSolverMultistepScheduler (the registry's options plus ``scheduler_options``) on
    the toy network, diffusers given our Brownian increments as ``variance_noise``: (ours, theirs) latents."""
    config = ScheduleConfig(prediction=prediction)
    schedule, network = NoiseSchedule(config), ToyNetwork(prediction)
    context = torch.randn(len(SEEDS), 5, CONTEXT_DIM, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(len(SEEDS), CHANNELS, 8, 8, generator=torch.Generator().manual_seed(3))
    denoiser = DiscreteDenoiser(network, schedule, round_timesteps=karras)
    sigmas = schedule.sampling_sigmas(steps, sampler=name, karras=karras)
    x = initial_latents(noise, sigmas, sampler=name)
    ours = SAMPLERS[name].fn(lambda x, s: denoiser(x, s, context), x, sigmas,
                             generator=[torch.Generator().manual_seed(s) for s in SEEDS])
    scheduler_config = {**_diffusers_scheduler(name, config, karras).config, **scheduler_options}
    scheduler_config.pop("_use_default_values", None)  # else from_config resets the options given here
    scheduler = (_ThirdOrderSignFixed if fix_third_order else diffusers.DPMSolverMultistepScheduler).from_config(
        scheduler_config)
    scheduler.set_timesteps(steps)
    seeds = [torch.Generator().manual_seed(s) for s in SEEDS]
    brownian = BrownianNoise(x, sigmas[sigmas > 0].min(), sigmas.max(), seeds)
    chain, theirs = sigmas.tolist(), noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        output = network(scheduler.scale_model_input(theirs, t), t.float().expand(len(SEEDS)), context)
        increment = brownian(chain[i], chain[i + 1]) if chain[i + 1] > 0 else torch.zeros_like(theirs)
        theirs = scheduler.step(output, t, theirs, variance_noise=increment).prev_sample
    return final_latents(ours, sigmas), theirs


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_2m_sde_heun"])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpmpp_2m_sde_samplers_match_diffusers_given_the_same_noise(name, karras, prediction):
    """``algorithm_type="sde-dpmsolver++"`` with ``solver_type`` midpoint / heun (the registry's options)."""
    ours, theirs = _run_diffusers_sde(name, prediction, karras, 10)
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_3m_sde_matches_diffusers_up_to_its_third_order_sign(karras):
    """diffusers' ``solver_order=3`` SDE equals k-diffusion's 3M SDE given (a) the Heun-type warm-up step
    (``solver_type="heun"``), (b) third order up to the last step (``lower_order_final=False``; it is off
    by itself from 15 steps) and (c) the corrected D2 weight (:class:`_ThirdOrderSignFixed`). As diffusers
    ships it, it lands O(1) away on this toy model (0.2 to 1 over 10 to 20 steps)."""
    fixed = dict(fix_third_order=True, solver_type="heun", lower_order_final=False)
    ours, theirs = _run_diffusers_sde("dpmpp_3m_sde", "eps", karras, 10, **fixed)
    assert (ours - theirs).abs().max() < 1e-4
    ours, as_shipped = _run_diffusers_sde("dpmpp_3m_sde", "eps", karras, 10)
    assert (ours - as_shipped).abs().max() > 0.05, "diffusers fixed its 3M SDE: drop _ThirdOrderSignFixed"


def test_sde_sampler_with_one_generator_uses_one_tree_for_the_batch(k_sampling):
    schedule, denoise = _toy_denoise()
    sigmas = schedule.sampling_sigmas(6, sampler="dpmpp_2m_sde")
    x = _start(sigmas)
    ours = SAMPLERS["dpmpp_2m_sde"].fn(denoise, x, sigmas, generator=torch.Generator().manual_seed(5))
    noise = k_sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=5)
    theirs = k_sampling.sample_dpmpp_2m_sde(denoise, x, sigmas, disable=True, noise_sampler=noise)
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("name,k_name", [("lms", "sample_lms"), ("dpm2", "sample_dpm_2"),
                                         ("dpm2_ancestral", "sample_dpm_2_ancestral")])
def test_lms_and_dpm2_match_k_diffusion_on_karras_sigmas(k_sampling, name, k_name):
    """The web UI runs these through k-diffusion (Karras sigmas by default for DPM2 and DPM2 a)."""
    schedule, denoise = _toy_denoise("v")
    sigmas = schedule.sampling_sigmas(10, sampler=name, karras=True)
    x = _start(sigmas)
    generator = torch.Generator().manual_seed(4)
    ours = SAMPLERS[name].fn(denoise, x, sigmas, generator=generator)
    options = {}
    if SAMPLERS[name].ancestral:
        replay = torch.Generator().manual_seed(4)
        options["noise_sampler"] = lambda sigma, sigma_next: randn_like_rows(x, replay)
    theirs = getattr(k_sampling, k_name)(denoise, x, sigmas, disable=True, **options)
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["dpm2", "dpm2_ancestral"])
def test_dpm2_karras_matches_diffusers_given_its_rounded_timesteps(name):
    """With Karras sigmas diffusers' KDPM2 schedulers feed the network round(t) at the chain's sigmas but
    the exact t at the midpoints; a denoiser that does the same makes the two samplers agree exactly."""
    config = ScheduleConfig()
    schedule = NoiseSchedule(config)
    network = ToyNetwork("eps")
    sigmas = schedule.sampling_sigmas(10, sampler=name, karras=True)
    calls = []

    def rounding_network(x, t, context):  # calls alternate: chain sigma, midpoint, chain sigma, ...
        calls.append(t)
        return network(x, t.round() if len(calls) % 2 == 1 else t, context)

    denoiser = DiscreteDenoiser(rounding_network, schedule)
    context = torch.randn(2, 5, CONTEXT_DIM, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(2, CHANNELS, 8, 8, generator=torch.Generator().manual_seed(3))
    x = initial_latents(noise, sigmas, sampler=name)
    ours = SAMPLERS[name].fn(lambda x, s: denoiser(x, s, context), x, sigmas,
                             generator=torch.Generator().manual_seed(5))
    ours = final_latents(ours, sigmas)
    theirs = _run_diffusers(name, config, True, network, noise, context, 10, torch.Generator().manual_seed(5))
    assert len(calls) == 2 * 10 - 1
    assert (ours - theirs).abs().max() < 1e-4


def test_lcm_timesteps_match_diffusers():
    schedule = NoiseSchedule(ScheduleConfig())
    for steps in (1, 2, 4, 8, 50):
        scheduler = _diffusers_scheduler("lcm", schedule.config, karras=False)
        scheduler.set_timesteps(steps)
        assert torch.equal(schedule.timesteps(steps, sampler="lcm"), scheduler.timesteps.double())
    assert schedule.timesteps(4, sampler="lcm").tolist() == [999, 759, 499, 259]
    with pytest.raises(ValueError, match="at most 50"):
        schedule.timesteps(51, sampler="lcm")


# ---------------------------------------------------------------------- Brownian noise


def test_brownian_noise_is_one_path_per_seed():
    like = torch.zeros(2, CHANNELS, 8, 8)
    batch = BrownianNoise(like, 0.1, 10.0, [torch.Generator().manual_seed(s) for s in SEEDS])
    alone = BrownianNoise(like[1:], 0.1, 10.0, [torch.Generator().manual_seed(SEEDS[1])])
    assert torch.equal(batch(5.0, 2.0)[1:], alone(5.0, 2.0))  # an image's noise does not depend on its batch
    # increments of one path add up: W(2) - W(5) = (W(3) - W(5)) + (W(2) - W(3))
    whole = batch(5.0, 2.0) * math.sqrt(3.0)
    parts = batch(5.0, 3.0) * math.sqrt(2.0) + batch(3.0, 2.0) * math.sqrt(1.0)
    assert (whole - parts).abs().max() < 1e-5
    assert not torch.equal(batch(5.0, 2.0)[0], batch(5.0, 2.0)[1])
    big = BrownianNoise(torch.zeros(4, 64, 64), 0.1, 10.0, torch.Generator().manual_seed(0))(9.0, 1.0)
    assert big.mean().abs() < 0.02 and big.std().item() == pytest.approx(1.0, abs=0.02)


# ---------------------------------------------------------------------- analytic Gaussian checks


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "dpmpp_sde",
                                  "dpm2_ancestral"])
def test_stochastic_samplers_draw_the_gaussian_data_distribution(name):
    """For data N(mu, s^2) the exact reverse SDE keeps x ~ N(mu, s^2 + sigma^2) at every level, so a
    fine chain must end at mean mu and std s (16384 draws: sampling error of the std ~0.5%)."""
    mu, s = 0.3, 0.5
    sigmas = NoiseSchedule(ScheduleConfig()).sampling_sigmas(60, sampler=name, karras=True)
    noise = torch.randn(64, CHANNELS, 8, 8, generator=torch.Generator().manual_seed(0))
    x = mu + math.sqrt(s**2 + float(sigmas[0]) ** 2) * noise
    out = SAMPLERS[name].fn(_gaussian_denoiser(mu, s), x, sigmas, generator=torch.Generator().manual_seed(1))
    assert out.mean().item() == pytest.approx(mu, abs=0.015)
    assert out.std().item() == pytest.approx(s, rel=0.03)


def test_lcm_with_the_exact_consistency_function_draws_the_data_distribution():
    """For data N(mu, s^2) the consistency function (the probability-flow ODE's map to sigma = 0) is
    f(x, sigma) = mu + s / sqrt(s^2 + sigma^2) (x - mu); LCM sampling with it is exact in any number of steps."""
    mu, s = 0.3, 0.5

    def consistency(x, sigma):
        return mu + s / (s**2 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt() * (x - mu)

    sigmas = NoiseSchedule(ScheduleConfig()).sampling_sigmas(4, sampler="lcm")
    noise = torch.randn(64, CHANNELS, 8, 8, generator=torch.Generator().manual_seed(0))
    x = mu + math.sqrt(s**2 + float(sigmas[0]) ** 2) * noise
    out = SAMPLERS["lcm"].fn(consistency, x, sigmas, generator=torch.Generator().manual_seed(1))
    assert out.mean().item() == pytest.approx(mu, abs=0.015)
    assert out.std().item() == pytest.approx(s, rel=0.015)
    one_step = SAMPLERS["lcm"].fn(consistency, x, sigmas[[0, -1]])
    assert (one_step - (mu + s * noise)).abs().max() < 1e-5


# ---------------------------------------------------------------------- diffusers folders


DIFFUSERS_CLASSES = sorted({member.name for member in KarrasDiffusionSchedulers} | {"LCMScheduler", "TCDScheduler"})


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    from tests.conftest import tiny_pipeline

    folder = tmp_path_factory.mktemp("sd") / "sd"
    tiny_pipeline(seed=1).save_pretrained(folder, format="diffusers")
    return folder


def _load_with_scheduler(folder, scheduler_config: dict):
    from ldm.pipeline import Txt2ImgPipeline

    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config))
    return Txt2ImgPipeline.from_pretrained(folder)


@pytest.mark.parametrize("class_name", DIFFUSERS_CLASSES)
def test_every_diffusers_scheduler_class_loads_as_its_sampler_or_names_the_substitute(diffusers_folder, class_name,
                                                                                     caplog):
    """A scheduler_config.json as diffusers itself writes it (all the class's defaults; PNDM as SD 1.5 ships it)."""
    base = schedule_config_to_diffusers(tiny_pipeline_config().schedule)
    sd_options = {"skip_prk_steps": True} if class_name == "PNDMScheduler" else {}
    scheduler = getattr(diffusers, class_name).from_config({**base, **sd_options})
    scheduler.save_config(diffusers_folder / "scheduler")
    written = json.loads((diffusers_folder / "scheduler" / "scheduler_config.json").read_text())
    with caplog.at_level("WARNING"):
        loaded = _load_with_scheduler(diffusers_folder, written)
    sampler = loaded.config.sampling.sampler
    exact = [name for name, spec in SAMPLERS.items() if spec.diffusers_class == class_name]
    if exact:
        assert sampler == exact[0] and not caplog.records  # the class default (DPM-Solver: dpmsolver++)
    else:
        assert sampler == SUBSTITUTE_SAMPLERS.get(class_name, FALLBACK_SAMPLER)
        assert any(f"{class_name} has no equivalent sampler here; sampling with {sampler}" in r.message
                   for r in caplog.records)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_saves_as_its_diffusers_scheduler_and_loads_back(diffusers_folder, name, caplog):
    from ldm.config import PipelineConfig

    config = tiny_pipeline_config(sampler=name)
    config = PipelineConfig.from_dict({**config.to_dict(), "sampling": {**config.to_dict()["sampling"],
                                                                       "karras": SAMPLERS[name].diffusers_karras}})
    written = scheduler_json(config)
    scheduler = getattr(diffusers, written["_class_name"]).from_config(written)  # diffusers reads it as meant
    for key, value in SAMPLERS[name].diffusers_options:
        assert scheduler.config[key] == value
    with caplog.at_level("WARNING"):
        loaded = _load_with_scheduler(diffusers_folder, written)
    assert loaded.config.sampling.sampler == name and not caplog.records
    assert loaded.config.sampling.karras == SAMPLERS[name].diffusers_karras


@pytest.mark.parametrize("options, ours", [
    ({"algorithm_type": "sde-dpmsolver++"}, "dpmpp_2m_sde"),
    ({"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, "dpmpp_2m_sde_heun"),
    ({"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, "dpmpp_3m_sde"),
    ({"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "heun"}, "dpmpp_3m_sde"),
])
def test_dpm_solver_sde_configs_select_their_sampler(options, ours, tmp_path, caplog):
    """A scheduler_config.json as diffusers writes it (every key, defaults included) picks the sampler."""
    written = diffusers.DPMSolverMultistepScheduler.from_config(options).config
    with caplog.at_level("WARNING"):
        assert sampler_for_scheduler({"_class_name": "DPMSolverMultistepScheduler", **written}, tmp_path) == ours
    assert not caplog.records


@pytest.mark.parametrize("given, ours, written", [("DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun"),
                                                  ("DPM++ 3M SDE", "dpmpp_3m_sde", "DPM++ 3M SDE"),
                                                  ("dpm++ 3m sde", "dpmpp_3m_sde", "DPM++ 3M SDE")])
def test_new_sde_samplers_by_their_web_ui_names(given, ours, written):
    """``--sampler "DPM++ 3M SDE"`` resolves; the PNG parameters write and read back the web UI's name."""
    from ldm.images import a1111_parameters, read_a1111_parameters

    assert resolve_sampler_name(given) == ours
    text = a1111_parameters("a cat", "", steps=20, sampler=ours, guidance_scale=7, seed=1, width=64, height=64,
                            schedule="exponential")
    assert read_a1111_parameters(text)["Sampler"] == written
    assert resolve_sampler_name(read_a1111_parameters(text)["Sampler"]) == ours
    assert resolve_schedule_name("Automatic", ours) == "exponential"  # the web UI's sampler option


def test_scheduler_variants_without_equivalent_name_the_substitute(diffusers_folder, caplog):
    base = schedule_config_to_diffusers(tiny_pipeline_config().schedule)
    with caplog.at_level("WARNING"):
        pndm = _load_with_scheduler(diffusers_folder, {**base, "_class_name": "PNDMScheduler", "skip_prk_steps": False})
        dpm = _load_with_scheduler(diffusers_folder, {**base, "_class_name": "DPMSolverMultistepScheduler",
                                                      "algorithm_type": "dpmsolver"})
        exponential = _load_with_scheduler(diffusers_folder, {**base, "_class_name": "EulerDiscreteScheduler",
                                                              "use_exponential_sigmas": True})
    assert pndm.config.sampling.sampler == "plms" and dpm.config.sampling.sampler == "dpmpp_2m"
    assert exponential.config.sampling.sampler == "euler"
    messages = " | ".join(r.message for r in caplog.records)
    assert "PNDMScheduler with skip_prk_steps=False has no equivalent sampler here; sampling with plms (PLMS)" in messages
    assert ("DPMSolverMultistepScheduler with algorithm_type='dpmsolver', solver_order=2, solver_type='midpoint' "
            "has no equivalent sampler here; sampling with dpmpp_2m") in messages
    assert "asks for exponential sigmas" in messages


def test_zero_snr_refusal_list_is_the_schedulers_without_the_option():
    lacking = {name for name, spec in SAMPLERS.items() if "rescale_betas_zero_snr" not in
               inspect.signature(getattr(diffusers, spec.diffusers_class).__init__).parameters}
    assert lacking == set(NO_ZERO_SNR_SUPPORT)
    for (class_name, key), default in DIFFUSERS_OPTION_DEFAULTS.items():
        assert inspect.signature(getattr(diffusers, class_name).__init__).parameters[key].default == default


@pytest.mark.parametrize("sampler", ["lms", "dpm2_ancestral", "unipc", "plms", "lcm"])
def test_pipeline_with_new_samplers_draws_diffusers_image(saved_diffusers, sampler):
    """The whole pipeline (guidance, VAE) against diffusers' StableDiffusionPipeline with the matching scheduler."""
    pipe, folder = saved_diffusers
    ours = pipe(PROMPT, NEGATIVE, sampler=sampler, steps=4, guidance_scale=5.0, seed=11, output_type="pt")
    theirs = diffusers_images(folder, sampler, seed=11)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_lcm_with_too_many_steps_is_a_one_line_error(pipe):
    from ldm.errors import ConfigError

    with pytest.raises(ConfigError, match="LCM sampler takes at most 50 steps"):
        pipe("a cat", sampler="LCM", steps=60)  # AUTOMATIC1111's names work in the pipeline too
    assert pipe.sampling_options(sampler="DPM++ 2M SDE").sampler == "dpmpp_2m_sde"
    with pytest.raises(ConfigError, match="unknown sampler 'DPM fast'"):
        pipe.sampling_options(sampler="DPM fast")
