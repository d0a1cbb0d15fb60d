"""Stability's generative-models (sgm) inference YAMLs (``sd_xl_base.yaml``, ``sd_xl_refiner.yaml``) -> our config.

An sgm YAML names a ``DiffusionEngine`` by ``target`` class paths and their ``params``::

    model.params                              scale_factor (the VAE's latent scaling)
    model.params.network_config.params        the U-Net (CompVis names: :func:`unet_config_from_compvis`)
    model.params.first_stage_config.params    the VAE: ddconfig and embed_dim (:func:`vae_config_from_compvis`)
    model.params.denoiser_config.params       DiscreteDenoiser: num_idx training steps, scaling_config (EpsScaling
                                              = eps, VScaling = v), discretization_config (LegacyDDPMDiscretization:
                                              linear_start, linear_end = our scaled_linear betas)
    model.params.conditioner_config.params    emb_models: the text towers (FrozenCLIPEmbedder at layer_idx
                                              -2 / layers - 1, FrozenOpenCLIPEmbedder2 penultimate with its pooled
                                              output) then one ConcatTimestepEmbedderND per micro-conditioning
                                              number (base: original size, crop, target size; refiner: original
                                              size, crop, aesthetic score)

As for CompVis YAMLs, the text encoders' sizes come from the checkpoint's weights (the YAML names only
their class); ``target`` strings are checked, never imported; what our models do not implement raises
:class:`~ldm.errors.ConfigError` with a one-line message naming the YAML.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from torch import Tensor

from ldm.config import PipelineConfig
from ldm.errors import ConfigError
from ldm.formats.compvis import _check_target, _section, unet_config_from_compvis, vae_config_from_first_stage
from ldm.formats.single_file_config import SDXL_LATENT_SIZE, infer_sdxl_config, native_sampling
from ldm.models.sdxl_conditioning import MICRO_CONDITIONING_FEATURES, micro_conditioning_count
from ldm.sampling.schedule import ScheduleConfig

__all__ = ["config_from_sgm", "is_sgm_yaml"]

ENGINE = "DiffusionEngine"
_PREDICTIONS = {"EpsScaling": "eps", "VScaling": "v"}
_TEXT_EMBEDDERS = ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2")
_VECTOR_EMBEDDER = "ConcatTimestepEmbedderND"
# the vector inputs after the pooled text embedding, by micro-conditioning count (ldm.models.sdxl_conditioning)
_VECTOR_KEYS = {6: ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"),
                5: ("original_size_as_tuple", "crop_coords_top_left", "aesthetic_score")}


def is_sgm_yaml(data: Any) -> bool:
    """Whether a parsed YAML describes an sgm ``DiffusionEngine`` (an SDXL-style model)."""
    model = data.get("model") if isinstance(data, dict) else None
    return isinstance(model, dict) and _class(model) == ENGINE


def config_from_sgm(data: Any, parts: Mapping[str, Mapping[str, Tensor]], *, source: str = "config") -> PipelineConfig:
    """A PipelineConfig from an sgm inference YAML and the checkpoint's weights (which give the text towers).

    The YAML decides the U-Net, the VAE (and its scaling factor), the noise schedule and the prediction;
    the native size is SDXL's 1024x1024, the SDXL settings those of a file read from its weights alone.
    """
    params = _section(data["model"], "params", source, "model.")
    inferred = infer_sdxl_config(parts)  # the text towers and SDXL settings (sizes are not in the YAML)
    unet_params = _section(_target(params, "network_config", "UNetModel", source), "params", source,
                           "model.params.network_config.")
    vae_params = _target(params, "first_stage_config", ("AutoencoderKL", "AutoencoderKLInferenceWrapper"),
                         source).get("params") or {}
    try:
        unet = unet_config_from_compvis(unet_params)
        vae = vae_config_from_first_stage(vae_params, float(params.get("scale_factor", 1.0)))
    except (ValueError, KeyError, TypeError) as error:
        message = f"missing key {error.args[0]!r}" if isinstance(error, KeyError) and error.args else error
        raise ConfigError(f"{source}: {message}") from None
    config = replace(inferred, unet=unet, vae=vae, schedule=_schedule(params, source),
                     sampling=native_sampling(SDXL_LATENT_SIZE, vae))
    _check_conditioner(params, config, source)
    return config


def _schedule(params: dict[str, Any], source: str) -> ScheduleConfig:
    """The training schedule and prediction of ``denoiser_config`` (DiscreteDenoiser + LegacyDDPMDiscretization)."""
    where = "model.params.denoiser_config."
    denoiser = _target(params, "denoiser_config", "DiscreteDenoiser", source)
    settings = denoiser.get("params") or {}
    scaling = _class(_section(settings, "scaling_config", source, where + "params."))
    if scaling not in _PREDICTIONS:
        raise ConfigError(f"{source}: {where}params.scaling_config {scaling!r} is not supported "
                          f"(supported: {', '.join(_PREDICTIONS)})")
    discretization = _target(settings, "discretization_config", "LegacyDDPMDiscretization", source,
                             where + "params.")
    steps = (discretization.get("params") or {})
    try:
        return ScheduleConfig(num_train_timesteps=int(settings.get("num_idx", 1000)),
                              beta_start=float(steps.get("linear_start", 0.00085)),
                              beta_end=float(steps.get("linear_end", 0.012)),
                              prediction=_PREDICTIONS[scaling])
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{source}: {where}{error}") from None


def _check_conditioner(params: dict[str, Any], config: PipelineConfig, source: str) -> None:
    """The conditioner's embedders must be the text towers the weights hold, at the layers we read, followed by
    the micro-conditioning numbers the U-Net's vector width implies, in that order."""
    where = "model.params.conditioner_config.params.emb_models"
    conditioner = _target(params, "conditioner_config", "GeneralConditioner", source)
    models = (conditioner.get("params") or {}).get("emb_models")
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise ConfigError(f"{source}: missing list {where}")
    towers = config.text_encoder_configs
    text, vector = models[:len(towers)], models[len(towers):]
    expected_text = _TEXT_EMBEDDERS[-len(towers):]
    if [_class(m) for m in text] != list(expected_text):
        raise ConfigError(f"{source}: {where} starts with {[_class(m) for m in text]}; the checkpoint's text "
                          f"encoders need {list(expected_text)}")
    for model, tower in zip(text, towers):
        _check_text_layer(model, tower.layers, source)
    try:
        count = micro_conditioning_count(config.unet, towers[-1].projection_dim)
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None
    keys = tuple(m.get("input_key") for m in vector)
    if keys != _VECTOR_KEYS[count] or any(
            _class(m) != _VECTOR_EMBEDDER or (m.get("params") or {}).get("outdim") != MICRO_CONDITIONING_FEATURES
            for m in vector):
        raise ConfigError(f"{source}: {where} conditions on {list(keys)}; this U-Net's vector holds "
                          f"{list(_VECTOR_KEYS[count])} ({_VECTOR_EMBEDDER}, outdim "
                          f"{MICRO_CONDITIONING_FEATURES})")


def _check_text_layer(model: dict[str, Any], layers: int, source: str) -> None:
    """SDXL reads both towers at their penultimate block; OpenCLIP-bigG also gives its pooled output."""
    settings, name = model.get("params") or {}, _class(model)
    if name == "FrozenCLIPEmbedder":
        penultimate = settings.get("layer") == "hidden" and settings.get("layer_idx") in (-2, layers - 1)
    else:
        penultimate = (settings.get("layer") == "penultimate" and settings.get("always_return_pooled", False)
                       and not settings.get("legacy", True))
    if not penultimate:
        raise ConfigError(f"{source}: {name} with {settings} is not supported (SDXL's penultimate layer"
                          f"{'' if name == 'FrozenCLIPEmbedder' else ', always_return_pooled, legacy: false'})")


def _class(section: dict[str, Any]) -> str:
    return str(section.get("target", "")).rsplit(".", 1)[-1]


def _target(d: dict[str, Any], key: str, expected: str | tuple[str, ...], source: str,
            where: str = "model.params.") -> dict[str, Any]:
    """The mapping ``d[key]``, whose ``target`` class must be (one of) ``expected``."""
    section = _section(d, key, source, where)
    _check_target(section, expected, source, f"{where}{key}.")
    return section
