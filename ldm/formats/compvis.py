"""CompVis / Stability inference YAMLs (``v1-inference.yaml``, ``v2-inference-v.yaml``) <-> our configs.

A CompVis YAML names a ``LatentDiffusion`` model by ``target`` class paths and their ``params``::

    model.params                              schedule (linear_start, linear_end, timesteps, beta_schedule),
                                              parameterization, scale_factor, image_size (latent pixels)
    model.params.unet_config.params           the U-Net (UNetConfig names; CompVis defaults)
    model.params.first_stage_config.params    the VAE: ddconfig and embed_dim
    model.params.cond_stage_config            the text encoder, named only by class:
                                              FrozenCLIPEmbedder (SD 1.x), FrozenOpenCLIPEmbedder (SD 2.x)
    model.params.low_scale_config.params      SD's x4 upscaler (LatentUpscaleDiffusion) only: the augmentation
                                              noise_schedule_config and max_noise_level (ldm.upscaling)

Per section, :func:`unet_config_from_compvis`, :func:`vae_config_from_compvis` and
:func:`schedule_config_from_compvis` raise ``ValueError`` for what our models do not implement.
:func:`config_from_compvis` reads a whole YAML together with the checkpoint's weights, which give the
text encoder's sizes (:mod:`ldm.formats.single_file_config`); :func:`compvis_yaml` and
:func:`save_compvis_yaml` write one. ``target`` strings are checked, never imported. Whole-YAML
failures raise :class:`~ldm.errors.ConfigError` (or :class:`~ldm.errors.CheckpointError` when the
weights contradict the YAML) with a one-line message.

Naming trap: the beta schedule CompVis calls ``"linear"`` (a linspace of sqrt(beta), squared) is our
(and diffusers') ``"scaled_linear"``; CompVis ``"sqrt_linear"`` is our ``"linear"``; ``"cosine"`` is
``"cosine"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import Tensor

from autoencoder.model import AutoencoderConfig
from ldm.config import PipelineConfig
from ldm.config_io import write_yaml
from ldm.errors import CheckpointError, ConfigError
from ldm.formats.single_file_config import (
    COMPVIS_NORM_GROUPS,
    DEFAULT_SCALING_FACTOR,
    TEXT_HEAD_CHANNELS,
    exported_text_config,
    infer_text_config,
    native_sampling,
    text_layout,
)
from ldm.models.text_encoders import TextEncoderConfig
from ldm.models.unet import UNetConfig
from ldm.sampling.schedule import ScheduleConfig
from ldm.upscaling import UpscaleConfig

__all__ = [
    "compvis_yaml",
    "config_from_compvis",
    "save_compvis_yaml",
    "schedule_config_from_compvis",
    "unet_config_from_compvis",
    "vae_config_from_compvis",
    "vae_config_from_first_stage",
]

_CLIP_EMBEDDER = "FrozenCLIPEmbedder"
_OPENCLIP_EMBEDDER = "FrozenOpenCLIPEmbedder"
_TARGETS = {
    "model": "ldm.models.diffusion.ddpm.LatentDiffusion",
    "inpainting model": "ldm.models.diffusion.ddpm.LatentInpaintDiffusion",
    "upscaling model": "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion",
    "low scale": "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation",
    "unet": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "vae": "ldm.models.autoencoder.AutoencoderKL",
    _CLIP_EMBEDDER: "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
    _OPENCLIP_EMBEDDER: "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
}


# --------------------------------------------------------------------------------------------
# Sections: U-Net, VAE, schedule
# --------------------------------------------------------------------------------------------


# CompVis key -> UNetConfig field
_UNET_FIELDS = {
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "model_channels": "model_channels",
    "channel_mult": "channel_mult",
    "num_res_blocks": "num_res_blocks",
    "attention_resolutions": "attention_resolutions",
    "num_heads": "num_heads",
    "num_head_channels": "num_head_channels",
    "context_dim": "context_dim",
    "transformer_depth": "transformer_depth",
    "use_linear_in_transformer": "use_linear_in_transformer",
    "upcast_attention": "upcast_attention",
    "num_classes": "num_classes",  # an int: label embedding (the x4 upscaler's noise level); see below for "sequential"
    "disable_self_attentions": "disable_self_attentions",
    "adm_in_channels": "adm_in_channels",  # with num_classes: "sequential" (SDXL's vector conditioning)
}
# CompVis options whose only supported value is the one given (None also accepted for None).
_UNET_REQUIRED: dict[str, Any] = {
    "use_spatial_transformer": True,
    "dims": 2,
    "conv_resample": True,
    "dropout": 0.0,
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "n_embed": None,
    "num_attention_blocks": None,
    "disable_middle_self_attn": False,
    "transformer_depth_middle": None,
}
# Options that do not change the network's function or parameters here.
_UNET_IGNORED = {
    "use_checkpoint",  # runtime choice: UNetModel.set_gradient_checkpointing
    "use_fp16",
    "use_bf16",
    "image_size",  # unused by CompVis too
    "legacy",  # only changes head sizes of non-spatial attention blocks
    "num_heads_upsample",  # only for non-spatial attention blocks
    "use_new_attention_order",  # idem
    "spatial_transformer_attn_type",  # backend choice; see ldm.models.attention
}


def _matches_required(value: Any, required: Any) -> bool:
    """Whether a CompVis option value equals the only value supported (``None`` ~ ``False``)."""
    if isinstance(value, (list, tuple)) and not any(value):
        value = None  # e.g. disable_self_attentions: [False, False, False, False]
    if value is None:
        return required is None or required is False
    return required is not None and value == required


def _read_label_embedding(kwargs: dict[str, Any]) -> None:
    """CompVis ``num_classes`` (an int: an Embedding; ``"sequential"``: an MLP of an ``adm_in_channels``
    vector) -> our ``num_classes`` / ``adm_in_channels``, in place."""
    num_classes = kwargs.get("num_classes")
    if num_classes == "sequential":
        if not isinstance(kwargs.get("adm_in_channels"), int):
            raise ValueError("CompVis U-Net option num_classes='sequential' needs an integer adm_in_channels")
        del kwargs["num_classes"]
    elif not isinstance(num_classes, (int, type(None))):
        raise ValueError(f"unsupported CompVis U-Net option num_classes={num_classes!r} "
                         "(supported: an integer, or 'sequential' with adm_in_channels)")
    elif kwargs.get("adm_in_channels") is not None:
        raise ValueError("CompVis U-Net option adm_in_channels needs num_classes='sequential'")


def unet_config_from_compvis(params: Mapping[str, Any]) -> UNetConfig:
    """Build from the ``model.params.unet_config.params`` dict of a CompVis/SGM YAML.

    Training and precision switches (``use_checkpoint``, ``use_fp16``, ``image_size``, ...)
    are ignored; features this U-Net does not implement (class conditioning, scale-shift
    norm, attention blocks without a SpatialTransformer, ...) raise ``ValueError``. Missing
    keys take the UNetConfig defaults, except ``num_heads`` whose CompVis default is -1.
    """
    params = dict(params)
    for key, required in _UNET_REQUIRED.items():
        if key in params and not _matches_required(params[key], required):
            raise ValueError(
                f"unsupported CompVis U-Net option {key}={params[key]!r} (supported: {required!r})"
            )
    unknown = sorted(set(params) - set(_UNET_FIELDS) - set(_UNET_REQUIRED) - _UNET_IGNORED)
    if unknown:
        raise ValueError(f"unknown CompVis U-Net option(s): {', '.join(unknown)}")

    kwargs = {field: params[key] for key, field in _UNET_FIELDS.items() if key in params}
    kwargs.setdefault("num_heads", -1)  # CompVis default; SD2 YAMLs omit it
    if kwargs.get("num_head_channels", -1) > 0:
        kwargs["num_heads"] = -1  # head channels win, as in CompVis
    if isinstance(kwargs.get("transformer_depth"), Iterable):
        kwargs["transformer_depth"] = tuple(kwargs["transformer_depth"])
    if isinstance(kwargs.get("context_dim"), Iterable):  # the SDXL refiner YAML names it per level
        widths = set(kwargs["context_dim"])
        if len(widths) != 1:
            raise ValueError(f"per-level context_dim {list(kwargs['context_dim'])} is not supported")
        kwargs["context_dim"] = widths.pop()
    _read_label_embedding(kwargs)
    if kwargs.get("disable_self_attentions") is not None and not any(kwargs["disable_self_attentions"]):
        kwargs["disable_self_attentions"] = None
    if "context_dim" in kwargs and kwargs["context_dim"] is None:
        raise ValueError("context_dim=None (a U-Net without cross-attention) is not supported")
    return UNetConfig(**kwargs)


def vae_config_from_compvis(
    ddconfig: Mapping[str, Any], embed_dim: int, scaling_factor: float = DEFAULT_SCALING_FACTOR
) -> AutoencoderConfig:
    """Read the ``first_stage_config.params.ddconfig`` dict of a CompVis/SD YAML.

    Args:
        ddconfig: e.g. ``{double_z: true, z_channels: 4, resolution: 256, in_channels: 3, out_ch: 3,
            ch: 128, ch_mult: [1, 2, 4, 4], num_res_blocks: 2, attn_resolutions: [], dropout: 0.0}``.
        embed_dim: ``first_stage_config.params.embed_dim``; must equal ``z_channels`` (true for SD).
        scaling_factor: ``model.params.scale_factor`` of the YAML.

    Raises:
        ValueError: for an unknown key or a CompVis feature this model does not implement
            (attention inside levels, dropout, tanh output, single-z encoders, embed_dim != z_channels).
    """
    supported = {
        "double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
        "num_res_blocks", "attn_resolutions", "dropout", "attn_type", "tanh_out", "give_pre_end",
        "resamp_with_conv", "use_linear_attn",
    }  # fmt: skip
    unknown = sorted(set(ddconfig) - supported)
    if unknown:
        raise ValueError(f"unknown CompVis ddconfig key(s): {', '.join(unknown)}")
    unsupported = {
        "attn_resolutions": list(ddconfig.get("attn_resolutions", [])) != [],
        "dropout": float(ddconfig.get("dropout", 0.0)) != 0.0,
        "double_z": not ddconfig.get("double_z", True),
        "tanh_out": bool(ddconfig.get("tanh_out", False)),
        "give_pre_end": bool(ddconfig.get("give_pre_end", False)),
        "resamp_with_conv": not ddconfig.get("resamp_with_conv", True),
        "use_linear_attn": bool(ddconfig.get("use_linear_attn", False)),
        "attn_type": ddconfig.get("attn_type", "vanilla") not in ("vanilla", "none"),
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(f"unsupported CompVis ddconfig value(s) for: {', '.join(bad)}")
    if int(embed_dim) != int(ddconfig["z_channels"]):
        raise ValueError(f"embed_dim={embed_dim} must equal z_channels={ddconfig['z_channels']}")
    return AutoencoderConfig(
        in_channels=int(ddconfig.get("in_channels", 3)),
        out_channels=int(ddconfig.get("out_ch", 3)),
        latent_channels=int(ddconfig["z_channels"]),
        base_channels=int(ddconfig["ch"]),
        channel_mult=tuple(ddconfig["ch_mult"]),
        num_res_blocks=int(ddconfig["num_res_blocks"]),
        mid_attention=ddconfig.get("attn_type", "vanilla") == "vanilla",
        scaling_factor=float(scaling_factor),
    )


def vae_config_from_first_stage(params: Mapping[str, Any], scaling_factor: float) -> AutoencoderConfig:
    """Read ``first_stage_config.params`` (``ddconfig``, ``embed_dim``) of a CompVis or sgm YAML; the xformers
    attention kernel (``attn_type: vanilla-xformers``) is the same maths as ``vanilla``. ``ValueError`` as
    :func:`vae_config_from_compvis`."""
    ddconfig = dict(params.get("ddconfig") or {})
    if ddconfig.get("attn_type") == "vanilla-xformers":
        ddconfig["attn_type"] = "vanilla"
    return vae_config_from_compvis(ddconfig, params.get("embed_dim", ddconfig.get("z_channels")), scaling_factor)


# CompVis beta schedule name -> ours (the diffusers meaning; module docstring), and back.
_BETA_NAMES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "cosine"}
_OUR_BETAS_TO_COMPVIS = {ours: compvis for compvis, ours in _BETA_NAMES.items()}


def schedule_config_from_compvis(params: Mapping[str, Any]) -> ScheduleConfig:
    """Read the ``model.params`` of a CompVis/Stability YAML (``linear_start``, ``linear_end``,
    ``timesteps``, ``beta_schedule``, ``parameterization``); other keys are ignored.

    CompVis sampling uses DDIM "uniform" spacing, which is diffusers ``"leading"`` with
    ``steps_offset=1``.
    """
    compvis_beta = params.get("beta_schedule", "linear")
    if compvis_beta not in _BETA_NAMES:
        raise ValueError(f"unsupported CompVis beta_schedule {compvis_beta!r} (supported: {sorted(_BETA_NAMES)})")
    return ScheduleConfig(
        num_train_timesteps=int(params.get("timesteps", 1000)),
        beta_schedule=_BETA_NAMES[compvis_beta],
        beta_start=float(params.get("linear_start", 1e-4)),
        beta_end=float(params.get("linear_end", 2e-2)),
        prediction=params.get("parameterization", "eps"),
        timestep_spacing="leading",
        steps_offset=1,
    )


def upscale_config_from_compvis(params: Mapping[str, Any]) -> UpscaleConfig:
    """Read ``model.params.low_scale_config.params`` of an x4-upscaler YAML (ImageConcatWithNoiseAugmentation):
    ``noise_schedule_config`` (linear_start, linear_end, timesteps, beta_schedule; CompVis defaults) and
    ``max_noise_level`` (its default 1000)."""
    schedule = params.get("noise_schedule_config") or {}
    compvis_beta = schedule.get("beta_schedule", "linear")
    if compvis_beta not in _BETA_NAMES:
        raise ValueError(f"unsupported CompVis beta_schedule {compvis_beta!r} (supported: {sorted(_BETA_NAMES)})")
    noise_schedule = ScheduleConfig(num_train_timesteps=int(schedule.get("timesteps", 1000)),
                                    beta_schedule=_BETA_NAMES[compvis_beta],
                                    beta_start=float(schedule.get("linear_start", 1e-4)),
                                    beta_end=float(schedule.get("linear_end", 2e-2)))
    return UpscaleConfig(noise_schedule=noise_schedule, max_noise_level=int(params.get("max_noise_level", 1000)))


# --------------------------------------------------------------------------------------------
# CompVis YAML -> PipelineConfig
# --------------------------------------------------------------------------------------------


def _section(d: Any, key: str, source: str, where: str) -> dict[str, Any]:
    value = d.get(key) if isinstance(d, dict) else None
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: missing mapping {where}{key}")
    return value


def _check_target(section: dict[str, Any], expected_class: str | tuple[str, ...], source: str, where: str) -> str:
    target = str(section.get("target", ""))
    expected = (expected_class,) if isinstance(expected_class, str) else expected_class
    if target.rsplit(".", 1)[-1] not in expected:
        raise ConfigError(f"{source}: {where}target is {target!r}; only {' or '.join(expected)} is supported")
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
    target = _check_target(model, ("LatentDiffusion", "LatentInpaintDiffusion", "LatentUpscaleDiffusion"), source,
                           "model.")
    params = model.get("params") or {}
    # Text-to-image models condition by cross-attention only; inpainting models ("hybrid") also
    # concatenate the mask and the masked image's latents to the U-Net's input; the x4 upscaler
    # ("hybrid-adm") concatenates the small image and adds its noise level as a class label.
    conditioning = {"LatentInpaintDiffusion": "hybrid", "LatentUpscaleDiffusion": "hybrid-adm"}.get(
        target.rsplit(".", 1)[-1], "crossattn")
    if params.get("conditioning_key", "crossattn") != conditioning:
        raise ConfigError(f"{source}: conditioning_key {params['conditioning_key']!r} is not supported by "
                          f"{target.rsplit('.', 1)[-1]} (expected {conditioning})")
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
        unet = unet_config_from_compvis(unet_params)
        vae = vae_config_from_first_stage(vae_section.get("params") or {},
                                          float(params.get("scale_factor", 1.0)))  # CompVis default 1.0
        schedule = schedule_config_from_compvis(params)
        upscale = _upscale_section(params, source) if conditioning == "hybrid-adm" else None
    except (ValueError, KeyError, TypeError) as error:
        message = f"missing key {error.args[0]!r}" if isinstance(error, KeyError) and error.args else error
        raise ConfigError(f"{source}: {message}") from None
    text = _text_config_from_embedder(embedder, cond_section.get("params") or {}, parts["text_encoder"], source)
    return PipelineConfig(unet=unet, vae=vae, text_encoder=text, schedule=schedule,
                          sampling=native_sampling(params.get("image_size", 64), vae), upscale=upscale)


def _upscale_section(params: dict[str, Any], source: str) -> UpscaleConfig:
    low_scale = _section(params, "low_scale_config", source, "model.params.")
    _check_target(low_scale, "ImageConcatWithNoiseAugmentation", source, "model.params.low_scale_config.")
    return upscale_config_from_compvis(low_scale.get("params") or {})


def _text_config_from_embedder(embedder: str, params: dict[str, Any], weights, source: str) -> TextEncoderConfig:
    """Sizes from the weights; family and output layer from the YAML (CompVis semantics)."""
    inferred = infer_text_config(weights)
    layout = text_layout(weights)
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


# --------------------------------------------------------------------------------------------
# PipelineConfig -> CompVis YAML
# --------------------------------------------------------------------------------------------


def compvis_yaml(config: PipelineConfig) -> dict[str, Any]:
    """The CompVis/Stability inference YAML describing ``config`` (as a dict).

    It loads in the original repositories, AUTOMATIC1111 (as ``model.yaml`` beside ``model.safetensors``),
    diffusers' ``from_single_file(original_config=...)`` and
    :func:`ldm.formats.single_file.read_single_file` (which then
    reads back an equal config). Raises ConfigError for what a CompVis YAML cannot express.
    """
    unet, vae, schedule = config.unet, config.vae, config.schedule
    text = exported_text_config(config.text_encoder)
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
    inpainting = unet.in_channels == 2 * vae.latent_channels + 1
    kind, conditioning = ("inpainting model", "hybrid") if inpainting else ("model", "crossattn")
    if config.is_upscaler:
        kind, conditioning = "upscaling model", "hybrid-adm"
    label_options = {}  # the x4 upscaler's noise-level embedding and cross-attention-only levels
    if unet.num_classes is not None:
        label_options["num_classes"] = unet.num_classes
    if unet.disable_self_attentions is not None:
        label_options["disable_self_attentions"] = list(unet.disable_self_attentions)
    if unet.adm_in_channels is not None:
        label_options |= {"num_classes": "sequential", "adm_in_channels": unet.adm_in_channels}
    return {"model": {
        "target": _TARGETS[kind],
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
            "conditioning_key": conditioning,
            "scale_factor": vae.scaling_factor,
            "use_ema": False,
            **_low_scale_yaml(config),
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
                "transformer_depth": (list(unet.transformer_depth) if isinstance(unet.transformer_depth, tuple)
                                      else unet.transformer_depth),
                "context_dim": unet.context_dim,
                "legacy": False,
                **label_options,
            }},
            "first_stage_config": {"target": _TARGETS["vae"], "params": {
                "embed_dim": vae.latent_channels, "ddconfig": ddconfig,
                "lossconfig": {"target": "torch.nn.Identity"},
            }},
            "cond_stage_config": _cond_stage_yaml(text),
        },
    }}


def _low_scale_yaml(config: PipelineConfig) -> dict[str, Any]:
    """The x4 upscaler's ``low_scale_key`` and ``low_scale_config`` (nothing for other models)."""
    if not config.is_upscaler:
        return {}
    schedule = config.upscale.noise_schedule
    noise_schedule = {"linear_start": schedule.beta_start, "linear_end": schedule.beta_end,
                      "timesteps": schedule.num_train_timesteps,
                      "beta_schedule": _OUR_BETAS_TO_COMPVIS[schedule.beta_schedule]}
    return {"low_scale_key": "lr", "low_scale_config": {"target": _TARGETS["low scale"], "params": {
        "noise_schedule_config": noise_schedule, "max_noise_level": config.upscale.max_noise_level}}}


def _cond_stage_yaml(text: TextEncoderConfig) -> dict[str, Any]:
    if text.kind == "clip" and text.act == "quick_gelu":
        params = {"layer": "hidden", "layer_idx": -2} if text.layer == "penultimate" else {"layer": "last"}
        return {"target": _TARGETS[_CLIP_EMBEDDER], "params": params}
    # An exported GELU tower is the complete tower's penultimate-layer output (ldm.formats.single_file_config).
    layer = text.layer if text.kind == "openclip" else "penultimate"
    return {"target": _TARGETS[_OPENCLIP_EMBEDDER], "params": {"freeze": True, "layer": layer}}


def _check_expressible(config: PipelineConfig, text: TextEncoderConfig) -> None:
    """Raise ConfigError naming the first setting a CompVis YAML (plus the weights) cannot carry."""
    sd2 = text.kind == "openclip" or text.act == "gelu"
    problems = {
        "SDXL (Stability's generative-models YAML is not written yet)": config.is_sdxl,
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
    write_yaml(compvis_yaml(config), path)
