"""Reading and writing diffusers ``StableDiffusionPipeline`` folders (and their SDXL, inpainting and
upscaler siblings).

A diffusers folder holds one sub-folder per component (``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``), each with a ``config.json`` and weights in diffusers' own
names. The key maps in ``ldm.formats.*_keys`` translate those names to the original Stable
Diffusion names our modules use, and the component configs to ours;
:func:`schedule_config_from_diffusers` / :func:`schedule_config_to_diffusers` translate
``scheduler/scheduler_config.json`` (diffusers names the beta schedules and parameterisations
differently: ``"squaredcos_cap_v2"`` is our ``"cosine"``, ``"epsilon"`` / ``"v_prediction"`` our
``"eps"`` / ``"v"``).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ldm.formats import checkpoints
from ldm.config import PipelineConfig, SamplingDefaults, plain_data
from ldm.errors import CheckpointError, ConfigError
from ldm.formats import text_keys as text_keymap
from ldm.formats import unet_keys as unet_keymap
from ldm.formats import vae_keys as vae_keymap
from ldm.formats.single_file_config import UPSCALER_SCALING_FACTOR, check_upscaler_channels
from ldm.sampling.registry import SAMPLER_INFO
from ldm.sampling.schedule import ScheduleConfig
from ldm.models.sdxl_conditioning import SDXLConfig
from ldm.models.tokenizer import ClipTokenizer
from ldm.upscaling import UpscaleConfig

logger = logging.getLogger(__name__)

# our sampler name -> the diffusers scheduler class with the same algorithm (with the config values in
# SAMPLER_INFO[name].diffusers_options: DPM-Solver's algorithm_type, PNDM's skip_prk_steps).
SCHEDULER_CLASSES = {name: info.diffusers_class for name, info in SAMPLER_INFO.items()}
# the class defaults of those keys (a scheduler_config.json without the key means the default)
DIFFUSERS_OPTION_DEFAULTS = {("DPMSolverMultistepScheduler", "algorithm_type"): "dpmsolver++",
                             ("DPMSolverMultistepScheduler", "solver_order"): 2,
                             ("DPMSolverMultistepScheduler", "solver_type"): "midpoint",
                             ("PNDMScheduler", "skip_prk_steps"): False}
# diffusers scheduler classes without a sampler of the same algorithm here -> the nearest (named in a warning)
SUBSTITUTE_SAMPLERS = {
    "DPMSolverSinglestepScheduler": "dpmpp_2m",  # DPM-Solver++ 2S, singlestep: its multistep sibling
    "DEISMultistepScheduler": "unipc",  # another multistep exponential integrator
    "EDMEulerScheduler": "euler",
    "EDMDPMSolverMultistepScheduler": "dpmpp_2m",
    "TCDScheduler": "lcm",  # trajectory consistency distillation samples like LCM (gamma = 0.3 differs)
}

_WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin"),
}
_KEYMAPS = {"unet": unet_keymap, "vae": vae_keymap, "text_encoder": text_keymap}

# our ScheduleConfig names -> diffusers scheduler-config names
_BETA_NAMES = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}
_PREDICTION_NAMES = {"eps": "epsilon", "v": "v_prediction"}


def schedule_config_from_diffusers(scheduler_config: dict[str, Any]) -> ScheduleConfig:
    """Read a diffusers ``scheduler_config.json`` dict (any of the DDPM-family schedulers).

    Keys this schedule does not model (``clip_sample``, ``skip_prk_steps``, ...) are ignored;
    missing keys take the defaults of diffusers' DDPM/DDIM/PNDM schedulers (the classes
    SD checkpoints ship), e.g. ``timestep_spacing="leading"``. Unsupported values raise.
    """
    c = scheduler_config
    if c.get("trained_betas") is not None:
        raise ValueError("scheduler config with trained_betas is not supported")
    beta_name = c.get("beta_schedule", "linear")
    prediction_name = c.get("prediction_type", "epsilon")
    return ScheduleConfig(
        num_train_timesteps=int(c.get("num_train_timesteps", 1000)),
        beta_schedule=_reverse_lookup(_BETA_NAMES, beta_name, "beta_schedule"),
        beta_start=float(c.get("beta_start", 0.0001)),
        beta_end=float(c.get("beta_end", 0.02)),
        prediction=_reverse_lookup(_PREDICTION_NAMES, prediction_name, "prediction_type"),
        timestep_spacing=c.get("timestep_spacing", "leading"),
        steps_offset=int(c.get("steps_offset", 0)),
        rescale_betas_zero_snr=bool(c.get("rescale_betas_zero_snr", False)),
    )


def schedule_config_to_diffusers(config: ScheduleConfig) -> dict[str, Any]:
    """The diffusers scheduler-config keys ``config`` determines (no ``_class_name``).

    Includes ``clip_sample=False`` and ``set_alpha_to_one=False``, the values our DDPM/DDIM
    samplers implement (and Stable Diffusion ships); schedulers without those keys ignore them.
    """
    return {
        "num_train_timesteps": config.num_train_timesteps,
        "beta_schedule": _BETA_NAMES[config.beta_schedule],
        "beta_start": config.beta_start,
        "beta_end": config.beta_end,
        "prediction_type": _PREDICTION_NAMES[config.prediction],
        "timestep_spacing": config.timestep_spacing,
        "steps_offset": config.steps_offset,
        "rescale_betas_zero_snr": config.rescale_betas_zero_snr,
        "clip_sample": False,
        "set_alpha_to_one": False,
    }


def _reverse_lookup(ours_to_theirs: dict[str, str], theirs: str, key: str) -> str:
    for ours, name in ours_to_theirs.items():
        if name == theirs:
            return ours
    raise ValueError(f"unsupported {key} {theirs!r} (supported: {sorted(ours_to_theirs.values())})")


FALLBACK_SAMPLER = "dpmpp_2m"


def sampler_for_scheduler(scheduler_config: dict[str, Any], folder: Path) -> str:
    """The sampler matching a diffusers ``scheduler_config.json`` (its class, and the options that select
    an algorithm within the class); for one with no equivalent here (DPM-Solver singlestep, DEIS, PNDM
    with Runge-Kutta warm-up, ...) a warning names the substitute, never a silent change."""
    class_name = scheduler_config.get("_class_name", "")
    candidates = [name for name, info in SAMPLER_INFO.items() if info.diffusers_class == class_name]
    for name in candidates:
        if all(scheduler_config.get(key, DIFFUSERS_OPTION_DEFAULTS.get((class_name, key))) == value
               for key, value in SAMPLER_INFO[name].diffusers_options):
            return name
    substitute = candidates[0] if candidates else SUBSTITUTE_SAMPLERS.get(class_name, FALLBACK_SAMPLER)
    options = sorted({key for name in candidates for key, _ in SAMPLER_INFO[name].diffusers_options})
    detail = ", ".join(f"{key}={scheduler_config.get(key, DIFFUSERS_OPTION_DEFAULTS.get((class_name, key)))!r}"
                       for key in options)
    detail = f" with {detail}" if detail else ""
    logger.warning("%s: its scheduler %s%s has no equivalent sampler here; sampling with %s (%s) instead",
                   folder, class_name or "(none named)", detail, substitute, SAMPLER_INFO[substitute].a1111_name)
    return substitute


def schedule_flags_from_diffusers(scheduler_config: dict[str, Any], folder: Path) -> bool:
    """``karras`` for ``use_karras_sigmas``; the exponential and beta sigmas diffusers can also ask for
    are named in a warning (the model's default schedule is used; pass ``schedule=`` to sample with them)."""
    for key, name in (("use_exponential_sigmas", "exponential"), ("use_beta_sigmas", "beta")):
        if scheduler_config.get(key):
            logger.warning("%s: its scheduler asks for %s sigmas, which a model's defaults cannot hold here; "
                           "sampling with the default schedule unless schedule=%r is given", folder, name, name)
    return bool(scheduler_config.get("use_karras_sigmas", False))


# Pipelines whose folders hold the weights of a U-Net kind we run (text-to-image, inpainting or SD's x4
# super-resolution); img2img is a mode of ours over the same weights.
UPSCALE_PIPELINE = "StableDiffusionUpscalePipeline"
SDXL_PIPELINE, SDXL_REFINER_PIPELINE = "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"
SDXL_INPAINT_PIPELINE = "StableDiffusionXLInpaintPipeline"
PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                    UPSCALE_PIPELINE, SDXL_PIPELINE, SDXL_REFINER_PIPELINE, SDXL_INPAINT_PIPELINE)
# SDXL's text encoders: diffusers component -> its tokenizer folder and transformers class
SDXL_TEXT_COMPONENTS = {"text_encoder": ("tokenizer", "CLIPTextModel"),
                        "text_encoder_2": ("tokenizer_2", "CLIPTextModelWithProjection")}


