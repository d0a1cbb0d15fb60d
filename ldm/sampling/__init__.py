"""Sampling: noise schedule (betas -> sigmas, timestep spacing), the denoiser ``D(x, sigma) -> x0``
and classifier-free guidance, the sampler functions and their registry, signal-leak starts.

Independent of any network: a denoiser is any callable ``(x, sigma) -> x0``.
"""
