"""Noise schedule, denoiser, guidance and samplers: equivalence with diffusers' schedulers and analytic checks.

Oracles: diffusers' DDPM/DDIM/Euler/EulerAncestral/Heun/DPMSolverMultistep schedulers driven in a
pipeline-style loop with the same deterministic toy network, the same initial noise and the same
seeded generator for per-step noise (diffusers' ``randn_tensor`` draws the same way as our
``randn_like_rows``, so even the ancestral samplers are compared exactly, not statistically).
"""

from __future__ import annotations

import inspect
import math

import diffusers
import pytest
import torch
import torch.nn.functional as F

from ldm.formats.compvis import schedule_config_from_compvis
from ldm.formats.diffusers_folder import schedule_config_from_diffusers, schedule_config_to_diffusers
from ldm.sampling.denoiser import DiscreteDenoiser, cfg_denoiser
from ldm.sampling.registry import DISCRETISATIONS, SAMPLER_NAMES
from ldm.sampling.samplers import SAMPLERS, ancestral_split, final_latents, initial_latents, randn_like_rows
from ldm.sampling.schedule import (
    BETA_SCHEDULES,
    NoiseSchedule,
    ScheduleConfig,
    karras_sigmas,
)

# diffusers' schedulers call np.array(tensor) in a way numpy 2 flags; not ours to fix
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]

TOL = 1e-4
CHANNELS, CONTEXT_DIM = 4, 8
DIFFUSERS_TAKES_GENERATOR = {"ddpm", "ddim", "euler_ancestral", "dpmpp_2m", "dpm2_ancestral", "lcm"}
# diffusers' scheduler is the oracle of every sampler but the Brownian-noise SDE samplers (k-diffusion is theirs:
# tests/test_samplers_a1111.py)
DIFFUSERS_ORACLE = [name for name, spec in SAMPLERS.items() if not spec.brownian]
DIFFUSERS_ZERO_SNR = [name for name in DIFFUSERS_ORACLE if "rescale_betas_zero_snr" in inspect.signature(
    getattr(diffusers, SAMPLERS[name].diffusers_class).__init__).parameters]


class ToyNetwork(torch.nn.Module):
    """A fixed random eps- or v-network ``(x_vp [B,C,H,W], t [B], context [B,L,D]) -> [B,C,H,W]``.

    Depends on x (3x3 conv), on t strongly enough that a timestep off by 0.01 changes the output by
    ~1e-4, and on the context, while staying bounded so the samplers stay well conditioned.
    """

    def __init__(self, prediction: str, seed: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(CHANNELS, CHANNELS, 3, 3, generator=g) * 0.15
        self.context_proj = torch.randn(CONTEXT_DIM, CHANNELS, generator=g) * 0.3
        self.phase = torch.rand(CHANNELS, generator=g) * 6
        self.prediction = prediction
        self.calls: list[int] = []  # batch size of each call

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        t = t.float().reshape(-1, 1, 1, 1)
        h = F.conv2d(x, self.weight, padding=1) + (context.mean(1) @ self.context_proj)[:, :, None, None]
        h = h + torch.sin(t / 20 + self.phase[None, :, None, None])
        if self.prediction == "eps":
            return x + 0.2 * torch.tanh(h)
        return 0.5 * torch.tanh(h) + 0.3 * x


# our schedule types -> the diffusers scheduler option that gives the same sigmas
DIFFUSERS_SCHEDULE_FLAGS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas",
                            "beta": "use_beta_sigmas"}


def _schedule_name(karras: bool | str) -> str:
    """``True``/``False`` (Karras or not) or a schedule name -> the schedule name."""
    return ("karras" if karras else "default") if isinstance(karras, bool) else karras


def _diffusers_scheduler(name: str, config: ScheduleConfig, karras: bool | str):
    scheduler_config = {**schedule_config_to_diffusers(config), **dict(SAMPLERS[name].diffusers_options)}
    schedule = _schedule_name(karras)
    if schedule != "default":
        scheduler_config[DIFFUSERS_SCHEDULE_FLAGS[schedule]] = True
    return getattr(diffusers, SAMPLERS[name].diffusers_class).from_config(scheduler_config)


