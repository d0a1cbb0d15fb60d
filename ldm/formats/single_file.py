"""Original single-file Stable Diffusion checkpoints (CompVis / Stability layout) and CompVis YAML configs.

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
  (open_clip names);
* ``betas``, ``alphas_cumprod``, ...: the DDPM schedule as buffers. They are checked against the
  config (a warning when they differ), never loaded, and not written: every reader recomputes them.

Our modules use exactly these names (minus the component prefix), so reading is mostly a matter of
finding the configuration. It comes from the first of:

1. the ``config`` argument: a CompVis YAML (``configs/sd-v2-inference-v.yaml``), this package's
   ``config.yaml`` or model folder, or a :class:`~ldm.config.PipelineConfig`;
2. the config this package stores in the safetensors metadata (``ldm_config``) of files it writes;
3. a CompVis YAML beside the checkpoint with the same name (``model.yaml`` for ``model.safetensors``),
   the convention of AUTOMATIC1111 and ComfyUI;
4. the weights themselves. Shapes give every size; the text-encoder keys give the family (SD 1.x:
   CLIP keys, 8 heads per U-Net attention; SD 2.x: OpenCLIP keys, 64-channel heads, linear
   ``proj_in``). What no weight shows takes the Stable Diffusion value: 32 normalisation groups,
   64-channel text-encoder heads, the SD noise schedule, eps prediction, VAE scaling 0.18215.

``prediction="v"`` (SD 2.x 768-v models) overrides the parameterisation of any of them.

Two kinds of SD 2.x text encoder are found in single files. A *complete* OpenCLIP tower (every
Stability release) holds all blocks plus ``text_projection`` and ``logit_scale``; SD 2.x uses the
penultimate block's output. An *exported* tower (written from a diffusers folder, as diffusers'
own ``convert_diffusers_to_original_stable_diffusion.py`` does) lacks ``text_projection`` and
``logit_scale`` and also the last block, which the penultimate-layer model never uses; its stored
blocks are all used. The first loads as ``kind="openclip"``, the second as a ``kind="clip"``
transformers tower with GELU, exactly what a diffusers SD 2.x folder loads as.

Round trips (tested; schedule buffers aside): original -> ours -> original is bitwise for both families. Through a diffusers
folder, SD 1.x files come back bitwise; SD 2.x files come back with the U-Net and VAE bitwise and
the text encoder as an exported tower (the unused last block, ``text_projection`` and
``logit_scale`` are gone, as in diffusers; every tensor that influences an image is bitwise equal).

All user-fixable failures raise :class:`~ldm.errors.CheckpointError` (weights) or
:class:`~ldm.errors.ConfigError` (configs) with a one-line message.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from torch import Tensor

from autoencoder.model import AutoencoderConfig
from ldm.formats import checkpoints
from ldm.formats.checkpoints import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from ldm.config import PipelineConfig, SamplingDefaults, load_config
from ldm.errors import CheckpointError, ConfigError
from ldm.formats import text_keys as text_keymap
from ldm.formats import vae_keys as vae_keymap
from ldm.sampling.schedule import NoiseSchedule, ScheduleConfig
from ldm.models.text_encoders import TextEncoderConfig
from ldm.models.builder import build_components
from ldm.models.unet import UNetConfig, UNetModel

logger = logging.getLogger(__name__)

__all__ = [
    "OriginalCheckpoint",
    "check_fits",
    "compvis_yaml",
    "config_from_compvis",
    "ema_key",
    "infer_config",
    "infer_text_config",
    "infer_unet_config",
    "infer_vae_config",
    "original_state_dict",
    "read_single_file",
    "read_vae_file",
    "save_compvis_yaml",
    "save_single_file",
    "write_single_file",
]

EMA_PREFIX = "model_ema."
UNET_EMA_PREFIX = "model_ema.diffusion_model"
EMA_BUFFERS = ("model_ema.decay", "model_ema.num_updates")
CONFIG_METADATA_KEY = "ldm_config"
# Buffers of CompVis' DDPM class: derived from the schedule, never loaded.
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
})  # fmt: skip

# Text-encoder key layouts, module-relative (no ``cond_stage_model.``).
CLIP_TEXT_PREFIX = "transformer.text_model."
OPENCLIP_PREFIX = "model."
POSITION_IDS = "transformer.text_model.embeddings.position_ids"  # a constant arange SD 1.x files carry
_OPENCLIP_EXTRAS = ("model.text_projection", "model.logit_scale")

# Values CompVis code hard-codes (not in any YAML) and Stable Diffusion uses.
COMPVIS_NORM_GROUPS = 32
TEXT_HEAD_CHANNELS = 64  # CLIP ViT-L/14 (768 / 12) and OpenCLIP ViT-H/14 (1024 / 16)
SD1_UNET_HEADS = {"num_heads": 8, "num_head_channels": -1}
SD2_UNET_HEADS = {"num_heads": -1, "num_head_channels": 64}
DEFAULT_SCALING_FACTOR = 0.18215

_CLIP_EMBEDDER = "FrozenCLIPEmbedder"
_OPENCLIP_EMBEDDER = "FrozenOpenCLIPEmbedder"
_TARGETS = {
    "model": "ldm.models.diffusion.ddpm.LatentDiffusion",
    "unet": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "vae": "ldm.models.autoencoder.AutoencoderKL",
    _CLIP_EMBEDDER: "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
    _OPENCLIP_EMBEDDER: "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
}
_OUR_BETAS_TO_COMPVIS = {"scaled_linear": "linear", "linear": "sqrt_linear", "cosine": "cosine"}


# ============================================================================================
# Reading
# ============================================================================================


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
    _check_latent_channels(resolved.unet, resolved.vae, source)

    ema_unet, non_ema_unet = _unet_weight_sets(parts["unet"], other, resolved.unet, ema, source)
    used_ema = _use_ema(ema, ema_unet, non_ema_unet, source)
    _check_leftover_keys(other, source)
    _check_schedule_buffers(other, resolved.schedule, source)
    if vae is not None:
        vae_weights = _vae_weights_for(vae_weights, resolved.vae, str(vae))
    return OriginalCheckpoint(
        config=resolved,
        parts={"unet": ema_unet if used_ema else non_ema_unet, "vae": vae_weights,
               "text_encoder": _text_weights_for(resolved.text_encoder, text_weights, source)},
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

    if any_starts("conditioner.embedders."):
        raise CheckpointError(f"{source} is an SDXL / SGM checkpoint (conditioner.embedders.*); "
                              "only Stable Diffusion 1.x/2.x single files are supported")
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


def _check_latent_channels(unet: UNetConfig, vae: AutoencoderConfig, source: str) -> None:
    if unet.in_channels != vae.latent_channels or unet.out_channels != vae.latent_channels:
        raise CheckpointError(
            f"{source}: the U-Net maps {unet.in_channels} to {unet.out_channels} channels but the VAE makes "
            f"{vae.latent_channels}-channel latents (an inpainting / depth / pix2pix model?): "
            "only text-to-image checkpoints are supported"
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
        return config_from_compvis(_read_yaml(beside), parts, source=str(beside))
    inferred = infer_config(parts, prediction=prediction or "eps")
    if inferred.text_encoder.width == 1024 and prediction is None:
        logger.info("%s: SD 2.x weights, assuming eps prediction; 768-v models need prediction='v' "
                    "(--prediction v) or configs/sd-v2-inference-v.yaml", path)
    return inferred


def _read_config_argument(config: Path, parts: dict[str, dict[str, Tensor]]) -> PipelineConfig:
    if config.is_dir():
        if not (config / "config.yaml").is_file():
            raise ConfigError(f"{config} is a folder without a config.yaml (pass a YAML file or a model folder)")
        return load_config(config / "config.yaml")
    data = _read_yaml(config)
    if isinstance(data, dict) and "model" in data:
        return config_from_compvis(data, parts, source=str(config))
    return load_config(config)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None


def _metadata_config(path: Path) -> PipelineConfig | None:
    """The PipelineConfig :func:`write_single_file` stores in the safetensors header, if any."""
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
# Inference from the weights
# --------------------------------------------------------------------------------------------


def infer_config(parts: Mapping[str, Mapping[str, Tensor]], *, prediction: str = "eps") -> PipelineConfig:
    """A PipelineConfig from the shapes of an original checkpoint's weights.

    Args:
        parts: ``{"unet", "vae", "text_encoder"}`` module-relative state dicts, as
            :func:`ldm.formats.checkpoints.split_components` gives (tensors may live on the meta device).
        prediction: the parameterisation (not visible in weights). SD 2.x v-prediction models
            get their native 768x768 size, every other model 512x512 (for an f=8 VAE).
    """
    text = infer_text_config(parts["text_encoder"])
    family = "sd2" if _text_layout(parts["text_encoder"]) != "clip" else "sd1"
    unet = infer_unet_config(parts["unet"], family)
    vae = infer_vae_config(parts["vae"])
    latent_size = 96 if family == "sd2" and prediction == "v" else 64
    return PipelineConfig(unet=unet, vae=vae, text_encoder=text, schedule=ScheduleConfig(prediction=prediction),
                          sampling=_native_sampling(latent_size, vae))


def _native_sampling(latent_size: int, vae: AutoencoderConfig) -> SamplingDefaults:
    size = int(latent_size) * vae.downsample_factor
    return SamplingDefaults(height=size, width=size)


def _need(weights: Mapping[str, Tensor], key: str, what: str) -> Tensor:
    if key not in weights:
        raise CheckpointError(f"cannot read the {what} architecture: the weights lack {key} (pass a config)")
    return weights[key]


def _indices(weights: Mapping[str, Tensor], prefix: str) -> list[int]:
    """Sorted integers ``i`` of keys ``{prefix}{i}.*``."""
    found = {k[len(prefix):].split(".", 1)[0] for k in weights if k.startswith(prefix)}
    return sorted(int(i) for i in found if i.isdigit())


def _ratio(channels: int, base: int, what: str) -> int:
    if channels % base:
        raise CheckpointError(f"cannot read the {what} architecture: {channels} channels are not a multiple of {base}")
    return channels // base


def infer_unet_config(weights: Mapping[str, Tensor], family: str) -> UNetConfig:
    """The U-Net config from its weights' shapes; head layout and norm groups from the family."""
    if not weights:
        raise CheckpointError(f"cannot read the U-Net architecture: no {UNET_PREFIX}* weights (pass a config)")
    conv_in = _need(weights, "input_blocks.0.0.weight", "U-Net")
    base, in_channels = conv_in.shape[0], conv_in.shape[1]
    levels: list[list[int]] = [[]]  # input-block indices of the ResBlocks of each level
    for i in _indices(weights, "input_blocks.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in weights:  # a Downsample ends the level
            levels.append([])
        else:
            levels[-1].append(i)
    if len({len(level) for level in levels}) != 1 or not levels[0]:
        raise CheckpointError(f"cannot read the U-Net architecture: levels hold {[len(x) for x in levels]} ResBlocks")
    mult = [_ratio(_need(weights, f"input_blocks.{level[0]}.0.out_layers.3.weight", "U-Net").shape[0], base, "U-Net")
            for level in levels]
    attention = [n for n, level in enumerate(levels) if f"input_blocks.{level[0]}.1.proj_in.weight" in weights]
    to_k = _need(weights, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "U-Net")
    try:
        return UNetConfig(
            in_channels=in_channels,
            out_channels=_need(weights, "out.2.weight", "U-Net").shape[0],
            model_channels=base,
            channel_mult=tuple(mult),
            num_res_blocks=len(levels[0]),
            attention_resolutions=tuple(2**n for n in attention),
            context_dim=to_k.shape[1],
            transformer_depth=len(_indices(weights, "middle_block.1.transformer_blocks.")),
            use_linear_in_transformer=weights["middle_block.1.proj_in.weight"].ndim == 2,
            upcast_attention=family == "sd2",  # Stability's SD 2 code computes attention in float32
            norm_groups=COMPVIS_NORM_GROUPS,
            **(SD2_UNET_HEADS if family == "sd2" else SD1_UNET_HEADS),
        )
    except ValueError as error:
        raise CheckpointError(f"cannot build a U-Net for these weights ({error}); pass a config") from None


def infer_vae_config(
    weights: Mapping[str, Tensor], scaling_factor: float = DEFAULT_SCALING_FACTOR
) -> AutoencoderConfig:
    """The VAE config from its weights' shapes (32 norm groups, as CompVis hard-codes)."""
    if not weights:
        raise CheckpointError(f"cannot read the VAE architecture: no {VAE_PREFIX}* weights (pass a VAE file)")
    conv_in = _need(weights, "encoder.conv_in.weight", "VAE")
    base = conv_in.shape[0]
    levels = _indices(weights, "encoder.down.")
    mult = [_ratio(_need(weights, f"encoder.down.{n}.block.0.conv2.weight", "VAE").shape[0], base, "VAE")
            for n in levels]
    try:
        return AutoencoderConfig(
            in_channels=conv_in.shape[1],
            out_channels=_need(weights, "decoder.conv_out.weight", "VAE").shape[0],
            latent_channels=_need(weights, "decoder.conv_in.weight", "VAE").shape[1],
            base_channels=base,
            channel_mult=tuple(mult),
            num_res_blocks=len(_indices(weights, "encoder.down.0.block.")),
            norm_groups=COMPVIS_NORM_GROUPS,
            mid_attention="encoder.mid.attn_1.q.weight" in weights,
            scaling_factor=scaling_factor,
        )
    except ValueError as error:
        raise CheckpointError(f"cannot build a VAE for these weights ({error}); pass a config") from None


def _normalise_text_keys(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Put back the ``text_model.`` level some early SD 1.x files lack (transformers < 4.20 names)."""
    legacy = ("transformer.embeddings.", "transformer.encoder.", "transformer.final_layer_norm.")
    return {("transformer.text_model." + k[len("transformer."):] if k.startswith(legacy) else k): v
            for k, v in weights.items()}


def _text_layout(weights: Mapping[str, Tensor]) -> str:
    """``"clip"`` (SD 1.x), ``"openclip"`` (complete SD 2.x tower) or ``"exported"`` (no extras, see module doc)."""
    has_clip = any(k.startswith(CLIP_TEXT_PREFIX) for k in weights)
    has_openclip = any(k.startswith(OPENCLIP_PREFIX) for k in weights)
    if has_clip and has_openclip:
        raise CheckpointError("the text encoder weights mix CLIP (transformer.*) and OpenCLIP (model.*) keys")
    if has_clip:
        return "clip"
    if has_openclip:
        return "openclip" if any(k in weights for k in _OPENCLIP_EXTRAS) else "exported"
    raise CheckpointError(f"no text encoder weights ({TEXT_PREFIX}transformer.* or {TEXT_PREFIX}model.*)")


def infer_text_config(weights: Mapping[str, Tensor]) -> TextEncoderConfig:
    """The text-encoder config from its weights (64-channel heads; activation and padding by family)."""
    layout = _text_layout(weights)
    if layout == "clip":
        prefix = CLIP_TEXT_PREFIX
        token = _need(weights, prefix + "embeddings.token_embedding.weight", "text encoder")
        positions = _need(weights, prefix + "embeddings.position_embedding.weight", "text encoder")
        layers = len(_indices(weights, prefix + "encoder.layers."))
        hidden = _need(weights, prefix + "encoder.layers.0.mlp.fc1.weight", "text encoder").shape[0]
        projection = token.shape[1]
    else:
        token = _need(weights, "model.token_embedding.weight", "text encoder")
        positions = _need(weights, "model.positional_embedding", "text encoder")
        layers = len(_indices(weights, "model.transformer.resblocks."))
        hidden = _need(weights, "model.transformer.resblocks.0.mlp.c_fc.weight", "text encoder").shape[0]
        projection = weights["model.text_projection"].shape[1] if "model.text_projection" in weights else token.shape[1]
    width = token.shape[1]
    family = {
        "clip": dict(kind="clip", act="quick_gelu", layer="last", pad="eot"),
        "openclip": dict(kind="openclip", act="gelu", layer="penultimate", pad="zero"),
        "exported": dict(kind="clip", act="gelu", layer="last", pad="zero"),
    }[layout]
    try:
        return TextEncoderConfig(vocab_size=token.shape[0], width=width, layers=layers,
                                 heads=max(1, width // TEXT_HEAD_CHANNELS), mlp_ratio=hidden / width,
                                 max_length=positions.shape[0], projection_dim=projection, **family)
    except ValueError as error:
        raise CheckpointError(f"cannot build a text encoder for these weights ({error}); pass a config") from None


def _text_weights_for(config: TextEncoderConfig, weights: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """The file's text-encoder weights renamed for the module ``config`` builds."""
    layout = _text_layout(weights)
    if layout == "clip":
        if config.kind != "clip":
            raise CheckpointError(f"{source}: the config asks for an OpenCLIP text encoder (SD 2.x) "
                                  "but the file holds a CLIP one (SD 1.x)")
        return {k: v for k, v in weights.items() if k != POSITION_IDS}
    if config.kind == "openclip":
        return weights
    # An OpenCLIP-named tower loaded into a transformers CLIPTextModel (q/k/v split, renamed).
    blocks = len(_indices(weights, "model.transformer.resblocks."))
    if blocks != config.layers:
        raise CheckpointError(f"{source}: the text encoder has {blocks} blocks but the config has {config.layers}")
    openclip = replace(config, kind="openclip", layer="last")
    try:
        converted = text_keymap.to_diffusers(weights, openclip)
    except ValueError as error:
        raise CheckpointError(f"{source}: text encoder weights do not fit the config ({error})") from None
    return {"transformer." + k: v for k, v in converted.items()}


# --------------------------------------------------------------------------------------------
# CompVis YAML -> PipelineConfig
# --------------------------------------------------------------------------------------------


def _section(d: Any, key: str, source: str, where: str) -> dict[str, Any]:
    value = d.get(key) if isinstance(d, dict) else None
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: missing mapping {where}{key}")
    return value


def _check_target(section: dict[str, Any], expected_class: str, source: str, where: str) -> str:
    target = str(section.get("target", ""))
    if target.rsplit(".", 1)[-1] != expected_class:
        raise ConfigError(f"{source}: {where}target is {target!r}; only {expected_class} is supported")
    return target


def config_from_compvis(
    data: Any, parts: Mapping[str, Mapping[str, Tensor]], *, source: str = "config"
) -> PipelineConfig:
    """A PipelineConfig from a CompVis/Stability inference YAML and the checkpoint's weights.

    The YAML gives the U-Net, VAE, schedule, parameterisation and native size; the text encoder
    is named there only by class (``FrozenCLIPEmbedder`` = SD 1.x, ``FrozenOpenCLIPEmbedder`` =
    SD 2.x, with its ``layer``), so its sizes come from the weights. ``target`` strings are
    checked, never imported.
    """
    model = _section(data, "model", source, "")
    _check_target(model, "LatentDiffusion", source, "model.")
    params = model.get("params") or {}
    if params.get("conditioning_key", "crossattn") != "crossattn":
        raise ConfigError(f"{source}: conditioning_key {params['conditioning_key']!r} is not supported (crossattn)")
    unet_section = _section(params, "unet_config", source, "model.params.")
    _check_target(unet_section, "UNetModel", source, "model.params.unet_config.")
    vae_section = _section(params, "first_stage_config", source, "model.params.")
    _check_target(vae_section, "AutoencoderKL", source, "model.params.first_stage_config.")
    cond_section = _section(params, "cond_stage_config", source, "model.params.")
    embedder = str(cond_section.get("target", "")).rsplit(".", 1)[-1]
    if embedder not in (_CLIP_EMBEDDER, _OPENCLIP_EMBEDDER):
        raise ConfigError(f"{source}: cond_stage_config target {cond_section.get('target')!r} is not supported "
                          f"(expected {_CLIP_EMBEDDER} or {_OPENCLIP_EMBEDDER})")
    try:
        unet_params = dict(unet_section.get("params") or {})
        unet_params.setdefault("upcast_attention", embedder == _OPENCLIP_EMBEDDER)
        unet = UNetConfig.from_compvis(unet_params)
        vae_params = vae_section.get("params") or {}
        ddconfig = dict(vae_params.get("ddconfig") or {})
        if ddconfig.get("attn_type") == "vanilla-xformers":  # same maths, another kernel
            ddconfig["attn_type"] = "vanilla"
        vae = AutoencoderConfig.from_compvis(ddconfig, vae_params.get("embed_dim", ddconfig.get("z_channels")),
                                             float(params.get("scale_factor", 1.0)))  # CompVis default 1.0
        schedule = ScheduleConfig.from_compvis(params)
    except (ValueError, KeyError, TypeError) as error:
        message = f"missing key {error.args[0]!r}" if isinstance(error, KeyError) and error.args else error
        raise ConfigError(f"{source}: {message}") from None
    text = _text_config_from_embedder(embedder, cond_section.get("params") or {}, parts["text_encoder"], source)
    return PipelineConfig(unet=unet, vae=vae, text_encoder=text, schedule=schedule,
                          sampling=_native_sampling(params.get("image_size", 64), vae))


def _text_config_from_embedder(embedder: str, params: dict[str, Any], weights, source: str) -> TextEncoderConfig:
    """Sizes from the weights; family and output layer from the YAML (CompVis semantics)."""
    inferred = infer_text_config(weights)
    layout = _text_layout(weights)
    if (embedder == _CLIP_EMBEDDER) != (layout == "clip"):
        held = "a CLIP (SD 1.x)" if layout == "clip" else "an OpenCLIP (SD 2.x)"
        raise CheckpointError(f"{source} names {embedder} but the checkpoint holds {held} text encoder")
    if embedder == _CLIP_EMBEDDER:
        layer = params.get("layer", "last")
        if layer == "hidden" and params.get("layer_idx") == -2:
            layer = "penultimate"
        if layer != "last" and layer != "penultimate":
            raise ConfigError(f"{source}: FrozenCLIPEmbedder layer={layer!r} "
                              f"layer_idx={params.get('layer_idx')!r} is not supported (last, or hidden with -2)")
        return replace(inferred, layer=layer)
    layer = params.get("layer", "last")  # FrozenOpenCLIPEmbedder's default; SD 2.x YAMLs say penultimate
    if layer not in ("last", "penultimate"):
        raise ConfigError(f"{source}: FrozenOpenCLIPEmbedder layer={layer!r} is not supported")
    if layout == "openclip":
        return replace(inferred, layer=layer)
    # An exported tower lacks the last block: "penultimate" is its last stored block.
    if layer == "last":
        raise CheckpointError(f"{source} asks for the last OpenCLIP layer, but the checkpoint's text encoder "
                              "was exported without it (no text_projection/logit_scale)")
    return inferred


# ============================================================================================
# Writing
# ============================================================================================


def _exported_text_config(config: TextEncoderConfig) -> TextEncoderConfig:
    """The text config as written: a GELU CLIP tower with penultimate output keeps only its used blocks."""
    if config.kind == "clip" and config.act == "gelu" and config.layer == "penultimate":
        return replace(config, layers=config.layers - 1, layer="last")
    return config


def _text_to_original(config: TextEncoderConfig, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our text-encoder weights -> the original layout of their family (module-relative keys).

    ``kind="openclip"`` and SD 1.x CLIP towers are stored as they are (SD 1.x with the
    ``position_ids`` buffer real files carry). A GELU CLIP tower is an SD 2.x tower that went
    through diffusers: it is written with OpenCLIP names (fused q/k/v), as every SD 2.x tool expects.
    """
    if config.kind == "openclip":
        return dict(weights)
    if config.act == "quick_gelu":
        position_ids = torch.arange(config.max_length, dtype=torch.int64).unsqueeze(0)
        return {**weights, POSITION_IDS: position_ids}
    exported = _exported_text_config(config)
    kept = {k: v for k, v in weights.items() if not _is_dropped_clip_block(k, exported.layers)}
    diffusers_names = {k[len("transformer."):]: v for k, v in kept.items()}
    return text_keymap.from_diffusers(diffusers_names, replace(exported, kind="openclip"))


def _is_dropped_clip_block(key: str, kept_layers: int) -> bool:
    prefix = CLIP_TEXT_PREFIX + "encoder.layers."
    if not key.startswith(prefix):
        return False
    return int(key[len(prefix):].split(".", 1)[0]) >= kept_layers


def original_state_dict(
    config: PipelineConfig,
    parts: Mapping[str, Mapping[str, Tensor]],
    *,
    ema_unet: Mapping[str, Tensor] | None = None,
    ema_buffers: Mapping[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], PipelineConfig]:
    """Our component state dicts -> ``(original-layout state dict, config of what was written)``.

    ``ema_unet`` (module-relative U-Net keys) is stored under CompVis' LitEma names, with
    ``ema_buffers`` (``model_ema.decay`` / ``num_updates``) when given. Schedule buffers are not
    written: every reader recomputes them from its config.
    """
    text = _text_to_original(config.text_encoder, parts["text_encoder"])
    state = checkpoints.join_components({"unet": parts["unet"], "vae": parts["vae"], "text_encoder": text})
    if ema_unet is not None:
        state.update({ema_key(k): v for k, v in ema_unet.items()})
        state.update(dict(ema_buffers or {}))
    return state, replace(config, text_encoder=_exported_text_config(config.text_encoder))


def write_single_file(
    path: str | Path,
    config: PipelineConfig,
    parts: Mapping[str, Mapping[str, Tensor]],
    *,
    ema_unet: Mapping[str, Tensor] | None = None,
    ema_buffers: Mapping[str, Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> PipelineConfig:
    """Write an original-layout ``.safetensors`` file (atomically) and return the config it stores.

    The file loads in CompVis/Stability code, AUTOMATIC1111, ComfyUI and diffusers'
    ``from_single_file``; this package's config goes into the safetensors metadata
    (``ldm_config``), so :func:`read_single_file` needs no YAML for it.

    Args:
        dtype: storage precision of the model weights (e.g. ``torch.float16``); default: as given.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"write single files as .safetensors (got {path.name}); pickled .ckpt output "
                              "is not supported")
    state, written = original_state_dict(config, parts, ema_unet=ema_unet, ema_buffers=ema_buffers)
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() and k not in EMA_BUFFERS else v) for k, v in state.items()}
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(written.to_dict())}
    checkpoints.save_safetensors_atomic(state, path, metadata=metadata)
    return written


