"""The general training loop behind ``scripts/train.py``: from-scratch training, full fine-tuning and LoRA.

A run is described by a :class:`ldm.training.run_config.RunConfig` (one strictly read YAML file,
see :mod:`ldm.training.run_config`). :func:`train` runs it as named steps, each testable alone:
:func:`setup_run` (accelerator, models, EMA, optimizer, as a :class:`TrainingRun`),
:func:`resume_from_checkpoint`, :func:`load_run_data`, :func:`start_session`, then per step
:func:`training_step`, :func:`log_step`, :func:`save_run_checkpoint` and :func:`render_validation`,
and :func:`finish_run` (export of the final model).

The step is Algorithm 1 of the lecture on VAE latents: uniform ``t``, ``x_t = sqrt(abar) z +
sqrt(1-abar) eps``, MSE to the eps or v target (the model's schedule decides), optionally weighted
by Min-SNR-gamma, with caption dropout for classifier-free guidance. ``accelerate`` places the
models, runs mixed precision, gradient accumulation and DDP (imported only by :func:`setup_run`).

Checkpoints (``run_dir/checkpoints/step-N``, atomic, last K kept) hold the trained weights under
original SD key prefixes (``weights.safetensors``) and ``state.pt`` (optimizer, EMA, RNG, data
position, elapsed time), so a killed run resumes where its last checkpoint left it. All step
randomness (batch choice, caption dropout, timesteps, noise) comes from a generator seeded by the
step number, so a resumed run repeats exactly what an uninterrupted one would have done.

Nothing is mixed up or lost silently: ``run_dir/run.json`` records the settings that define the run
(:func:`ldm.training.run_config.run_identity`), and a session with other ones is refused unless told
to continue or restart (:func:`ldm.training.run_state.plan_session`); the exported model carries the
run's id, and an output that another run (or the user) made is never replaced without ``overwrite``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from autoencoder.model import AutoencoderConfig, AutoencoderKL
from ldm.config import PipelineConfig
from ldm.config_io import read_yaml
from ldm.errors import ConfigError
from ldm.formats import checkpoints
from ldm.formats.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora, save_lora
from ldm.images import make_grid
from ldm.models.sdxl_conditioning import MicroConditioning, conditioning_vector, micro_conditioning_count
from ldm.models.text_encoders import build_text_encoder
from ldm.models.unet import UNetModel
from ldm.pipeline import Txt2ImgPipeline
from ldm.toy.procedural import ProceduralDataset, images_to_tensor
from ldm.training import objectives, run_state
from ldm.training.data import (BucketBatchSampler, ImageCaptionDataset, cache_latents, collate_batch,
                               load_image_caption_dataset, vae_fingerprint)
from ldm.training.ema import EMA
from ldm.upscaling import LowResAugmentation, LowResDegradation, paler_colours
from ldm.training.run_config import (OUTPUT_DTYPES, DataSettings, RunConfig, TrainSettings, ValidationSettings,
                                     run_identity)

logger = logging.getLogger(__name__)

NOTE_FILE = "training.json"  # beside every exported model: steps, time, samples and the run id
LORA_FILE = "lora.safetensors"
RUN_ID_KEY = "ldm_run_id"  # the run id in the metadata of an exported LoRA file


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def load_vae_folder(folder: str | Path):
    """The frozen autoencoder written by ``scripts/toy/train_autoencoder.py`` (``vae.yaml`` + ``vae.safetensors``),
    or the autoencoder of a saved model (any folder or file ``from_pretrained`` reads)."""
    folder = Path(folder)
    if not (folder / "vae.yaml").is_file() and _is_model(folder):
        return Txt2ImgPipeline.from_pretrained(folder).vae
    if not (folder / "vae.yaml").is_file():
        raise ConfigError(f"vae folder {folder} has no vae.yaml (write it with scripts/toy/train_autoencoder.py)")
    meta = read_yaml(folder / "vae.yaml", what="vae config")
    vae = AutoencoderKL(AutoencoderConfig.from_dict(meta["model"]))
    vae.load_state_dict(checkpoints.load_state_dict(folder / "vae.safetensors"))
    return vae


def build_pipeline(config: RunConfig):
    """The starting pipeline: pretrained (``model.init``) or fresh weights seeded by ``training.seed``."""
    if config.model_init is not None:
        pipe = Txt2ImgPipeline.from_pretrained(config.model_init)
        if config.vae is not None:
            pipe.vae = load_vae_folder(config.vae)
        if config.model_sections:
            pipe.replace_config_sections(config.model_sections, source=f"{config.source}: model")
        return pipe
    vae = load_vae_folder(config.vae)
    sections = {**config.model_sections, "vae": vae.config.to_dict()}
    pretrained_text = None
    if config.text_encoder is not None:  # a pretrained text encoder (frozen unless training says otherwise)
        pretrained_text = Txt2ImgPipeline.from_pretrained(config.text_encoder)
        sections["text_encoder"] = pretrained_text.config.text_encoder.to_dict()
    pipeline_config = PipelineConfig.from_dict(sections, source=f"{config.source}: model")
    torch.manual_seed(config.training.seed)
    unet = UNetModel(pipeline_config.unet)
    text_encoder = pretrained_text.text_encoder if pretrained_text else build_text_encoder(pipeline_config.text_encoder)
    return Txt2ImgPipeline(pipeline_config, unet, vae, text_encoder)


def _is_model(path: Path) -> bool:
    return path.is_file() or (path / "config.yaml").is_file() or (path / "model_index.json").is_file()


class TrainableParameters(nn.Module):
    """A view of the parameters of ``module`` that require gradients, under their own names.

    Lets :class:`ldm.training.ema.EMA` average only what is trained (all of a fully trained network, or
    only the adapters under LoRA) with unchanged parameter names.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]

    def named_parameters(self, *args, **kwargs):  # noqa: D102 - nn.Module API
        return iter(self._named)

    def parameters(self, *args, **kwargs):  # noqa: D102 - nn.Module API
        return iter(p for _, p in self._named)

    def state_dict(self, *args, **kwargs):  # noqa: D102 - nn.Module API
        return {name: p.detach() for name, p in self._named}