def _run_diffusers(name, config, karras, network, noise, context, steps, generator, eta=0.0):
    """The StableDiffusionPipeline denoising loop (no guidance) with a diffusers scheduler."""
    scheduler = _diffusers_scheduler(name, config, karras)
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        output = network(model_input, t.float().expand(x.shape[0]), context)
        kwargs = {"generator": generator} if name in DIFFUSERS_TAKES_GENERATOR else {}
        if name == "ddim":
            kwargs["eta"] = eta
        x = scheduler.step(output, t, x, **kwargs).prev_sample
    return x


def _run_ours(name, config, karras, network, noise, context, steps, generator, eta=0.0):
    schedule = NoiseSchedule(config)
    spec = SAMPLERS[name]
    denoiser = DiscreteDenoiser(
        network, schedule, round_timesteps=_schedule_name(karras) == "karras" and spec.diffusers_rounds_karras_timesteps
    )
    sigmas = schedule.sampling_sigmas(steps, sampler=name, schedule=_schedule_name(karras))
    x = initial_latents(noise, sigmas, sampler=name, timestep_spacing=config.timestep_spacing)
    options = {"eta": eta} if "eta" in spec.options else {}
    x = spec.fn(lambda x, sigma: denoiser(x, sigma, context), x, sigmas, generator=generator, **options)
    return final_latents(x, sigmas, sampler=name)


def _compare_with_diffusers(name, prediction="eps", spacing="leading", karras=False, steps=10, eta=0.0, per_row=False,
                            zero_snr=False):
    config = ScheduleConfig(prediction=prediction, timestep_spacing=spacing, rescale_betas_zero_snr=zero_snr)
    network = ToyNetwork(prediction)
    batch = 2
    context = torch.randn(batch, 5, CONTEXT_DIM, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(batch, CHANNELS, 8, 8, generator=torch.Generator().manual_seed(3))

    def generator():
        if per_row:
            return [torch.Generator().manual_seed(10 + i) for i in range(batch)]
        return torch.Generator().manual_seed(5)

    expected = _run_diffusers(name, config, karras, network, noise, context, steps, generator(), eta)
    actual = _run_ours(name, config, karras, network, noise, context, steps, generator(), eta)
    return (actual - expected).abs().max().item()


# ---------------------------------------------------------------------- samplers vs diffusers


@pytest.mark.parametrize("name,prediction", [(name, prediction) for name in DIFFUSERS_ORACLE for prediction in ("eps", "v")
                                             if (name, prediction) != ("plms", "v")])  # plms v: the test below
def test_sampler_matches_diffusers_leading(name, prediction):
    steps = 7 if name == "ddim" else 10  # 1000 % 7 != 0 exercises the leading-spacing arithmetic
    assert _compare_with_diffusers(name, prediction, "leading", steps=steps) < TOL


def test_plms_on_a_v_model_extrapolates_noise_estimates():
    """diffusers' PNDM extrapolates the raw model output (v, for a v model); PLMS extrapolates the noise
    estimates, as CompVis and the web UI do. diffusers given the v network's noise estimate
    ``eps = sqrt(abar) v + sqrt(1 - abar) x_vp`` as an eps network is then the oracle."""
    config = ScheduleConfig(prediction="v")
    v_network = ToyNetwork("v")
    alphas_cumprod = NoiseSchedule(config).alphas_cumprod.float()

    def eps_network(x_vp, t, context):
        abar = alphas_cumprod[t.round().long()].reshape(-1, 1, 1, 1)
        return abar.sqrt() * v_network(x_vp, t, context) + (1 - abar).sqrt() * x_vp

    context = torch.randn(2, 5, CONTEXT_DIM, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(2, CHANNELS, 8, 8, generator=torch.Generator().manual_seed(3))
    eps_config = ScheduleConfig(prediction="eps")
    expected = _run_diffusers("plms", eps_config, False, eps_network, noise, context, 10, None)
    actual = _run_ours("plms", config, False, v_network, noise, context, 10, None)
    assert (actual - expected).abs().max() < TOL
    assert _compare_with_diffusers("plms", "v", "leading", steps=10) > 1e-2  # diffusers' own v extrapolation


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "lms", "unipc"])
def test_sampler_matches_diffusers_karras(name):
    # euler_ancestral/ddim/ddpm/plms/lcm: diffusers has no Karras option for them; dpm2: test_samplers_a1111.py.
    assert _compare_with_diffusers(name, "eps", "leading", karras=True) < TOL


def test_dpmpp_2m_karras_v_matches_diffusers_with_rounded_timesteps():
    assert _compare_with_diffusers("dpmpp_2m", "v", "leading", karras=True, steps=12) < TOL


