"""The type and range checks of the pipeline's call arguments, each failing with a one-line
:class:`~ldm.errors.ArgumentError` (a ``ValueError``) that names the argument, and the expansion of a
call's prompts to one per image.

Checks that need the model (sizes against the VAE's factor, a refiner's compatibility, classifier
channels) stay with :class:`ldm.pipeline.Txt2ImgPipeline`; the sampling options' own checks are in
:mod:`ldm.sampling_options`.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

from ldm.errors import ArgumentError, ConfigError
from ldm.hardware import check_device

MAX_IMAGES_PER_CALL = 10_000  # a sanity limit on num_images (and prompt lists): beyond it, a typo
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes [0, 2**64) (it wraps negative seeds around)


def is_finite_number(value) -> bool:
    """A real number (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_finite(name: str, value) -> None:
    """:class:`ArgumentError` naming ``name`` unless ``value`` is a finite real number."""
    if not is_finite_number(value):
        raise ArgumentError(f"{name} must be a finite number, got {value!r}")


def check_integer(name: str, value, minimum: int | None = None, maximum: int | None = None) -> None:
    """:class:`ArgumentError` naming ``name`` unless ``value`` is an integer (not a bool) in [minimum, maximum]."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ArgumentError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ArgumentError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ArgumentError(f"{name} must be at most {maximum}, got {value}")


def check_prompt(name: str, prompt) -> int | None:
    """:class:`ArgumentError` unless ``prompt`` is a string or a non-empty list of strings; the list's length."""
    if isinstance(prompt, str):
        return None
    if not isinstance(prompt, Sequence) or not all(isinstance(item, str) for item in prompt):
        raise ArgumentError(f"{name} must be a string or a list of strings, got {describe(prompt)}")
    if not 1 <= len(prompt) <= MAX_IMAGES_PER_CALL:
        raise ArgumentError(f"{name} must hold 1 to {MAX_IMAGES_PER_CALL} strings, got {len(prompt)}")
    return len(prompt)


def describe(value) -> str:
    """A short description of a wrong-typed value for error messages: its repr, cut to one short line."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}... ({type(value).__name__})"


def check_seed(seed, count: int, name: str = "seed") -> None:
    """:class:`ArgumentError` unless ``seed`` .. ``seed + count - 1`` are all seeds torch takes."""
    check_integer(name, seed, 0, MAX_SEED)
    if seed + count - 1 > MAX_SEED:
        raise ArgumentError(f"{name} {seed} with {count} images needs seeds up to {seed + count - 1}, "
                            f"past the largest, 2**64 - 1")


def check_call_arguments(prompt, negative_prompt, seed, num_images, *, integers: dict, reals: dict) -> None:
    """The type and range checks of :meth:`Txt2ImgPipeline.__call__` (``None`` values: the defaults)."""
    count = check_prompt("prompt", prompt)
    check_prompt("negative_prompt", negative_prompt)
    check_integer("num_images", num_images, 1, MAX_IMAGES_PER_CALL)
    check_seed(seed, count if count is not None else num_images)
    for name, value in integers.items():
        if value is not None:
            check_integer(name, value)
    for name, value in reals.items():
        if value is not None:
            check_finite(name, value)


def check_placement(device, dtype) -> None:
    """:class:`~ldm.errors.DeviceError` for a device this machine lacks; :class:`ArgumentError` for a non-dtype."""
    if device is not None:
        check_device(device)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ArgumentError(f"dtype must be a torch.dtype such as torch.float16, got {dtype!r}")


def expand_prompts(prompt, negative_prompt, num_images: int) -> tuple[list[str], list[str]]:
    """One prompt and one negative prompt per image: a single string is repeated ``num_images`` times
    (the negative prompt: once per prompt); lists are taken as they are and must agree in length."""
    if num_images < 1:
        raise ConfigError(f"num_images must be at least 1, got {num_images}")
    prompts = [prompt] * num_images if isinstance(prompt, str) else list(prompt)
    if isinstance(negative_prompt, str):
        negatives = [negative_prompt] * len(prompts)
    else:
        negatives = list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ConfigError(f"got {len(prompts)} prompts but {len(negatives)} negative prompts")
    return prompts, negatives
