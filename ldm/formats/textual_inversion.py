"""Textual-inversion embeddings (Gal et al. 2022): learned token vectors, read from the files people share.

Three layouts are read (each one or more vectors ``[n, D]`` for one trigger word):

* AUTOMATIC1111 ``.pt``: a pickled dict whose ``string_to_param["*"]`` holds the vectors (plus
  ``name``, ``step``, ...); read only through ``torch.load(weights_only=True)``, so a file that would
  run code while unpickling is refused.
* AUTOMATIC1111 ``.safetensors``: ``{"emb_params": [n, D]}``.
* diffusers ``learned_embeds.bin`` / ``.safetensors``: ``{token: [D] or [n, D]}`` (one entry).

The trigger word is the ``token`` asked for, else the diffusers file's own token, else the file's
stem (as the web UI names embeddings after their files). Using the vectors is the text encoder's
business (:meth:`ldm.models.text_encoders._TextEncoderBase.add_embedding`); this module only reads.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ldm.errors import CheckpointError
from ldm.formats import checkpoints

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")


@dataclass(frozen=True)
class Embedding:
    """One textual-inversion embedding: its trigger word and its vectors ``[n, D]`` (float32)."""

    token: str
    vectors: Tensor


def read_embedding(path: str | Path, token: str | None = None) -> Embedding:
    """Read one embedding file (any layout above). ``CheckpointError`` with a one-line message for a
    missing, corrupt, unsafe or unrecognised file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"embedding file not found: {path}")
    if path.suffix not in EMBEDDING_SUFFIXES:
        raise CheckpointError(f"{path} is not an embedding file (expected {', '.join(EMBEDDING_SUFFIXES)})")
    data = checkpoints.load_state_dict(path) if path.suffix == ".safetensors" else _read_pickle(path)
    file_token, vectors = _vectors_and_token(data, path)
    if vectors.ndim not in (1, 2) or vectors.numel() == 0:
        raise CheckpointError(f"{path}: expected embedding vectors [n, width], got shape {tuple(vectors.shape)}")
    return Embedding(token or file_token or path.stem, vectors.detach().float().reshape(-1, vectors.shape[-1]))


def read_embeddings_folder(folder: str | Path) -> list[Embedding]:
    """Every embedding file in ``folder`` (not its sub-folders), each triggered by its stem, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"embeddings folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in EMBEDDING_SUFFIXES)
    return [read_embedding(p, p.stem) for p in files]


def _read_pickle(path: Path) -> Any:
    """A ``.pt``/``.bin`` file through ``torch.load(weights_only=True)`` (no code runs while unpickling)."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):
            raise CheckpointError(f"refusing to load {path}: it is not a plain embedding file "
                                  "(unpickling would call code)") from None
        raise CheckpointError(f"corrupt embedding file {path}: not a readable PyTorch file") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"corrupt or truncated embedding file {path}: {first_line}") from None


def _vectors_and_token(data: Any, path: Path) -> tuple[str | None, Tensor]:
    """``(token the file names or None, vectors)`` from a loaded file of any of the three layouts."""
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path} is not an embedding file (it holds a {type(data).__name__})")
    if "string_to_param" in data:  # AUTOMATIC1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or not params:
            raise CheckpointError(f"{path}: string_to_param holds no vectors")
        return None, _tensor(next(iter(params.values())), path)
    if "emb_params" in data:  # AUTOMATIC1111 .safetensors
        return None, _tensor(data["emb_params"], path)
    if {"clip_l", "clip_g"} <= set(data):
        raise CheckpointError(f"{path} is an SDXL embedding (clip_l and clip_g vectors): it needs an SDXL model")
    tensors = {key: value for key, value in data.items() if isinstance(value, Tensor)}
    if len(tensors) == 1:  # diffusers learned_embeds: {token: vectors}
        token, vectors = next(iter(tensors.items()))
        return token, vectors
    raise CheckpointError(f"{path} is not a textual-inversion embedding (expected string_to_param, emb_params "
                          f"or one token's vectors; found keys {sorted(map(str, data))[:5]})")


def _tensor(value: Any, path: Path) -> Tensor:
    if not isinstance(value, Tensor):
        raise CheckpointError(f"{path}: the embedding vectors are a {type(value).__name__}, not a tensor")
    return value
