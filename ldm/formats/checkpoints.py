"""Reading and writing weights: safetensors everywhere, pickles only through ``weights_only``.

A state dict here is a flat ``{name: tensor}``. Our own saved models keep the original
single-file Stable Diffusion key names, grouped under three prefixes:

=========================  ==================
prefix                     component
=========================  ==================
``model.diffusion_model.``  U-Net
``first_stage_model.``      autoencoder (VAE)
``cond_stage_model.``       text encoder
=========================  ==================

Every failure a user can cause (missing file, truncated file, a pickle that tries to run
code, keys that do not fit the model) raises :class:`ldm.errors.CheckpointError` with a
one-line message.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from ldm.errors import CheckpointError

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
COMPONENT_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIX}
# SDXL's text encoders live under sgm's GeneralConditioner; our SDXLTextEncoder names them ``embedders.{i}.*`` too.
SDXL_TEXT_PREFIX = "conditioner."
SDXL_TEXT_KEYS = "embedders."


def component_prefix(name: str, keys: Iterable[str] = ()) -> str:
    """The original prefix of component ``name`` (``"conditioner."`` for an SDXL text encoder's ``keys``)."""
    if name == "text_encoder" and any(key.startswith(SDXL_TEXT_KEYS) for key in keys):
        return SDXL_TEXT_PREFIX
    return COMPONENT_PREFIXES[name]

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def load_state_dict(path: str | Path, *, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a flat state dict from ``.safetensors`` or a weights-only pickle (``.ckpt``/``.pt``).

    Pickles are read with ``torch.load(weights_only=True)``, which refuses to call any
    function while unpickling; a file that tries is reported as unsafe. A ``state_dict``
    entry (as in CompVis ``.ckpt`` files) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"weights file is empty: {path}")
    if path.suffix in SAFETENSORS_SUFFIXES:
        return _load_safetensors(path, device)
    if path.suffix in PICKLE_SUFFIXES:
        return _load_weights_only_pickle(path, device)
    raise CheckpointError(f"unsupported weights file type {path.suffix!r}: {path} (use .safetensors or .ckpt)")


def _load_safetensors(path: Path, device: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"corrupt or truncated safetensors file {path}: {_first_line(error)}") from None


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file; ``{}`` when it has none or is missing or unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return {}


def _load_weights_only_pickle(path: Path, device: str) -> dict[str, torch.Tensor]:
    try:
        data = _torch_load_weights_only(path, device)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):
            raise CheckpointError(
                f"refusing to load {path}: it is not a plain weights file "
                f"(unpickling would call code: {_unsafe_reason(error)})"
            ) from None
        raise CheckpointError(f"corrupt checkpoint {path}: not a readable PyTorch weights file") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"corrupt or truncated checkpoint {path}: {_first_line(error)}") from None
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path} does not hold a flat mapping of tensor names to tensors")
    return dict(data)


def _torch_load_weights_only(path: Path, device: str):
    """``torch.load(weights_only=True)``, memory-mapped when the file is a zip archive of uncompressed
    records (no private copy). torch's memory-mapped reader takes each record's bytes as stored, so a
    deflate-compressed archive (re-zipped by some tool) is read without ``mmap``: torch inflates it then."""
    return torch.load(str(path), map_location=device, weights_only=True, mmap=_is_plain_zip(path))