@pytest.mark.parametrize("name,prediction", [("euler", "eps"), ("euler_ancestral", "v"), ("dpmpp_2m", "v"), ("ddim", "eps"),
                                             ("lms", "v"), ("dpm2", "eps"), ("dpm2_ancestral", "v"), ("unipc", "v"),
                                             ("plms", "eps"), ("lcm", "v")])
def test_sampler_matches_diffusers_trailing(name, prediction):
    # trailing: the Euler family starts from noise * sigma_max in diffusers (initial_latents follows)
    assert _compare_with_diffusers(name, prediction, "trailing", steps=10) < TOL


@pytest.mark.parametrize("name", DIFFUSERS_ZERO_SNR)  # diffusers' Heun, LMS, KDPM2, PNDM: no zero SNR
def test_sampler_matches_diffusers_with_zero_terminal_snr(name):
    # diffusers' Euler/DPM schedulers replace alpha_bar = 0 by 2^-24 at t = 999 (sigma = 4096), as we
    # do for every sampler. Its DDPM/DDIM keep the exact 0; a first step from sigma = 4096 instead of
    # infinity differs by about (sigma_next / 4096)^2 ~ 1e-4 relative, hence the looser tolerance.
    tolerance = 1e-3 if name in ("ddpm", "ddim") else TOL
    assert _compare_with_diffusers(name, "v", "trailing", steps=10, zero_snr=True) < tolerance


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_with_eta_matches_diffusers(prediction):
    assert _compare_with_diffusers("ddim", prediction, "leading", steps=10, eta=1.0) < TOL
    assert _compare_with_diffusers("ddim", prediction, "leading", steps=10, eta=0.5) < TOL


@pytest.mark.parametrize("name", ["ddpm", "euler_ancestral", "dpm2_ancestral", "lcm"])
def test_ancestral_with_per_row_generators_matches_diffusers(name):
    assert _compare_with_diffusers(name, "eps", "leading", steps=8, per_row=True) < TOL


# ---------------------------------------------------------------------- schedule vs diffusers


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_alphas_cumprod_match_diffusers(beta_schedule):
    config = ScheduleConfig(beta_schedule=beta_schedule)
    ours = NoiseSchedule(config)
    theirs = diffusers.DDPMScheduler.from_config(schedule_config_to_diffusers(config))
    assert ours.betas.dtype == torch.float64
    assert (ours.alphas_cumprod - theirs.alphas_cumprod.double()).abs().max() < 1e-6


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_zero_terminal_snr_rescaling_matches_diffusers_and_lin_et_al(beta_schedule):
    plain = NoiseSchedule(ScheduleConfig(beta_schedule=beta_schedule, prediction="v"))
    config = ScheduleConfig(beta_schedule=beta_schedule, prediction="v", rescale_betas_zero_snr=True)
    ours = NoiseSchedule(config)
    theirs = diffusers.DDPMScheduler.from_config(schedule_config_to_diffusers(config))
    assert (ours.alphas_cumprod - theirs.alphas_cumprod.double()).abs().max() < 1e-6
    # Lin et al. 2024, Algorithm 1: sqrt(alpha_bar) is 0 at the last step and unchanged at the first
    assert ours.alphas_cumprod[-1] == 0
    assert torch.isclose(ours.alphas_cumprod[0], plain.alphas_cumprod[0], rtol=1e-12)
    assert (ours.alphas_cumprod.diff() < 0).all()
    assert ours.sigmas[-1] == pytest.approx((1 - 2**-24) ** 0.5 * 2**12)  # diffusers' stand-in for infinity


