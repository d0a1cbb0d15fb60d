"""The sampler registry: every sampler name the package knows and what it corresponds to elsewhere.

The one table that the CLI choices, the pipeline, the PNG parameters (AUTOMATIC1111 names) and
the diffusers scheduler mapping all read. It holds names and facts only (no torch), so
command-line parsing can use it without loading the networks; :mod:`ldm.sampling.samplers`
attaches the sampling function to each entry.
"""

from __future__ import annotations

from dataclasses import dataclass

DISCRETISATIONS = ("ddpm", "ddim", "k", "dpm")


@dataclass(frozen=True)
class SamplerInfo:
    """What one sampler is, outside its function.

    Attributes:
        discretisation: the sigma chain it walks, one of :data:`DISCRETISATIONS` (the timesteps of
            the matching diffusers scheduler: DDPM, DDIM, the Euler family "k", DPM-Solver "dpm").
        ancestral: draws fresh noise each step (results depend on the generator); DDIM only with eta > 0.
        diffusers_class: the equivalent diffusers scheduler class name.
        a1111_name: the name AUTOMATIC1111 writes in its PNG parameters ("Sampler: ...").
        options: keyword options beyond the common signature (e.g. ``("eta",)``).
        diffusers_karras: the diffusers scheduler has ``use_karras_sigmas``.
        diffusers_rounds_karras_timesteps: diffusers feeds the network ``round(t)`` with Karras sigmas;
            build the denoiser with ``round_timesteps=True`` to reproduce it exactly.
    """

    discretisation: str
    ancestral: bool
    diffusers_class: str
    a1111_name: str
    options: tuple[str, ...] = ()
    diffusers_karras: bool = False
    diffusers_rounds_karras_timesteps: bool = False


SAMPLER_INFO: dict[str, SamplerInfo] = {
    "ddpm": SamplerInfo("ddpm", True, "DDPMScheduler", "DDPM"),
    "ddim": SamplerInfo("ddim", False, "DDIMScheduler", "DDIM", options=("eta",)),
    "euler": SamplerInfo("k", False, "EulerDiscreteScheduler", "Euler", diffusers_karras=True),
    "euler_ancestral": SamplerInfo("k", True, "EulerAncestralDiscreteScheduler", "Euler a"),
    "heun": SamplerInfo("k", False, "HeunDiscreteScheduler", "Heun", diffusers_karras=True),
    "dpmpp_2m": SamplerInfo("dpm", False, "DPMSolverMultistepScheduler", "DPM++ 2M", diffusers_karras=True,
                            diffusers_rounds_karras_timesteps=True),
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
