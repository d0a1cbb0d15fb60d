"""Writing original single-file Stable Diffusion checkpoints (CompVis / Stability layout).

:func:`write_single_file` stores our three components under their original prefixes
(``model.diffusion_model.``, ``first_stage_model.``, ``cond_stage_model.``; the layout is described
in :mod:`ldm.formats.single_file`), optionally an EMA U-Net under CompVis ``LitEma`` names with
``model_ema.decay`` / ``num_updates``, and this package's config in the safetensors metadata
(``ldm_config``), so :func:`ldm.formats.single_file.read_single_file` needs no YAML for the file.
Schedule buffers (``betas``, ``alphas_cumprod``, ...) are not written: every reader recomputes them.
:func:`ldm.formats.compvis.save_compvis_yaml` writes a YAML for tools that want one.

Text encoders are written in the layout of their family: SD 1.x CLIP towers and complete OpenCLIP
towers as they are (SD 1.x with the ``position_ids`` buffer real files carry); a GELU CLIP tower
(SD 2.x that went through diffusers) with OpenCLIP names (fused q/k/v) as an *exported* tower,
without the last block when the model uses the penultimate one
(:func:`ldm.formats.single_file_config.exported_text_config` is the config written with it).

Round trips (tested; schedule buffers aside): original -> ours -> original is bitwise for both
families. Through a diffusers folder, SD 1.x files come back bitwise; SD 2.x files come back with
the U-Net and VAE bitwise and the text encoder as an exported tower (the unused last block,
``text_projection`` and ``logit_scale`` are gone, as in diffusers; every tensor that influences an
image is bitwise equal).

:func:`check_fits` checks a read checkpoint strictly against meta-device modules before it is
written (or loaded), using no memory for weights.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from ldm.config import PipelineConfig
from ldm.errors import CheckpointError
from ldm.formats import checkpoints
from ldm.formats import text_keys as text_keymap
from ldm.formats.single_file import CONFIG_METADATA_KEY, EMA_BUFFERS, OriginalCheckpoint, ema_key
from ldm.formats.single_file_config import CLIP_TEXT_PREFIX, POSITION_IDS, exported_text_config
from ldm.models.builder import build_components
from ldm.models.text_encoders import TextEncoderConfig

__all__ = [
    "check_fits",
    "original_state_dict",
    "save_single_file",
    "write_single_file",
]


def _text_to_original(config: TextEncoderConfig, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our text-encoder weights -> the original layout of their family (module-relative keys).

    ``kind="openclip"`` and SD 1.x CLIP towers are stored as they are (SD 1.x with the
    ``position_ids`` buffer real files carry). A GELU CLIP tower is an SD 2.x tower that went
    through diffusers: it is written with OpenCLIP names (fused q/k/v), as every SD 2.x tool expects.
    """
    if config.kind == "openclip":
        return dict(weights)
    if config.act == "quick_gelu":
        return {**weights, POSITION_IDS: _position_ids(config)}
    exported = exported_text_config(config)
    kept = {k: v for k, v in weights.items() if not _is_dropped_clip_block(k, exported.layers)}
    diffusers_names = {k[len("transformer."):]: v for k, v in kept.items()}
    return text_keymap.from_diffusers(diffusers_names, replace(exported, kind="openclip"))


def _position_ids(config: TextEncoderConfig) -> Tensor:
    """The constant ``position_ids [1, max_length]`` buffer CLIP towers carry in original files."""
    return torch.arange(config.max_length, dtype=torch.int64).unsqueeze(0)


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
    if config.is_sdxl:  # conditioner.embedders.{i}.*: each tower as it is, CLIP ViT-L with its position_ids
        text = dict(parts["text_encoder"])
        text |= {f"embedders.{i}.{POSITION_IDS}": _position_ids(tower)
                 for i, tower in enumerate(config.text_encoder_configs) if tower.kind == "clip"}
    else:
        text = _text_to_original(config.text_encoder, parts["text_encoder"])
    state = checkpoints.join_components({"unet": parts["unet"], "vae": parts["vae"], "text_encoder": text})
    if ema_unet is not None:
        state.update({ema_key(k): v for k, v in ema_unet.items()})
        state.update(dict(ema_buffers or {}))
    return state, (config if config.is_sdxl else replace(config, text_encoder=exported_text_config(config.text_encoder)))


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
    (``ldm_config``), so :func:`ldm.formats.single_file.read_single_file` needs no YAML for it.

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