def test_zero_terminal_snr_needs_v_prediction():
    with pytest.raises(ValueError, match="needs prediction 'v'"):
        ScheduleConfig(rescale_betas_zero_snr=True)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_and_sigmas_match_diffusers(spacing):
    config = ScheduleConfig(timestep_spacing=spacing)
    schedule = NoiseSchedule(config)
    alphas_cumprod = schedule.alphas_cumprod
    for steps in (1, 7, 10, 30, 50):
        for name in ("ddpm", "ddim", "euler", "dpmpp_2m", "unipc", "lcm"):
            scheduler = _diffusers_scheduler(name, config, karras=False)
            scheduler.set_timesteps(steps)
            ours = schedule.timesteps(steps, sampler=name)
            assert torch.equal(ours, scheduler.timesteps.double()), (name, steps)
        # sigma chains: the Euler family and DPM-Solver keep them in scheduler.sigmas
        for name in ("euler", "dpmpp_2m"):
            scheduler = _diffusers_scheduler(name, config, karras=False)
            scheduler.set_timesteps(steps)
            ours = schedule.sampling_sigmas(steps, sampler=name)
            # fractional timesteps (Euler + linspace): we interpolate log-sigma, diffusers sigma (documented)
            rtol = 1e-3 if (name, spacing) == ("euler", "linspace") else 1e-5
            assert torch.allclose(ours, scheduler.sigmas.float(), rtol=rtol, atol=1e-6), (name, steps)
        # DDPM/DDIM: the strided chain, then alpha_bar = 1 (DDPM) or alpha_bar[0] (DDIM, set_alpha_to_one=False)
        t = schedule.timesteps(steps, sampler="ddim").long()
        chain = ((1 - alphas_cumprod[t]) / alphas_cumprod[t]).sqrt()
        assert torch.allclose(schedule.sampling_sigmas(steps, sampler="ddpm"), torch.cat([chain, chain.new_zeros(1)]).float())
        ddim_end = chain.new_tensor([schedule.sigmas[0]])
        assert torch.allclose(schedule.sampling_sigmas(steps, sampler="ddim"), torch.cat([chain, ddim_end]).float())


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_karras_sigmas_match_diffusers(name, spacing):
    config = ScheduleConfig(timestep_spacing=spacing)
    scheduler = _diffusers_scheduler(name, config, karras=True)
    scheduler.set_timesteps(15)
    theirs = scheduler.sigmas if name != "heun" else torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1::2]])
    ours = NoiseSchedule(config).sampling_sigmas(15, sampler=name, karras=True)
    assert torch.allclose(ours, theirs.float(), rtol=1e-5, atol=1e-6)


def test_karras_sigmas_formula():
    sigmas = karras_sigmas(5, 0.1, 10.0, rho=7.0)
    assert sigmas[0].item() == pytest.approx(10.0) and sigmas[-1].item() == pytest.approx(0.1)
    # Karras et al. (2022) eq. 5: sigma^(1/rho) is evenly spaced
    assert torch.allclose(torch.diff(sigmas ** (1 / 7)), torch.full((4,), (0.1 ** (1 / 7) - 10 ** (1 / 7)) / 4, dtype=torch.float64))


def test_initial_latents_scale_matches_diffusers_init_noise_sigma():
    noise = torch.ones(1, 1, 1, 1)
    for spacing in ("leading", "trailing", "linspace"):
        config = ScheduleConfig(timestep_spacing=spacing)
        for name in SAMPLERS:
            scheduler = _diffusers_scheduler(name, config, karras=False)
            scheduler.set_timesteps(10)
            sigmas = NoiseSchedule(config).sampling_sigmas(10, sampler=name)
            ours = initial_latents(noise, sigmas, sampler=name, timestep_spacing=spacing).item()
            sigma_0 = float(sigmas[0])
            # on the sigma scale, diffusers' VP schedulers (scale_model_input = identity) start at sqrt(1 + sigma_0^2)
            vp_scheduler = SAMPLERS[name].discretisation != "k"
            theirs = math.sqrt(1 + sigma_0**2) if vp_scheduler else float(scheduler.init_noise_sigma)
            assert ours == pytest.approx(theirs, rel=1e-5), (name, spacing)


# ---------------------------------------------------------------------- schedule config


def test_schedule_config_dict_round_trip_and_unknown_key():
    config = ScheduleConfig(beta_schedule="linear", prediction="v", timestep_spacing="trailing", steps_offset=0)
    assert ScheduleConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="betaschedule"):
        ScheduleConfig.from_dict({"betaschedule": "linear"})
    with pytest.raises(ValueError):
        ScheduleConfig(prediction="sample")


