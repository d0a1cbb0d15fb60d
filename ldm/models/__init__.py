"""The networks: cross-attention U-Net, attention backend, CLIP/OpenCLIP text encoders, tokenizer,
and the builder that makes a pipeline's networks from its config.

Models know nothing of files, sampling or training: they import no other room of ``ldm``
(weight formats live in :mod:`ldm.formats`, sampling in :mod:`ldm.sampling`).
"""
