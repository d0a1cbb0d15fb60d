"""The text-to-image pipeline: prompt -> text context -> guided sampling in latent space -> image.

``Txt2ImgPipeline`` owns the three networks (U-Net, autoencoder, text encoder), the noise
schedule and the sampling defaults. Its ``__call__`` is Algorithm 2 of the lecture
(ancestral sampling, generalised to any sampler in :mod:`ldm.sampling.samplers`) with classifier-free
guidance, followed by the VAE decoder.

Weights load from this package's own folder format (``config.yaml`` + ``model.safetensors``
with original Stable Diffusion key names), from diffusers ``StableDiffusionPipeline``
folders, from original single-file checkpoints (:mod:`ldm.formats.single_file`), or from a Hugging
Face hub id when there is a network.

What a call needs around that core lives beside it: argument checks (:mod:`ldm.call_arguments`), the
sampling options (:mod:`ldm.sampling_options`), the image modes' inputs and paste-back
(:mod:`ldm.image_modes`), where the chain starts in each mode (:mod:`ldm.starting_points`, a mixin of
the pipeline) and SDXL's vector conditioning (:mod:`ldm.sdxl_guidance`).
"""

from __future__ import annotations

import copy
import functools
import logging
import re
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from autoencoder.model import AutoencoderKL
from ldm.call_arguments import check_call_arguments, check_finite, check_placement, check_seed, describe, expand_prompts
from ldm.formats import checkpoints
from ldm.formats.diffusers_folder import load_diffusers_folder, save_diffusers_folder
from ldm.formats.single_file import read_single_file
from ldm.formats.textual_inversion import read_embedding, read_embeddings_folder
from ldm.config import PipelineConfig, load_config, save_config
from ldm.sampling.denoiser import DiscreteDenoiser, cfg_denoiser
from ldm.errors import ArgumentError, CheckpointError, ConfigError, ImageInputError
from ldm.image_inputs import ImageCondition, default_size, image_to_tensor, pil_to_tensor, steps_to_skip, to_pil
from ldm.image_modes import (check_low_res_sizes, hires_condition, hires_options, image_condition, only_masked_crop,
                             paste_back_results)
from ldm.sampling.samplers import SAMPLERS, final_latents
from ldm.sampling.schedule import NoiseSchedule
from ldm.sampling.variation import Variation
from ldm.sampling_options import SamplingOptions, build_sampling_options
from ldm.models.builder import build_components, fill_derived_buffers
from ldm.models.prompt_encoding import ContextSchedule, encode_prompts, schedule_contexts
from ldm.models.sdxl_conditioning import MicroConditioning
from ldm.refiner import DEFAULT_SWITCH, RefinerHandover, check_compatible, check_switch, steps_before_switch
from ldm.models.unet import UNetModel
from ldm.sdxl_guidance import micro_conditioning_options, sdxl_guidance_inputs
from ldm.starting_points import StartingPoints
from ldm.upscaling import LowResCondition, check_colour_fix, check_noise_level
from ldm.upscaling import colour_fix as apply_colour_fix
from ldm.sampling.classifier_guidance import ClassifierGuidance, classifier_guided

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "toy" / "default_model"
NATIVE_CONFIG = "config.yaml"
NATIVE_WEIGHTS = "model.safetensors"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

AUTO_TILING_PIXELS = 1024 * 1024  # decode in tiles above this image area (memory, not quality)
ProgressFn = Callable[[int, int], None]  # (steps done, total steps)
PreviewFn = Callable[[torch.Tensor], None]  # (denoised estimate x0 [B, C, h, w] after a step)
InterruptFn = Callable[[], bool]  # polled after each step: True stops the sampler there