def test_schedule_config_diffusers_names():
    sd15 = {  # the scheduler_config.json Stable Diffusion 1.5 ships (PNDM, no timestep_spacing key)
        "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "trained_betas": None,
    }
    assert schedule_config_from_diffusers(sd15) == ScheduleConfig()
    sd2v = {**sd15, "prediction_type": "v_prediction", "timestep_spacing": "leading"}
    assert schedule_config_from_diffusers(sd2v).prediction == "v"
    cosine = ScheduleConfig(beta_schedule="cosine", prediction="v")
    assert schedule_config_to_diffusers(cosine)["beta_schedule"] == "squaredcos_cap_v2"
    assert schedule_config_to_diffusers(cosine)["prediction_type"] == "v_prediction"
    assert schedule_config_from_diffusers(schedule_config_to_diffusers(cosine)) == cosine
    zero_snr = ScheduleConfig(prediction="v", timestep_spacing="trailing", steps_offset=0, rescale_betas_zero_snr=True)
    assert schedule_config_to_diffusers(zero_snr)["rescale_betas_zero_snr"] is True
    assert schedule_config_from_diffusers(schedule_config_to_diffusers(zero_snr)) == zero_snr
    with pytest.raises(ValueError):
        schedule_config_from_diffusers({**sd15, "prediction_type": "sample"})


def test_schedule_config_compvis_linear_is_diffusers_scaled_linear():
    params = {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "parameterization": "v"}
    config = schedule_config_from_compvis(params)
    assert config.beta_schedule == "scaled_linear" and config.prediction == "v"
    assert config.timestep_spacing == "leading" and config.steps_offset == 1
    assert schedule_config_from_compvis({**params, "beta_schedule": "sqrt_linear"}).beta_schedule == "linear"


# ---------------------------------------------------------------------- analytic checks


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_sigma_to_t_inverts_t_to_sigma(beta_schedule):
    schedule = NoiseSchedule(ScheduleConfig(beta_schedule=beta_schedule))
    t = torch.linspace(0, 999, 20001, dtype=torch.float64)
    assert (schedule.sigma_to_t(schedule.t_to_sigma(t)) - t).abs().max() < 1e-9
    integers = torch.arange(1000, dtype=torch.float64)
    assert torch.equal(schedule.sigma_to_t(schedule.sigmas), integers)
    assert torch.allclose(schedule.t_to_sigma(integers), schedule.sigmas, rtol=1e-12, atol=0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_denoiser_inverts_eps_and_v_scalings(prediction):
    """A network that returns the true eps / v makes the denoiser return the clean latent exactly."""
    config = ScheduleConfig(prediction=prediction)
    schedule = NoiseSchedule(config)
    oracle = diffusers.DDPMScheduler.from_config(schedule_config_to_diffusers(config))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, CHANNELS, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, CHANNELS, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 999])
    oracle.alphas_cumprod = schedule.alphas_cumprod  # float64 for an exact comparison
    x_vp = oracle.add_noise(z, eps, t)
    target = eps if prediction == "eps" else oracle.get_velocity(z, eps, t)
    seen = {}

    def network(model_input, timestep, context):
        seen["input"], seen["t"] = model_input, timestep
        return target

    sigma = schedule.sigmas[t]
    x = x_vp * (1 + sigma[:, None, None, None] ** 2).sqrt()  # = z + sigma * eps
    x0 = DiscreteDenoiser(network, schedule)(x, sigma, torch.zeros(4, 1, 1))
    assert (x0 - z).abs().max() < 1e-9
    assert (seen["input"] - x_vp).abs().max() < 1e-9
    assert torch.allclose(seen["t"], t.float(), atol=1e-4)


def _gaussian_denoiser(mu: float, s: float):
    """The ideal denoiser E[z | x] for data z ~ N(mu, s^2) per element and x = z + sigma * eps."""

    def denoise(x, sigma):
        sigma = sigma.reshape(-1, 1, 1, 1)
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)

    return denoise


@pytest.mark.parametrize(
    "name,steps,tolerance", [("euler", 200, 0.04), ("ddim", 200, 0.04), ("heun", 50, 0.01), ("dpmpp_2m", 50, 0.005),
                             ("lms", 50, 0.005), ("dpm2", 50, 0.01), ("unipc", 50, 0.005), ("plms", 50, 0.005)]
)
def test_deterministic_samplers_follow_the_exact_gaussian_flow(name, steps, tolerance):
    """For Gaussian data the probability-flow ODE keeps (x - mu) / sqrt(s^2 + sigma^2) constant, so each
    noise draw maps to one known sample: mu + s * noise (plus the chain's final sigma)."""
    mu, s = 0.3, 0.5
    schedule = NoiseSchedule(ScheduleConfig())
    sigmas = schedule.sampling_sigmas(steps, sampler=name, karras=True)
    noise = torch.randn(64, CHANNELS, 8, 8, generator=torch.Generator().manual_seed(0))
    x = mu + math.sqrt(s**2 + float(sigmas[0]) ** 2) * noise
    out = SAMPLERS[name].fn(_gaussian_denoiser(mu, s), x, sigmas)
    expected = mu + math.sqrt(s**2 + float(sigmas[-1]) ** 2) * noise
    assert (out - expected).abs().max() < tolerance
    assert out.mean().item() == pytest.approx(expected.mean().item(), abs=0.01)
    assert out.std().item() == pytest.approx(expected.std().item(), rel=0.02)