def prepare_trainable(pipe, settings: TrainSettings) -> dict[str, nn.Module]:
    """Freeze/unfreeze networks and attach LoRA adapters; returns ``{"unet": ..., "text_encoder"?: ...}``
    with the networks whose (adapter) parameters are trained."""
    pipe.vae.requires_grad_(False).eval()
    train_text = settings.train_text_encoder
    if settings.lora is not None:
        lora = settings.lora
        with torch.random.fork_rng(devices=[]):  # adapters start from the run's seed, whatever ran before
            torch.manual_seed(settings.seed)
            add_lora(pipe.unet, lora.rank, lora.alpha, lora.unet_targets or UNET_TARGETS, dropout=lora.dropout)
            pipe.text_encoder.requires_grad_(False)
            train_text = lora.text_encoder
            if train_text:
                add_lora(pipe.text_encoder, lora.rank, lora.alpha, TEXT_ENCODER_TARGETS, dropout=lora.dropout)
    else:
        pipe.unet.requires_grad_(True)
        pipe.text_encoder.requires_grad_(train_text)
    if settings.gradient_checkpointing:
        pipe.unet.set_gradient_checkpointing(True)
    trained = {"unet": pipe.unet}
    if train_text:
        trained["text_encoder"] = pipe.text_encoder
    return trained


def trained_weights(trained: dict[str, nn.Module], *, lora: bool) -> dict[str, torch.Tensor]:
    """The trained networks under original SD prefixes: whole state dicts, or only the adapters under LoRA."""
    parts = {}
    for name, module in trained.items():
        state = TrainableParameters(module).state_dict() if lora else module.state_dict()
        parts[name] = {k: v.detach().cpu() for k, v in state.items()}
    return checkpoints.join_components(parts)


def load_trained_weights(trained: dict[str, nn.Module], weights: dict[str, torch.Tensor], *, lora: bool,
                         where: str) -> None:
    """Inverse of :func:`trained_weights` (strict: every trained tensor present with its shape)."""
    parts = checkpoints.split_components(weights)
    for name, module in trained.items():
        if not lora:
            checkpoints.load_into(module, parts.get(name, {}), what=f"{where}: {name}")
            continue
        params = dict(TrainableParameters(module).named_parameters())
        state = parts.get(name, {})
        missing = [k for k in params if k not in state]
        if missing:
            raise ConfigError(f"{where}: checkpoint lacks {name} weights such as {missing[0]!r} "
                              "(was it written with another model or LoRA setting?)")
        with torch.no_grad():
            for key, param in params.items():
                if state[key].shape != param.shape:
                    raise ConfigError(f"{where}: {name}.{key} has shape {tuple(state[key].shape)}, "
                                      f"model expects {tuple(param.shape)}")
                param.copy_(state[key])


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class ProceduralLatents:
    """A pool of procedural images encoded once into latents; batches drawn with replacement per step.

    For a super-resolution model the pool also holds each image rendered small (``[N, 3, h, w]`` uint8,
    the latents' spatial size: the same scene drawn at ``1 / downsample_factor`` of the side), and
    ``latent_crop`` cuts the same random square out of the latents and the small image. A
    ``degradation`` (:class:`ldm.upscaling.LowResDegradation`) then softens the small images as a base
    model's would be; its round trips through the autoencoder (``low_res_round_trip``, uint8 like
    ``low_res``) are made once with the pool.
    """

    def __init__(self, latents: torch.Tensor, captions: list[str], batch_size: int, *,
                 low_res: torch.Tensor | None = None, latent_crop: int | None = None,
                 low_res_round_trip: torch.Tensor | None = None,
                 degradation: LowResDegradation | None = None) -> None:
        self.latents, self.captions, self.batch_size = latents, captions, batch_size
        self.low_res, self.latent_crop = low_res, latent_crop
        self.low_res_round_trip = low_res_round_trip
        self.degradation = degradation if degradation is not None and degradation.active else None
        if latent_crop is not None and latent_crop > min(latents.shape[-2:]):
            raise ConfigError(f"data.latent_crop {latent_crop} is larger than the latents {tuple(latents.shape[-2:])}")

    @classmethod
    @torch.no_grad()
    def build(cls, vae, settings: DataSettings, cache: Path, batch_size: int, device, *, image_size: int = 64,
              with_low_res: bool = False) -> "ProceduralLatents":
        """Posterior-mean latents ``z [N, C, h, w]`` of ``pool_size`` procedural images of ``image_size``
        pixels (and their small renders when ``with_low_res``), cached in ``cache`` with their captions and a
        fingerprint of the data seed, pool size, sizes and VAE (a cache made for other ones is recomputed,
        not used)."""
        degradation = LowResDegradation(settings.low_res_round_trip, settings.low_res_blur)
        if (degradation.active or settings.low_res_colour_jitter) and not with_low_res:  # before any encoding
            raise ConfigError("data.low_res_round_trip, data.low_res_blur and data.low_res_colour_jitter are for "
                              "super-resolution models")
        with_round_trips = with_low_res and degradation.round_trip > 0
        identity = {"seed": settings.seed, "pool_size": settings.pool_size, "vae": vae_fingerprint(vae)}
        if image_size != 64 or with_low_res:  # the fingerprint of earlier 64-pixel caches stays valid
            identity |= {"image_size": image_size, "low_res": with_low_res}
        if with_round_trips:
            identity["low_res_round_trip"] = True
        if settings.low_res_colour_jitter:
            identity["low_res_colour_jitter"] = settings.low_res_colour_jitter
        fingerprint = json.dumps(identity)
        metadata = checkpoints.safetensors_metadata(cache)
        if metadata.get("fingerprint") == fingerprint:
            tensors, captions = checkpoints.load_state_dict(cache), json.loads(metadata["captions"])
        else:
            if cache.is_file():
                logger.info("latent cache %s was made for other data or another VAE; recomputing", cache)
            tensors, captions = _encode_procedural_pool(vae, settings, image_size, with_low_res, device,
                                                        with_round_trips=with_round_trips)
            checkpoints.save_safetensors_atomic(tensors, cache, metadata={"fingerprint": fingerprint,
                                                                          "captions": json.dumps(captions)})
        return cls(tensors["latents"], captions, batch_size, low_res=tensors.get("low_res"),
                   latent_crop=settings.latent_crop, low_res_round_trip=tensors.get("low_res_round_trip"),
                   degradation=degradation)

    def next_batch(self, generator: torch.Generator) -> dict[str, Any]:
        index = torch.randint(len(self.latents), (self.batch_size,), generator=generator)
        batch = {"latents": self.latents[index], "captions": [self.captions[i] for i in index.tolist()]}
        if self.low_res is not None:
            batch["low_res"] = _from_uint8(self.low_res[index])
        if self.degradation is not None:  # before cropping: the blur sees the whole small image
            round_trips = None if self.low_res_round_trip is None else _from_uint8(self.low_res_round_trip[index])
            batch["low_res"] = self.degradation(batch["low_res"], round_trips, generator)
        if self.latent_crop is not None:
            batch = _random_crop(batch, self.latent_crop, generator)
        return batch

    def state_dict(self) -> dict:
        return {}  # batches depend only on the step's generator

    def load_state_dict(self, state: dict) -> None:
        pass


