"""Reading original single-file Stable Diffusion checkpoints (CompVis / Stability layout).

Most Stable Diffusion weights in the wild are one ``.safetensors`` or ``.ckpt`` file in the
layout of the CompVis (SD 1.x) and Stability (SD 2.x) training code:

* ``model.diffusion_model.*``: U-Net (the training weights when EMA ones exist too);
* ``model_ema.diffusion_model<name without dots>``: EMA U-Net. CompVis ``LitEma`` keeps one buffer
  per U-Net parameter, named with the dots removed (``input_blocks.1.0.in_layers.0.weight`` ->
  ``model_ema.diffusion_modelinput_blocks10in_layers0weight``), plus the scalars
  ``model_ema.decay`` and ``model_ema.num_updates``;
* ``first_stage_model.*``: VAE (``loss.*`` tensors kept from autoencoder training are dropped);
* ``cond_stage_model.transformer.text_model.*``: SD 1.x text encoder, OpenAI CLIP ViT-L/14
  (transformers names); ``cond_stage_model.model.*``: SD 2.x text encoder, OpenCLIP ViT-H/14
  (open_clip names), either a complete or an exported tower (:mod:`ldm.formats.single_file_config`;
  an exported one is renamed here for a transformers ``CLIPTextModel``);
* ``conditioner.embedders.{i}.*``: SDXL's text encoders (Stability's generative-models layout): CLIP ViT-L
  (``embedders.0.transformer.text_model.*``) and OpenCLIP bigG (``embedders.1.model.*``), or bigG alone
  (``embedders.0.model.*``, the refiner); our :class:`~ldm.models.text_encoders.SDXLTextEncoder` uses these
  names below ``conditioner.``;
* ``betas``, ``alphas_cumprod``, ...: the DDPM schedule as buffers. They are checked against the
  config (a warning when they differ), never loaded: every reader recomputes them;
* ``low_scale_model.betas``, ``low_scale_model.alphas_cumprod``, ...: SD's x4 upscaler only, the schedule
  of the low-resolution image's noise augmentation (CompVis ``ImageConcatWithNoiseAugmentation``),
  checked against ``config.upscale.noise_schedule`` in the same way.

Our modules use exactly these names (minus the component prefix), so reading is mostly a matter of
finding the configuration. It comes from the first of:

1. the ``config`` argument: a CompVis YAML (``configs/sd-v2-inference-v.yaml``, read by
   :mod:`ldm.formats.compvis`) or Stability's sgm YAML for SDXL (``sd_xl_base.yaml``, read by
   :mod:`ldm.formats.sgm_yaml`), this package's ``config.yaml`` or model folder, or a
   :class:`~ldm.config.PipelineConfig`;
2. the config this package stores in the safetensors metadata (``ldm_config``) of files it writes
   (:mod:`ldm.formats.single_file_write`);
3. a CompVis or sgm YAML beside the checkpoint with the same name (``model.yaml`` for ``model.safetensors``),
   the convention of AUTOMATIC1111 and ComfyUI;
4. the weights themselves (:func:`ldm.formats.single_file_config.infer_config`): shapes give every
   size, the text-encoder keys the family, and what no weight shows takes the Stable Diffusion value.

``prediction="v"`` (SD 2.x 768-v models) overrides the parameterisation of any of them.

All user-fixable failures raise :class:`~ldm.errors.CheckpointError` (weights) or
:class:`~ldm.errors.ConfigError` (configs) with a one-line message.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from autoencoder.model import AutoencoderConfig
from ldm.config import PipelineConfig, load_config
from ldm.config_io import read_yaml
from ldm.errors import CheckpointError, ConfigError
from ldm.formats import checkpoints
from ldm.formats import text_keys as text_keymap
from ldm.formats import vae_keys as vae_keymap
from ldm.formats.checkpoints import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from ldm.formats.compvis import config_from_compvis
from ldm.formats.sgm_yaml import config_from_sgm, is_sgm_yaml
from ldm.formats.single_file_config import (POSITION_IDS, check_upscaler_channels, infer_config, key_indices,
                                            text_layout)
from ldm.models.text_encoders import TextEncoderConfig
from ldm.models.unet import UNetConfig, UNetModel
from ldm.sampling.schedule import NoiseSchedule, ScheduleConfig

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_METADATA_KEY",
    "EMA_BUFFERS",
    "OriginalCheckpoint",
    "SCHEDULE_BUFFERS",
    "ema_key",
    "read_single_file",
    "read_vae_file",
]

EMA_PREFIX = "model_ema."
UNET_EMA_PREFIX = "model_ema.diffusion_model"
EMA_BUFFERS = ("model_ema.decay", "model_ema.num_updates")
CONFIG_METADATA_KEY = "ldm_config"
LOW_SCALE_PREFIX = "low_scale_model."  # the x4 upscaler's augmentation schedule buffers
# Buffers of CompVis' DDPM class: derived from the schedule, never loaded.
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
})  # fmt: skip


@dataclass
class OriginalCheckpoint:
    """An original-layout checkpoint, renamed for our modules and ready for strict loading.

    Attributes:
        config: the resolved pipeline config.
        parts: ``{"unet", "vae", "text_encoder"}`` state dicts with our module-relative names; the
            U-Net is the weight set chosen by ``ema``.
        ema_unet, non_ema_unet: the U-Net weight sets the file holds (``None`` when absent).
        ema_buffers: ``model_ema.decay`` / ``model_ema.num_updates`` as found.
        used_ema: whether ``parts["unet"]`` is the EMA set.
        source: the file, for messages.
    """

    config: PipelineConfig
    parts: dict[str, dict[str, Tensor]]
    ema_unet: dict[str, Tensor] | None
    non_ema_unet: dict[str, Tensor] | None
    ema_buffers: dict[str, Tensor]
    used_ema: bool
    source: str


def read_single_file(
    path: str | Path,
    config: PipelineConfig | str | Path | None = None,
    *,
    prediction: str | None = None,
    vae: str | Path | None = None,
    ema: bool | str = "auto",
) -> OriginalCheckpoint:
    """Read an original SD 1.x/2.x single-file checkpoint (``.safetensors``, or ``.ckpt`` weights-only).

    Args:
        path: the checkpoint.
        config: CompVis YAML, our ``config.yaml`` / model folder, or a PipelineConfig; ``None`` to use
            the file's own metadata, a same-named YAML beside it, or inference (module docstring).
        prediction: ``"eps"`` or ``"v"``; overrides the config's parameterisation.
        vae: a separate VAE file replacing the checkpoint's (original keys with or without
            ``first_stage_model.``, or a diffusers ``AutoencoderKL`` file).
        ema: ``"auto"`` (the EMA U-Net when the file has one: it is the better one for images),
            ``True`` (require it) or ``False`` (the training weights ``model.diffusion_model.*``).
    Raises:
        CheckpointError: unreadable/unsafe file, another model type, keys that do not fit.
        ConfigError: a config that cannot be read or that this package cannot build.
    """
    path = Path(path)
    source = str(path)
    if prediction not in (None, "eps", "v"):
        raise ConfigError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    if ema not in ("auto", True, False):
        raise ConfigError(f"ema must be 'auto', True or False, got {ema!r}")
    state = checkpoints.load_state_dict(path)
    _refuse_other_model_types(state, source)
    parts = checkpoints.split_components(state)
    other = parts.pop("other")
    text_weights = _normalise_text_keys(parts["text_encoder"])
    parts["vae"] = _without_training_losses(parts["vae"], source)
    vae_weights = read_vae_file(vae) if vae is not None else parts["vae"]

    # The VAE architecture is read from the checkpoint's own VAE when it has one.
    for_inference = {**parts, "vae": parts["vae"] or vae_weights, "text_encoder": text_weights}
    resolved = _resolve_config(config, path, for_inference, prediction)
    if resolved.is_upscaler:
        check_upscaler_channels(resolved.unet, resolved.vae, source)
        low_scale = {k[len(LOW_SCALE_PREFIX):]: other.pop(k) for k in list(other) if k.startswith(LOW_SCALE_PREFIX)}
        _check_schedule_buffers(low_scale, resolved.upscale.noise_schedule, f"{source} ({LOW_SCALE_PREFIX}*)")
    else:
        checkpoints.check_unet_channels(resolved.unet, resolved.vae, source)

    ema_unet, non_ema_unet = _unet_weight_sets(parts["unet"], other, resolved.unet, ema, source)
    used_ema = _use_ema(ema, ema_unet, non_ema_unet, source)
    _check_leftover_keys(other, source)
    _check_schedule_buffers(other, resolved.schedule, source)
    if vae is not None:
        vae_weights = _vae_weights_for(vae_weights, resolved.vae, str(vae))
    return OriginalCheckpoint(
        config=resolved,
        parts={"unet": ema_unet if used_ema else non_ema_unet, "vae": vae_weights,
               "text_encoder": _sdxl_text_weights(text_weights) if resolved.is_sdxl
               else _text_weights_for(resolved.text_encoder, text_weights, source)},
        ema_unet=ema_unet,
        non_ema_unet=non_ema_unet,
        ema_buffers={k: other[k] for k in EMA_BUFFERS if k in other},
        used_ema=used_ema,
        source=source,
    )


def _use_ema(ema: bool | str, ema_unet, non_ema_unet, source: str) -> bool:
    """Whether the pipeline gets the EMA U-Net, given the ``ema`` choice and the sets the file holds."""
    if ema is True and ema_unet is None:
        raise CheckpointError(f"{source} holds no EMA weights (model_ema.*); load it with ema='auto' or False")
    if ema is False and non_ema_unet is None:
        raise CheckpointError(f"{source} holds no non-EMA U-Net weights (model.diffusion_model.*)")
    used_ema = ema_unet is not None  # _unet_weight_sets leaves it out when ema=False
    if ema_unet is not None and non_ema_unet is not None:
        logger.info("%s holds EMA and non-EMA U-Net weights: using the %s ones", source,
                    "EMA" if used_ema else "non-EMA")
    return used_ema


def read_vae_file(path: str | Path) -> dict[str, Tensor]:
    """A standalone VAE file's weights with module-relative keys (original or diffusers layout).

    ``first_stage_model.`` prefixes are stripped (a full checkpoint gives its VAE), and ``loss.*``
    keys (the LPIPS / discriminator weights some VAE releases keep from training) are dropped.
    Diffusers-layout keys are converted later, when the VAE config is known.
    """
    path = Path(path)
    state = checkpoints.load_state_dict(path)
    if any(k.startswith(VAE_PREFIX) for k in state):
        state = {k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    return _without_training_losses(state, str(path))


def _without_training_losses(vae_weights: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Drop a VAE's ``loss.*`` tensors (LPIPS / discriminator kept from autoencoder training)."""
    training_only = [k for k in vae_weights if k.startswith("loss.")]
    if not training_only:
        return vae_weights
    logger.info("%s: dropping %d training-only VAE loss.* tensors", source, len(training_only))
    return {k: v for k, v in vae_weights.items() if not k.startswith("loss.")}