@pytest.mark.parametrize("name,options", [("ddpm", {}), ("euler_ancestral", {}), ("ddim", {"eta": 1.0})])
def test_ancestral_samplers_give_the_predicted_gaussian(name, options):
    """With Gaussian data every ancestral step is linear-Gaussian: x' - mu = a (x - mu) + sigma_up * n with
    a = k + (sigma_down / sigma)(1 - k), k = s^2 / (s^2 + sigma^2). The sample std must match that
    recursion (which tends to s as steps grow) and the mean must be mu."""
    mu, s = 0.3, 0.5
    schedule = NoiseSchedule(ScheduleConfig())
    sigmas = schedule.sampling_sigmas(100, sampler=name)
    noise = torch.randn(64, CHANNELS, 8, 8, generator=torch.Generator().manual_seed(0))
    variance = s**2 + float(sigmas[0]) ** 2
    x = mu + math.sqrt(variance) * noise
    out = SAMPLERS[name].fn(_gaussian_denoiser(mu, s), x, sigmas, generator=torch.Generator().manual_seed(1), **options)
    for sigma, sigma_next in zip(sigmas.tolist()[:-1], sigmas.tolist()[1:]):
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next, options.get("eta", 1.0))
        k = s**2 / (s**2 + sigma**2)
        a = k + sigma_down / sigma * (1 - k)
        variance = a**2 * variance + sigma_up**2
    assert math.sqrt(variance) == pytest.approx(s, rel=0.1)  # fixed_small under-disperses at finite steps
    assert out.std().item() == pytest.approx(math.sqrt(variance), rel=0.025)
    assert out.mean().item() == pytest.approx(mu, abs=0.015)


def test_ddim_eta0_is_euler_on_the_same_chain():
    schedule = NoiseSchedule(ScheduleConfig())
    sigmas = schedule.sampling_sigmas(10, sampler="ddim")
    x = torch.randn(2, CHANNELS, 8, 8, generator=torch.Generator().manual_seed(0)) * 10
    denoise = _gaussian_denoiser(0.3, 0.5)
    ddim = SAMPLERS["ddim"].fn(denoise, x, sigmas)
    euler = SAMPLERS["euler"].fn(denoise, x, sigmas)
    assert (ddim - euler).abs().max() < 1e-5


# ---------------------------------------------------------------------- contracts


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_do_not_modify_inputs_and_use_randomness_only_when_ancestral(name):
    schedule = NoiseSchedule(ScheduleConfig())
    network = ToyNetwork("eps")
    denoiser = DiscreteDenoiser(network, schedule)
    context = torch.randn(2, 5, CONTEXT_DIM)
    denoise = lambda x, sigma: denoiser(x, sigma, context)  # noqa: E731
    sigmas = schedule.sampling_sigmas(5, sampler=name)
    x = torch.randn(2, CHANNELS, 8, 8)
    x_before, sigmas_before = x.clone(), sigmas.clone()
    steps_seen = []
    out_a = SAMPLERS[name].fn(
        denoise, x, sigmas, generator=torch.Generator().manual_seed(0), callback=lambda i, xi, x0: steps_seen.append(i)
    )
    assert torch.equal(x, x_before) and torch.equal(sigmas, sigmas_before)
    assert steps_seen == list(range(5))
    out_b = SAMPLERS[name].fn(denoise, x, sigmas, generator=torch.Generator().manual_seed(1))
    out_a_again = SAMPLERS[name].fn(denoise, x, sigmas, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out_a, out_a_again)
    assert torch.equal(out_a, out_b) != SAMPLERS[name].ancestral