def load_diffusers_folder(folder: str | Path) -> tuple[PipelineConfig, dict[str, dict[str, torch.Tensor]]]:
    """Read a diffusers pipeline folder into our config and original-named state dicts.

    Returns:
        ``(config, parts)`` with ``parts = {"unet": sd, "vae": sd, "text_encoder": sd}``, keys in
        the original single-file names without their component prefix.
    """
    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    pipeline_class = index.get("_class_name", "StableDiffusionPipeline")
    if pipeline_class not in PIPELINE_CLASSES:
        raise CheckpointError(f"{folder} is a {pipeline_class} folder: only {', '.join(PIPELINE_CLASSES)} "
                              "folders can be run here")
    unet_json = _read_json(folder / "unet" / "config.json")
    unet_config = unet_keymap.config_from_diffusers(unet_json)
    vae_config = vae_keymap.config_from_diffusers(_read_json(folder / "vae" / "config.json"))
    upscale = None
    if pipeline_class == UPSCALE_PIPELINE:
        upscale = _upscale_config(folder, index)
        vae_config = _upscaler_vae_config(vae_config, folder)
        check_upscaler_channels(unet_config, vae_config, str(folder))
    else:
        checkpoints.check_unet_channels(unet_config, vae_config, str(folder))
    if unet_config.adm_in_channels is not None:
        return _load_sdxl_folder(folder, index, unet_config, vae_config, unet_json)
    text_config = text_keymap.config_from_diffusers(_read_json(folder / "text_encoder" / "config.json"))
    tokenizer = ClipTokenizer.from_diffusers_folder(folder / "tokenizer")
    text_config = _with_tokenizer_settings(text_config, tokenizer)
    scheduler_dict = _read_json(folder / "scheduler" / "scheduler_config.json")
    config = PipelineConfig(
        unet=unet_config,
        vae=vae_config,
        text_encoder=text_config,
        schedule=schedule_config_from_diffusers(scheduler_dict),
        sampling=_sampling_defaults(folder, scheduler_dict, unet_json, vae_config),
        upscale=upscale,
    )
    parts = {}
    for name, component_config in (("unet", unet_config), ("vae", vae_config), ("text_encoder", text_config)):
        parts[name] = _component_weights(folder, name, name, component_config)
    return config, parts


