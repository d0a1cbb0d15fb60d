"""One call's sampling options: the model's ``config.sampling`` defaults with the call's overrides,
the schedule type resolved (ours or AUTOMATIC1111's label), and every value checked with a one-line
:class:`~ldm.errors.ConfigError` before any sampling starts.

:meth:`ldm.pipeline.Txt2ImgPipeline.sampling_options` is the entry point users call; it passes the
model's defaults and its VAE's downsampling factor to :func:`build_sampling_options`.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import replace
from typing import Sequence

from ldm.call_arguments import is_finite_number
from ldm.config import SamplingDefaults
from ldm.errors import ArgumentError, ConfigError
from ldm.sampling.registry import resolve_sampler_name, resolve_schedule_name
from ldm.sampling.samplers import SAMPLERS
from ldm.sampling.schedule import LCM_ORIGINAL_STEPS


@dataclasses.dataclass
class SamplingOptions(SamplingDefaults):
    """One call's sampling options: the model's ``config.sampling`` with the call's overrides, plus the
    schedule type (a name of :data:`ldm.sampling.registry.SCHEDULE_NAMES`; ``karras`` mirrors ``"karras"``)."""

    schedule: str = "default"
    seed_resize_from: tuple[int, int] | None = None  # (height, width) in pixels: see Txt2ImgPipeline.initial_noise


def build_sampling_options(defaults: SamplingDefaults, downsample_factor: int, *, signal_leak: bool | None = None,
                           schedule: str | None = None, seed_resize_from: tuple[int, int] | None = None,
                           **overrides) -> SamplingOptions:
    """``defaults`` (a model's ``config.sampling``) with the given non-``None`` overrides, validated, plus the
    schedule. See :meth:`ldm.pipeline.Txt2ImgPipeline.sampling_options` for the keywords.

    Raises:
        ConfigError: for options no sampler can use (see :func:`validate_sampling_options`).
    """
    if isinstance(overrides.get("sampler"), str) and overrides["sampler"] not in SAMPLERS:
        try:  # AUTOMATIC1111's name ("DPM++ 2M SDE"); an unknown one is refused below
            overrides["sampler"] = resolve_sampler_name(overrides["sampler"])
        except ValueError:
            pass
    options = replace(defaults, **{k: v for k, v in overrides.items() if v is not None})
    options = SamplingOptions(**dataclasses.asdict(options),
                              schedule=schedule_for(schedule, options, karras_given=overrides.get("karras")))
    options = replace(options, karras=options.schedule == "karras",
                      seed_resize_from=checked_size("seed_resize_from", seed_resize_from, downsample_factor))
    if signal_leak is False:
        options = replace(options, signal_leak=None)
    elif signal_leak and options.signal_leak is None:
        raise ConfigError("this model has no signal-leak statistics (sampling.signal_leak in its config.yaml; "
                          "scripts/fit_signal_leak.py writes them)")
    validate_sampling_options(options, downsample_factor)
    return options


def checked_size(name: str, size, factor: int) -> tuple[int, int] | None:
    """``size`` as ``(height, width)`` of positive integers at least ``factor`` pixels, or ``None``."""
    if size is None:
        return None
    if (not isinstance(size, Sequence) or len(size) != 2 or
            not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= factor for v in size)):
        raise ArgumentError(f"{name} must be (height, width) in pixels, each at least {factor}, got {size!r}")
    return int(size[0]), int(size[1])


def schedule_for(schedule: str | None, options: SamplingDefaults, *, karras_given: bool | None) -> str:
    """Our schedule name for a call's ``schedule`` (ours or AUTOMATIC1111's label, "Automatic" resolved
    for ``options.sampler``); ``None``: the model's ``karras`` flag. ``ConfigError`` for an unknown name,
    or one that contradicts an explicit ``karras=True``."""
    if schedule is None:
        return "karras" if options.karras else "default"
    try:
        name = resolve_schedule_name(schedule, options.sampler if options.sampler in SAMPLERS else None)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if karras_given and name != "karras":
        raise ConfigError(f"karras=True contradicts schedule {schedule!r}")
    return name


def validate_sampling_options(options, downsample_factor: int = 8) -> None:
    """Raise ``ConfigError`` with a one-line message for options no sampler can use."""
    if options.sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {options.sampler!r} (choose from {', '.join(SAMPLERS)})")
    if int(options.steps) < 1:
        raise ConfigError(f"steps must be at least 1, got {options.steps}")
    if SAMPLERS[options.sampler].discretisation == "lcm" and options.steps > LCM_ORIGINAL_STEPS:
        raise ConfigError(f"the LCM sampler takes at most {LCM_ORIGINAL_STEPS} steps (its distillation grid), "
                          f"got {options.steps}")
    for name in ("height", "width"):
        value = getattr(options, name)
        if value < downsample_factor or value % 8 or value % downsample_factor:
            raise ConfigError(f"{name} must be a positive multiple of {max(8, downsample_factor)}, got {value}")
    for name in ("guidance_scale", "eta"):
        value = getattr(options, name)
        if not is_finite_number(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if options.eta < 0:
        raise ConfigError(f"eta must be >= 0, got {options.eta}")
    if not isinstance(options.clip_skip, int) or isinstance(options.clip_skip, bool) or options.clip_skip < 1:
        raise ConfigError(f"clip_skip must be an integer >= 1, got {options.clip_skip!r}")