def _encode_procedural_pool(vae, settings: DataSettings, image_size: int, with_low_res: bool, device, *,
                            with_round_trips: bool = False):
    """``({"latents": [N, C, h, w] float32, "low_res"?: [N, 3, h, w] uint8, "low_res_round_trip"?: the same
    small images decoded from their posterior-mean latents}, captions)`` of the first ``pool_size``
    samples of the procedural training split. With ``low_res_colour_jitter`` j, sample ``i``'s large and
    small renders are made paler alike (:func:`ldm.upscaling.paler_colours`: saturation uniform in
    ``[1 - j, 1]``, lightening in ``[0, j / 2]``, drawn from a generator seeded by the data seed and ``i``)."""
    dataset = ProceduralDataset(seed=settings.seed, split="train", image_size=image_size)
    small = ProceduralDataset(seed=settings.seed, split="train", image_size=image_size // vae.config.downsample_factor)
    latents, low_res, round_trips, captions, start = [], [], [], [], time.perf_counter()
    dtype = next(vae.parameters()).dtype
    chunk = max(1, 256 * 64 * 64 // image_size**2)  # bounded memory at any image size
    for first in range(0, settings.pool_size, chunk):
        samples = dataset.take(min(chunk, settings.pool_size - first), start=first)
        images = images_to_tensor([s.image for s in samples]).to(device, dtype)
        jitter = _colour_jitter(settings, first, len(samples))
        if jitter is not None:
            images = paler_colours(images, *jitter).to(dtype)
        latents.append(vae.encode_latents(images).float().cpu())
        captions.extend(s.caption for s in samples)
        if with_low_res:
            small_images = [small.sample(first + i).image for i in range(len(samples))]
            small_pixels = torch.from_numpy(np.stack([np.asarray(im) for im in small_images])).permute(0, 3, 1, 2)
            if jitter is not None:
                small_pixels = _to_uint8(paler_colours(_from_uint8(small_pixels), *jitter))
            low_res.append(small_pixels)
        if with_round_trips:
            small_tensor = _from_uint8(low_res[-1]).to(device, dtype)
            round_trips.append(_to_uint8(vae.decode(vae.encode(small_tensor).mode()).float().cpu()))
        if first // chunk % 20 == 0:
            logger.info("encoded %d/%d procedural images (%.0f s)", first + len(samples), settings.pool_size,
                        time.perf_counter() - start)
    tensors = {"latents": torch.cat(latents)}
    if with_low_res:
        tensors["low_res"] = torch.cat(low_res).contiguous()
    if with_round_trips:
        tensors["low_res_round_trip"] = torch.cat(round_trips).contiguous()
    logger.info("encoded %d procedural latents in %.0f s (std %.3f)", len(tensors["latents"]),
                time.perf_counter() - start, tensors["latents"].std())
    return tensors, captions


def _from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels ``[B, 3, h, w]`` -> float32 in ``[-1, 1]``."""
    return pixels.float().div(127.5).sub(1.0)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, h, w]`` in ``[-1, 1]`` (clamped) -> uint8 pixels."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def _colour_jitter(settings: DataSettings, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(saturation [count], lightening [count])`` of samples ``first ..``, or ``None`` without jitter."""
    strength = settings.low_res_colour_jitter
    if not strength:
        return None
    draws = [torch.rand(2, generator=torch.Generator().manual_seed(settings.seed * 1_000_003 + first + i))
             for i in range(count)]
    draws = torch.stack(draws)  # [count, 2] uniform
    return 1 - strength * draws[:, 0], strength / 2 * draws[:, 1]


def _random_crop(batch: dict[str, Any], size: int, generator: torch.Generator) -> dict[str, Any]:
    """The same random ``size x size`` window of every spatial tensor of the batch, one window per sample."""
    latents = batch["latents"]
    height, width = latents.shape[-2:]
    tops = torch.randint(height - size + 1, (len(latents),), generator=generator).tolist()
    lefts = torch.randint(width - size + 1, (len(latents),), generator=generator).tolist()
    cropped = dict(batch)
    for key in ("latents", "low_res"):
        if key in batch:
            cropped[key] = torch.stack([x[:, top:top + size, left:left + size]
                                        for x, top, left in zip(batch[key], tops, lefts)])
    return cropped


class _RankBatches:
    """The batches of a :class:`ldm.training.data.BucketBatchSampler` that belong to one process (every ``world``-th)."""

    def __init__(self, sampler, rank: int, world: int) -> None:
        self.sampler, self.rank, self.world = sampler, rank, world

    def __iter__(self):
        first = self.sampler.batch_index
        for offset, batch in enumerate(self.sampler):
            if (first + offset) % self.world == self.rank:
                yield batch

    def __len__(self) -> int:
        return math.ceil(self.sampler.batches_per_epoch / self.world)


class ImageBatches:
    """Batches from an image/caption dataset (pixels or cached latents) in resumable bucket order.

    The position is the number of (global) batches consumed, saved in checkpoints; the sampler
    is re-positioned from it on resume, so a resumed run sees the same batches in the same order.
    """

    def __init__(self, dataset, sampler, *, num_workers: int = 0, rank: int = 0, world: int = 1) -> None:
        self.dataset, self.sampler = dataset, sampler
        self.num_workers, self.rank, self.world = num_workers, rank, world
        self.batches_done = 0
        self._iterator: Iterator | None = None

    def _stream(self) -> Iterator[dict]:
        self.sampler.set_position(*self.sampler.position_after(self.batches_done))
        while True:
            loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=_RankBatches(self.sampler, self.rank,
                                                                                          self.world),
                                                 collate_fn=collate_batch, num_workers=self.num_workers)
            yield from loader

    def next_batch(self, generator: torch.Generator) -> dict[str, Any]:
        if self._iterator is None:
            self._iterator = self._stream()
        batch = next(self._iterator)
        self.batches_done += self.world
        return batch

    def state_dict(self) -> dict:
        return {"batches_done": self.batches_done, "epoch_batches": self.sampler.batches_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.batches_done = int(state.get("batches_done", 0))
        self._iterator = None


def build_image_data(config: RunConfig, pipe, run_dir: Path, device, *, rank: int = 0, world: int = 1):
    """Dataset -> (optional latent cache) -> bucket sampler; logs the :class:`ldm.training.data.DataReport`."""
    d = config.data
    rows = load_image_caption_dataset(d.source, image_column=d.image_column, caption_column=d.caption_column,
                                      split=d.split, repeats_column=d.repeats_column)
    resolution = d.resolution or pipe.config.sampling.height
    step = d.bucket_step or pipe.config.vae.downsample_factor * 2 ** (len(pipe.config.unet.channel_mult) - 1)
    dataset = ImageCaptionDataset(rows, resolution=resolution, crop=d.crop, random_flip=d.random_flip,
                                  bucketing=d.bucketing, bucket_step=step, max_aspect=d.max_aspect, seed=d.seed)
    for example in dataset.report.examples:
        logger.info("  skipped/converted: %s", example)
    repeats = dataset.repeats
    if d.repeats_column is not None:
        logger.info("repeats: %d images give %d samples per epoch", len(repeats), sum(repeats))
    if d.cache_latents:
        dataset = cache_latents(pipe.vae, dataset, run_dir / "latent-cache.safetensors", device=device)
    sampler = BucketBatchSampler(dataset.bucket_ids, config.training.batch_size, seed=d.seed, repeats=repeats)
    return ImageBatches(dataset, sampler, num_workers=d.num_workers, rank=rank, world=world), getattr(
        dataset, "report", None)


# --------------------------------------------------------------------------------------------
# The training step
# --------------------------------------------------------------------------------------------


def diffusion_loss_on_batch(unet, text_encoder, tokenizer, schedule, z: torch.Tensor, captions: list[str],
                            settings: TrainSettings, generator: torch.Generator, *,
                            low_res: torch.Tensor | None = None,
                            augmentation: LowResAugmentation | None = None,
                            time_ids: torch.Tensor | None = None,
                            zeros_for_empty_captions: bool = False) -> torch.Tensor:
    """One DDPM loss evaluation (Algorithm 1) on clean latents ``z [B, C, h, w]``.

    Randomness (caption dropout, timesteps ``t ~ U{0..T-1}``, noise ``eps``; for a super-resolution
    model then the augmentation levels and noise) comes from ``generator`` in that order. The target is
    eps or v by ``schedule.config.prediction``. A super-resolution model (``low_res [B, 3, h, w]`` in
    [-1, 1] with its ``augmentation``) sees the noise-augmented small image concatenated to ``x_t`` and the
    augmentation level as its class label (:mod:`ldm.upscaling`). An SDXL model gets ``time_ids [B, k]``
    (:func:`sdxl_time_ids`): its vector ``y`` is the pooled text embedding and their Fourier features; with
    ``zeros_for_empty_captions`` (the model's ``force_zeros_for_empty_prompt``) an empty or dropped caption is
    all-zero context and pooled embedding, the unconditional input the pipeline gives it.
    """
    prediction = schedule.config.prediction
    captions = objectives.drop_captions(captions, settings.caption_dropout, generator=generator)
    y = None
    if time_ids is None:
        context = text_encoder(tokenizer(captions).to(z.device))
    else:
        context, pooled = text_encoder(tokenizer(captions).to(z.device), with_pooled=True)
        if zeros_for_empty_captions:
            keep = torch.tensor([caption != "" for caption in captions], device=z.device)
            context, pooled = context * keep[:, None, None], pooled * keep[:, None]
        y = conditioning_vector(pooled, time_ids.to(z.device))
    t = objectives.sample_timesteps(len(z), schedule.config.num_train_timesteps, generator=generator,
                                    device=z.device)
    eps = objectives.sample_noise(z, generator=generator, offset=settings.noise_offset)
    abar = schedule.alphas_cumprod.to(z.device)[t].float()
    x_t = objectives.add_noise(z, eps, abar)  # Ho et al. 2020, eq. 4
    target = objectives.training_target(z, eps, abar, prediction)
    weights = objectives.min_snr_weights(abar, settings.min_snr_gamma, prediction)  # Hang et al. 2023, eq. 9
    labels = None
    if low_res is not None:
        labels = augmentation.training_levels(len(z), generator=generator, device=z.device)
        noise = torch.randn(low_res.shape, generator=generator).to(z.device)
        x_t = torch.cat([x_t, augmentation(low_res.to(z.device, x_t.dtype), noise, labels)], dim=1)
    model_output = unet(x_t, t.float(), context.to(x_t.dtype), class_labels=labels,
                        y=None if y is None else y.to(x_t.dtype))
    return objectives.diffusion_loss(model_output, target, weights)


def sdxl_time_ids(pipe, batch: dict[str, Any], z: torch.Tensor) -> torch.Tensor | None:
    """Each sample's SDXL micro-conditioning numbers ``[B, k]`` (None for other models), as SDXL was trained:
    original size = the image's ``(height, width)`` before resizing, crop = ``(top, left)`` of its crop in the
    resized image (both recorded by :mod:`ldm.training.data`), target size = the sample's own pixel size (the
    training resolution or bucket). Batches without them (procedural data) use original = target, crop (0, 0).
    The refiner's fifth number is the model's ``aesthetic_score``."""
    if not pipe.config.is_sdxl:
        return None
    factor = pipe.vae.downsample_factor
    target = (z.shape[-2] * factor, z.shape[-1] * factor)
    count = micro_conditioning_count(pipe.config.unet, pipe.text_encoder.pooled_dim)
    rows = []
    for i in range(len(z)):
        original = tuple(batch["original_size"][i].tolist()) if "original_size" in batch else target
        crop = tuple(batch["crop_top_left"][i].tolist()) if "crop_top_left" in batch else (0, 0)
        micro = MicroConditioning(original_size=original, crop_top_left=crop, target_size=target)
        rows.append(micro.time_ids(*target, count, pipe.config.sdxl.aesthetic_score))
    return torch.tensor(rows)


def parameter_groups(trained: dict[str, nn.Module], settings: TrainSettings) -> list[dict]:
    """AdamW parameter groups, one per trained network; ``lr_scale`` multiplies the scheduled lr
    (``text_encoder_lr / lr`` for the text encoder when ``text_encoder_lr`` is set, else 1)."""
    groups = []
    for name, module in trained.items():
        scale = 1.0
        if name == "text_encoder" and settings.text_encoder_lr is not None:
            scale = settings.text_encoder_lr / settings.lr
        groups.append({"params": list(TrainableParameters(module).parameters()), "lr_scale": scale})
    return groups


def step_generator(seed: int, step: int, micro: int = 0, accumulation: int = 1, rank: int = 0,
                   world: int = 1) -> torch.Generator:
    """The random stream of one micro-batch: a pure function of (seed, step, micro-step, process).

    For one process without accumulation it is ``seed * 1_000_003 + step`` (the default model's recipe).
    """
    index = (step * accumulation + micro) * world + rank
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


# --------------------------------------------------------------------------------------------
# Validation and export
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def render_validation(pipe, settings: ValidationSettings, path: Path) -> Path:
    """Generate one image per validation prompt (seed ``settings.seed + i``) and save them as a grid.

    Uses the current training weights (not the EMA average), so grids show what the optimizer did.
    """
    modes = {name: getattr(pipe, name).training for name in ("unet", "text_encoder")}
    pipe.unet.eval(), pipe.text_encoder.eval()
    try:
        images = pipe(list(settings.prompts), settings.negative_prompt, seed=settings.seed,
                      steps=settings.steps, guidance_scale=settings.guidance_scale,
                      num_images=len(settings.prompts))
    finally:
        for name, was_training in modes.items():
            getattr(pipe, name).train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images).save(path)
    logger.info("validation grid %s", path)
    return path


def export_model(pipe, trained: dict[str, nn.Module], emas: dict, config: RunConfig, note: dict, *,
                 overwrite: bool = False) -> Path | None:
    """Write the final model: EMA weights when kept; LoRA runs write ``lora.safetensors``, others a
    pipeline folder (our format, plus ``PATH-diffusers`` on request); ``training.json`` (``note``, with
    the run id) beside it. Every write is atomic.

    Raises:
        ConfigError: unless ``overwrite``: an output exists that this run (``note["run_id"]``) did not
            write, or replacing the model folder would delete files the user put in it.
    """
    out = config.output
    if out.path is None:
        logger.info("no output.path: final model not exported (see the checkpoints)")
        return None
    check_outputs(config, note.get("run_id"), overwrite=overwrite)
    path = Path(out.path)
    for name, ema in emas.items():
        ema.copy_to(TrainableParameters(trained[name]))
    dtype = OUTPUT_DTYPES[out.dtype]
    note_text = json.dumps(note, indent=2) + "\n"
    if config.lora is not None:
        save_lora(path / LORA_FILE, unet=pipe.unet,
                  text_encoder=pipe.text_encoder if "text_encoder" in trained else None, dtype=dtype,
                  metadata={"ldm_base_model": str(config.model_init), "ldm_steps": str(note.get("steps")),
                            RUN_ID_KEY: str(note.get("run_id"))})
        checkpoints.write_text_atomic(path / NOTE_FILE, note_text)
    else:
        _save_model_folder(path, lambda folder: pipe.save_pretrained(folder, dtype=dtype), note_text,
                           overwrite=overwrite)
        if out.diffusers:
            _save_model_folder(_diffusers_path(path),
                               lambda folder: pipe.save_pretrained(folder, format="diffusers", dtype=dtype),
                               note_text, overwrite=overwrite)
    logger.info("exported the final model to %s", path)
    return path


def _diffusers_path(path: Path) -> Path:
    return path.with_name(path.name + "-diffusers")


def _save_model_folder(path: Path, save, note_text: str, *, overwrite: bool) -> None:
    """Build the folder ``path`` beside it (``save(folder)`` writes the model, then ``training.json``)
    and move it into place; refused unless ``overwrite`` when that would delete files of the old folder."""
    with checkpoints.atomic_folder(path) as folder:
        save(folder)
        checkpoints.write_text_atomic(folder / NOTE_FILE, note_text)
        if not overwrite:
            _refuse_to_delete(path, folder)


def _refuse_to_delete(old: Path, new: Path) -> None:
    """Raise when replacing the folder ``old`` by ``new`` would lose entries (Markdown files are carried over)."""
    lost = sorted(p.name for p in old.iterdir() if p.suffix != ".md" and not (new / p.name).exists()) \
        if old.is_dir() else []
    if lost:
        more = f" and {len(lost) - 1} more" if len(lost) > 1 else ""
        raise ConfigError(f"output {old} holds {lost[0]!r}{more}, which the export would delete: move it away or "
                          "pass --overwrite (then export the last checkpoint with --export)")


def output_targets(config: RunConfig) -> list[Path]:
    """What exporting ``config``'s model may replace: ``lora.safetensors`` and ``training.json`` in
    ``output.path`` for LoRA, else the model folder (and ``PATH-diffusers``)."""
    if config.output.path is None:
        return []
    path = Path(config.output.path)
    if config.lora is not None:
        return [path / LORA_FILE, path / NOTE_FILE]
    return [path, _diffusers_path(path)] if config.output.diffusers else [path]


def output_run_id(target: Path) -> str | None:
    """The id of the run that wrote ``target`` (a model folder, a LoRA file or a ``training.json``), or
    ``None`` when it carries none (not written by a training run, or by an older version)."""
    if target.is_dir():
        target = target / NOTE_FILE
    if target.suffix == ".safetensors":
        return checkpoints.safetensors_metadata(target).get(RUN_ID_KEY)
    try:
        note = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return note.get("run_id") if isinstance(note, dict) else None


def check_outputs(config: RunConfig, run_id: str | None, *, overwrite: bool = False) -> None:
    """Refuse to replace an output that the run ``run_id`` did not write, unless ``overwrite``.

    Raises:
        ConfigError: naming the output, when one exists (a file, or a non-empty folder) with another
            run id or none.
    """
    if overwrite:
        return
    for target in output_targets(config):
        occupied = target.is_file() or (target.is_dir() and any(target.iterdir()))
        if occupied and (run_id is None or output_run_id(target) != run_id):
            raise ConfigError(f"output {target} exists and was not written by this run: pass --overwrite to "
                              "replace it, or set another output.path")


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # per optimizer step, this session
    output: Path | None = None
    samples_per_second: float = 0.0  # this session's training loop (data, forward, backward, optimizer, EMA)




@dataclass
class TrainingRun:
    """What one training session holds, handed from step to step of :func:`train`."""

    config: RunConfig
    run_dir: Path
    accelerator: Any  # accelerate.Accelerator
    pipe: Txt2ImgPipeline
    trained: dict[str, nn.Module]  # the networks whose (adapter) parameters are trained
    emas: dict[str, EMA]
    optimizer: Any  # torch AdamW; accelerate's wrapper of it after start_session
    parameters: list[nn.Parameter]  # every trained parameter (gradient clipping)
    run_id: str = ""  # from run_dir/run.json (ldm.training.run_state.plan_session)
    step: int = 0  # optimizer steps done
    elapsed: float = 0.0  # training seconds of earlier sessions (from the checkpoint)
    data_state: dict = field(default_factory=dict)  # data position from the checkpoint
    data: Any = None  # ProceduralLatents | ImageBatches (load_run_data)
    wrapped: dict[str, nn.Module] = field(default_factory=dict)  # accelerate-prepared trained networks
    losses: list[float] = field(default_factory=list)  # per optimizer step, this session
    samples_per_second: float = 0.0
    augmentation: LowResAugmentation | None = None  # a super-resolution model's low-resolution noise
    # Clocks and progress of this session (start_session).
    started: float = 0.0  # perf_counter() at which the run (all sessions) would have started
    session_start: float = 0.0
    session_first: int = 0  # step at which this session started
    last_log: float = 0.0
    running: float | None = None  # smoothed loss
    bar: Any = None  # tqdm progress bar, or None

    @property
    def samples_per_step(self) -> int:
        """Images per optimizer step over all processes."""
        t = self.config.training
        return t.batch_size * t.gradient_accumulation * self.accelerator.num_processes

    def note(self, seconds: float) -> dict:
        """The ``training.json`` written beside the exported model."""
        return {"config": self.config.source, "steps": self.step, "train_seconds": round(seconds),
                "samples_seen": self.step * self.samples_per_step, "run_id": self.run_id}


def train(config: RunConfig, run_dir: str | Path, *, resume: str = "auto", export_only: bool = False,
          progress: bool = True, settings_changed: str = "refuse", overwrite: bool = False) -> TrainResult:
    """Train (or resume) the run described by ``config`` in ``run_dir``; export the final model.

    Args:
        resume: ``"auto"`` (continue from the newest checkpoint when there is one) or ``"latest"``
            (require one).
        export_only: write the newest checkpoint's (EMA) weights to ``output`` without training.
        settings_changed: when ``run_dir`` holds a run whose defining settings differ from ``config``'s:
            ``"refuse"`` (a :class:`ConfigError` naming them), ``"continue"`` it with the new settings, or
            ``"restart"`` (move the old run directory aside, start a new run; also when nothing differs).
        overwrite: replace an output that exists and was not written by this run.
    """
    run_dir = Path(run_dir)
    plan = run_state.plan_session(run_dir, run_identity(config), settings_changed=settings_changed)
    run = setup_run(config, run_dir)
    open_run_dir(run, plan)
    resumed = resume_from_checkpoint(run, required=resume == "latest")
    if export_only:
        if not resumed:
            raise ConfigError(f"--export: no checkpoint in {run.run_dir / 'checkpoints'}")
        return export_checkpoint(run, overwrite=overwrite)
    check_outputs(config, run.run_id, overwrite=overwrite)  # before training, not after it
    load_run_data(run)
    start_session(run, progress=progress)
    t, v = config.training, config.validation
    while run.step < t.steps:
        loss, lr = training_step(run)
        log_step(run, loss, lr)
        if run.step % t.checkpoint_every == 0 or run.step == t.steps:
            save_run_checkpoint(run)
        if v.prompts and run.accelerator.is_main_process and (
                (v.every and run.step % v.every == 0) or run.step == t.steps):
            render_validation(run.pipe, v, run.run_dir / "validation" / f"step-{run.step:07d}.png")
    return finish_run(run, overwrite=overwrite)


def setup_run(config: RunConfig, run_dir: Path) -> TrainingRun:
    """The accelerator, the pipeline (fp32 master weights on the device), trainable networks, EMAs and
    the AdamW optimizer of a fresh session (step 0)."""
    # accelerate takes ~1.5 s to import (and pulls in its own heavy deps); only a training session needs it.
    from accelerate import Accelerator

    t = config.training
    accelerator = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.gradient_accumulation,
                              log_with=_available_trackers(), project_dir=str(run_dir))
    pipe = build_pipeline(config)
    trained = prepare_trainable(pipe, t)
    pipe.to(accelerator.device, torch.float32)  # master weights in fp32; accelerate's autocast runs mixed precision
    emas = {name: EMA(TrainableParameters(module), t.ema_decay) for name, module in trained.items()} \
        if t.ema_decay else {}
    groups = parameter_groups(trained, t)
    optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    augmentation = LowResAugmentation(pipe.config.upscale) if pipe.config.is_upscaler else None
    return TrainingRun(config, run_dir, accelerator, pipe, trained, emas, optimizer,
                       parameters=[p for group in groups for p in group["params"]], augmentation=augmentation)


