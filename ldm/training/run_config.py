"""The configuration of a training run (``scripts/train.py``): settings dataclasses, strict YAML reading.

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

Every mistake is a one-line :class:`ConfigError` naming the file and the dotted key. Reading and
the unknown-key and type checks live in :mod:`ldm.config_io`; this module knows the run's sections,
the checks across them and which settings define a run (:func:`run_identity`). The loop that runs a
config is :mod:`ldm.training.trainer`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ldm.config import OPTIONAL_SECTIONS, SECTION_CLASSES, PipelineConfig
from ldm.config_io import check_keys, check_types, parse_yaml_value, plain_data, read_yaml, strict_from_dict
from ldm.errors import ConfigError
from ldm.upscaling import LowResDegradation

DATA_KINDS = ("procedural", "folder", "hub")
PRECISIONS = ("no", "fp16", "bf16")
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PIPELINE_SECTIONS = ("unet", "text_encoder", "schedule", "sampling", "upscale")
_INIT_OVERRIDABLE = ("schedule", "sampling", "upscale")  # sections model.init may be combined with
_TOP_LEVEL = ("model", "vae", "text_encoder", "data", "training", "validation", "output", "run_dir")
# Settings a resumed session may change: how long to train, the learning-rate schedule, checkpointing,
# logging, speed and memory options, the model's sampling defaults. All others (base model or
# architecture, VAE, data, objective and method) define the run; validation and output never do.
RESUMABLE_SETTINGS = frozenset({
    "data.num_workers", "data.cache_latents",
    "training.steps", "training.lr", "training.final_lr", "training.warmup_steps", "training.weight_decay",
    "training.grad_clip", "training.text_encoder_lr", "training.ema_decay", "training.checkpoint_every",
    "training.keep_checkpoints", "training.mixed_precision", "training.gradient_checkpointing",
    "training.log_every",
    "model.sampling.steps", "model.sampling.guidance_scale", "model.sampling.sampler", "model.sampling.karras",
    "model.sampling.eta", "model.sampling.signal_leak", "model.upscale.noise_level", "model.upscale.colour_fix",
})


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
    latent_crop: int | None = None  # procedural: train on random square crops of this many latent pixels
    low_res_round_trip: float = 0.0  # super-resolution: share of small images replaced by their autoencoder round trip
    low_res_blur: float = 0.0  # super-resolution: largest Gaussian blur sigma (small-image pixels), drawn per sample
    low_res_colour_jitter: float = 0.0  # super-resolution: paler colours, alike in a pair's large and small render
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
    text_encoder: str | None = None  # a model whose (pretrained) text encoder a fresh model takes over

    @property
    def lora(self) -> LoraSettings | None:
        return self.training.lora


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
        node[parts[-1]] = parse_yaml_value(text)
    return config


def read_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a training YAML strictly, after applying dotted overrides.

    Raises:
        ConfigError: missing file, bad YAML, an unknown key (named by its dotted path), bad values.
    """
    data = read_yaml(path) or {}
    return parse_run_config(apply_overrides(data, overrides), source=str(Path(path)))