def _vae_weights_for(state: dict[str, Tensor], vae_config: AutoencoderConfig, source: str) -> dict[str, Tensor]:
    if "encoder.down_blocks.0.resnets.0.conv1.weight" not in state:
        return state
    try:
        return vae_keymap.from_diffusers(state, vae_config)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{source}: diffusers VAE weights do not fit the VAE config ({error})") from None


def ema_key(unet_key: str) -> str:
    """The CompVis ``LitEma`` name of U-Net parameter ``unet_key`` (module-relative, no prefix).

    LitEma wraps ``DiffusionWrapper``, whose parameters are ``diffusion_model.<key>``, and stores
    each as a buffer named with every dot removed (buffer names may not contain dots).
    """
    return UNET_EMA_PREFIX + unet_key.replace(".", "")


def _unet_weight_sets(
    unet: dict[str, Tensor], other: dict[str, Tensor], unet_config: UNetConfig, ema: bool | str, source: str
) -> tuple[dict[str, Tensor] | None, dict[str, Tensor] | None]:
    """``(ema_unet, non_ema_unet)`` with module-relative keys; EMA keys removed from ``other``."""
    flat_keys = [k for k in other if k.startswith(EMA_PREFIX) and k not in EMA_BUFFERS]
    non_ema = unet or None
    if not flat_keys:
        return None, non_ema
    flat = {k: other.pop(k) for k in flat_keys}
    if ema is False:
        logger.info("%s: ignoring %d EMA tensors (ema=False)", source, len(flat))
        return None, non_ema
    with torch.device("meta"):
        expected = list(UNetModel(unet_config).state_dict())
    by_flat_name = {ema_key(k): k for k in expected}
    if len(by_flat_name) != len(expected):  # two names that differ only in their dots
        raise CheckpointError(f"{source}: EMA names are ambiguous for this U-Net config; load with ema=False")
    missing = [ema_key(k) for k in expected if ema_key(k) not in flat]
    unexpected = [k for k in flat if k not in by_flat_name]
    _raise_key_problems(f"{source}: EMA U-Net", missing, unexpected)
    return {by_flat_name[k]: v for k, v in flat.items()}, non_ema


