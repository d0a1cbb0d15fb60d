"""The sampler registry: every sampler name the package knows and what it corresponds to elsewhere.

The one table that the CLI choices, the pipeline, the PNG parameters (AUTOMATIC1111 names) and
the diffusers scheduler mapping all read. It holds names and facts only (no torch), so
command-line parsing can use it without loading the networks; :mod:`ldm.sampling.samplers`
attaches the sampling function to each entry.
"""

from __future__ import annotations

from dataclasses import dataclass

DISCRETISATIONS = ("ddpm", "ddim", "k", "dpm", "lcm")


@dataclass(frozen=True)
class SamplerInfo:
    """What one sampler is, outside its function.

    Attributes:
        discretisation: the sigma chain it walks, one of :data:`DISCRETISATIONS` (the timesteps of
            the matching diffusers scheduler: DDPM, DDIM/PNDM, the Euler family "k", DPM-Solver/UniPC
            "dpm", LCM "lcm").
        ancestral: draws fresh noise each step (results depend on the generator); DDIM only with eta > 0.
        diffusers_class: the equivalent diffusers scheduler class name.
        a1111_name: the name AUTOMATIC1111 writes in its PNG parameters ("Sampler: ...").
        options: keyword options beyond the common signature (e.g. ``("eta",)``).
        diffusers_karras: the diffusers scheduler has ``use_karras_sigmas``.
        diffusers_rounds_karras_timesteps: diffusers feeds the network ``round(t)`` with Karras sigmas;
            build the denoiser with ``round_timesteps=True`` to reproduce it exactly.
        diffusers_options: ``(key, value)`` pairs of the diffusers scheduler config that select this
            sampler among those of the same class (DPM-Solver's ``algorithm_type``, PNDM's ``skip_prk_steps``).
        brownian: its noise is a Brownian tree (``torchsde``) seeded by each row's generator seed, as
            k-diffusion and AUTOMATIC1111 draw it, so diffusers' scheduler (plain per-step noise) is no
            oracle for it: k-diffusion's own function is.
        a1111_schedule: the schedule AUTOMATIC1111's "Automatic" schedule type means for this sampler
            (its sampler option ``scheduler``), or ``None``: the model's own discretisation.
    """

    discretisation: str
    ancestral: bool
    diffusers_class: str
    a1111_name: str
    options: tuple[str, ...] = ()
    diffusers_karras: bool = False
    diffusers_rounds_karras_timesteps: bool = False
    diffusers_options: tuple[tuple[str, object], ...] = ()
    brownian: bool = False
    a1111_schedule: str | None = None


