"""Request and response bodies, with AUTOMATIC1111's field names (its ``modules/api/models.py``, which
builds them from ``StableDiffusionProcessingTxt2Img`` / ``...Img2Img`` in ``modules/processing.py``).

Every field AUTOMATIC1111 takes is accepted, ``null`` meaning its default as there. A field this
package cannot honour is refused (422, naming it) unless it holds the value with which AUTOMATIC1111
itself does nothing (:mod:`ldm.server.generation` checks that); a field AUTOMATIC1111 does not know is
refused too. Four defaults differ on purpose: ``steps``, ``cfg_scale``, ``width`` and ``height`` left
out take the loaded model's own values (AUTOMATIC1111: 50, 7, 512, 512, which suit SD 1.5 only).
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    # extra="forbid": a misspelt field is a 422 naming it, never silently dropped.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())


class GenerationRequest(_Request):
    """The fields txt2img and img2img share (``StableDiffusionProcessing`` and the API's additions)."""

    prompt: Optional[str] = ""
    negative_prompt: Optional[str] = ""
    styles: Optional[list[str]] = None
    seed: Optional[int] = -1
    subseed: Optional[int] = -1
    subseed_strength: Optional[float] = 0
    seed_resize_from_h: Optional[int] = -1
    seed_resize_from_w: Optional[int] = -1
    seed_enable_extras: Optional[bool] = True
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = "Euler"
    scheduler: Optional[str] = None
    batch_size: Optional[int] = 1
    n_iter: Optional[int] = 1
    steps: Optional[int] = Field(default=None, description="default: the model's (AUTOMATIC1111: 50)")
    cfg_scale: Optional[float] = Field(default=None, description="default: the model's (AUTOMATIC1111: 7)")
    width: Optional[int] = Field(default=None, description="default: the model's (AUTOMATIC1111: 512)")
    height: Optional[int] = Field(default=None, description="default: the model's (AUTOMATIC1111: 512)")
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: Optional[bool] = False
    do_not_save_grid: Optional[bool] = False
    eta: Optional[float] = None
    denoising_strength: Optional[float] = 0.75
    s_min_uncond: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmax: Optional[float] = None
    s_tmin: Optional[float] = None
    s_noise: Optional[float] = None
    override_settings: Optional[dict[str, Any]] = None
    override_settings_restore_afterwards: Optional[bool] = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    disable_extra_networks: Optional[bool] = False
    firstpass_image: Optional[str] = None
    comments: Optional[dict[str, Any]] = None
    script_name: Optional[str] = None
    script_args: Optional[list] = []
    send_images: Optional[bool] = True
    save_images: Optional[bool] = False
    alwayson_scripts: Optional[dict[str, Any]] = {}
    force_task_id: Optional[str] = None
    infotext: Optional[str] = None


class Txt2ImgRequest(GenerationRequest):
    """``POST /sdapi/v1/txt2img`` (``StableDiffusionProcessingTxt2Img``)."""

    enable_hr: Optional[bool] = False
    firstphase_width: Optional[int] = 0
    firstphase_height: Optional[int] = 0
    hr_scale: Optional[float] = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: Optional[int] = 0
    hr_resize_x: Optional[int] = 0
    hr_resize_y: Optional[int] = 0
    hr_checkpoint_name: Optional[str] = None
    hr_additional_modules: Optional[list] = None
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: Optional[str] = ""
    hr_negative_prompt: Optional[str] = ""


class Img2ImgRequest(GenerationRequest):
    """``POST /sdapi/v1/img2img`` (``StableDiffusionProcessingImg2Img``): images as base64 (or data URLs)."""

    init_images: Optional[list[str]] = None
    resize_mode: Optional[int] = 0
    image_cfg_scale: Optional[float] = None
    mask: Optional[str] = None
    mask_blur_x: Optional[int] = 4
    mask_blur_y: Optional[int] = 4
    mask_blur: Optional[int] = None
    mask_round: Optional[bool] = True
    inpainting_fill: Optional[int] = 0
    inpaint_full_res: Optional[bool] = True
    inpaint_full_res_padding: Optional[int] = 0
    inpainting_mask_invert: Optional[int] = 0
    initial_noise_multiplier: Optional[float] = None
    latent_mask: Optional[str] = None
    include_init_images: Optional[bool] = False


class GenerationResponse(BaseModel):
    """txt2img and img2img answer alike: base64 PNGs, the request's fields, and ``info`` (a JSON string)."""

    images: Optional[list[str]] = None
    parameters: dict
    info: str


class PNGInfoRequest(_Request):
    image: str


class PNGInfoResponse(BaseModel):
    info: str
    items: dict
    parameters: dict


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict
    current_image: Optional[str] = None
    textinfo: Optional[str] = None


class TaskProgressRequest(_Request):
    """``POST /internal/progress``: one job's progress, named by the ``force_task_id`` it was sent with."""

    id_task: str
    id_live_preview: int = -1
    live_preview: bool = True


class TaskProgressResponse(BaseModel):
    active: bool
    queued: bool
    completed: bool
    progress: Optional[float] = None
    eta: Optional[float] = None
    live_preview: Optional[str] = None
    id_live_preview: Optional[int] = None
    textinfo: Optional[str] = None
    queue_position: Optional[int] = Field(default=None, description="jobs ahead of this one (0: next)")


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: Optional[list[str]] = None
    default_rho: Optional[float] = None
    need_inner_model: Optional[bool] = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: Optional[str] = None
    sha256: Optional[str] = None
    filename: str
    config: Optional[str] = None


class ScriptsList(BaseModel):
    txt2img: list = []
    img2img: list = []
