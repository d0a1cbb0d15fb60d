"""The general training loop behind ``scripts/train.py``: from-scratch training, full fine-tuning and LoRA.

One YAML file (strictly checked, overridable with dotted ``key=value`` pairs) describes a run::

    model:       {init: PATH}  (any model Txt2ImgPipeline.from_pretrained loads), optionally with
                 {schedule, sampling} keys that replace the pretrained model's (e.g. fine-tune an eps
                 model into a v-prediction one), or the pipeline sections {unet, text_encoder,
                 schedule, sampling} for a fresh model
    vae:         folder written by scripts/toy/train_autoencoder.py (fresh models only)
    data:        kind procedural | folder | hub, plus image options (see DataSettings)
    training:    optimisation options (see TrainSettings), ``lora: {rank, alpha, text_encoder}``
    validation:  fixed prompts rendered as a grid every N steps
    output:      a folder path, or {path, dtype, diffusers}
    run_dir:     checkpoints, logs and validation grids (optional; --run-dir wins)

The step is Algorithm 1 of the lecture on VAE latents: uniform ``t``, ``x_t = sqrt(abar) z +
sqrt(1-abar) eps``, MSE to the eps or v target (the model's schedule decides), optionally weighted
by Min-SNR-gamma, with caption dropout for classifier-free guidance. ``accelerate`` places the
models, runs mixed precision, gradient accumulation and DDP (imported only by :func:`train`).

Checkpoints (``run_dir/checkpoints/step-N``, atomic, last K kept) hold the trained weights under
original SD key prefixes (``weights.safetensors``) and ``state.pt`` (optimizer, EMA, RNG, data
position, elapsed time), so a killed run resumes where its last checkpoint left it. All step
randomness (batch choice, caption dropout, timesteps, noise) comes from a generator seeded by the
step number, so a resumed run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import yaml
from torch import nn

from ldm.formats import checkpoints

from ldm.training import objectives

from ldm.training import run_state
from ldm.config import SECTION_CLASSES, PipelineConfig
from ldm.errors import ConfigError

logger = logging.getLogger(__name__)

DATA_KINDS = ("procedural", "folder", "hub")
PRECISIONS = ("no", "fp16", "bf16")
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PIPELINE_SECTIONS = ("unet", "text_encoder", "schedule", "sampling")
_INIT_OVERRIDABLE = ("schedule", "sampling")  # sections model.init may be combined with


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class DataSettings:
    """Where training images come from and how they are prepared."""

    kind: str = "procedural"  # procedural | folder | hub
    seed: int = 0
    pool_size: int = 60000  # procedural: images encoded once into cached latents
    source: str | None = None  # folder path or hub dataset id
    image_column: str = "image"
    caption_column: str = "text"
    repeats_column: str | None = None  # per-image repeats per epoch (folder/hub data)
    split: str = "train"
    resolution: int | None = None  # default: the model's sampling height
    crop: str = "center"  # center | random
    random_flip: bool = False
    bucketing: bool = False
    bucket_step: int | None = None  # default: VAE factor x U-Net downsampling
    max_aspect: float = 2.0
    cache_latents: bool = False  # encode every image once with the VAE (needs crop: center)
    num_workers: int = 0


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float | None = None  # default: alpha = rank
    text_encoder: bool = False
    dropout: float = 0.0
    unet_targets: tuple[str, ...] | None = None  # U-Net layer-name suffixes; None: ldm.formats.lora.UNET_TARGETS


@dataclass
class TrainSettings:
    seed: int = 0
    batch_size: int = 64  # per process and micro-step
    steps: int = 20000  # optimizer steps
    lr: float = 6e-4
    final_lr: float = 5e-5
    warmup_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0
    caption_dropout: float = 0.1
    min_snr_gamma: float | None = 5.0
    noise_offset: float = 0.0
    ema_decay: float | None = 0.999  # null: no EMA
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    gradient_accumulation: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16 (GPU)
    gradient_checkpointing: bool = False
    train_text_encoder: bool = True
    text_encoder_lr: float | None = None  # peak lr of the text encoder (kohya's text_encoder_lr); None: lr
    lora: LoraSettings | None = None
    log_every: int = 10  # tracker logging interval (steps)


@dataclass
class ValidationSettings:
    prompts: tuple[str, ...] = ()
    every: int = 0  # steps; 0: only at the end (when prompts are given)
    seed: int = 0
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str = ""


@dataclass
class OutputSettings:
    path: str | None = None
    dtype: str = "float16"
    diffusers: bool = False  # also write a diffusers folder at PATH-diffusers


@dataclass
class RunConfig:
    """A whole training run, as read from YAML."""

    model_init: str | None
    model_sections: dict[str, Any]
    vae: str | None
    data: DataSettings
    training: TrainSettings
    validation: ValidationSettings
    output: OutputSettings
    run_dir: str | None = None  # default: runs/<config file stem> (scripts/train.py)
    source: str = "config"

    @property
    def lora(self) -> LoraSettings | None:
        return self.training.lora


_TOP_LEVEL = ("model", "vae", "data", "training", "validation", "output", "run_dir")


def apply_overrides(config: dict, overrides: Sequence[str]) -> dict:
    """Set ``a.b.c=value`` pairs (values parsed as YAML) in the nested dict ``config``, in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        parts = key.split(".")
        node = config
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                if node.get(part) is not None:
                    raise ConfigError(f"override {key}: {'.'.join(parts[:depth + 1])} is not a section")
                node[part] = {}
            node = node[part]
        node[parts[-1]] = _parse_value(text)
    return config