def open_run_dir(run: TrainingRun, plan: run_state.SessionPlan) -> None:
    """Carry out ``plan`` (the main process sets an old run aside and records this one; all processes
    wait for it) and take its run id."""
    if run.accelerator.is_main_process:
        run_state.open_session(plan)
    run.accelerator.wait_for_everyone()
    run.run_id = plan.run_id


def resume_from_checkpoint(run: TrainingRun, *, required: bool = False) -> bool:
    """Load the newest checkpoint of ``run.run_dir`` (weights, optimizer, EMAs, step, elapsed time, data
    position, RNG); returns whether there was one.

    Raises:
        ConfigError: ``required`` (``--resume latest``) and there is no checkpoint.
    """
    resumed = run_state.load_latest_checkpoint(run.run_dir)
    if resumed is None and required:
        raise ConfigError(f"--resume latest: no checkpoint in {run.run_dir / 'checkpoints'}")
    if resumed is None:
        return False
    weights, state = resumed
    load_trained_weights(run.trained, weights, lora=run.config.lora is not None, where=str(run.run_dir))
    run.optimizer.load_state_dict(state["optimizer"])
    for name, ema in run.emas.items():
        if f"ema_{_short(name)}" in state:
            ema.load_state_dict(state[f"ema_{_short(name)}"])
    run.step, run.elapsed, run.data_state = state["step"], state.get("elapsed", 0.0), state.get("data", {})
    run_state.set_rng_state(state["rng"])
    return True


