"""SDXL's guidance inputs for the pipeline: one batch's text contexts and the U-Net's vector conditioning
(pooled text embedding + micro-conditioning, :mod:`ldm.models.sdxl_conditioning`), and a call's
micro-conditioning arguments checked. Other models' contexts come from
:meth:`ldm.pipeline.Txt2ImgPipeline.conditioning`.
"""

from __future__ import annotations

import torch

from ldm.config import PipelineConfig
from ldm.errors import ArgumentError
from ldm.models.prompt_encoding import encode_prompts
from ldm.models.sdxl_conditioning import MicroConditioning, conditioning_vector, micro_conditioning_count
from ldm.prompt_syntax import prompt_schedule
from ldm.sampling_options import SamplingOptions


def micro_conditioning_options(config: PipelineConfig, original_size, crop_top_left, target_size) -> dict:
    """The ``_generate`` keyword of SDXL's micro-conditioning, checked (``{}`` for other models)."""
    if not config.is_sdxl:
        if original_size is not None or target_size is not None or crop_top_left not in ((0, 0), [0, 0]):
            raise ArgumentError("original_size, crop_top_left and target_size are for SDXL models")
        return {}
    try:
        return {"micro": MicroConditioning(original_size, crop_top_left, target_size)}
    except ValueError as error:
        raise ArgumentError(str(error)) from None


@torch.no_grad()
def sdxl_guidance_inputs(text_encoder, config: PipelineConfig, prompts: list[str], negatives: list[str] | None,
                         options: SamplingOptions, micro: MicroConditioning, dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """SDXL's guidance inputs of one batch: ``(cond [B, chunks * L, D], uncond or None, y)`` in ``dtype``, with
    ``y`` the U-Net's vectors for one denoiser call, ``[uncond; cond]`` rows ``[2B, adm_in_channels]`` under
    guidance, else ``[B, adm_in_channels]`` (pooled text embedding + micro-conditioning). An empty
    negative prompt is zero conditioning when the model says so (``force_zeros_for_empty_prompt``)."""
    texts = prompts + (negatives or [])
    if any(len(prompt_schedule(text, options.steps)) > 1 for text in texts):
        raise ArgumentError("prompt editing [a:b:when] and alternation [a|b] are not supported for SDXL models yet")
    contexts, pooled = encode_prompts(text_encoder, texts, clip_skip=options.clip_skip, pooled=True)
    count, settings = len(prompts), config.sdxl
    if negatives and settings.force_zeros_for_empty_prompt:  # per row, so batching never changes an image
        for row in [count + i for i, text in enumerate(negatives) if text == ""]:
            contexts[row], pooled[row] = 0, 0
    numbers = micro_conditioning_count(config.unet, text_encoder.pooled_dim)
    cond_ids = micro.time_ids(options.height, options.width, numbers, settings.aesthetic_score)
    y = conditioning_vector(pooled[:count], cond_ids)
    if negatives:
        uncond_ids = micro.time_ids(options.height, options.width, numbers, settings.negative_aesthetic_score)
        y = torch.cat([conditioning_vector(pooled[count:], uncond_ids), y])
    contexts = contexts.to(dtype)
    return contexts[:count], (contexts[count:] if negatives else None), y.to(dtype)
