"""autoencoder: the KL-regularised image autoencoder that maps images to latents.

Public API:
    AutoencoderConfig   hyper-parameters (CompVis ``ddconfig`` reader: ``ldm.formats.compvis.vae_config_from_compvis``)
    AutoencoderKL       ``encode``/``decode`` (raw latents), ``encode_latents``/``decode_latents``
                        (``z = latent * scaling_factor``), ``forward`` -> (reconstruction, posterior)
    DiagonalGaussian    the encoder's posterior: ``mean``, ``logvar``, ``std``, ``sample``, ``mode``, ``kl``
    Encoder, Decoder    the two halves (parameter names equal SD's ``first_stage_model.*`` keys)
"""

from autoencoder.model import AutoencoderConfig, AutoencoderKL, Decoder, DiagonalGaussian, Encoder

__all__ = ["AutoencoderConfig", "AutoencoderKL", "Decoder", "DiagonalGaussian", "Encoder"]