def save_single_file(pipe, path: str | Path, *, dtype: torch.dtype | None = None) -> PipelineConfig:
    """Write a :class:`~ldm.pipeline.Txt2ImgPipeline` as an original single ``.safetensors`` file."""
    parts = {name: getattr(pipe, name).state_dict() for name in checkpoints.COMPONENT_PREFIXES}
    return write_single_file(path, pipe.config, parts, dtype=dtype)


def check_fits(checkpoint: OriginalCheckpoint) -> None:
    """Strictly check every weight set of ``checkpoint`` against meta-device modules (no memory used).

    Raises the same one-line :class:`CheckpointError` as loading would (missing / unexpected keys,
    shape mismatches), also for the U-Net weight set the pipeline would not load.
    """
    with torch.device("meta"):
        modules = build_components(checkpoint.config)
    weight_sets = [(name, checkpoint.parts[name]) for name in modules]
    weight_sets += [("unet", s) for s in (checkpoint.ema_unet, checkpoint.non_ema_unet) if s is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "copying into a meta parameter is a no-op": that is the point
        for name, weights in weight_sets:
            checkpoints.load_into(modules[name], weights, what=f"{checkpoint.source}: {name}")


# --------------------------------------------------------------------------------------------
# PipelineConfig -> CompVis YAML
# --------------------------------------------------------------------------------------------


def compvis_yaml(config: PipelineConfig) -> dict[str, Any]:
    """The CompVis/Stability inference YAML describing ``config`` (as a dict).

    It loads in the original repositories, AUTOMATIC1111 (as ``model.yaml`` beside ``model.safetensors``),
    diffusers' ``from_single_file(original_config=...)`` and :func:`read_single_file` (which then
    reads back an equal config). Raises ConfigError for what a CompVis YAML cannot express.
    """
    unet, vae, schedule = config.unet, config.vae, config.schedule
    text = _exported_text_config(config.text_encoder)
    _check_expressible(config, text)
    # diffusers reads num_heads whenever present, so name exactly one of the two.
    if unet.num_head_channels > 0:
        heads = {"num_head_channels": unet.num_head_channels}
    else:
        heads = {"num_heads": unet.num_heads}
    ddconfig = {
        "double_z": True, "z_channels": vae.latent_channels, "resolution": 256, "in_channels": vae.in_channels,
        "out_ch": vae.out_channels, "ch": vae.base_channels, "ch_mult": list(vae.channel_mult),
        "num_res_blocks": vae.num_res_blocks, "attn_resolutions": [], "dropout": 0.0,
    }  # fmt: skip
    if not vae.mid_attention:
        ddconfig["attn_type"] = "none"
    return {"model": {
        "target": _TARGETS["model"],
        "params": {
            "linear_start": schedule.beta_start,
            "linear_end": schedule.beta_end,
            "timesteps": schedule.num_train_timesteps,
            "beta_schedule": _OUR_BETAS_TO_COMPVIS[schedule.beta_schedule],
            "parameterization": schedule.prediction,
            "first_stage_key": "jpg",
            "cond_stage_key": "txt",
            "image_size": config.sampling.height // vae.downsample_factor,
            "channels": vae.latent_channels,
            "cond_stage_trainable": False,
            "conditioning_key": "crossattn",
            "scale_factor": vae.scaling_factor,
            "use_ema": False,
            "unet_config": {"target": _TARGETS["unet"], "params": {
                "image_size": 32,  # unused by CompVis
                "in_channels": unet.in_channels,
                "out_channels": unet.out_channels,
                "model_channels": unet.model_channels,
                "attention_resolutions": list(unet.attention_resolutions),
                "num_res_blocks": unet.num_res_blocks,
                "channel_mult": list(unet.channel_mult),
                **heads,
                "use_spatial_transformer": True,
                "use_linear_in_transformer": unet.use_linear_in_transformer,
                "transformer_depth": unet.transformer_depth,
                "context_dim": unet.context_dim,
                "legacy": False,
            }},
            "first_stage_config": {"target": _TARGETS["vae"], "params": {
                "embed_dim": vae.latent_channels, "ddconfig": ddconfig,
                "lossconfig": {"target": "torch.nn.Identity"},
            }},
            "cond_stage_config": _cond_stage_yaml(text),
        },
    }}


def _cond_stage_yaml(text: TextEncoderConfig) -> dict[str, Any]:
    if text.kind == "clip" and text.act == "quick_gelu":
        params = {"layer": "hidden", "layer_idx": -2} if text.layer == "penultimate" else {"layer": "last"}
        return {"target": _TARGETS[_CLIP_EMBEDDER], "params": params}
    # An exported GELU tower is the penultimate-layer output of the complete tower (module docstring).
    layer = text.layer if text.kind == "openclip" else "penultimate"
    return {"target": _TARGETS[_OPENCLIP_EMBEDDER], "params": {"freeze": True, "layer": layer}}


def _check_expressible(config: PipelineConfig, text: TextEncoderConfig) -> None:
    """Raise ConfigError naming the first setting a CompVis YAML (plus the weights) cannot carry."""
    sd2 = text.kind == "openclip" or text.act == "gelu"
    problems = {
        "U-Net norm_groups != 32": config.unet.norm_groups != COMPVIS_NORM_GROUPS,
        "VAE norm_groups != 32": config.vae.norm_groups != COMPVIS_NORM_GROUPS,
        "upcast_attention differs from the SD 1.x/2.x code": config.unet.upcast_attention != sd2,
        "text encoder heads are not 64 channels wide": text.heads != max(1, text.width // TEXT_HEAD_CHANNELS),
        "text encoder padding differs from its family": text.pad != ("zero" if sd2 else "eot"),
        "layer_norm_eps != 1e-5": text.layer_norm_eps != 1e-5,
        "timesteps other than CompVis' DDIM spacing": (config.schedule.timestep_spacing, config.schedule.steps_offset)
        != ("leading", 1),
        "non-square native size": config.sampling.height != config.sampling.width,
    }
    for problem, present in problems.items():
        if present:
            raise ConfigError(f"this model cannot be described by a CompVis YAML: {problem}")


def save_compvis_yaml(config: PipelineConfig, path: str | Path) -> None:
    """Write :func:`compvis_yaml` of ``config`` to ``path``."""
    text = yaml.safe_dump(compvis_yaml(config), sort_keys=False)
    Path(path).write_text(text, encoding="utf-8")