def export_checkpoint(run: TrainingRun, *, overwrite: bool = False) -> TrainResult:
    """``--export``: write the loaded checkpoint's (EMA) weights to ``output`` without training (main process)."""
    if run.accelerator.is_main_process:
        return TrainResult(run.step, output=export_model(run.pipe, run.trained, run.emas, run.config,
                                                         run.note(run.elapsed), overwrite=overwrite))
    return TrainResult(run.step)


def load_run_data(run: TrainingRun) -> None:
    """The run's batches (procedural latents or an image dataset), positioned where the checkpoint left off."""
    config, accelerator = run.config, run.accelerator
    if config.data.kind == "procedural":
        pipe = run.pipe
        run.data = ProceduralLatents.build(pipe.vae, config.data, run.run_dir / "latents.safetensors",
                                           config.training.batch_size, accelerator.device,
                                           image_size=config.data.resolution or pipe.config.sampling.height,
                                           with_low_res=pipe.config.is_upscaler)
    else:
        run.data, _ = build_image_data(config, run.pipe, run.run_dir, accelerator.device,
                                       rank=accelerator.process_index, world=accelerator.num_processes)
    run.data.load_state_dict(run.data_state)


def start_session(run: TrainingRun, *, progress: bool = True) -> None:
    """Hand the trained networks and the optimizer to accelerate, switch to train mode, start trackers,
    clocks and the progress bar."""
    t, accelerator = run.config.training, run.accelerator
    models = list(run.trained.values())
    prepared = accelerator.prepare(*models, run.optimizer)
    prepared = prepared if isinstance(prepared, (list, tuple)) else (prepared,)
    run.wrapped = dict(zip(run.trained, prepared[:len(models)]))
    run.optimizer = prepared[len(models)]
    for module in run.trained.values():
        module.train()
    if _available_trackers():
        accelerator.init_trackers("train")
    schedule = run.pipe.schedule
    if schedule.config.rescale_betas_zero_snr and t.min_snr_gamma is not None:
        logger.warning("Min-SNR-gamma gives the zero-SNR timestep (t = %d) weight 0, so the model never learns "
                       "it; set training.min_snr_gamma: null", schedule.num_train_timesteps - 1)
    run.started, run.session_start, run.session_first = time.perf_counter() - run.elapsed, time.perf_counter(), run.step
    run.last_log, run.running = time.perf_counter(), None
    run.bar = _progress_bar(run.step, t.steps, enabled=progress and accelerator.is_local_main_process)