def _parse_value(text: str) -> Any:
    """A YAML value, with ``1e-4`` read as a number (YAML 1.1 wants ``1.0e-4``)."""
    value = yaml.safe_load(text) if text.strip() else None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def read_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a training YAML strictly, after applying dotted overrides.

    Raises:
        ConfigError: missing file, bad YAML, an unknown key (named by its dotted path), bad values.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    return parse_run_config(apply_overrides(data, overrides), source=str(path))


def parse_run_config(data: dict, *, source: str = "config") -> RunConfig:
    _reject_unknown(data, _TOP_LEVEL, source, "")
    model = dict(data.get("model") or {})
    _reject_unknown(model, ("init", *_PIPELINE_SECTIONS), source, "model.")
    init = model.pop("init", None)
    architecture = sorted(set(model) - set(_INIT_OVERRIDABLE))
    if init is not None and architecture:
        raise ConfigError(f"{source}: model.init and model.{architecture[0]} exclude each other "
                          "(a pretrained model brings its own architecture)")
    if init is None and not model:
        raise ConfigError(f"{source}: model needs init (a pretrained model) or unet/text_encoder sections")
    if init is None:
        PipelineConfig.from_dict(model, source=f"{source}: model")  # strict check now, not after loading data
    else:  # partial sections: their values merge into the init model's when it is loaded; check the keys now
        for name, values in model.items():
            _reject_unknown(values or {}, [f.name for f in dataclasses.fields(SECTION_CLASSES[name])], source,
                            f"model.{name}.")
    training_dict = dict(data.get("training") or {})
    lora = training_dict.pop("lora", None)
    settings = _build(TrainSettings, training_dict, source, "training")
    if lora is not None:
        settings.lora = _build(LoraSettings, lora, source, "training.lora")
    output = data.get("output")
    output = {"path": output} if isinstance(output, str) else (output or {})
    validation = dict(data.get("validation") or {})
    config = RunConfig(
        model_init=None if init is None else str(init), model_sections=model,
        vae=None if data.get("vae") is None else str(data["vae"]),
        data=_build(DataSettings, data.get("data") or {}, source, "data"), training=settings,
        validation=_build(ValidationSettings, validation, source, "validation"),
        output=_build(OutputSettings, output, source, "output"),
        run_dir=None if data.get("run_dir") is None else str(data["run_dir"]), source=source)
    _check_values(config)
    return config


