"""One txt2img / img2img request -> a plan of pipeline calls -> base64 PNGs, ``parameters`` and ``info``.

:func:`plan_txt2img` / :func:`plan_img2img` run in the request's thread: they refuse what the
server cannot honour (:func:`refuse_unsupported`), check the limits, decode the input images and fix
the seeds, all before the job is queued. :meth:`Plan.run` runs on the worker with the loaded pipeline.

Seeds as AUTOMATIC1111 gives them: ``-1`` draws a random 32-bit seed; image ``k`` of
``batch_size x n_iter`` uses ``seed + k`` (``seed`` for every image when ``subseed_strength > 0``,
with variation seed ``subseed + k``). Each image is one pipeline call, so it is bitwise the image
:class:`~ldm.pipeline.Txt2ImgPipeline` gives for the same settings.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm.call_arguments import MAX_SEED
from ldm.image_inputs import default_size
from ldm.images import a1111_parameters
from ldm.pipeline import Txt2ImgPipeline
from ldm.sampling.registry import AUTOMATIC, SAMPLER_INFO, resolve_sampler_name, resolve_schedule_name
from ldm.server.catalogue import Catalogue, ModelEntry
from ldm.server.limits import Limits, RequestError
from ldm.server.options import ServerOptions
from ldm.server.schemas import GenerationRequest, Img2ImgRequest, Txt2ImgRequest
from ldm.server.worker import Job, png_base64

RANDOM_SEED = -1
HIRES_UPSCALERS = {"latent": "latent", "lanczos": "lanczos"}  # AUTOMATIC1111's names, lower-cased -> ours
INPAINTING_FILL = {0: "fill", 1: "original"}  # the modes this server has (2 latent noise, 3 latent nothing: no)
OVERRIDABLE = ("sd_model_checkpoint", "CLIP_stop_at_last_layers")


@dataclass
class Plan:
    """A checked request: what to call the pipeline with, image by image."""

    request: GenerationRequest
    model: ModelEntry
    prompt: str
    negative_prompt: str
    seeds: list[int]
    subseeds: list[int]
    subseed_strength: float
    sampler: str | None
    schedule: str | None  # AUTOMATIC1111's scheduler name or label (``None``: the model's own chain)
    clip_skip: int
    preview_every: int  # record a preview every n-th step (-1: the last step only, 0: none)
    options_after: dict[str, Any]  # settings this request leaves changed (override_settings_restore_afterwards=False)
    limits: Limits
    call: dict[str, Any] = field(default_factory=dict)  # further pipeline keywords shared by every image
    init_images: list[Image.Image] = field(default_factory=list)  # img2img: image k uses init_images[k % n]
    mask: Image.Image | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # extra PNG parameters
    denoising_strength: float | None = None

    def run(self, pipe: Txt2ImgPipeline, job: Job) -> dict[str, Any]:
        """Generate every image (stopping early on interrupt) -> ``{"images": [...], "info": str}``."""
        request, count = self.request, len(self.seeds)
        job.preview_every = self.preview_every
        options = pipe.sampling_options(steps=request.steps, guidance_scale=request.cfg_scale, sampler=self.sampler,
                                        height=self.side(pipe, "height"), width=self.side(pipe, "width"),
                                        eta=self.eta(), schedule=self.schedule, clip_skip=self.clip_skip)
        self.limits.check_size("width", options.width, options.height)
        self.limits.check_steps("steps", options.steps)
        if "hires_scale" in self.call:
            scale = self.call["hires_scale"]
            self.limits.check_size("hr_scale", int(options.width * scale), int(options.height * scale))
        fields = self.png_fields(pipe)
        images, infotexts = [], []
        for k in range(count):
            job.begin_image(k, count, options.steps)
            for image, text in self.generate_image(pipe, job, options, fields, k):
                images.append(png_base64(image, text))
                infotexts.append(text)
            if job.interrupted.is_set() or job.abandoned:
                break
        info = self.info(options, infotexts, fields)
        return {"images": images if request.send_images is not False else [], "info": json.dumps(info)}

    def generate_image(self, pipe: Txt2ImgPipeline, job: Job, options, fields: dict[str, Any],
                       k: int) -> list[tuple[Image.Image, str]]:
        """Image ``k`` (one pipeline call; none if interrupted before it) with its ``parameters`` text."""
        variation = {"subseed": self.subseeds[k], "subseed_strength": self.subseed_strength} \
            if self.subseed_strength > 0 else {}
        image_inputs = {"image": self.init_images[k % len(self.init_images)], "mask_image": self.mask} \
            if self.init_images else {}
        made = pipe(self.prompt, self.negative_prompt, steps=options.steps, guidance_scale=options.guidance_scale,
                    sampler=options.sampler, seed=self.seeds[k], height=options.height, width=options.width,
                    eta=options.eta, schedule=options.schedule, clip_skip=options.clip_skip, **variation,
                    **image_inputs, **self.call, progress=job.step, preview=job.preview(pipe),
                    interrupt=job.should_stop)
        if variation:
            fields = {**fields, "Variation seed": self.subseeds[k],
                      "Variation seed strength": f"{self.subseed_strength:g}"}
        text = a1111_parameters(self.prompt, self.negative_prompt, steps=options.steps, sampler=options.sampler,
                                guidance_scale=options.guidance_scale, seed=self.seeds[k], width=options.width,
                                height=options.height, schedule=options.schedule, extra=fields)
        return [(image, text) for image in made]

    def side(self, pipe: Txt2ImgPipeline, side: str) -> int | None:
        """The requested ``side`` (``"height"``/``"width"``); img2img: else the first image's, rounded down."""
        value = getattr(self.request, side)
        if value is None and self.init_images:
            width, height = default_size(self.init_images[0], pipe.vae.downsample_factor)
            return height if side == "height" else width
        return value

    def eta(self) -> float | None:
        """``eta`` for a sampler that takes it (DDIM); refusals for the others are in :func:`check_eta`."""
        return self.request.eta if self.sampler is not None and "eta" in SAMPLER_INFO[self.sampler].options else None

    def png_fields(self, pipe: Txt2ImgPipeline) -> dict[str, Any]:
        """The PNG parameters beyond :func:`ldm.images.a1111_parameters`' own, as AUTOMATIC1111 names them."""
        fields = dict(self.fields)
        if self.denoising_strength is not None:
            fields = {"Denoising strength": f"{self.denoising_strength:g}", **fields}
        if self.clip_skip != 1:
            fields["Clip skip"] = self.clip_skip
        fields["Model"] = self.model.model_name
        starts_from_noise = not self.init_images or (self.mask is not None and self.denoising_strength == 1)
        if pipe.config.sampling.signal_leak is not None and starts_from_noise:
            fields["Signal leak"] = "on"
        return fields

    def info(self, options, infotexts: list[str], fields: dict[str, Any]) -> dict[str, Any]:
        """The ``info`` object of AUTOMATIC1111's ``Processed.js()``."""
        done = max(len(infotexts), 1)
        sampler = SAMPLER_INFO[options.sampler].a1111_name if options.sampler in SAMPLER_INFO else options.sampler
        return {
            "prompt": self.prompt, "all_prompts": [self.prompt] * done,
            "negative_prompt": self.negative_prompt, "all_negative_prompts": [self.negative_prompt] * done,
            "seed": self.seeds[0], "all_seeds": self.seeds[:done],
            "subseed": self.subseeds[0], "all_subseeds": self.subseeds[:done],
            "subseed_strength": self.subseed_strength,
            "width": options.width, "height": options.height, "sampler_name": sampler,
            "cfg_scale": options.guidance_scale, "steps": options.steps, "batch_size": self.request.batch_size,
            "restore_faces": self.request.restore_faces, "face_restoration_model": None,
            "sd_model_name": self.model.model_name, "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None,
            "seed_resize_from_w": self.request.seed_resize_from_w, "seed_resize_from_h": self.request.seed_resize_from_h,
            "denoising_strength": self.denoising_strength,
            "extra_generation_params": {key: value for key, value in fields.items() if key != "Model"},
            "index_of_first_image": 0, "infotexts": infotexts, "styles": self.request.styles or [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": self.clip_skip,
            "is_using_inpainting_conditioning": False,
        }


# ---------------------------------------------------------------------- planning (request thread)


def plan_txt2img(request: Txt2ImgRequest, limits: Limits, catalogue: Catalogue, options: ServerOptions) -> Plan:
    plan = _plan_common(request, limits, catalogue, options)
    if request.enable_hr:
        _plan_hires(plan, request, limits)
    return plan


def plan_img2img(request: Img2ImgRequest, limits: Limits, catalogue: Catalogue, options: ServerOptions) -> Plan:
    plan = _plan_common(request, limits, catalogue, options)
    refuse_unsupported(request, {"resize_mode": (0,), "mask_round": (True,), "initial_noise_multiplier": (1,),
                                 "latent_mask": ("",)})
    if not request.init_images:
        raise RequestError("init_images", "img2img needs at least one image in init_images (base64 PNG or JPEG)")
    if len(request.init_images) > 1 and len(request.init_images) > request.batch_size:
        raise RequestError("init_images", f"{len(request.init_images)} images for batch_size {request.batch_size}: "
                                          "give one image, or at most batch_size")
    plan.init_images = [decode_image(text, f"init_images.{i}", limits)
                        for i, text in enumerate(request.init_images)]
    strength = _number("denoising_strength", request.denoising_strength, 0.75)
    if not 0 < strength <= 1:
        raise RequestError("denoising_strength", f"must be in (0, 1], got {strength:g}")
    plan.denoising_strength = plan.call["strength"] = strength
    if request.mask:
        _plan_mask(plan, request, limits)
    return plan


def _plan_common(request: GenerationRequest, limits: Limits, catalogue: Catalogue, options: ServerOptions) -> Plan:
    refuse_unsupported(request, {"styles": ([],), "restore_faces": (False,), "tiling": (False,),
                                 "save_images": (False,), "s_min_uncond": (0,), "s_churn": (0,), "s_tmin": (0,),
                                 "s_noise": (1,), "refiner_checkpoint": ("",), "firstpass_image": ("",),
                                 "script_name": ("",), "script_args": ([],), "alwayson_scripts": ({},),
                                 "infotext": ("",)})
    if request.s_tmax not in (None, 0) and not (request.s_tmax == math.inf):
        raise RequestError("s_tmax", "this server has no churn (s_churn, s_tmin, s_tmax): leave them 0")
    if request.seed_resize_from_h is not None and request.seed_resize_from_w is not None \
            and request.seed_resize_from_h > 0 and request.seed_resize_from_w > 0:
        raise RequestError("seed_resize_from_w", "this server cannot resize seeds: leave seed_resize_from_w/h at -1")
    for name in ("prompt", "negative_prompt"):
        limits.check_prompt(name, getattr(request, name) or "")
    batch_size, n_iter = _count("batch_size", request.batch_size), _count("n_iter", request.n_iter)
    limits.check_images(batch_size, n_iter)
    request.batch_size, request.n_iter = batch_size, n_iter
    for name in ("width", "height"):
        value = getattr(request, name)
        if value is not None and (value < 8 or value % 8):
            raise RequestError(name, f"must be a positive multiple of 8, got {value}")
    limits.check_size("width", request.width or 0, request.height or 0)
    if request.steps is not None:
        if request.steps < 1:
            raise RequestError("steps", f"must be at least 1, got {request.steps}")
        limits.check_steps("steps", request.steps)
    sampler, schedule = resolve_sampler(request)
    check_eta(request, sampler)
    overrides = options.check(request.override_settings or {}, prefix="override_settings.")
    refused = sorted(set(overrides) - set(OVERRIDABLE))
    if refused:
        raise RequestError(f"override_settings.{refused[0]}", "only sd_model_checkpoint and CLIP_stop_at_last_layers "
                                                              "can be overridden per request")
    settings = {**options.snapshot(), **overrides}
    model = catalogue.resolve(settings["sd_model_checkpoint"], "override_settings.sd_model_checkpoint")
    count = batch_size * n_iter
    subseed_strength = _number("subseed_strength", request.subseed_strength, 0.0)
    if request.seed_enable_extras is False:
        subseed_strength = 0.0
    if not 0 <= subseed_strength <= 1:
        raise RequestError("subseed_strength", f"must be in [0, 1], got {subseed_strength:g}")
    seed = fixed_seed("seed", request.seed, count if subseed_strength == 0 else 1)
    subseed = fixed_seed("subseed", request.subseed, count)
    return Plan(request=request, model=model, prompt=request.prompt or "", negative_prompt=request.negative_prompt or "",
                seeds=[seed + (k if subseed_strength == 0 else 0) for k in range(count)],
                subseeds=[subseed + k for k in range(count)], subseed_strength=subseed_strength,
                sampler=sampler, schedule=schedule, clip_skip=int(settings["CLIP_stop_at_last_layers"]),
                preview_every=int(settings["show_progress_every_n_steps"]),
                options_after=overrides if request.override_settings_restore_afterwards is False else {},
                limits=limits)


def _plan_hires(plan: Plan, request: Txt2ImgRequest, limits: Limits) -> None:
    """``enable_hr``: the hires fix's pipeline keywords and PNG fields (its other fields ignored otherwise)."""
    refuse_unsupported(request, {"firstphase_width": (0,), "firstphase_height": (0,), "hr_resize_x": (0,),
                                 "hr_resize_y": (0,), "hr_checkpoint_name": ("", "Use same checkpoint"),
                                 "hr_sampler_name": ("", "Use same sampler", request.sampler_name),
                                 "hr_scheduler": ("", "Use same scheduler", request.scheduler),
                                 "hr_prompt": ("", request.prompt), "hr_negative_prompt": ("", request.negative_prompt),
                                 "hr_additional_modules": ([], ["Use same choices"])})
    scale = _number("hr_scale", request.hr_scale, 2.0)
    if not scale > 1:
        raise RequestError("hr_scale", f"must be > 1, got {scale:g}")
    upscaler = (request.hr_upscaler or "Latent").strip().lower()
    if upscaler not in HIRES_UPSCALERS:
        raise RequestError("hr_upscaler", f"this server's upscalers are Latent and Lanczos, not {request.hr_upscaler!r}")
    strength = _number("denoising_strength", request.denoising_strength, 0.75)
    if not 0 < strength <= 1:
        raise RequestError("denoising_strength", f"must be in (0, 1], got {strength:g}")
    steps = request.hr_second_pass_steps or None
    if steps is not None:
        if steps < 1:
            raise RequestError("hr_second_pass_steps", f"must be at least 0 (0: the first pass's), got {steps}")
        limits.check_steps("hr_second_pass_steps", steps)
    if request.width is not None and request.height is not None:
        limits.check_size("hr_scale", int(request.width * scale), int(request.height * scale))
    plan.call.update(hires_scale=scale, hires_strength=strength, hires_upscaler=HIRES_UPSCALERS[upscaler],
                     hires_steps=steps)
    plan.denoising_strength = strength
    plan.fields.update({"Hires upscale": f"{scale:g}", **({"Hires steps": steps} if steps else {}),
                        "Hires upscaler": upscaler.capitalize()})


def _plan_mask(plan: Plan, request: Img2ImgRequest, limits: Limits) -> None:
    """Inpainting: the mask (inverted if asked), blur, fill mode and "only masked" area."""
    mask = decode_image(request.mask, "mask", limits).convert("L")
    if request.inpainting_mask_invert not in (0, 1, None):
        raise RequestError("inpainting_mask_invert", f"must be 0 or 1, got {request.inpainting_mask_invert}")
    if request.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    blur_x = request.mask_blur if request.mask_blur is not None else request.mask_blur_x
    blur_y = request.mask_blur if request.mask_blur is not None else request.mask_blur_y
    if blur_x != blur_y:
        raise RequestError("mask_blur_y", "this server blurs the mask alike in both directions: "
                                          "give mask_blur, or equal mask_blur_x and mask_blur_y")
    blur = blur_x if blur_x is not None else 4
    if blur < 0:
        raise RequestError("mask_blur", f"must be >= 0, got {blur}")
    fill = 0 if request.inpainting_fill is None else request.inpainting_fill
    if fill not in INPAINTING_FILL:
        raise RequestError("inpainting_fill", f"this server has inpainting_fill 0 (fill) and 1 (original), not {fill}")
    if fill == 0:
        plan.init_images = [fill_masked(image, mask) for image in plan.init_images]
    padding = request.inpaint_full_res_padding or 0
    if padding < 0:
        raise RequestError("inpaint_full_res_padding", f"must be >= 0, got {padding}")
    only_masked = request.inpaint_full_res is not False
    if not only_masked and (request.width is not None or request.height is not None):
        # "Just resize" (resize_mode 0): the image and its mask are redrawn at the requested size.
        size = (request.width or plan.init_images[0].width, request.height or plan.init_images[0].height)
        plan.init_images = [image.convert("RGB").resize(size, Image.LANCZOS) for image in plan.init_images]
        mask = mask.resize(size, Image.LANCZOS)
    for i, image in enumerate(plan.init_images):
        if image.size != mask.size:
            raise RequestError("mask", f"the mask is {mask.width}x{mask.height} but init_images.{i} is "
                                       f"{image.width}x{image.height}: they must be the same size")
    plan.mask = mask
    plan.call.update(mask_blur=blur, only_masked=only_masked, only_masked_padding=padding)
    plan.fields.update({"Mask blur": blur, **({"Inpaint area": "Only masked", "Masked area padding": padding}
                                              if only_masked else {})})


# ---------------------------------------------------------------------- field checks


def refuse_unsupported(request, neutral: dict[str, tuple]) -> None:
    """:class:`RequestError` for the first field whose value is neither ``None`` nor one of its ``neutral``
    values (those with which AUTOMATIC1111 does nothing, or the only ones this server has)."""
    for name, allowed in neutral.items():
        value = getattr(request, name)
        if value is not None and value not in allowed:
            raise RequestError(name, f"this server cannot honour {name}={_short(value)} "
                                     f"(leave it out or use {_short(allowed[0])})")


def resolve_sampler(request: GenerationRequest) -> tuple[str | None, str | None]:
    """(our sampler name, the schedule) from ``sampler_name`` / ``sampler_index`` (AUTOMATIC1111's names or
    ours; ``"DPM++ 2M Karras"`` as versions before schedule types wrote it) and ``scheduler`` (a name or
    label of :data:`ldm.sampling.registry.SCHEDULE_LABELS`, or ``automatic``). ``None``: the model's own."""
    name_field = "sampler_name" if request.sampler_name else "sampler_index"
    name = request.sampler_name or (request.sampler_index if "sampler_index" in request.model_fields_set else None)
    sampler, schedule = None, request.scheduler or None
    if name:
        sampler = _sampler_named(name)
        if sampler is None and name.strip().lower().endswith(" karras") and schedule is None:
            sampler, schedule = _sampler_named(name.strip()[: -len(" karras")]), "karras"
        if sampler is None:
            known = ", ".join(info.a1111_name for info in SAMPLER_INFO.values())
            raise RequestError(name_field, f"unknown sampler {name!r} (GET /sdapi/v1/samplers lists them: {known})")
    if schedule is not None and (sampler is not None or schedule.strip().lower() != AUTOMATIC):
        try:
            resolve_schedule_name(schedule, sampler)
        except ValueError as error:
            raise RequestError("scheduler", f"{error} (GET /sdapi/v1/schedulers lists them)") from None
    return sampler, schedule


def _sampler_named(name: str) -> str | None:
    try:
        return resolve_sampler_name(name)
    except ValueError:
        return None


def check_eta(request: GenerationRequest, sampler: str | None) -> None:
    """``eta`` goes to samplers that take it; an ancestral sampler here always has eta 1 (AUTOMATIC1111's
    default); other samplers ignore it, as in AUTOMATIC1111."""
    if request.eta is None or sampler is None:
        return
    info = SAMPLER_INFO[sampler]
    if "eta" in info.options:
        if request.eta < 0:
            raise RequestError("eta", f"must be >= 0, got {request.eta:g}")
    elif info.ancestral and request.eta != 1:
        raise RequestError("eta", f"{info.a1111_name} here always uses eta 1, got {request.eta:g}")


def fixed_seed(name: str, seed: int | None, count: int) -> int:
    """``seed`` (``-1``/``None``: a random 32-bit one, as AUTOMATIC1111 draws) such that ``seed + count - 1``
    is still a seed."""
    if seed is None or seed == RANDOM_SEED:
        return secrets.randbelow(2**32 - 1)
    if seed < 0 or seed + count - 1 > MAX_SEED:
        raise RequestError(name, f"must be -1 (random) or in [0, 2**64 - {count}] for {count} images, got {seed}")
    return seed


def decode_image(text: str, name: str, limits: Limits) -> Image.Image:
    """A base64 image (or ``data:image/...;base64,`` URL) -> a loaded PIL image, its size checked before
    its pixels are decoded. URLs are refused (this server fetches nothing)."""
    if text.startswith(("http://", "https://")):
        raise RequestError(name, "this server does not fetch images from URLs: send the image as base64")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=False)
        image = Image.open(io.BytesIO(data))
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
        raise RequestError(name, "is not a base64-encoded image (PNG, JPEG or WebP)") from None
    limits.check_size(name, *image.size)
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError):
        raise RequestError(name, "is a damaged or truncated image") from None
    return image


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """AUTOMATIC1111's "fill" start for inpainting: the masked pixels replaced by the colours around them,
    smoothed (the kept pixels averaged over coarse to fine grids, each finer one used where it reaches).
    Pixels outside the mask are unchanged."""
    rgb = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)  # [3, H, W]
    repaint = torch.from_numpy(np.asarray(mask.convert("L").resize(image.size), dtype=np.uint8) >= 128)
    keep = (~repaint).float()[None]  # [1, H, W]
    if keep.sum() == 0:
        return image.convert("RGB")
    filled = ((rgb * keep).sum((1, 2)) / keep.sum())[:, None, None].expand_as(rgb).clone()
    for factor in (32, 8, 2, 1):
        weight, colour = _smooth(keep, factor), _smooth(rgb * keep, factor)
        reached = (weight > 1e-3).expand_as(rgb)
        filled[reached] = (colour / weight.clamp_min(1e-3))[reached]
    out = torch.where(repaint[None], filled, rgb)
    return Image.fromarray(out.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def _smooth(planes: torch.Tensor, factor: int) -> torch.Tensor:
    """``planes [C, H, W]`` averaged over ``factor`` x ``factor`` cells, then bilinearly back to ``[C, H, W]``."""
    height, width = planes.shape[-2:]
    small = F.interpolate(planes[None], size=(max(1, height // factor), max(1, width // factor)), mode="area")
    return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)[0]


def _count(name: str, value: int | None) -> int:
    value = 1 if value is None else value
    if value < 1:
        raise RequestError(name, f"must be at least 1, got {value}")
    return value


def _number(name: str, value: float | None, default: float) -> float:
    return default if value is None else float(value)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