def _raise_key_problems(what: str, missing: list[str], unexpected: list[str]) -> None:
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{what} weights do not fit the model ({'; '.join(problems)})")


def _check_leftover_keys(other: Mapping[str, Tensor], source: str) -> None:
    """Keys outside the three components must be known CompVis bookkeeping, else they are an error."""
    unknown = sorted(k for k in other if k not in SCHEDULE_BUFFERS and k not in EMA_BUFFERS)
    if unknown:
        shown = ", ".join(unknown[:3]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 3 else "")
        raise CheckpointError(
            f"{source}: unexpected keys outside model.diffusion_model / first_stage_model / cond_stage_model: {shown}"
        )


def _check_schedule_buffers(other: Mapping[str, Tensor], schedule: ScheduleConfig, source: str) -> None:
    """Warn when the file's stored ``alphas_cumprod`` disagree with the configured schedule."""
    stored = other.get("alphas_cumprod")
    if stored is None or stored.device.type == "meta":
        return
    expected = NoiseSchedule(schedule).alphas_cumprod
    if stored.shape != expected.shape:
        logger.warning("%s stores %d training steps but the config has %d", source, stored.numel(), expected.numel())
        return
    difference = (stored.double() - expected).abs().max().item()
    if difference > 1e-3:  # fp16 storage rounds to ~5e-4
        logger.warning("%s: stored alphas_cumprod differ from the configured schedule by up to %.3g; "
                       "check the config (beta schedule, timesteps)", source, difference)