def _reject_unknown(values: dict, known: Sequence[str], source: str, prefix: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}'")


def _build(cls, values: dict, source: str, section: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(values, list(fields), source, f"{section}.")
    values = dict(values)
    for name, value in values.items():
        if isinstance(value, str) and "float" in str(fields[name].type):  # YAML reads 1e-4 as a string
            try:
                values[name] = float(value)
            except ValueError:
                raise ConfigError(f"{source}: {section}.{name} must be a number, got {value!r}") from None
        elif isinstance(value, list) and "tuple" in str(fields[name].type):  # YAML has lists, the fields tuples
            values[name] = tuple(value)
    return cls(**values)


def _check_values(config: RunConfig) -> None:
    where, t, d = config.source, config.training, config.data
    if d.kind not in DATA_KINDS:
        raise ConfigError(f"{where}: data.kind must be one of {DATA_KINDS}, got {d.kind!r}")
    if d.kind != "procedural" and not d.source:
        raise ConfigError(f"{where}: data.source (a folder or hub dataset id) is required for kind {d.kind!r}")
    if t.mixed_precision not in PRECISIONS:
        raise ConfigError(f"{where}: training.mixed_precision must be one of {PRECISIONS}")
    if config.output.dtype not in OUTPUT_DTYPES:
        raise ConfigError(f"{where}: output.dtype must be one of {tuple(OUTPUT_DTYPES)}")
    for name in ("batch_size", "steps", "checkpoint_every", "keep_checkpoints", "gradient_accumulation"):
        if getattr(t, name) < 1:
            raise ConfigError(f"{where}: training.{name} must be >= 1")
    if config.model_init is None and config.vae is None:
        raise ConfigError(f"{where}: a fresh model (no model.init) needs vae: a folder from train_autoencoder.py")
    if t.text_encoder_lr is not None:
        if t.text_encoder_lr <= 0 or t.lr <= 0:
            raise ConfigError(f"{where}: training.text_encoder_lr and training.lr must be > 0")
        if not (t.lora.text_encoder if t.lora is not None else t.train_text_encoder):
            raise ConfigError(f"{where}: training.text_encoder_lr is set but the text encoder is not trained")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def load_vae_folder(folder: str | Path):
    """The frozen autoencoder written by ``scripts/toy/train_autoencoder.py`` (``vae.yaml`` + ``vae.safetensors``)."""
    from autoencoder.model import AutoencoderConfig, AutoencoderKL

    folder = Path(folder)
    if not (folder / "vae.yaml").is_file():
        raise ConfigError(f"vae folder {folder} has no vae.yaml (write it with scripts/toy/train_autoencoder.py)")
    meta = yaml.safe_load((folder / "vae.yaml").read_text(encoding="utf-8"))
    vae = AutoencoderKL(AutoencoderConfig.from_dict(meta["model"]))
    vae.load_state_dict(checkpoints.load_state_dict(folder / "vae.safetensors"))
    return vae


def build_pipeline(config: RunConfig):
    """The starting pipeline: pretrained (``model.init``) or fresh weights seeded by ``training.seed``."""
    from ldm.pipeline import Txt2ImgPipeline
    from ldm.models.text_encoders import build_text_encoder
    from ldm.models.unet import UNetModel

    if config.model_init is not None:
        pipe = Txt2ImgPipeline.from_pretrained(config.model_init)
        if config.vae is not None:
            pipe.vae = load_vae_folder(config.vae)
        if config.model_sections:
            pipe.replace_config_sections(config.model_sections, source=f"{config.source}: model")
        return pipe
    vae = load_vae_folder(config.vae)
    pipeline_config = PipelineConfig.from_dict({**config.model_sections, "vae": vae.config.to_dict()},
                                               source=f"{config.source}: model")
    torch.manual_seed(config.training.seed)
    unet, text_encoder = UNetModel(pipeline_config.unet), build_text_encoder(pipeline_config.text_encoder)
    return Txt2ImgPipeline(pipeline_config, unet, vae, text_encoder)


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
        from ldm.formats.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora

        lora = settings.lora
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
    """A pool of procedural images encoded once into latents; batches drawn with replacement per step."""

    def __init__(self, latents: torch.Tensor, captions: list[str], batch_size: int) -> None:
        self.latents, self.captions, self.batch_size = latents, captions, batch_size

    @classmethod
    @torch.no_grad()
    def build(cls, vae, settings: DataSettings, cache: Path, batch_size: int, device) -> "ProceduralLatents":
        """Posterior-mean latents ``z [N, C, h, w]`` of ``pool_size`` procedural images, cached in ``cache``."""
        from ldm.toy.procedural import ProceduralDataset, images_to_tensor

        captions_file = cache.with_suffix(".json")
        if captions_file.is_file() and cache.is_file():
            captions = json.loads(captions_file.read_text(encoding="utf-8"))
            return cls(checkpoints.load_state_dict(cache)["latents"], captions, batch_size)
        dataset = ProceduralDataset(seed=settings.seed, split="train")
        latents, captions, start = [], [], time.perf_counter()
        dtype = next(vae.parameters()).dtype
        for first in range(0, settings.pool_size, 256):
            samples = dataset.take(min(256, settings.pool_size - first), start=first)
            images = images_to_tensor([s.image for s in samples]).to(device, dtype)
            latents.append(vae.encode_latents(images).float().cpu())
            captions.extend(s.caption for s in samples)
        latents = torch.cat(latents)
        logger.info("encoded %d procedural latents in %.0f s (std %.3f)", len(latents),
                    time.perf_counter() - start, latents.std())
        checkpoints.save_safetensors_atomic({"latents": latents}, cache)
        captions_file.write_text(json.dumps(captions), encoding="utf-8")
        return cls(latents, captions, batch_size)

    def next_batch(self, generator: torch.Generator) -> dict[str, Any]:
        index = torch.randint(len(self.latents), (self.batch_size,), generator=generator)
        return {"latents": self.latents[index], "captions": [self.captions[i] for i in index.tolist()]}

    def state_dict(self) -> dict:
        return {}  # batches depend only on the step's generator

    def load_state_dict(self, state: dict) -> None:
        pass


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
        from ldm.training.data import collate_batch

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
    from ldm.training.data import BucketBatchSampler, ImageCaptionDataset, cache_latents, load_image_caption_dataset

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
                            settings: TrainSettings, generator: torch.Generator) -> torch.Tensor:
    """One DDPM loss evaluation (Algorithm 1) on clean latents ``z [B, C, h, w]``.

    Randomness (caption dropout, timesteps ``t ~ U{0..T-1}``, noise ``eps``) comes from ``generator``
    in that order. The target is eps or v by ``schedule.config.prediction``.
    """
    prediction = schedule.config.prediction
    captions = objectives.drop_captions(captions, settings.caption_dropout, generator=generator)
    context = text_encoder(tokenizer(captions).to(z.device))
    t = objectives.sample_timesteps(len(z), schedule.config.num_train_timesteps, generator=generator,
                                    device=z.device)
    eps = objectives.sample_noise(z, generator=generator, offset=settings.noise_offset)
    abar = schedule.alphas_cumprod.to(z.device)[t].float()
    x_t = objectives.add_noise(z, eps, abar)  # Ho et al. 2020, eq. 4
    target = objectives.training_target(z, eps, abar, prediction)
    weights = objectives.min_snr_weights(abar, settings.min_snr_gamma, prediction)  # Hang et al. 2023, eq. 9
    return objectives.diffusion_loss(unet(x_t, t.float(), context.to(x_t.dtype)), target, weights)


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
    from ldm.images import make_grid

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