class Txt2ImgPipeline(StartingPoints):
    """Stable-Diffusion-style text-to-image generation.

    Example::

        pipe = Txt2ImgPipeline.from_pretrained()          # the shipped default model
        images = pipe("a red bicycle", seed=0)           # list of PIL images
    """

    def __init__(self, config: PipelineConfig, unet: UNetModel, vae: AutoencoderKL, text_encoder) -> None:
        self.config = config
        self.unet = unet.eval()
        self.vae = vae.eval()
        self.text_encoder = text_encoder.eval()
        self.schedule = NoiseSchedule(config.schedule)
        self.memory_format = torch.contiguous_format  # of the U-Net's and the VAE's 4-D tensors

    # ------------------------------------------------------------------ construction

    def replace_config_sections(self, sections: dict, *, source: str = "config") -> None:
        """Replace keys of the ``schedule``, ``sampling`` and/or (super-resolution models) ``upscale``
        sections (the weights stay), e.g. ``{"schedule": {"prediction": "v"}}`` before fine-tuning an eps
        model into a v model.

        Raises:
            ConfigError: for other sections, unknown keys or invalid values.
        """
        other = sorted(set(sections) - {"schedule", "sampling", "upscale"})
        if other:
            raise ConfigError(f"{source}: only schedule, sampling and upscale can be replaced, not {other[0]!r}")
        if "upscale" in sections and not self.config.is_upscaler:
            raise ConfigError(f"{source}: upscale settings need a super-resolution model")
        merged = self.config.to_dict()
        for name, values in sections.items():
            merged[name] = {**merged[name], **(values or {})}
        self.config = PipelineConfig.from_dict(merged, source=source)
        self.schedule = NoiseSchedule(self.config.schedule)

    @classmethod
    def from_config(cls, config: PipelineConfig) -> "Txt2ImgPipeline":
        """Build a pipeline with freshly initialised (random) weights."""
        return cls(config, **build_components(config))

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "Txt2ImgPipeline":
        """Load a model: our folder format, a diffusers pipeline folder, an original single file, or a hub id.

        Args:
            path: a folder saved by :meth:`save_pretrained` (either format), an original single-file
                checkpoint (``.safetensors``/``.ckpt``, read by :meth:`from_single_file` with its
                defaults), a Hugging Face hub id such as ``"stable-diffusion-v1-5/stable-diffusion-v1-5"``
                (needs a network), or ``None`` for the default model that ships inside the package.
            device, dtype: where and in which precision to run.
        Raises:
            CheckpointError: the path is missing, not a model, corrupt, or cannot be downloaded.
            DeviceError / ArgumentError: ``device`` is unknown or absent here, ``dtype`` is no torch dtype.
        """
        check_placement(device, dtype)
        if path is not None and Path(path).expanduser().is_file():
            return cls.from_single_file(Path(path).expanduser(), device=device, dtype=dtype)
        folder = _resolve_model_path(path)
        if (folder / NATIVE_CONFIG).is_file():
            pipe = cls._from_native_folder(folder)
        elif (folder / "model_index.json").is_file():
            config, parts = load_diffusers_folder(folder)
            pipe = cls._from_parts(config, parts, source=str(folder))
        else:
            raise CheckpointError(
                f"{folder} is not a model folder (expected {NATIVE_CONFIG} or a diffusers model_index.json)"
            )
        return pipe.to(device, dtype)

    @classmethod
    def from_single_file(
        cls,
        path: str | Path,
        config: PipelineConfig | str | Path | None = None,
        *,
        prediction: str | None = None,
        vae: str | Path | None = None,
        ema: bool | str = "auto",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "Txt2ImgPipeline":
        """Load an original SD 1.x/2.x single-file checkpoint (``.safetensors``; ``.ckpt`` weights-only).

        Args:
            path: the checkpoint file.
            config: a CompVis YAML (e.g. ``configs/sd-v2-inference-v.yaml``), this package's
                ``config.yaml`` or model folder, or a PipelineConfig. ``None``: the config stored in
                the file, else a same-named ``.yaml`` beside it, else inferred from the weights.
            prediction: ``"eps"`` or ``"v"`` (SD 2.x 768-v models); overrides the config.
            vae: a separate VAE file that replaces the checkpoint's VAE.
            ema: ``"auto"`` (EMA U-Net weights when present), ``True`` (require them), ``False``
                (the non-EMA training weights).
            device, dtype: where and in which precision to run.
        Raises:
            CheckpointError / ConfigError: one-line messages (see :mod:`ldm.formats.single_file`).
            DeviceError / ArgumentError: ``device`` is unknown or absent here, ``dtype`` is no torch dtype.
        """
        check_placement(device, dtype)
        checkpoint = read_single_file(path, config, prediction=prediction, vae=vae, ema=ema)
        pipe = cls._from_parts(checkpoint.config, checkpoint.parts, source=str(path))
        return pipe.to(device, dtype)

    @classmethod
    def _from_native_folder(cls, folder: Path) -> "Txt2ImgPipeline":
        config = load_config(folder / NATIVE_CONFIG)
        state_dict = checkpoints.load_state_dict(folder / NATIVE_WEIGHTS)
        return cls._from_parts(config, checkpoints.split_components(state_dict), source=str(folder))

    @classmethod
    def _from_parts(cls, config: PipelineConfig, parts: dict, *, source: str) -> "Txt2ImgPipeline":
        """Build the networks on the meta device and fill them strictly from per-component state dicts."""
        with torch.device("meta"):
            modules = build_components(config)
        for name, module in modules.items():
            # assign=True: the module takes the loaded tensors themselves, so weights are held once.
            checkpoints.load_into(module, parts.get(name, {}), what=f"{source}: {name}", assign=True)
            fill_derived_buffers(module)
        return cls(config, **modules)

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, path: str | Path, *, format: str = "native", dtype: torch.dtype | None = None) -> None:
        """Save to a folder in this package's format (``"native"``) or as a diffusers pipeline.

        Args:
            path: destination folder, written beside and moved into place only when complete
                (an existing folder there is replaced).
            format: ``"native"`` (``config.yaml`` + ``model.safetensors`` with original SD key
                names) or ``"diffusers"`` (loads with ``StableDiffusionPipeline.from_pretrained``).
            dtype: storage precision (default: the current one), e.g. ``torch.float16``.
        """
        path = Path(path)
        if format == "diffusers":
            save_diffusers_folder(self, path, dtype=dtype)
            return
        if format != "native":
            raise ConfigError(f"unknown save format {format!r} (expected 'native' or 'diffusers')")
        tensors = {
            key: (t.to(dtype) if dtype is not None and t.is_floating_point() else t)
            for key, t in self.state_dict().items()
        }
        with checkpoints.atomic_folder(path) as folder:
            checkpoints.save_safetensors_atomic(tensors, folder / NATIVE_WEIGHTS, metadata={"format": "ldm-native"})
            save_config(self.config, folder / NATIVE_CONFIG)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All weights under their original single-file Stable Diffusion names."""
        return checkpoints.join_components(
            {name: getattr(self, name).state_dict() for name in checkpoints.COMPONENT_PREFIXES}
        )

    # ------------------------------------------------------------------ device handling

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None, *,
           memory_format: torch.memory_format | None = None) -> "Txt2ImgPipeline":
        """Move all networks (in place) and return ``self``.

        ``memory_format=torch.channels_last`` stores the U-Net's and the VAE's convolution weights
        and feeds their inputs channels-last (faster for bfloat16 on CPUs, see :mod:`ldm.hardware`).
        Raises :class:`~ldm.errors.DeviceError` for a device this machine lacks (``cuda`` without a GPU).
        """
        check_placement(device, dtype)
        for name in checkpoints.COMPONENT_PREFIXES:
            getattr(self, name).to(device=device, dtype=dtype)
        if memory_format is not None:
            for network in (self.unet, self.vae):
                network.to(memory_format=memory_format)
            self.memory_format = memory_format
        return self

    def compile(self, **options) -> "Txt2ImgPipeline":
        """Compile the U-Net with ``torch.compile`` (in place; weights and ``state_dict`` keys unchanged).

        On the CPU, inductor's ``freezing`` is on (weights folded in as constants and pre-packed for
        oneDNN): compile after loading LoRA or changing weights, later changes are not seen. The first
        call at each new shape compiles (minutes for SD-sized U-Nets on a small CPU, see the README);
        ``options`` go to ``torch.compile``. Returns ``self``.
        """
        if self.device.type == "cpu":
            options.setdefault("options", {"freezing": True})
        self.unet.compile(**options)
        return self

    def load_textual_inversion(self, path: str | Path, token: str | None = None) -> list[str]:
        """Load textual-inversion embeddings (diffusers' method name): ``path`` is one file (an
        AUTOMATIC1111 ``.pt`` / ``.safetensors`` or a diffusers ``learned_embeds`` file) or a folder of
        them (the web UI's embeddings folder). A file's trigger word is ``token``, else the token a
        diffusers file names, else the file's stem; a folder's files are triggered by their stems.
        The trigger then works in prompts and negative prompts. Returns the trigger words loaded.

        Raises:
            CheckpointError: a missing, corrupt or unsafe file, or vectors whose width does not fit this
                model's text encoder (e.g. an SD1 embedding on an SD2 model).
        """
        path = Path(path).expanduser()
        if path.is_dir():
            if token is not None:
                raise ArgumentError("token names the trigger of one embedding file, not of a folder")
            embeddings = read_embeddings_folder(path)
        else:
            embeddings = [read_embedding(path, token)]
        for embedding in embeddings:
            try:
                self.text_encoder.add_embedding(embedding.token, embedding.vectors)
            except ValueError as error:
                raise CheckpointError(f"{path}: {error}") from None
        return [embedding.token for embedding in embeddings]

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def conditioning(self, prompts: list[str], negatives: list[str] | None, options, *,
                     hires_base_steps: int | None = None) -> tuple:
        """The guidance contexts of one batch: ``(cond, uncond or None)``, each ``[B, chunks * L, D]``,
        or a :class:`ldm.models.prompt_encoding.ContextSchedule` when a prompt changes during sampling
        (prompt editing ``[a:b:when]``, alternation ``[a|b]``). Prompts and negative prompts are encoded
        in one call: padded to the same number of chunks, as AUTOMATIC1111 does."""
        texts = prompts + (negatives or [])
        contexts = schedule_contexts(self.text_encoder, texts, options.steps, clip_skip=options.clip_skip,
                                     hires_base_steps=hires_base_steps)
        if isinstance(contexts, ContextSchedule):
            contexts = ContextSchedule(contexts.contexts.to(self.dtype), contexts.rows)
            cond = ContextSchedule(contexts.contexts, contexts.rows[:len(prompts)])
            uncond = ContextSchedule(contexts.contexts, contexts.rows[len(prompts):]) if negatives else None
            return cond, uncond
        contexts = contexts.to(self.dtype)
        return contexts[:len(prompts)], (contexts[len(prompts):] if negatives else None)

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str], *, clip_skip: int = 1) -> torch.Tensor:
        """Prompts in AUTOMATIC1111's language -> cross-attention context ``[B, chunks * L, D]`` in the
        U-Net's dtype (:mod:`ldm.models.prompt_encoding`: weights, BREAK, 75-token chunks, all prompts
        padded to the longest's chunk count; a plain prompt of at most ``L - 2`` tokens gives exactly
        the text encoder's ``[B, L, D]``)."""
        return encode_prompts(self.text_encoder, list(prompts), clip_skip=clip_skip).to(self.dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        eta: float | None = None,
        karras: bool | None = None,
        schedule: str | None = None,
        signal_leak: bool | None = None,
        clip_skip: int | None = None,
        subseed: int | None = None,
        subseed_strength: float = 0.0,
        seed_resize_from: tuple[int, int] | None = None,
        image: Image.Image | None = None,
        strength: float | None = None,
        mask_image: Image.Image | None = None,
        mask_blur: float = 0,
        paste_back: bool = True,
        only_masked: bool = False,
        only_masked_padding: int = 32,
        hires_scale: float | None = None,
        hires_strength: float = 0.5,
        hires_upscaler: str = "latent",
        hires_steps: int | None = None,
        progress: ProgressFn | None = None,
        preview: PreviewFn | None = None,
        interrupt: InterruptFn | None = None,
        classifier_guidance: ClassifierGuidance | None = None,
        classifier_scale: float = 0.0,
        output_type: str = "pil",
        batch_invariant: bool = True,
        vae_tiling: bool | None = None,
        original_size: tuple[int, int] | None = None,
        crop_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        refiner: "Txt2ImgPipeline | None" = None,
        refiner_switch: float | None = None,
    ) -> list[Image.Image] | torch.Tensor:
        """Generate images from text (txt2img), from text and an image (img2img), or repaint a masked region.

        Args:
            prompt: one prompt (repeated ``num_images`` times) or one prompt per image.
            negative_prompt: what to steer away from (the unconditional half of guidance).
            steps, guidance_scale, sampler, height, width, eta, karras: default to the model's
                ``config.sampling`` values (height and width to the image's size when one is given).
            schedule: the spacing of the sigma chain (AUTOMATIC1111's "Schedule type"): ``"default"`` (the
                sampler's diffusers chain), ``"karras"``, ``"exponential"``, ``"uniform"``, ``"sgm_uniform"``,
                ``"simple"``, ``"beta"``, or the web UI's labels ("Karras", "SGM Uniform", "Automatic": the
                sampler's own preference there). ``None``: ``"karras"`` if ``karras`` else ``"default"``.
            seed: image ``i`` uses initial noise from ``torch.Generator("cpu").manual_seed(seed + i)``,
                exactly as diffusers does with that generator, so image ``i`` of a batch is the
                image generated alone with seed ``seed + i``.
            signal_leak: start from noise plus a leak drawn from the training latents' statistics
                (:mod:`ldm.sampling.signal_leak`; the same generator, after the noise). ``None``: when the
                model has them. diffusers has no such option: :meth:`diffusers_latents` gives the
                ``latents=`` that make its StableDiffusionPipeline draw the same image.
            clip_skip: AUTOMATIC1111's "Clip skip": 1 (default) = the text encoder's own output layer,
                2 = one block earlier (SD1 models trained that way), ...
            subseed, subseed_strength: AUTOMATIC1111's variation seed: image ``i``'s noise is slerped
                (:mod:`ldm.sampling.variation`) towards the noise of seed ``subseed + i`` by
                ``subseed_strength`` in [0, 1] (0: the seed's image, 1: the variation seed's noise).
            seed_resize_from: AUTOMATIC1111's "Resize seed from" ``(height, width)`` in pixels: draw each
                seed's noise (and its variation) at that size and paste it, centred, into the noise at the
                generation size, to keep a seed's composition at another size (:meth:`initial_noise`).
            image: img2img (SDEdit): encode this image, noise it to the level ``strength`` selects
                and run the rest of the chain (about ``steps * strength`` steps), as diffusers'
                StableDiffusionImg2ImgPipeline does, generator use included (posterior sample, then noise).
            strength: how much of the chain to run, in (0, 1]; default 0.75 (img2img) or 1.0 (inpainting).
            mask_image: inpainting: repaint where the mask is white (grey >= 128). A 9-channel
                inpainting U-Net gets the mask and the masked image's latents as extra input; any other
                model gets the known region's noised latents put back after every step. Both as
                diffusers' StableDiffusionInpaintPipeline.
            mask_blur: Gaussian blur radius (pixels) of the mask used for ``paste_back`` (AUTOMATIC1111's
                "Mask blur"; the sampling mask stays sharp).
            paste_back: inpainting: composite the result over the input image with the (blurred) mask,
                so that pixels outside the mask are the input's exactly (AUTOMATIC1111 does this;
                diffusers does not).
            only_masked: inpainting: work on the mask's box grown by ``only_masked_padding`` pixels
                (and to the generation size's aspect), resized to the generation size (``height`` x
                ``width``, default the image's), then paste that back into the full image (always
                pasted). AUTOMATIC1111's "Inpaint area: Only masked": small regions get full resolution.
            hires_scale: AUTOMATIC1111's hires fix: generate at ``height`` x ``width``, upscale by this
                factor (``hires_upscaler``: ``"latent"``, bilinear in latent space, or ``"lanczos"``,
                decode - resize - encode), then img2img at ``hires_strength`` with ``hires_steps``
                (default ``steps``) and the same seed. Text-to-image only.
            progress: optional ``progress(done, total)`` called after each step (``total`` counts
                the steps of all images).
            preview: optional ``preview(x0)`` called after each step with the sampler's denoised
                estimate ``x0 [B, C, h, w]`` (latents on the decoder's scale: :meth:`decode` shows them).
            classifier_guidance, classifier_scale: classifier guidance (Dhariwal & Nichol 2021,
                :mod:`ldm.sampling.classifier_guidance`): a noise-aware classifier and the class to draw; every
                denoised estimate (after classifier-free guidance) moves by ``classifier_scale * sigma^2 *
                grad log p(class | x)``. Works with any sampler, any prompt (an empty one: the unconditional
                model), and with classifier-free guidance. Scale 0 (default) turns it off.
            interrupt: optional ``interrupt()`` polled after each step; when it returns True the sampler
                stops there and that image is decoded from its current denoised estimate (AUTOMATIC1111's
                Interrupt): the call returns the images finished so far plus that one.
            batch_invariant: sample images one at a time so that results never depend on the batch
                (default). ``False`` runs all images as one batch: faster on a GPU, equal to within
                float rounding.
            output_type: ``"pil"`` (list of images) or ``"pt"`` (tensor ``[B, 3, H, W]`` in [0, 1]).
            vae_tiling: decode in overlapping tiles (bounded memory, see :meth:`decode`); ``None``:
                when the image has more than :data:`AUTO_TILING_PIXELS` pixels.
            original_size, crop_top_left, target_size: SDXL models only: the micro-conditioning in pixels,
                ``(height, width)``, ``(top, left)``, ``(height, width)``; sizes default to the output size
                (diffusers' defaults; :class:`ldm.models.sdxl_conditioning.MicroConditioning`).
            refiner, refiner_switch: SDXL's ensemble of experts (:mod:`ldm.refiner`): this model runs the chain
                until ``refiner_switch`` (default 0.8) of the training schedule, then the ``refiner`` pipeline
                (same latents and noise levels) runs the rest from that point and decodes, as diffusers'
                ``denoising_end`` / ``denoising_start`` and AUTOMATIC1111's "Refiner switch at". Text-to-image
                and img2img (not with a mask or the hires fix).

        Raises:
            ArgumentError / ConfigError / ImageInputError (all ``ValueError``): an argument of the wrong
            type or out of range (a prompt that is not text, a seed outside [0, 2**64), a NaN scale).
        """
        check_call_arguments(prompt, negative_prompt, seed, num_images,
                              integers={"steps": steps, "height": height, "width": width, "hires_steps": hires_steps,
                                        "only_masked_padding": only_masked_padding},
                              reals={"strength": strength, "mask_blur": mask_blur, "hires_scale": hires_scale,
                                     "hires_strength": hires_strength, "subseed_strength": subseed_strength})
        classifier = self.classifier_options(classifier_guidance, classifier_scale)
        micro = micro_conditioning_options(self.config, original_size, crop_top_left, target_size)
        if self.config.is_upscaler:
            raise ArgumentError("this is a super-resolution model: it needs a small image to enlarge "
                                "(pipe.upscale(image, prompt), scripts/upscale.py)")
        if subseed is not None:
            check_seed(subseed, num_images if isinstance(prompt, str) else len(prompt), name="subseed")
            if not 0 <= subseed_strength <= 1:
                raise ArgumentError(f"subseed_strength must be in [0, 1], got {subseed_strength}")
        original_image, region = image, None
        if image is not None and (height is None or width is None):
            default_width, default_height = default_size(image, self.vae.downsample_factor)
            height, width = height or default_height, width or default_width
        options = self.sampling_options(steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                                        height=height, width=width, eta=eta, karras=karras, schedule=schedule,
                                        signal_leak=signal_leak, seed_resize_from=seed_resize_from,
                                        clip_skip=clip_skip)
        if only_masked:
            full_mask, region = only_masked_crop(image, mask_image, only_masked_padding, options)
            image, mask_image = image.crop(region), full_mask.crop(region)
        condition = image_condition(image, mask_image, strength, options, inpainting_model=self.is_inpainting_model)
        hires = hires_options(hires_scale, hires_strength, hires_upscaler, hires_steps, options, condition,
                              downsample_factor=self.vae.downsample_factor)
        handover = self.refiner_handover(refiner, refiner_switch, condition, hires)
        decoder = self if handover is None else handover.pipe  # diffusers decodes with the refiner's VAE
        prompts, negatives = expand_prompts(prompt, negative_prompt, num_images)
        seeds = [seed + i for i in range(len(prompts))]
        steps_run = options.steps - (steps_to_skip(options.steps, condition.strength) if condition else 0)
        if hires is not None:
            steps_run += hires.steps - steps_to_skip(hires.steps, hires_strength)
        total_steps = steps_run * len(prompts)
        # CPU kernels give slightly different float results for different batch sizes, so by
        # default each image is sampled alone: then image i is bitwise the one seed + i gives alone.
        chunk = len(prompts) if not batch_invariant else 1
        images = []
        for start in range(0, len(prompts), chunk):
            done_before = start * steps_run
            report = (lambda done, d=done_before: progress(d + done, total_steps)) if progress else None
            batch = (prompts[start:start + chunk], negatives[start:start + chunk], seeds[start:start + chunk])
            variation = None if subseed is None else Variation(
                tuple(subseed + s - seed for s in batch[2]), subseed_strength)  # image i: subseed + i
            z = self._generate(*batch, options, report, condition, variation, preview=preview, interrupt=interrupt,
                               refiner=handover, **classifier, **micro)
            if hires is not None and not (interrupt is not None and interrupt()):
                first_pass = options.steps
                report = (lambda done, d=done_before: progress(d + first_pass + done, total_steps)) if progress else None
                second_start = hires_condition(z, hires, hires_upscaler, hires_strength,
                                               decode=functools.partial(self.decode, tiled=vae_tiling),
                                               downsample_factor=self.vae.downsample_factor)
                z = self._generate(*batch, hires, report, second_start, variation, preview=preview,
                                   interrupt=interrupt, hires_base_steps=options.steps, **classifier, **micro)
            images.append(decoder.decode(z, tiled=vae_tiling))
            if interrupt is not None and interrupt():
                break
        images = torch.cat(images)
        if condition is None or condition.mask is None or not (paste_back or only_masked):
            return images if output_type == "pt" else to_pil(images)
        if only_masked:
            image, mask_image = original_image, full_mask
        pasted = paste_back_results(images, image, mask_image, mask_blur, region)
        return pasted if output_type != "pt" else torch.stack([pil_to_tensor(p) for p in pasted])

    @torch.no_grad()
    def upscale(
        self,
        image: Image.Image | Sequence[Image.Image],
        prompt: str | Sequence[str] = "",
        negative_prompt: str | Sequence[str] = "",
        *,
        noise_level: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        seed: int = 0,
        eta: float | None = None,
        karras: bool | None = None,
        progress: ProgressFn | None = None,
        output_type: str = "pil",
        vae_tiling: bool | None = None,
        colour_fix: float | None = None,
    ) -> list[Image.Image] | torch.Tensor:
        """Super-resolution with a super-resolution model (SD's x4 upscaler or the default cascade's stage):
        each image comes back ``vae.downsample_factor`` times larger, its detail drawn by diffusion
        conditioned on the image (noise-augmented to ``noise_level``, :mod:`ldm.upscaling`) and the prompt.

        The same sampling core as :meth:`__call__`, and the same generator use as diffusers'
        StableDiffusionUpscalePipeline: image ``i`` uses ``torch.Generator("cpu").manual_seed(seed + i)``,
        first for the augmentation noise, then for the latents' noise.

        Args:
            image: one image or a list (one output each); sides multiples of the U-Net's downsampling.
            prompt, negative_prompt: one text for all images, or one per image.
            noise_level: augmentation level in ``[0, upscale.max_noise_level]``; default the model's
                (20, as diffusers). Higher hides more of the input's artefacts and invents more.
            steps, guidance_scale, sampler, eta, karras: default to the model's ``config.sampling``.
            progress, output_type, vae_tiling: as in :meth:`__call__`.
            colour_fix: keep the result's detail but take its content coarser than this Gaussian sigma
                (output pixels) from the input (:func:`ldm.upscaling.colour_fix`); 0: off; default the
                model's ``upscale.colour_fix`` (0 for SD's x4 upscaler, as diffusers).

        Raises:
            ArgumentError / ImageInputError: not a super-resolution model, a wrong image, level, colour fix or
                prompt.
        """
        if not self.config.is_upscaler:
            raise ArgumentError("this model is not a super-resolution model (its config has no upscale section); "
                                "use pipe(prompt, image=...) for img2img")
        images = [image] if isinstance(image, Image.Image) else list(image)
        if not images or not all(isinstance(im, Image.Image) for im in images):
            raise ImageInputError("image must be a PIL image or a non-empty list of them")
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(images) if isinstance(negative_prompt, str) else list(negative_prompt)
        if not len(prompts) == len(negatives) == len(images):
            raise ArgumentError(f"{len(images)} images need one prompt (and negative prompt) each or a single one")
        check_call_arguments(prompts, negatives, seed, len(images), integers={"steps": steps}, reals={})
        level = self.config.upscale.noise_level if noise_level is None else noise_level
        sigma = self.config.upscale.colour_fix if colour_fix is None else colour_fix
        try:
            check_noise_level(level, self.config.upscale.max_noise_level)
            check_colour_fix(sigma)
        except ValueError as error:
            raise ArgumentError(str(error)) from None
        f = self.vae.downsample_factor
        check_low_res_sizes(images, output_type, 2 ** (self.config.unet.num_levels - 1))
        results = []
        for i, small in enumerate(images):
            width, height = small.size
            options = self.sampling_options(steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                                            height=height * f, width=width * f, eta=eta, karras=karras,
                                            signal_leak=False)
            done = (lambda d, base=i * options.steps: progress(base + d, options.steps * len(images))) \
                if progress else None
            condition = LowResCondition(image_to_tensor(small, width, height), level)
            z = self._generate([prompts[i]], [negatives[i]], [seed + i], options, done, low_res=condition)
            results.append(apply_colour_fix(self.decode(z, tiled=vae_tiling), condition.images, sigma))
        if output_type == "pt":
            return torch.cat(results)
        return [image for result in results for image in to_pil(result)]

    def refiner_handover(self, refiner, switch, condition: ImageCondition | None,
                         hires: SamplingOptions | None) -> RefinerHandover | None:
        """The checked refiner of a call and its switch (default :data:`ldm.refiner.DEFAULT_SWITCH`), or ``None``."""
        if refiner is None:
            if switch is not None:
                raise ArgumentError("refiner_switch needs a refiner")
            return None
        if not isinstance(refiner, Txt2ImgPipeline):
            raise ArgumentError(f"refiner must be a Txt2ImgPipeline, got {describe(refiner)}")
        switch = check_switch(DEFAULT_SWITCH if switch is None else switch)
        if condition is not None and condition.mask is not None:
            raise ArgumentError("a refiner does not work with inpainting here yet (run it on the result as img2img)")
        if hires is not None:
            raise ArgumentError("a refiner does not work with the hires fix here yet")
        check_compatible(self.config, self.schedule, refiner.config, refiner.schedule)
        if refiner.device != self.device:
            raise ArgumentError(f"the refiner is on {refiner.device}, the model on {self.device}: move both to one device")
        return RefinerHandover(refiner, switch)

    def classifier_options(self, guidance: ClassifierGuidance | None, scale) -> dict:
        """The ``_generate`` keywords of classifier guidance, checked (``{}`` when it is off)."""
        check_finite("classifier_scale", scale)
        if guidance is None:
            if scale:
                raise ArgumentError("classifier_scale needs classifier_guidance (a classifier and the class to draw)")
            return {}
        if not isinstance(guidance, ClassifierGuidance):
            raise ArgumentError(f"classifier_guidance must be a ClassifierGuidance, got {describe(guidance)}")
        channels = guidance.classifier.config.in_channels
        if channels != self.config.vae.latent_channels:
            raise ArgumentError(f"the classifier reads {channels}-channel latents, this model has "
                                f"{self.config.vae.latent_channels}")
        return {"classifier_guidance": guidance, "classifier_scale": float(scale)} if scale else {}

    @property
    def is_inpainting_model(self) -> bool:
        """True for U-Nets that take the mask and the masked image's latents as extra input channels."""
        return self.config.unet.in_channels == 2 * self.config.vae.latent_channels + 1

    def _generate(self, prompts: list[str], negatives: list[str], seeds: list[int], options,
                  progress: Callable[[int], None] | None, condition: ImageCondition | None = None,
                  variation: Variation | None = None, *, preview: PreviewFn | None = None,
                  interrupt: InterruptFn | None = None, low_res: LowResCondition | None = None,
                  hires_base_steps: int | None = None, classifier_guidance: ClassifierGuidance | None = None,
                  classifier_scale: float = 0.0, micro: MicroConditioning | None = None,
                  refiner: RefinerHandover | None = None) -> torch.Tensor:
        """Algorithm 2 for one batch: final latents ``z [B, C, h, w]`` (float32, diffusers' scale); when
        ``interrupt()`` turns True after a step, the denoised estimate of that step instead.
        ``hires_base_steps``: this is a hires fix's second pass after that many steps (prompt editing).
        ``micro``: SDXL's micro-conditioning (SDXL models only). ``refiner``: this model runs the chain up to
        the switch, the refiner the rest, with the same generators (:mod:`ldm.refiner`)."""
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        sigmas = self.schedule.sampling_sigmas(options.steps, sampler=options.sampler, schedule=options.schedule)
        if low_res is not None:
            x, model, put_back = self.upscale_start(low_res, generators, sigmas, options, variation)
        elif condition is None:
            x, model, put_back = self.starting_point(generators, sigmas, options, variation), self.unet_prediction, None
        else:
            sigmas = sigmas[steps_to_skip(options.steps, condition.strength):]
            x, model, put_back = self.image_start(condition, generators, sigmas, options, variation)

        def after_step(i: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor | None:
            if progress is not None:
                progress(i + 1)
            if preview is not None:
                preview(x0)
            if interrupt is not None and interrupt():
                raise _Interrupted(x0)
            return put_back(i, x) if put_back is not None else None

        parts = [(self, model, sigmas)]  # (pipeline, its U-Net function, its part of the chain)
        if refiner is not None:
            switch = steps_before_switch(self.schedule, sigmas, refiner.switch)
            parts = [(self, model, sigmas[:switch + 1]), (refiner.pipe, refiner.pipe.unet_prediction, sigmas[switch:])]
        conditioning = dict(hires_base_steps=hires_base_steps, classifier_guidance=classifier_guidance,
                            classifier_scale=classifier_scale, micro=micro)
        steps_done = 0
        try:
            for pipe, part_model, part_sigmas in parts:
                if len(part_sigmas) > 1:
                    x = pipe._denoise(prompts, negatives, options, part_model, x, part_sigmas, generators,
                                      lambda i, x, x0, before=steps_done: after_step(before + i, x, x0), **conditioning)
                steps_done += len(part_sigmas) - 1
        except _Interrupted as stop:
            return stop.x0.float()
        return final_latents(x, sigmas, sampler=options.sampler)

    def _denoise(self, prompts: list[str], negatives: list[str], options, model: Callable, x: torch.Tensor,
                 sigmas: torch.Tensor, generators: list[torch.Generator], callback: Callable, *,
                 hires_base_steps: int | None = None, classifier_guidance: ClassifierGuidance | None = None,
                 classifier_scale: float = 0.0, micro: MicroConditioning | None = None) -> torch.Tensor:
        """Run the sampler with this model's guided denoiser over the chain ``sigmas [n + 1]`` from ``x [B, C, h, w]``
        at ``sigmas[0]``; returns ``x`` at ``sigmas[-1]`` (sigma scale). ``model(x, t, context, y=None)`` is the
        U-Net function of the starting point (:meth:`image_start` adds the inpainting channels)."""
        # Classifier-free guidance (Ho & Salimans 2022): one batched U-Net call on [uncond, cond].
        # Prompts and negative prompts encoded together: padded to the same number of chunks, as AUTOMATIC1111 does.
        guided = options.guidance_scale != 1
        if self.config.is_sdxl:
            context, uncond_context, vectors = sdxl_guidance_inputs(self.text_encoder, self.config, prompts,
                                                                    negatives if guided else None, options,
                                                                    micro or MicroConditioning(), self.dtype)
            model = functools.partial(model, y=vectors)  # the U-Net's vector rides along with the context
        else:
            context, uncond_context = self.conditioning(prompts, negatives if guided else None, options,
                                                        hires_base_steps=hires_base_steps)
        spec = SAMPLERS[options.sampler]
        denoiser = DiscreteDenoiser(model, self.schedule, self.config.schedule.prediction,
                                    round_timesteps=options.schedule == "karras" and spec.diffusers_rounds_karras_timesteps)
        denoise = cfg_denoiser(denoiser, context, uncond_context, options.guidance_scale)
        if classifier_guidance is not None:  # Dhariwal & Nichol 2021, on top of classifier-free guidance
            denoise = classifier_guided(denoise, classifier_guidance.log_prob_fn(self.device), self.schedule,
                                        classifier_scale)
        sampler_options = {"eta": options.eta} if "eta" in spec.options else {}
        return spec.fn(denoise, x, sigmas, generator=generators, callback=callback, **sampler_options)

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def decode(self, z: torch.Tensor, *, tiled: bool | None = None) -> torch.Tensor:
        """Latents ``z [B, C, h, w]`` -> images ``[B, 3, H, W]`` in [0, 1], float32 on the CPU.

        ``tiled``: decode overlapping tiles one at a time (:mod:`autoencoder.tiling`: bounded memory,
        seams blended, close to but not bitwise the whole); ``None``: above :data:`AUTO_TILING_PIXELS`.
        A float16 VAE whose output overflows (SDXL's VAE is known to) is decoded again in float32.
        """
        f = self.vae.downsample_factor
        if tiled is None:
            tiled = z.shape[-2] * z.shape[-1] * f * f > AUTO_TILING_PIXELS
        vae_dtype = self.vae_dtype
        images = self.vae.decode_latents(z.to(vae_dtype, memory_format=self.memory_format), tiled=tiled).float()
        if vae_dtype == torch.float16 and not torch.isfinite(images).all():
            logger.warning("the VAE overflowed in float16; decoding again in float32")
            images = copy.deepcopy(self.vae).float().decode_latents(z.float(), tiled=tiled)
        return (images / 2 + 0.5).clamp(0, 1).cpu()

    def unet_prediction(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                        class_labels: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """The U-Net in its own dtype, with float32 in and out for the sampler's arithmetic."""
        return self.unet(x.to(self.dtype, memory_format=self.memory_format), t, context.to(self.dtype),
                         class_labels=class_labels, y=y).float()

    def sampling_options(self, *, signal_leak: bool | None = None, schedule: str | None = None,
                         seed_resize_from: tuple[int, int] | None = None, **overrides) -> SamplingOptions:
        """The model's ``config.sampling`` with the given non-``None`` overrides, validated, plus the schedule.

        ``signal_leak=False`` drops the model's signal-leak statistics (start from pure noise);
        ``True`` requires them; ``None`` keeps the model's setting. ``schedule``, ``seed_resize_from``:
        see :meth:`__call__`.

        Raises:
            ConfigError: for options no sampler can use (see :func:`ldm.sampling_options.validate_sampling_options`).
        """
        return build_sampling_options(self.config.sampling, self.vae.downsample_factor, signal_leak=signal_leak,
                                      schedule=schedule, seed_resize_from=seed_resize_from, **overrides)


class _Interrupted(Exception):
    """Stops a sampler's loop from its step callback (``interrupt`` turned True); carries that step's ``x0``."""

    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__("interrupted")
        self.x0 = x0


def _resolve_model_path(path: str | Path | None) -> Path:
    """A local folder for ``path``: the default model, an existing folder, or a hub download."""
    if path is None:
        if not (DEFAULT_MODEL_DIR / NATIVE_WEIGHTS).is_file():
            raise CheckpointError(
                "no default model ships with this install yet; pass a model folder or hub id "
                "(e.g. --model path/to/stable-diffusion-v1-5)"
            )
        return DEFAULT_MODEL_DIR
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{local} is a file; single-file checkpoints are not supported here yet")
        return local
    if _HUB_ID.match(str(path)) and not str(path).startswith((".", "/", "~")):
        return _download_from_hub(str(path))
    raise CheckpointError(f"model path not found: {path}")


def _download_from_hub(repo_id: str) -> Path:
    """Fetch a diffusers pipeline repo (configs, tokenizer, safetensors weights) into the HF cache."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id,
            allow_patterns=["model_index.json", "*/config.json", "*/*config.json", "tokenizer/*",
                            "unet/*.safetensors", "vae/*.safetensors", "text_encoder/*.safetensors"],
        )
    except Exception as error:  # network, auth, missing repo: all user-fixable
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"could not download {repo_id!r} from the Hugging Face hub (offline or no such model?): {first}"
        ) from None
    return Path(folder)
