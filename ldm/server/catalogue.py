"""The models a request may name: the one the server started with and those found in the models folder.

A request names a model by its title (AUTOMATIC1111's ``sd_model_checkpoint``), and only a title in
this list resolves: no path is ever built from request text, so ``../`` or an absolute path from a
client finds nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ldm.server.limits import RequestError

DEFAULT_TITLE = "default"  # the model that ships inside the package
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
MODEL_FOLDER_MARKERS = ("config.yaml", "model_index.json")  # this package's folder format, diffusers'


@dataclass(frozen=True)
class ModelEntry:
    """One loadable model: ``title`` (what requests name) and where it lies (``None``: the shipped one)."""

    title: str
    path: Path | None

    @property
    def model_name(self) -> str:
        """The title without its file extension (AUTOMATIC1111 accepts either)."""
        return self.title[: -len(Path(self.title).suffix)] if Path(self.title).suffix in CHECKPOINT_SUFFIXES \
            else self.title


def is_model_folder(folder: Path) -> bool:
    return any((folder / marker).is_file() for marker in MODEL_FOLDER_MARKERS)


def scan_models_dir(models_dir: Path) -> list[ModelEntry]:
    """Model folders (ours or diffusers) and single files (``.safetensors``/``.ckpt``) under ``models_dir``,
    titled by their path relative to it (``sub/model.safetensors``), sorted by title."""
    entries = []
    for root, folders, files in os.walk(models_dir, followlinks=False):
        here = Path(root)
        if here != models_dir and is_model_folder(here):
            entries.append(ModelEntry(here.relative_to(models_dir).as_posix(), here))
            folders[:] = []  # its parts are not models of their own
            continue
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        entries.extend(ModelEntry((here / name).relative_to(models_dir).as_posix(), here / name)
                       for name in files if name.endswith(CHECKPOINT_SUFFIXES))
    return sorted(entries, key=lambda entry: entry.title)


class Catalogue:
    """The start-up model plus the models folder's contents (:meth:`refresh` rescans it)."""

    def __init__(self, models_dir: Path | None, initial: Path | None) -> None:
        self.models_dir = models_dir
        self.initial = ModelEntry(initial.name if initial is not None else DEFAULT_TITLE, initial)
        self._entries: list[ModelEntry] = []
        self.refresh()

    def refresh(self) -> None:
        found = scan_models_dir(self.models_dir) if self.models_dir is not None else []
        initial_path = self.initial.path.resolve() if self.initial.path is not None else None
        self._entries = [self.initial] + [entry for entry in found if entry.path.resolve() != initial_path]

    def entries(self) -> list[ModelEntry]:
        return list(self._entries)

    def resolve(self, name: str, field: str) -> ModelEntry:
        """The entry whose title (or title without extension, or with AUTOMATIC1111's `` [hash]``
        suffix) is ``name``; :class:`RequestError` naming ``field`` otherwise."""
        wanted = name.rsplit(" [", 1)[0] if name.endswith("]") else name
        for entry in self._entries:
            if wanted in (entry.title, entry.model_name):
                return entry
        titles = ", ".join(entry.title for entry in self._entries)
        raise RequestError(field, f"no model {name!r} on this server (choose from {titles}; "
                                  "GET /sdapi/v1/sd-models lists them)")
