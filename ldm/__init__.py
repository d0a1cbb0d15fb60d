"""ldm: a readable latent diffusion (Stable Diffusion 1.x/2.x compatible) package."""