def _sampling_defaults(folder: Path, scheduler_dict: dict[str, Any], unet_json: dict[str, Any],
                       vae_config) -> SamplingDefaults:
    """The native size (the U-Net's ``sample_size`` in latent pixels) and the folder's scheduler as a sampler."""
    native_size = unet_json.get("sample_size", 64)
    factor = 2 ** (len(vae_config.channel_mult) - 1)
    return SamplingDefaults(
        height=int(native_size) * factor,
        width=int(native_size) * factor,
        sampler=sampler_for_scheduler(scheduler_dict, folder),
        karras=schedule_flags_from_diffusers(scheduler_dict, folder),
    )


def _component_weights(folder: Path, component: str, kind: str, component_config) -> dict[str, torch.Tensor]:
    """The weights of ``folder/component`` in our names, through the key map of ``kind`` (unet, vae, text_encoder)."""
    state_dict = checkpoints.load_state_dict(_weights_file(folder / component, kind))
    try:
        return _KEYMAPS[kind].from_diffusers(state_dict, component_config)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{folder / component}: weights do not fit its config.json ({error})") from None


def _load_sdxl_folder(folder: Path, index: dict[str, Any], unet_config, vae_config,
                      unet_json: dict[str, Any]) -> tuple[PipelineConfig, dict[str, dict[str, torch.Tensor]]]:
    """An SDXL base (``text_encoder`` CLIP ViT-L + ``text_encoder_2`` bigG) or refiner (bigG alone) folder.

    Both towers become SDXL embedders (raw penultimate hidden states; bigG as ``kind="openclip"`` with its
    projection, for the pooled output); their weights are ``embedders.{i}.*`` of our text encoder.
    """
    present = [name for name in SDXL_TEXT_COMPONENTS if (index.get(name) or [None])[0] is not None]
    if not present or present[-1] != "text_encoder_2":
        raise CheckpointError(f"{folder}: an SDXL folder needs text_encoder_2 (OpenCLIP bigG) in model_index.json")
    text_configs, text_weights = [], {}
    for i, name in enumerate(present):
        tower = text_keymap.config_from_diffusers(_read_json(folder / name / "config.json"))
        tokenizer = ClipTokenizer.from_diffusers_folder(folder / SDXL_TEXT_COMPONENTS[name][0])
        tower = _with_tokenizer_settings(replace(tower, layer="penultimate", final_norm=False), tokenizer)
        if name == "text_encoder_2":
            tower = replace(tower, kind="openclip")
        weights = _component_weights(folder, name, "text_encoder", tower)
        if tower.kind == "openclip":  # CLIP's temperature: no diffusers counterpart, unused for conditioning
            weights.setdefault("model.logit_scale", torch.tensor(math.log(1 / 0.07)))
        text_configs.append(tower)
        text_weights |= {f"embedders.{i}.{key}": value for key, value in weights.items()}
    scheduler_dict = _read_json(folder / "scheduler" / "scheduler_config.json")
    config = PipelineConfig(
        unet=unet_config, vae=vae_config, text_encoder=text_configs[0],
        text_encoder_2=text_configs[1] if len(text_configs) == 2 else None,
        schedule=schedule_config_from_diffusers(scheduler_dict),
        sampling=_sampling_defaults(folder, scheduler_dict, unet_json, vae_config),
        sdxl=SDXLConfig(force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True))),
    )
    parts = {"unet": _component_weights(folder, "unet", "unet", unet_config),
             "vae": _component_weights(folder, "vae", "vae", vae_config), "text_encoder": text_weights}
    return config, parts