def _refuse_other_model_types(state: Mapping[str, Tensor], source: str) -> None:
    """One-line errors for files that are not SD 1.x/2.x checkpoints, saying what they seem to be."""
    keys = list(state)
    if not keys:
        raise CheckpointError(f"{source} holds no tensors")

    def any_starts(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if any_starts("control_model."):
        raise CheckpointError(f"{source} is a ControlNet checkpoint (control_model.*), which is not supported")
    if any_starts("lora_unet_", "lora_te") or any(".lora_down." in k or ".lora_A." in k for k in keys):
        raise CheckpointError(f"{source} is a LoRA, not a full Stable Diffusion checkpoint")
    if any_starts(UNET_PREFIX, UNET_EMA_PREFIX):
        return
    if any_starts("encoder.conv_in.", "decoder.conv_in.", VAE_PREFIX) and not any_starts(TEXT_PREFIX):
        raise CheckpointError(f"{source} holds only VAE weights: pass it as a separate VAE (--vae {source})")
    if any_starts("down_blocks.", "text_model.", "encoder.down_blocks."):
        raise CheckpointError(f"{source} is a single diffusers component file: load its whole diffusers folder")
    raise CheckpointError(
        f"{source} is not a Stable Diffusion 1.x/2.x checkpoint: no {UNET_PREFIX}* keys (found e.g. {keys[0]})"
    )


def _with_prediction(config: PipelineConfig, prediction: str) -> PipelineConfig:
    if prediction not in ("eps", "v"):
        raise ConfigError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    return replace(config, schedule=replace(config.schedule, prediction=prediction))


# --------------------------------------------------------------------------------------------
# Finding the config
# --------------------------------------------------------------------------------------------


def _resolve_config(config, path: Path, parts: dict[str, dict[str, Tensor]], prediction: str | None) -> PipelineConfig:
    """The config for a checkpoint (module docstring: order of sources), with ``prediction`` applied."""
    resolved = _config_from_sources(config, path, parts, prediction)
    return resolved if prediction is None else _with_prediction(resolved, prediction)


def _config_from_sources(config, path: Path, parts: dict[str, dict[str, Tensor]], prediction: str | None):
    if isinstance(config, PipelineConfig):
        return config
    if config is not None:
        return _read_config_argument(Path(config), parts)
    stored = _metadata_config(path)
    if stored is not None:
        logger.info("%s: using the config stored in the file", path)
        return stored
    beside = path.with_suffix(".yaml")
    if beside.is_file():
        logger.info("%s: using the CompVis config beside it, %s", path, beside)
        return _config_from_yaml(read_yaml(beside), parts, source=str(beside))
    inferred = infer_config(parts, prediction=prediction)
    if inferred.is_upscaler:
        logger.info("%s: an x4 upscaler (label embedding, latents + RGB input); settings of x4-upscaling.yaml", path)
    elif inferred.text_encoder.width == 1024 and prediction is None:
        logger.info("%s: SD 2.x weights, assuming eps prediction; 768-v models need prediction='v' "
                    "(--prediction v) or configs/sd-v2-inference-v.yaml", path)
    return inferred


def _read_config_argument(config: Path, parts: dict[str, dict[str, Tensor]]) -> PipelineConfig:
    if config.is_dir():
        if not (config / "config.yaml").is_file():
            raise ConfigError(f"{config} is a folder without a config.yaml (pass a YAML file or a model folder)")
        return load_config(config / "config.yaml")
    data = read_yaml(config)
    if isinstance(data, dict) and "model" in data:
        return _config_from_yaml(data, parts, source=str(config))
    return load_config(config)


def _config_from_yaml(data, parts: dict[str, dict[str, Tensor]], *, source: str) -> PipelineConfig:
    """A CompVis (``LatentDiffusion``) or Stability sgm (``DiffusionEngine``: SDXL) inference YAML read with
    the checkpoint's weights, which give the text encoders' sizes."""
    if is_sgm_yaml(data):
        return config_from_sgm(data, parts, source=source)
    return config_from_compvis(data, parts, source=source)


def _metadata_config(path: Path) -> PipelineConfig | None:
    """The PipelineConfig :mod:`ldm.formats.single_file_write` stores in the safetensors header, if any."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        text = (handle.metadata() or {}).get(CONFIG_METADATA_KEY)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: the stored {CONFIG_METADATA_KEY} is not valid JSON ({error})") from None
    return PipelineConfig.from_dict(data, source=f"{path} ({CONFIG_METADATA_KEY})")


# --------------------------------------------------------------------------------------------
# Text-encoder weights
# --------------------------------------------------------------------------------------------


def _normalise_text_keys(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Put back the ``text_model.`` level some early SD 1.x files lack (transformers < 4.20 names)."""
    legacy = ("transformer.embeddings.", "transformer.encoder.", "transformer.final_layer_norm.")
    return {("transformer.text_model." + k[len("transformer."):] if k.startswith(legacy) else k): v
            for k, v in weights.items()}


def _sdxl_text_weights(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """SDXL's embedders as they are, without the constant CLIP ``position_ids`` buffers we do not store."""
    return {k: v for k, v in weights.items() if not k.endswith(POSITION_IDS)}


def _text_weights_for(config: TextEncoderConfig, weights: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """The file's text-encoder weights renamed for the module ``config`` builds."""
    layout = text_layout(weights)
    if layout == "clip":
        if config.kind != "clip":
            raise CheckpointError(f"{source}: the config asks for an OpenCLIP text encoder (SD 2.x) "
                                  "but the file holds a CLIP one (SD 1.x)")
        return {k: v for k, v in weights.items() if k != POSITION_IDS}
    if config.kind == "openclip":
        return weights
    # An OpenCLIP-named tower loaded into a transformers CLIPTextModel (q/k/v split, renamed).
    blocks = len(key_indices(weights, "model.transformer.resblocks."))
    if blocks != config.layers:
        raise CheckpointError(f"{source}: the text encoder has {blocks} blocks but the config has {config.layers}")
    openclip = replace(config, kind="openclip", layer="last")
    try:
        converted = text_keymap.to_diffusers(weights, openclip)
    except ValueError as error:
        raise CheckpointError(f"{source}: text encoder weights do not fit the config ({error})") from None
    return {"transformer." + k: v for k, v in converted.items()}