def training_step(run: TrainingRun) -> tuple[float, float]:
    """One optimizer step (``gradient_accumulation`` micro-batches) and the EMA update; ``run.step`` += 1.

    Returns:
        (the step's mean loss, its learning rate).
    """
    t, accelerator, pipe = run.config.training, run.accelerator, run.pipe
    lr = run_state.warmup_cosine_lr(run.step, base_lr=t.lr, warmup_steps=t.warmup_steps, total_steps=t.steps,
                                   final_lr=t.final_lr)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    unet_fn = run.wrapped["unet"]
    text_fn = run.wrapped.get("text_encoder", pipe.text_encoder)
    step_loss = 0.0
    for micro in range(t.gradient_accumulation):
        generator = step_generator(t.seed, run.step, micro, t.gradient_accumulation, accelerator.process_index,
                                   accelerator.num_processes)
        batch = run.data.next_batch(generator)
        with accelerator.autocast():
            z = _latents(batch, pipe.vae, accelerator.device)
        with accelerator.accumulate(*run.wrapped.values()), accelerator.autocast():
            loss = diffusion_loss_on_batch(unet_fn, text_fn, pipe.text_encoder.tokenizer, pipe.schedule, z,
                                           batch["captions"], t, generator, low_res=batch.get("low_res"),
                                           augmentation=run.augmentation, time_ids=sdxl_time_ids(pipe, batch, z),
                                           zeros_for_empty_captions=pipe.config.is_sdxl
                                           and pipe.config.sdxl.force_zeros_for_empty_prompt)
            accelerator.backward(loss)
            if accelerator.sync_gradients and t.grad_clip:
                accelerator.clip_grad_norm_(run.parameters, t.grad_clip)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        step_loss += loss.item() / t.gradient_accumulation
    for name, ema in run.emas.items():
        ema.update(TrainableParameters(run.trained[name]))
    run.step += 1
    return step_loss, lr