def _upscale_config(folder: Path, index: dict[str, Any]) -> UpscaleConfig:
    """The ``upscale`` section of a StableDiffusionUpscalePipeline folder: the augmentation schedule from
    its ``low_res_scheduler`` (a DDPMScheduler config) and ``max_noise_level`` from ``model_index.json``."""
    low_res = _read_json(folder / "low_res_scheduler" / "scheduler_config.json")
    try:
        return UpscaleConfig(noise_schedule=schedule_config_from_diffusers(low_res),
                             max_noise_level=int(index.get("max_noise_level", 350)))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{folder}: unusable upscaler settings ({error})") from None


def _upscaler_vae_config(vae_config, folder: Path):
    """StableDiffusionUpscalePipeline decodes with scaling factor 0.08333 whatever ``vae/config.json`` says."""
    if vae_config.scaling_factor != UPSCALER_SCALING_FACTOR:
        logger.warning("%s: the VAE's scaling_factor %s is replaced by %s, as diffusers' %s does", folder,
                       vae_config.scaling_factor, UPSCALER_SCALING_FACTOR, UPSCALE_PIPELINE)
    return replace(vae_config, scaling_factor=UPSCALER_SCALING_FACTOR)


def _with_tokenizer_settings(text_config, tokenizer: ClipTokenizer):
    """The padding and length of the folder's tokenizer decide ours."""
    return replace(text_config, pad=tokenizer.pad, max_length=tokenizer.max_length)