def parse_run_config(data: dict, *, source: str = "config") -> RunConfig:
    """The :class:`RunConfig` of the nested dict ``data`` (a parsed YAML file named ``source``)."""
    check_keys(data, _TOP_LEVEL, source=source)
    model = dict(data.get("model") or {})
    check_keys(model, ("init", *_PIPELINE_SECTIONS), source=source, key="model")
    init = model.pop("init", None)
    architecture = sorted(set(model) - set(_INIT_OVERRIDABLE))
    if init is not None and architecture:
        raise ConfigError(f"{source}: model.init and model.{architecture[0]} exclude each other "
                          "(a pretrained model brings its own architecture)")
    if init is None and not model:
        raise ConfigError(f"{source}: model needs init (a pretrained model) or unet/text_encoder sections")
    for name, values in model.items():  # keys and types now, not after loading data (dotted keys named)
        check_types({**SECTION_CLASSES, **OPTIONAL_SECTIONS}[name], values or {}, source=source, key=f"model.{name}")
    if init is None:
        PipelineConfig.from_dict(model, source=f"{source}: model")  # partial sections merge into the init model's
    training_dict = dict(data.get("training") or {})
    lora = training_dict.pop("lora", None)
    settings = strict_from_dict(TrainSettings, training_dict, source=source, key="training")
    if lora is not None:
        settings.lora = strict_from_dict(LoraSettings, lora, source=source, key="training.lora")
    output = data.get("output")
    output = {"path": output} if isinstance(output, str) else (output or {})
    validation = dict(data.get("validation") or {})
    config = RunConfig(
        model_init=None if init is None else str(init), model_sections=model,
        vae=None if data.get("vae") is None else str(data["vae"]),
        data=strict_from_dict(DataSettings, data.get("data") or {}, source=source, key="data"), training=settings,
        validation=strict_from_dict(ValidationSettings, validation, source=source, key="validation"),
        output=strict_from_dict(OutputSettings, output, source=source, key="output"),
        run_dir=None if data.get("run_dir") is None else str(data["run_dir"]), source=source,
        text_encoder=None if data.get("text_encoder") is None else str(data["text_encoder"]))
    _check_values(config)
    return config


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
            raise ConfigError(f"{where}: training.{name} must be >= 1, got {getattr(t, name)}")
    if config.model_init is None and config.vae is None:
        raise ConfigError(f"{where}: a fresh model (no model.init) needs vae: a folder from train_autoencoder.py")
    if config.text_encoder is not None and (config.model_init is not None or "text_encoder" in config.model_sections):
        raise ConfigError(f"{where}: text_encoder (a pretrained model's) excludes model.init and model.text_encoder")
    if d.latent_crop is not None and (d.kind != "procedural" or d.latent_crop < 1):
        raise ConfigError(f"{where}: data.latent_crop needs procedural data and a positive size")
    if (d.low_res_round_trip or d.low_res_blur or d.low_res_colour_jitter) and d.kind != "procedural":
        raise ConfigError(f"{where}: data.low_res_round_trip, data.low_res_blur and data.low_res_colour_jitter "
                          "need procedural data")
    if not 0 <= d.low_res_colour_jitter <= 1:
        raise ConfigError(f"{where}: data.low_res_colour_jitter must be in [0, 1], got {d.low_res_colour_jitter}")
    try:
        LowResDegradation(d.low_res_round_trip, d.low_res_blur)
    except ValueError as error:
        raise ConfigError(f"{where}: data.low_res_*: {error}") from None
    if t.text_encoder_lr is not None:
        if t.text_encoder_lr <= 0 or t.lr <= 0:
            raise ConfigError(f"{where}: training.text_encoder_lr and training.lr must be > 0")
        if not (t.lora.text_encoder if t.lora is not None else t.train_text_encoder):
            raise ConfigError(f"{where}: training.text_encoder_lr is set but the text encoder is not trained")


def run_identity(config: RunConfig) -> dict[str, Any]:
    """The settings that define the run ``config`` describes, as ``{dotted key: value}``: the base model
    (``model.init``, resolved) or the architecture, the VAE, the data and the training objective and
    method; not the :data:`RESUMABLE_SETTINGS`, validation or output. A run directory records them
    (:mod:`ldm.training.run_state`) so that a session never continues another run by mistake."""
    settings = {"model.init": _location(config.model_init), "vae": _location(config.vae)}
    if config.text_encoder is not None:  # absent from the identity of runs that never used it
        settings["text_encoder"] = _location(config.text_encoder)
    settings.update(_flatten(config.model_sections, "model"))
    settings.update(_flatten(asdict(config.data), "data"))
    settings["data.source"] = _location(config.data.source)
    if config.data.latent_crop is None:  # a later option: absent from the identity of runs that do not use it
        del settings["data.latent_crop"]
    for later_option in ("data.low_res_round_trip", "data.low_res_blur", "data.low_res_colour_jitter"):  # likewise
        if not settings[later_option]:
            del settings[later_option]
    settings.update(_flatten(asdict(config.training), "training"))
    return {key: value for key, value in settings.items() if not _resumable(key)}


def _resumable(key: str) -> bool:
    """Whether ``key`` is, or lies under, one of the :data:`RESUMABLE_SETTINGS`."""
    return any(key == name or key.startswith(name + ".") for name in RESUMABLE_SETTINGS)


def _flatten(values: dict, prefix: str) -> dict[str, Any]:
    """Nested dicts -> ``{"prefix.a.b": value}`` with plain values (tuples as lists)."""
    flat = {}
    for name, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}.{name}"))
        else:
            flat[f"{prefix}.{name}"] = plain_data(value)
    return flat


def _location(path: str | None) -> str | None:
    """An existing local path made absolute (the same run may be started from another folder); a hub id
    or a missing path as given."""
    return str(Path(path).resolve()) if path is not None and Path(path).exists() else path


__all__ = ["RunConfig", "DataSettings", "TrainSettings", "LoraSettings", "ValidationSettings", "OutputSettings",
           "DATA_KINDS", "PRECISIONS", "OUTPUT_DTYPES", "RESUMABLE_SETTINGS", "apply_overrides", "read_run_config",
           "parse_run_config", "run_identity"]