def log_step(run: TrainingRun, loss: float, lr: float) -> None:
    """Record the step's loss; update the progress bar, the trackers (every ``log_every`` steps) and the
    log (every minute, and at the last step)."""
    t = run.config.training
    run.losses.append(loss)
    run.running = loss if run.running is None else 0.98 * run.running + 0.02 * loss
    rate = (run.step - run.session_first) * run.samples_per_step / max(1e-9, time.perf_counter() - run.session_start)
    run.samples_per_second = rate
    if run.bar is not None:
        run.bar.update(1)
        run.bar.set_postfix(loss=f"{run.running:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
    if run.step % t.log_every == 0 or run.step == t.steps:
        run.accelerator.log({"loss": loss, "lr": lr}, step=run.step)
    if time.perf_counter() - run.last_log > 60 or run.step == t.steps:
        logger.info("step %d/%d loss %.4f lr %.2e %.1f samples/s", run.step, t.steps, run.running, lr, rate)
        run.last_log = time.perf_counter()


def save_run_checkpoint(run: TrainingRun) -> None:
    """Write ``run_dir/checkpoints/step-N`` (weights, optimizer, EMAs, RNG, elapsed time, data position);
    every process waits, the main process writes."""
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        state = {"optimizer": run.optimizer.state_dict(), "rng": run_state.rng_state(),
                 "elapsed": time.perf_counter() - run.started, "data": run.data.state_dict(),
                 **{f"ema_{_short(name)}": ema.state_dict() for name, ema in run.emas.items()}}
        weights = trained_weights(run.trained, lora=run.config.lora is not None)
        run_state.save_checkpoint(run.run_dir, run.step, weights, state, keep=run.config.training.keep_checkpoints)


def finish_run(run: TrainingRun, *, overwrite: bool = False) -> TrainResult:
    """Close the session: the main process exports the final (EMA) model; trackers end."""
    if run.bar is not None:
        run.bar.close()
    run.accelerator.wait_for_everyone()
    note = run.note(time.perf_counter() - run.started)
    output = export_model(run.pipe, run.trained, run.emas, run.config, note, overwrite=overwrite) \
        if run.accelerator.is_main_process else None
    run.accelerator.end_training()
    return TrainResult(run.step, run.losses, output, run.samples_per_second)


def _short(name: str) -> str:
    """State key suffix: ``ema_unet`` / ``ema_text`` (the default model's checkpoint names)."""
    return "text" if name == "text_encoder" else name


@torch.no_grad()
def _latents(batch: dict, vae, device) -> torch.Tensor:
    if "latents" in batch:
        return batch["latents"].to(device)
    pixels = batch["pixel_values"].to(device, next(vae.parameters()).dtype)
    return vae.encode_latents(pixels).float()


def _available_trackers() -> list[str] | None:
    return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else None


def _progress_bar(step: int, total: int, *, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, leave=False)


__all__ = ["train", "TrainResult", "TrainingRun", "setup_run", "open_run_dir", "resume_from_checkpoint",
           "export_checkpoint", "check_outputs", "output_targets", "output_run_id",
           "load_run_data", "start_session", "training_step", "log_step", "save_run_checkpoint", "finish_run",
           "build_pipeline", "load_vae_folder", "prepare_trainable", "parameter_groups", "diffusion_loss_on_batch",
           "sdxl_time_ids",
           "step_generator", "render_validation", "export_model", "TrainableParameters", "ProceduralLatents",
           "ImageBatches"]