def save_diffusers_folder(pipe, path: str | Path, *, dtype: torch.dtype | None = None) -> None:
    """Write ``pipe`` as a folder ``diffusers.StableDiffusionPipeline.from_pretrained`` loads offline
    (``StableDiffusionUpscalePipeline`` for a super-resolution model, with its ``low_res_scheduler``;
    ``StableDiffusionXLPipeline`` / ``StableDiffusionXLImg2ImgPipeline`` for SDXL)."""
    config: PipelineConfig = pipe.config
    if config.is_sdxl:
        _save_sdxl_folder(pipe, path, dtype=dtype)
        return
    weights = {name: getattr(pipe, name).state_dict() for name in _KEYMAPS}
    if config.is_upscaler:
        config, weights["vae"] = _upscaler_vae(config, weights["vae"])
    with checkpoints.atomic_folder(path) as folder:
        write_json(folder / "model_index.json", model_index(config))
        for name, component_config in (("unet", config.unet), ("vae", config.vae),
                                       ("text_encoder", config.text_encoder)):
            keymap = _KEYMAPS[name]
            state_dict = keymap.to_diffusers(weights[name], component_config)
            if dtype is not None:
                state_dict = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state_dict.items()}
            (folder / name).mkdir()
            write_json(folder / name / "config.json", component_config_json(name, keymap, config))
            checkpoints.save_safetensors_atomic(state_dict, folder / name / _WEIGHT_NAMES[name][0],
                                                metadata={"format": "pt"})
        pipe.text_encoder.tokenizer.save_pretrained(folder / "tokenizer")
        (folder / "scheduler").mkdir()
        write_json(folder / "scheduler" / "scheduler_config.json", scheduler_json(config))
        if config.is_upscaler:
            (folder / "low_res_scheduler").mkdir()
            write_json(folder / "low_res_scheduler" / "scheduler_config.json", low_res_scheduler_json(config))


def _save_sdxl_folder(pipe, path: str | Path, *, dtype: torch.dtype | None) -> None:
    """An SDXL pipeline as a ``StableDiffusionXLPipeline`` folder (``StableDiffusionXLImg2ImgPipeline`` for a
    refiner, whose only text encoder is ``text_encoder_2``)."""
    config: PipelineConfig = pipe.config
    towers = list(zip(config.text_encoder_configs, pipe.text_encoder.embedders))
    names = list(SDXL_TEXT_COMPONENTS)[-len(towers):]
    with checkpoints.atomic_folder(path) as folder:
        write_json(folder / "model_index.json", sdxl_model_index(config))
        for name, component_config in (("unet", config.unet), ("vae", config.vae)):
            _write_component(folder, name, _KEYMAPS[name].to_diffusers(getattr(pipe, name).state_dict(), component_config),
                             component_config_json(name, _KEYMAPS[name], config), dtype)
        for name, (tower, module) in zip(names, towers):
            state = text_keymap.to_diffusers(module.state_dict(), tower, with_projection=tower.kind == "openclip")
            hf_config = transformers_text_config(tower, architecture=SDXL_TEXT_COMPONENTS[name][1])
            _write_component(folder, name, state, hf_config, dtype, weights_kind="text_encoder")
            module.tokenizer.save_pretrained(folder / SDXL_TEXT_COMPONENTS[name][0])
        (folder / "scheduler").mkdir()
        write_json(folder / "scheduler" / "scheduler_config.json", scheduler_json(config))


def _write_component(folder: Path, name: str, state_dict: dict[str, torch.Tensor], config_json: dict[str, Any],
                     dtype: torch.dtype | None, *, weights_kind: str | None = None) -> None:
    """``folder/name/config.json`` and its weights (in ``dtype`` when given)."""
    if dtype is not None:
        state_dict = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state_dict.items()}
    (folder / name).mkdir()
    write_json(folder / name / "config.json", config_json)
    checkpoints.save_safetensors_atomic(state_dict, folder / name / _WEIGHT_NAMES[weights_kind or name][0],
                                        metadata={"format": "pt"})


