"""Training: the run config and loop behind ``scripts/train.py`` (full fine-tuning and LoRA),
the DDPM objective, EMA, image/caption data with buckets and latent caching, and resumable run
state (numbered checkpoints, RNG, learning-rate schedule).

Nothing in the library imports training; the commands in :mod:`ldm.cli` do.
"""