def _is_plain_zip(path: Path) -> bool:
    """Whether ``path`` is a zip archive (``torch.save``'s format) whose records are all stored uncompressed.

    ``False`` for a legacy (non-zip) pickle, a deflated archive and an archive too broken for
    :mod:`zipfile` (``torch.load`` then reports it).

    Raises:
        CheckpointError: records compressed with another method than deflate (torch cannot read them).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            methods = {info.compress_type for info in archive.infolist()}
    except (zipfile.BadZipFile, OSError):
        return False
    unreadable = sorted(methods - {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
    if unreadable:
        raise CheckpointError(f"cannot read {path}: its zip records are compressed with method {unreadable[0]} "
                              "(PyTorch reads only stored or deflated records); re-save it with torch.save")
    return methods <= {zipfile.ZIP_STORED}


def _unsafe_reason(error: BaseException) -> str:
    """The callable a weights-only refusal names, e.g. ``GLOBAL posix.system``."""
    match = re.search(r"GLOBAL \S+", str(error))
    return match.group(0) if match else _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` to ``path`` so that a crash never leaves a half-written file (see :func:`atomic_file`)."""
    from safetensors.torch import save_file

    contiguous = {name: t.detach().contiguous() for name, t in tensors.items()}
    with atomic_file(path) as temporary:
        save_file(contiguous, str(temporary), metadata=dict(metadata) if metadata else None)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file name beside ``path``; on a clean exit the file written there is flushed
    to disk and renamed over ``path`` (``os.replace`` is atomic on POSIX and Windows), on an error it is
    removed. Temporaries that a killed process left for ``path`` are removed first
    (:func:`remove_stale_temporaries`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    handle, temp_name = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temp_name)
        with open(temp_name, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temp_name, 0o666 & ~_umask())  # mkstemp makes files private; use the usual permissions
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _temporary_prefix(path: Path) -> str:
    """Hidden temporaries beside ``path`` carry the writer's process id: ``.NAME.PID-random.tmp`` (``.old``)."""
    return f".{path.name}.{os.getpid()}-"


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove what killed writers of ``path`` left beside it; returns the paths removed or restored.

    A temporary (``.NAME.PID-random.tmp``, file or folder) of a process that no longer runs is deleted;
    so is a set-aside old version (``.NAME.PID-random.old``) when ``path`` exists. When ``path`` is missing
    (the writer was killed between moving the old version aside and moving the new one in), the old
    version is moved back to ``path`` instead: nothing the user had is lost. Temporaries of running
    processes (a concurrent writer) are left alone.
    """
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)-[a-z0-9_]+\.(tmp|old)$")
    if not path.parent.is_dir():
        return []
    touched = []
    for entry in sorted(path.parent.iterdir(), key=lambda p: p.name.endswith(".tmp")):  # .old first
        match = pattern.match(entry.name)
        if match is None or _process_running(int(match.group(1))):
            continue
        previous = entry / "previous"
        if match.group(2) == "old" and not path.exists() and previous.exists():
            os.replace(previous, path)
            logger.warning("restored %s from %s (a write of it was killed)", path, entry.name)
        _remove_path(entry)
        touched.append(entry)
    return touched


def _process_running(pid: int) -> bool:
    """Whether process ``pid`` runs (``True`` when unknowable, e.g. off POSIX: its files are then kept)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def split_components(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split an original-layout state dict into ``{"unet": ..., "vae": ..., "text_encoder": ...}``.

    Keys lose their component prefix (SDXL's ``conditioner.``: its text encoders become ``embedders.{i}.*``).
    Keys under no known prefix are returned under ``"other"``
    (e.g. ``model_ema.*``, ``betas``, ``alphas_cumprod`` in CompVis checkpoints).
    """
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in (*COMPONENT_PREFIXES, "other")}
    prefixes = [*COMPONENT_PREFIXES.items(), ("text_encoder", SDXL_TEXT_PREFIX)]  # SDXL: conditioner.embedders.*
    for key, tensor in state_dict.items():
        for name, prefix in prefixes:
            if key.startswith(prefix):
                parts[name][key[len(prefix):]] = tensor
                break
        else:
            parts["other"][key] = tensor
    return parts


def join_components(parts: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_components` for the three model components."""
    joined = {}
    for name in COMPONENT_PREFIXES:
        prefix = component_prefix(name, parts.get(name, {}))
        joined.update({prefix + key: tensor for key, tensor in parts.get(name, {}).items()})
    return joined


def load_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str, assign: bool = False) -> None:
    """Load ``state_dict`` into ``module`` strictly; any mismatch is a one-line error naming keys.

    With ``assign=True`` the module's parameters become the given tensors (no copy; works on a
    module built on the meta device), otherwise values are copied into the existing tensors.

    Raises:
        CheckpointError: on missing keys, unexpected keys or shape mismatches (the first few
            of each are named, with counts).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            shown = ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{what} weights do not fit the model ({'; '.join(problems)})")
    module.load_state_dict(state_dict, strict=True, assign=assign)


class atomic_folder:
    """Context manager that builds a folder beside ``path`` and moves it into place on success.

    Inside the ``with`` block, write into the yielded temporary folder. On a clean exit it
    replaces ``path`` (an existing folder there is moved aside first, then deleted); on an
    error the temporary folder is removed and ``path`` is left untouched.

    A non-empty existing folder is only replaced when it holds one of ``model_markers``
    (i.e. it is a saved model); anything else is refused, so user files are never deleted.
    Markdown files at the top of the replaced folder (a model card, notes) that the new save did
    not write are carried over into it. Temporaries are named ``.NAME.PID-random.tmp``; those of
    killed writers are removed on entry (:func:`remove_stale_temporaries`).
    """

    def __init__(self, path: str | Path, model_markers: tuple[str, ...] = ("config.yaml", "model_index.json")) -> None:
        self.path = Path(path)
        self.model_markers = model_markers

    def __enter__(self) -> Path:
        if self.path.exists():
            if not self.path.is_dir():
                raise CheckpointError(f"cannot save to {self.path}: it is a file")
            is_model = any((self.path / marker).exists() for marker in self.model_markers)
            if any(self.path.iterdir()) and not is_model:
                raise CheckpointError(f"cannot save to {self.path}: folder exists and is not a saved model")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)
        self.temp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(self.path), suffix=".tmp", dir=self.path.parent))
        return self.temp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.temp, ignore_errors=True)
            return
        os.chmod(self.temp, 0o777 & ~_umask())  # mkdtemp makes folders private; use the usual permissions
        if self.path.exists():
            for document in self.path.glob("*.md"):
                if document.is_file() and not (self.temp / document.name).exists():
                    shutil.copy2(document, self.temp / document.name)
            old = Path(tempfile.mkdtemp(prefix=_temporary_prefix(self.path), suffix=".old", dir=self.path.parent))
            os.replace(self.path, old / "previous")
            os.replace(self.temp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.temp, self.path)


def check_unet_channels(unet, vae, source: str) -> None:
    """Refuse U-Nets this package cannot drive: text-to-image (latent channels in and out) and SD
    inpainting (latents + mask + masked-image latents in: ``2 * C + 1``) are the two it runs.

    Depth (C + 1), pix2pix (2 * C) and the x4 upscaler (C + 3) have other inputs; they are named in
    the error so that the user knows why.
    """
    latent = vae.latent_channels
    if unet.out_channels == latent and unet.in_channels in (latent, 2 * latent + 1):
        return
    known = {latent + 1: "a depth-to-image model", 2 * latent: "an instruct-pix2pix model",
             latent + 3: "an x4 upscaler"}
    kind = known.get(unet.in_channels, "not a text-to-image or inpainting model")
    raise CheckpointError(
        f"{source}: the U-Net maps {unet.in_channels} to {unet.out_channels} channels with {latent}-channel "
        f"latents ({kind}): only text-to-image and inpainting models are supported"
    )