def export_model(pipe, trained: dict[str, nn.Module], emas: dict, config: RunConfig, note: dict) -> Path | None:
    """Write the final model: EMA weights when kept; LoRA runs write ``lora.safetensors``, others a
    pipeline folder (our format, plus ``PATH-diffusers`` on request)."""
    out = config.output
    if out.path is None:
        logger.info("no output.path: final model not exported (see the checkpoints)")
        return None
    path = Path(out.path)
    for name, ema in emas.items():
        ema.copy_to(TrainableParameters(trained[name]))
    dtype = OUTPUT_DTYPES[out.dtype]
    if config.lora is not None:
        from ldm.formats.lora import save_lora

        path.mkdir(parents=True, exist_ok=True)
        save_lora(path / "lora.safetensors", unet=pipe.unet,
                  text_encoder=pipe.text_encoder if "text_encoder" in trained else None, dtype=dtype,
                  metadata={"ldm_base_model": str(config.model_init), "ldm_steps": str(note.get("steps"))})
    else:
        pipe.save_pretrained(path, dtype=dtype)
        if out.diffusers:
            pipe.save_pretrained(path.with_name(path.name + "-diffusers"), format="diffusers", dtype=dtype)
    (path / "training.json").write_text(json.dumps(note, indent=2) + "\n", encoding="utf-8")
    logger.info("exported the final model to %s", path)
    return path


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # per optimizer step, this session
    output: Path | None = None
    samples_per_second: float = 0.0  # this session's training loop (data, forward, backward, optimizer, EMA)


