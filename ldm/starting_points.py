"""Where the sampling chain starts, per mode: ``x [B, C, h, w]`` at ``sigmas[0]`` on the sigma scale, the
U-Net function the denoiser calls, and (inpainting with an ordinary model) the per-step put-back.

* txt2img: unit noise from per-image generators (variation seeds, "Resize seed from"), scaled to the
  chain's first sigma, plus the signal leak when the model has one (:meth:`StartingPoints.starting_point`);
* img2img / inpainting: the encoded image noised to the strength's sigma, the mask and the known region,
  or an inpainting U-Net's extra channels (:meth:`StartingPoints.image_start`);
* super-resolution: noise, and a U-Net function that sees the noise-augmented small image
  (:meth:`StartingPoints.upscale_start`).

Every draw follows diffusers' generator order, so with the same generators the pipelines start alike.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ldm.call_arguments import MAX_IMAGES_PER_CALL, check_integer, check_seed
from ldm.image_inputs import ImageCondition, latent_mask
from ldm.sampling.samplers import initial_latents
from ldm.sampling.signal_leak import SignalLeak
from ldm.sampling.variation import Variation
from ldm.sampling_options import SamplingOptions
from ldm.upscaling import LowResAugmentation, LowResCondition


class StartingPoints:
    """The starting points of :class:`ldm.pipeline.Txt2ImgPipeline` (a mixin of it: ``pipe.initial_noise``,
    ``pipe.starting_point``, ... are public).

    Uses the pipeline's ``config``, ``vae``, ``schedule``, ``device``, ``vae_dtype``, ``is_inpainting_model``,
    ``unet_prediction`` and ``sampling_options``.
    """

    def image_start(self, condition: ImageCondition, generators: list[torch.Generator], sigmas: torch.Tensor,
                    options: SamplingOptions, variation: Variation | None = None
                    ) -> tuple[torch.Tensor, Callable, Callable | None]:
        """img2img / inpainting: the starting point, the U-Net function and the per-step put-back.

        Draws from each row's generator in diffusers' order: the image's posterior sample (unless an
        inpainting U-Net starts from pure noise), the noise, then the masked image's posterior sample
        (inpainting U-Nets). Returns ``(x [B, C, h, w] at sigmas[0], model(x, t, context), put_back)``;
        ``put_back(i, x)`` (ordinary models with a mask) replaces the known region after step ``i``
        by the image's latents noised to ``sigmas[i + 1]`` (clean after the last step).
        """
        inpainting_model = self.is_inpainting_model
        if condition.latents is not None:
            image_latents = condition.latents.to(self.device, torch.float32)
        elif not (inpainting_model and condition.starts_from_noise):
            image_latents = self.encode_rows(condition.image.to(self.device, self.vae_dtype), generators)
        else:
            image_latents = None
        noise = self.initial_noise(generators, options.height, options.width, variation, options.seed_resize_from)
        if condition.starts_from_noise:
            x = self.starting_point_from_noise(noise, generators, sigmas, options)
        else:
            x = image_latents + float(sigmas[0]) * noise  # x_sigma = x0 + sigma * eps on the sigma scale
        if condition.mask is None:
            return x, self.unet_prediction, None
        mask = latent_mask(condition.mask, self.vae.downsample_factor).to(self.device)
        if inpainting_model:
            masked_latents = self.encode_rows(condition.masked_image.to(self.device, self.vae_dtype), generators)
            extra = torch.cat([mask.expand(len(generators), -1, -1, -1), masked_latents], dim=1)

            def model(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None):
                # [noisy latents, mask, masked-image latents]: the SD inpainting U-Net's 9 channels
                return self.unet_prediction(torch.cat([x, extra.repeat(x.shape[0] // extra.shape[0], 1, 1, 1)], 1),
                                            t, context, y=y)

            return x, model, None
        last = len(sigmas) - 2

        def put_back(i: int, x: torch.Tensor) -> torch.Tensor:
            if i < last:
                known = image_latents + float(sigmas[i + 1]) * noise
            else:  # clean, on the chain's final scale (DDIM ends at sigma_min > 0: see final_latents)
                known = image_latents * math.sqrt(1 + float(sigmas[-1]) ** 2)
            return (1 - mask) * known + mask * x

        return x, self.unet_prediction, put_back

    def encode_rows(self, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """``images [1 or B, 3, H, W]`` -> one posterior sample per generator, ``[B, C, h, w]`` float32 (scaled).

        Row ``i`` encodes ``images[i]`` (or the one image) with ``generators[i]``, as diffusers does per generator.
        """
        rows = [self.vae.encode_latents(images[i:i + 1] if len(images) > 1 else images, sample=True, generator=g)
                for i, g in enumerate(generators)]
        return torch.cat(rows).float()

    def upscale_start(self, low_res: LowResCondition, generators: list[torch.Generator], sigmas: torch.Tensor,
                      options: SamplingOptions, variation: Variation | None = None
                      ) -> tuple[torch.Tensor, Callable, None]:
        """Super-resolution: the starting point and the U-Net function that sees the small image.

        Draws from each row's generator in diffusers' StableDiffusionUpscalePipeline order: the
        augmentation noise of the small image, then the latents' noise. Returns ``(x [B, C, h, w] at
        sigmas[0], model(x, t, context), None)``; ``model`` concatenates the noise-augmented small image
        ``[B, 3, h, w]`` to the (already input-scaled) latents and passes the noise level as the class label.
        """
        images = low_res.images.to(self.device, torch.float32)
        images = images.expand(len(generators), -1, -1, -1) if len(images) == 1 else images
        noise = torch.cat([torch.randn((1, *images.shape[1:]), generator=g) for g in generators]).to(self.device)
        levels = torch.full((len(generators),), low_res.noise_level, dtype=torch.long, device=self.device)
        augmented = LowResAugmentation(self.config.upscale)(images, noise, levels)
        x = self.starting_point(generators, sigmas, options, variation)

        def model(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            copies = x.shape[0] // augmented.shape[0]  # 2 under classifier-free guidance
            return self.unet_prediction(torch.cat([x, augmented.repeat(copies, 1, 1, 1)], 1), t, context,
                                        class_labels=levels.repeat(copies))

        return x, model, None

    def starting_point(self, generators: list[torch.Generator], sigmas: torch.Tensor, options: SamplingOptions,
                       variation: Variation | None = None) -> torch.Tensor:
        """``x [B, C, h, w]`` at ``sigmas[0]`` on the sigma scale: scaled noise, plus the signal leak if any."""
        noise = self.initial_noise(generators, options.height, options.width, variation, options.seed_resize_from)
        return self.starting_point_from_noise(noise, generators, sigmas, options)

    def starting_point_from_noise(self, noise: torch.Tensor, generators: list[torch.Generator], sigmas: torch.Tensor,
                                  options: SamplingOptions) -> torch.Tensor:
        """Unit ``noise [B, C, h, w]`` -> the txt2img starting point (the leak draws after the noise)."""
        x = initial_latents(noise, sigmas, sampler=options.sampler,
                            timestep_spacing=self.config.schedule.timestep_spacing)
        if options.signal_leak is not None:
            x = x + SignalLeak.from_dict(options.signal_leak).sample(generators).to(x.device)[:, :, None, None]
        return x

    @torch.no_grad()
    def diffusers_latents(self, seed: int = 0, num_images: int = 1, **options) -> torch.Tensor:
        """The ``latents`` argument that makes diffusers' StableDiffusionPipeline start where we do.

        diffusers multiplies given latents by its scheduler's ``init_noise_sigma``; this returns our
        starting point (signal leak included) divided by that same factor, ``[num_images, C, h, w]``.
        ``options`` are :meth:`sampling_options` keywords (``sampler``, ``steps``, ``height``, ...).
        """
        check_integer("num_images", num_images, 1, MAX_IMAGES_PER_CALL)
        check_seed(seed, num_images)
        options = self.sampling_options(**options)
        sigmas = self.schedule.sampling_sigmas(options.steps, sampler=options.sampler, schedule=options.schedule)
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)]
        scale = initial_latents(torch.ones(()), sigmas, sampler=options.sampler,
                                timestep_spacing=self.config.schedule.timestep_spacing)
        return self.starting_point(generators, sigmas, options) / scale

    def initial_noise(self, generators: list[torch.Generator], height: int, width: int,
                      variation: Variation | None = None, seed_resize_from: tuple[int, int] | None = None
                      ) -> torch.Tensor:
        """Unit Gaussian noise ``[B, C, H/f, W/f]``, row ``i`` drawn from ``generators[i]`` on the CPU;
        with a ``variation``, row ``i`` is slerped towards the noise of its variation seed.

        ``seed_resize_from=(height, width)`` (pixels; AUTOMATIC1111's "Resize seed from"): each seed's
        noise is also drawn at that size (and slerped there), then pasted, centred, into its noise at
        this size, so an image keeps much of the composition its seed gave at the old size.
        """
        f = self.vae.downsample_factor
        shape = (self.config.vae.latent_channels, height // f, width // f)
        rows = [torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators]
        old_shape = shape if seed_resize_from is None else (shape[0], seed_resize_from[0] // f,
                                                             seed_resize_from[1] // f)
        if old_shape != shape:
            olds = [torch.randn((1, *old_shape), generator=torch.Generator("cpu").manual_seed(g.initial_seed()),
                                dtype=torch.float32) for g in generators]
            if variation is not None:
                olds = [variation.mix(old, i) for i, old in enumerate(olds)]
            rows = [paste_centred(old, row) for old, row in zip(olds, rows)]
        elif variation is not None:
            rows = [variation.mix(row, i) for i, row in enumerate(rows)]
        return torch.cat(rows).to(self.device)


def paste_centred(old: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    """``old [1, C, h, w]`` pasted into a copy of ``canvas [1, C, H, W]``, centres aligned, cropped where it
    is larger, with the web UI's arithmetic (an odd surplus of ``old`` loses one more row or column)."""
    (old_h, old_w), (new_h, new_w) = old.shape[-2:], canvas.shape[-2:]
    dy, dx = (new_h - old_h) // 2, (new_w - old_w) // 2
    h, w = (old_h if dy >= 0 else old_h + 2 * dy), (old_w if dx >= 0 else old_w + 2 * dx)
    out = canvas.clone()
    out[..., max(dy, 0):max(dy, 0) + h, max(dx, 0):max(dx, 0) + w] = \
        old[..., max(-dy, 0):max(-dy, 0) + h, max(-dx, 0):max(-dx, 0) + w]
    return out