@pytest.mark.parametrize("name", ["ddpm", "euler_ancestral"])
def test_per_row_generators_make_a_row_independent_of_its_batch(name):
    schedule = NoiseSchedule(ScheduleConfig())
    network = ToyNetwork("eps")
    denoiser = DiscreteDenoiser(network, schedule)
    sigmas = schedule.sampling_sigmas(6, sampler=name)
    context = torch.randn(3, 5, CONTEXT_DIM, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, CHANNELS, 8, 8, generator=torch.Generator().manual_seed(2))
    batch = SAMPLERS[name].fn(
        lambda x, s: denoiser(x, s, context), x, sigmas, generator=[torch.Generator().manual_seed(100 + i) for i in range(3)]
    )
    alone = SAMPLERS[name].fn(
        lambda x, s: denoiser(x, s, context[1:2]), x[1:2], sigmas, generator=[torch.Generator().manual_seed(101)]
    )
    assert (batch[1:2] - alone).abs().max() < 1e-6
    # row i's noise comes from generators[i] only
    rows = randn_like_rows(x, [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8), torch.Generator().manual_seed(9)])
    assert torch.equal(rows[2:3], torch.randn(1, CHANNELS, 8, 8, generator=torch.Generator().manual_seed(9)))
    with pytest.raises(ValueError):
        randn_like_rows(x, [torch.Generator(), torch.Generator()])


def test_cfg_scale_one_is_the_conditional_denoiser_in_one_call():
    schedule = NoiseSchedule(ScheduleConfig())
    network = ToyNetwork("eps")
    denoiser = DiscreteDenoiser(network, schedule)
    cond, uncond = torch.randn(2, 5, CONTEXT_DIM), torch.randn(2, 5, CONTEXT_DIM)
    x, sigma = torch.randn(2, CHANNELS, 8, 8) * 3, torch.tensor([3.0, 3.0])
    expected = denoiser(x, sigma, cond)
    network.calls.clear()
    guided = cfg_denoiser(denoiser, cond, uncond, 1.0)(x, sigma)
    assert torch.equal(guided, expected)
    assert network.calls == [2]


def test_cfg_mixes_uncond_and_cond_in_one_batched_call_like_diffusers():
    schedule = NoiseSchedule(ScheduleConfig())
    network = ToyNetwork("eps")
    denoiser = DiscreteDenoiser(network, schedule)
    cond, uncond = torch.randn(2, 5, CONTEXT_DIM), torch.randn(2, 5, CONTEXT_DIM)
    x, sigma, scale = torch.randn(2, CHANNELS, 8, 8) * 3, torch.tensor([3.0, 3.0]), 7.5
    network.calls.clear()
    guided = cfg_denoiser(denoiser, cond, uncond, scale)(x, sigma)
    assert network.calls == [4]
    # diffusers guides the network output: eps = eps_u + w (eps_c - eps_u), then x0 = x - sigma * eps
    t = schedule.sigma_to_t(sigma)
    x_vp = x / math.sqrt(1 + 9.0)
    eps_u, eps_c = network(x_vp, t, uncond), network(x_vp, t, cond)
    expected = x - 3.0 * (eps_u + scale * (eps_c - eps_u))
    assert (guided - expected).abs().max() < 1e-4


def test_registry_is_consistent():
    assert set(SAMPLERS) == {"ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m", "lms", "dpm2",
                             "dpm2_ancestral", "unipc", "plms", "dpmpp_2m_sde", "dpmpp_sde", "lcm", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"}
    assert tuple(SAMPLERS) == SAMPLER_NAMES  # one registry: the functions cover exactly its names
    for name, spec in SAMPLERS.items():
        assert spec.discretisation in DISCRETISATIONS and callable(spec.fn)
        assert hasattr(diffusers, spec.diffusers_class)
        assert spec.diffusers_karras == ("use_karras_sigmas" in inspect.signature(
            getattr(diffusers, spec.diffusers_class).__init__).parameters)
    assert SAMPLERS["ddim"].options == ("eta",)


# ---------------------------------------------------------------------------------------- sampler names


@pytest.mark.parametrize("given, ours", [("DPM++ 2M", "dpmpp_2m"), ("euler a", "euler_ancestral"),
                                         ("Euler", "euler"), ("ddim", "ddim"), ("DDPM", "ddpm"), ("Heun", "heun")])
def test_automatic1111_sampler_names_are_understood(given, ours):
    from ldm.sampling.registry import resolve_sampler_name

    assert resolve_sampler_name(given) == ours