def train(config: RunConfig, run_dir: str | Path, *, resume: str = "auto", export_only: bool = False,
          progress: bool = True) -> TrainResult:
    """Train (or resume) the run described by ``config`` in ``run_dir``; export the final model.

    Args:
        resume: ``"auto"`` (continue from the newest checkpoint when there is one) or ``"latest"``
            (require one).
        export_only: write the newest checkpoint's (EMA) weights to ``output`` without training.
    """
    from accelerate import Accelerator

    from ldm.training.ema import EMA

    run_dir = Path(run_dir)
    t = config.training
    accelerator = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.gradient_accumulation,
                              log_with=_available_trackers(), project_dir=str(run_dir))
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    pipe = build_pipeline(config)
    trained = prepare_trainable(pipe, t)
    pipe.to(device, torch.float32)  # master weights in fp32; accelerate's autocast runs the mixed precision
    emas = {name: EMA(TrainableParameters(module), t.ema_decay) for name, module in trained.items()} \
        if t.ema_decay else {}
    groups = parameter_groups(trained, t)
    parameters = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)

    step, elapsed, data_state = 0, 0.0, {}
    resumed = run_state.load_latest_checkpoint(run_dir)
    if resumed is None and resume == "latest":
        raise ConfigError(f"--resume latest: no checkpoint in {run_dir / 'checkpoints'}")
    if resumed is not None:
        weights, state = resumed
        load_trained_weights(trained, weights, lora=config.lora is not None, where=str(run_dir))
        optimizer.load_state_dict(state["optimizer"])
        for name, ema in emas.items():
            if f"ema_{_short(name)}" in state:
                ema.load_state_dict(state[f"ema_{_short(name)}"])
        step, elapsed, data_state = state["step"], state.get("elapsed", 0.0), state.get("data", {})
        run_state.set_rng_state(state["rng"])
    note = {"config": config.source, "steps": step, "train_seconds": round(elapsed),
            "samples_seen": step * t.batch_size * t.gradient_accumulation * world}
    if export_only:
        if accelerator.is_main_process:
            return TrainResult(step, output=export_model(pipe, trained, emas, config, note))
        return TrainResult(step)

    if config.data.kind == "procedural":
        data = ProceduralLatents.build(pipe.vae, config.data, run_dir / "latents.safetensors", t.batch_size, device)
    else:
        data, _ = build_image_data(config, pipe, run_dir, device, rank=rank, world=world)
    data.load_state_dict(data_state)

    models = [m for m in trained.values()]
    prepared = accelerator.prepare(*models, optimizer)
    prepared = prepared if isinstance(prepared, (list, tuple)) else (prepared,)
    wrapped = dict(zip(trained, prepared[:len(models)]))
    optimizer = prepared[len(models)]
    unet_fn = wrapped["unet"]
    text_fn = wrapped.get("text_encoder", pipe.text_encoder)
    for module in trained.values():
        module.train()
    if _available_trackers():
        accelerator.init_trackers("train")

    schedule = pipe.schedule
    if schedule.config.rescale_betas_zero_snr and t.min_snr_gamma is not None:
        logger.warning("Min-SNR-gamma gives the zero-SNR timestep (t = %d) weight 0, so the model never learns "
                       "it; set training.min_snr_gamma: null", schedule.num_train_timesteps - 1)
    result = TrainResult(step)
    started, session_start, session_first = time.perf_counter() - elapsed, time.perf_counter(), step
    last_log, running = time.perf_counter(), None
    bar = _progress_bar(step, t.steps, enabled=progress and accelerator.is_local_main_process)
    while step < t.steps:
        lr = run_state.warmup_cosine_lr(step, base_lr=t.lr, warmup_steps=t.warmup_steps, total_steps=t.steps,
                                       final_lr=t.final_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        step_loss = 0.0
        for micro in range(t.gradient_accumulation):
            generator = step_generator(t.seed, step, micro, t.gradient_accumulation, rank, world)
            batch = data.next_batch(generator)
            with accelerator.autocast():
                z = _latents(batch, pipe.vae, device)
            with accelerator.accumulate(*wrapped.values()), accelerator.autocast():
                loss = diffusion_loss_on_batch(unet_fn, text_fn, pipe.text_encoder.tokenizer, schedule, z,
                                               batch["captions"], t, generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.grad_clip:
                    accelerator.clip_grad_norm_(parameters, t.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.item() / t.gradient_accumulation
        for name, ema in emas.items():
            ema.update(TrainableParameters(trained[name]))
        step += 1
        result.losses.append(step_loss)
        running = step_loss if running is None else 0.98 * running + 0.02 * step_loss
        rate = (step - session_first) * t.batch_size * t.gradient_accumulation * world / max(
            1e-9, time.perf_counter() - session_start)
        result.samples_per_second = rate
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
        if step % t.log_every == 0 or step == t.steps:
            accelerator.log({"loss": step_loss, "lr": lr}, step=step)
        if time.perf_counter() - last_log > 60 or step == t.steps:
            logger.info("step %d/%d loss %.4f lr %.2e %.1f samples/s", step, t.steps, running, lr, rate)
            last_log = time.perf_counter()
        if step % t.checkpoint_every == 0 or step == t.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                state = {"optimizer": optimizer.state_dict(), "rng": run_state.rng_state(),
                         "elapsed": time.perf_counter() - started, "data": data.state_dict(),
                         **{f"ema_{_short(name)}": ema.state_dict() for name, ema in emas.items()}}
                weights = trained_weights(trained, lora=config.lora is not None)
                run_state.save_checkpoint(run_dir, step, weights, state, keep=t.keep_checkpoints)
        v = config.validation
        if v.prompts and accelerator.is_main_process and ((v.every and step % v.every == 0) or step == t.steps):
            render_validation(pipe, v, run_dir / "validation" / f"step-{step:07d}.png")
    if bar is not None:
        bar.close()
    accelerator.wait_for_everyone()
    note.update(steps=step, train_seconds=round(time.perf_counter() - started),
                samples_seen=step * t.batch_size * t.gradient_accumulation * world)
    result.step = step
    if accelerator.is_main_process:
        result.output = export_model(pipe, trained, emas, config, note)
    accelerator.end_training()
    return result


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
    import importlib.util

    return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else None


def _progress_bar(step: int, total: int, *, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, leave=False)


__all__ = ["RunConfig", "DataSettings", "TrainSettings", "LoraSettings", "ValidationSettings", "OutputSettings",
           "apply_overrides", "read_run_config", "parse_run_config", "train", "TrainResult",
           "diffusion_loss_on_batch", "step_generator", "TrainableParameters"]