SAMPLER_INFO: dict[str, SamplerInfo] = {
    "ddpm": SamplerInfo("ddpm", True, "DDPMScheduler", "DDPM"),
    "ddim": SamplerInfo("ddim", False, "DDIMScheduler", "DDIM", options=("eta",)),
    "euler": SamplerInfo("k", False, "EulerDiscreteScheduler", "Euler", diffusers_karras=True),
    "euler_ancestral": SamplerInfo("k", True, "EulerAncestralDiscreteScheduler", "Euler a"),
    "heun": SamplerInfo("k", False, "HeunDiscreteScheduler", "Heun", diffusers_karras=True),
    "dpmpp_2m": SamplerInfo("dpm", False, "DPMSolverMultistepScheduler", "DPM++ 2M", diffusers_karras=True,
                            diffusers_rounds_karras_timesteps=True,
                            diffusers_options=(("algorithm_type", "dpmsolver++"),), a1111_schedule="karras"),
    "lms": SamplerInfo("k", False, "LMSDiscreteScheduler", "LMS", diffusers_karras=True),
    "dpm2": SamplerInfo("k", False, "KDPM2DiscreteScheduler", "DPM2", diffusers_karras=True, a1111_schedule="karras"),
    "dpm2_ancestral": SamplerInfo("k", True, "KDPM2AncestralDiscreteScheduler", "DPM2 a", diffusers_karras=True,
                                  a1111_schedule="karras"),
    "unipc": SamplerInfo("dpm", False, "UniPCMultistepScheduler", "UniPC", diffusers_karras=True,
                         diffusers_rounds_karras_timesteps=True),
    "plms": SamplerInfo("ddim", False, "PNDMScheduler", "PLMS", diffusers_options=(("skip_prk_steps", True),)),
    "dpmpp_2m_sde": SamplerInfo("dpm", True, "DPMSolverMultistepScheduler", "DPM++ 2M SDE", diffusers_karras=True,
                                diffusers_rounds_karras_timesteps=True,
                                diffusers_options=(("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2),
                                                   ("solver_type", "midpoint")),
                                brownian=True, a1111_schedule="exponential"),
    "dpmpp_2m_sde_heun": SamplerInfo("dpm", True, "DPMSolverMultistepScheduler", "DPM++ 2M SDE Heun",
                                     diffusers_karras=True, diffusers_rounds_karras_timesteps=True,
                                     diffusers_options=(("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2),
                                                        ("solver_type", "heun")),
                                     brownian=True, a1111_schedule="exponential"),
    "dpmpp_3m_sde": SamplerInfo("dpm", True, "DPMSolverMultistepScheduler", "DPM++ 3M SDE", diffusers_karras=True,
                                diffusers_rounds_karras_timesteps=True,
                                diffusers_options=(("algorithm_type", "sde-dpmsolver++"), ("solver_order", 3)),
                                brownian=True, a1111_schedule="exponential"),
    "dpmpp_sde": SamplerInfo("k", True, "DPMSolverSDEScheduler", "DPM++ SDE", diffusers_karras=True, brownian=True,
                             a1111_schedule="karras"),
    "lcm": SamplerInfo("lcm", True, "LCMScheduler", "LCM"),
}
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLER_INFO)


_BY_A1111_NAME = {info.a1111_name.lower(): name for name, info in SAMPLER_INFO.items()}


def resolve_sampler_name(name: str) -> str:
    """Our sampler name for ``name`` given as ours (``dpmpp_2m``) or as AUTOMATIC1111 writes it
    (``DPM++ 2M``, any case); ``ValueError`` listing both forms otherwise."""
    if name in SAMPLER_INFO:
        return name
    if name.strip().lower() in _BY_A1111_NAME:
        return _BY_A1111_NAME[name.strip().lower()]
    known = ", ".join(f"{ours} ({info.a1111_name})" for ours, info in SAMPLER_INFO.items())
    raise ValueError(f"unknown sampler {name!r} (choose from {known})")


def sampler_info(name: str) -> SamplerInfo:
    """The registry entry of ``name``; ``ValueError`` listing the known names otherwise."""
    if name not in SAMPLER_INFO:
        raise ValueError(f"unknown sampler {name!r} (choose from {', '.join(SAMPLER_NAMES)})")
    return SAMPLER_INFO[name]


# Schedule types: how the sigma chain is spaced (ldm.sampling.schedule.NoiseSchedule.sampling_sigmas).
# "default" is the chain of the sampler's diffusers scheduler; the others are AUTOMATIC1111's schedule
# types, with the label it writes in its PNG parameters ("Schedule type: Karras").
SCHEDULE_LABELS: dict[str, str | None] = {
    "default": None,
    "uniform": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "beta": "Beta",
}
SCHEDULE_NAMES: tuple[str, ...] = tuple(SCHEDULE_LABELS)
AUTOMATIC = "automatic"


def resolve_schedule_name(name: str, sampler: str | None = None) -> str:
    """Our schedule name for ``name`` given as ours (``sgm_uniform``) or as AUTOMATIC1111 writes it
    (``SGM Uniform``, any case). AUTOMATIC1111's ``Automatic`` means the sampler's own preference
    (Karras for DPM++ 2M, exponential for DPM++ 2M SDE, its uniform spacing of the training steps
    otherwise), so it needs ``sampler``. ``ValueError`` listing the names otherwise."""
    key = name.strip().lower()
    by_label = {label.lower(): ours for ours, label in SCHEDULE_LABELS.items() if label}
    if key == AUTOMATIC and sampler is not None:
        return sampler_info(sampler).a1111_schedule or "uniform"
    if name in SCHEDULE_LABELS or key in by_label:
        return name if name in SCHEDULE_LABELS else by_label[key]
    known = ", ".join(f"{ours} ({label})" if label else ours for ours, label in SCHEDULE_LABELS.items())
    raise ValueError(f"unknown schedule {name!r} (choose from {known}, or Automatic with a sampler)")