def sdxl_model_index(config: PipelineConfig) -> dict[str, Any]:
    """``model_index.json`` of an SDXL base (two text encoders) or refiner (``text_encoder_2`` alone) folder;
    ``StableDiffusionXLInpaintPipeline`` for a 9-channel (inpainting) U-Net."""
    import diffusers

    base = config.text_encoder_2 is not None
    pipeline_class = (SDXL_INPAINT_PIPELINE if _is_inpainting(config)
                      else SDXL_PIPELINE if base else SDXL_REFINER_PIPELINE)
    text = {name: ["transformers", cls] if base or name.endswith("_2") else [None, None]
            for name, (_, cls) in SDXL_TEXT_COMPONENTS.items()}
    tokenizers = {tokenizer: ["transformers", "CLIPTokenizer"] if base or tokenizer.endswith("_2") else [None, None]
                  for tokenizer, _ in SDXL_TEXT_COMPONENTS.values()}
    return {
        "_class_name": pipeline_class,
        "_diffusers_version": diffusers.__version__,
        "force_zeros_for_empty_prompt": config.sdxl.force_zeros_for_empty_prompt,
        **({} if base else {"requires_aesthetics_score": True}),
        "scheduler": ["diffusers", SCHEDULER_CLASSES[config.sampling.sampler]],
        **text, **tokenizers,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def transformers_text_config(tower, *, architecture: str = "CLIPTextModel") -> dict[str, Any]:
    """``config.json`` of a diffusers text-encoder folder holding ``tower`` as a transformers ``architecture``."""
    import transformers

    values = transformers.CLIPTextConfig(**text_keymap.diffusers_config(tower)).to_dict()
    values["architectures"] = [architecture]
    return values


def _upscaler_vae(config: PipelineConfig, vae_weights: dict[str, torch.Tensor]):
    """``(config, VAE weights)`` with the scaling factor StableDiffusionUpscalePipeline imposes (0.08333).

    A VAE with another factor ``s`` is rewritten to give latents ``s / 0.08333`` times larger (the
    encoder's mean times that ratio, its log-variance shifted by twice its log, the decoder's first
    1x1 convolution's weights divided by it): ``0.08333 * latent'`` is the same diffusion latent as
    ``s * latent``, so diffusers draws the same images (to float rounding).
    """
    ratio = config.vae.scaling_factor / UPSCALER_SCALING_FACTOR
    if ratio == 1:
        return config, vae_weights
    channels = config.vae.latent_channels
    weights = dict(vae_weights)
    mean_and_logvar_scale = torch.cat([torch.full((channels,), ratio), torch.ones(channels)])
    weights["quant_conv.weight"] = weights["quant_conv.weight"] * mean_and_logvar_scale.view(-1, 1, 1, 1)
    weights["quant_conv.bias"] = (weights["quant_conv.bias"] * mean_and_logvar_scale
                                  + torch.cat([torch.zeros(channels), torch.full((channels,), 2 * math.log(ratio))]))
    weights["post_quant_conv.weight"] = weights["post_quant_conv.weight"] / ratio
    return replace(config, vae=replace(config.vae, scaling_factor=UPSCALER_SCALING_FACTOR)), weights


def low_res_scheduler_json(config: PipelineConfig) -> dict[str, Any]:
    """``low_res_scheduler/scheduler_config.json``: the DDPMScheduler that noises the small image."""
    import diffusers

    return {"_class_name": "DDPMScheduler", "_diffusers_version": diffusers.__version__,
            **schedule_config_to_diffusers(config.upscale.noise_schedule)}


def model_index(config: PipelineConfig) -> dict[str, Any]:
    """The folder's ``model_index.json``: the pipeline class and each component's library and class."""
    if config.is_upscaler:
        index = _plain_model_index(config, UPSCALE_PIPELINE)
        del index["requires_safety_checker"]  # not an argument of StableDiffusionUpscalePipeline
        return {**index, "low_res_scheduler": ["diffusers", "DDPMScheduler"],
                "max_noise_level": config.upscale.max_noise_level, "watermarker": [None, None]}
    return _plain_model_index(config, "StableDiffusionInpaintPipeline" if _is_inpainting(config)
                              else "StableDiffusionPipeline")


def _is_inpainting(config: PipelineConfig) -> bool:
    """A U-Net that reads the latents, the mask and the masked image's latents (9 channels for SD/SDXL)."""
    return config.unet.in_channels == 2 * config.vae.latent_channels + 1


def _plain_model_index(config: PipelineConfig, pipeline_class: str) -> dict[str, Any]:
    import diffusers

    return {
        "_class_name": pipeline_class,
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", SCHEDULER_CLASSES[config.sampling.sampler]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def component_config_json(name: str, keymap, config: PipelineConfig) -> dict[str, Any]:
    """``{name}/config.json`` of component ``name`` (``"unet"``, ``"vae"``, ``"text_encoder"``), made by
    its key map (``ldm.formats.{unet,vae,text}_keys``) from ``config``."""
    import diffusers

    if name == "text_encoder":
        return transformers_text_config(config.text_encoder)
    if name == "unet":  # sample_size tells diffusers the native resolution (in latent pixels)
        factor = config.vae.downsample_factor
        values = keymap.diffusers_config(config.unet, sample_size=config.sampling.height // factor)
    else:
        values = dict(keymap.diffusers_config(getattr(config, name)))
    class_name = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}[name]
    return {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **plain_data(values)}


# samplers whose diffusers scheduler ignores rescale_betas_zero_snr (it would silently sample another schedule)
NO_ZERO_SNR_SUPPORT = ("heun", "lms", "dpm2", "dpm2_ancestral", "plms", "dpmpp_sde")


def scheduler_json(config: PipelineConfig) -> dict[str, Any]:
    """``scheduler/scheduler_config.json``: the diffusers class of ``config.sampling.sampler`` with
    the schedule (:func:`schedule_config_to_diffusers`) and Karras sigmas when asked for.

    Raises:
        ConfigError: the sampler's diffusers class cannot reproduce the schedule (zero terminal SNR).
    """
    import diffusers

    sampler = config.sampling.sampler
    if config.schedule.rescale_betas_zero_snr and sampler in NO_ZERO_SNR_SUPPORT:
        raise ConfigError(f"diffusers' {SCHEDULER_CLASSES[sampler]} has no zero-terminal-SNR option; "
                          f"set sampling.sampler to another sampler before saving in diffusers format")
    class_name = SCHEDULER_CLASSES[sampler]
    # DDIM's and PNDM's switches, kept in every config whose class or compatible classes read them (users swap
    # schedulers with SomeScheduler.from_config(pipe.scheduler.config)); LCMScheduler, which has no compatible
    # classes, gets only those it takes (it warns about any other key).
    readers = [getattr(diffusers, name) for name in [class_name, *getattr(diffusers, class_name)._compatibles]
               if hasattr(diffusers, name)]
    accepted = {key for reader in readers for key in inspect.signature(reader.__init__).parameters}
    switches = {key: value for key, value in (("clip_sample", False), ("set_alpha_to_one", False),
                                              ("skip_prk_steps", True)) if key in accepted}
    values = {
        "_class_name": class_name,
        "_diffusers_version": diffusers.__version__,
        **schedule_config_to_diffusers(config.schedule),
        **switches,
        **dict(SAMPLER_INFO[sampler].diffusers_options),
    }
    if config.sampling.karras:
        if SAMPLER_INFO[sampler].diffusers_karras:
            values["use_karras_sigmas"] = True
        else:
            logger.warning("diffusers' %s has no Karras sigmas: the saved scheduler uses its default sigmas",
                           SAMPLER_INFO[sampler].diffusers_class)
    return values


def _weights_file(component_folder: Path, name: str) -> Path:
    for file_name in _WEIGHT_NAMES[name]:
        if (component_folder / file_name).is_file():
            return component_folder / file_name
    raise CheckpointError(f"no weights in {component_folder} (expected {_WEIGHT_NAMES[name][0]})")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"diffusers folder is missing {path}") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as diffusers does: indented, sorted keys, a final newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
