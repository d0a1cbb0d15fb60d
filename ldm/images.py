"""Saving generated images: numbered files that never overwrite and never appear half-written,
grids, and PNG parameters.

The generation parameters go into a PNG text chunk named ``parameters`` in the format of the
AUTOMATIC1111 web UI, which many tools read back (prompt, then ``Negative prompt: ...``, then
a line of ``Key: value`` pairs).
"""

from __future__ import annotations

import errno
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.sampling.registry import SAMPLER_INFO, SCHEDULE_LABELS


def a1111_parameters(
    prompt: str,
    negative_prompt: str,
    *,
    steps: int,
    sampler: str,
    guidance_scale: float,
    seed: int,
    width: int,
    height: int,
    karras: bool = False,
    extra: dict[str, Any] | None = None,
    schedule: str | None = None,
) -> str:
    """The ``parameters`` text AUTOMATIC1111 writes for one image.

    ``schedule`` (a name of :data:`ldm.sampling.registry.SCHEDULE_LABELS`) is written as the web UI's
    label ("Schedule type: Karras"). The web UI's "Automatic" means the sampler's own preference
    (Karras for DPM++ 2M), so our ``"default"`` chain, which is none of its schedule types, is not
    written as "Automatic": the field is left out. Without ``schedule``, ``karras`` picks "Karras" or
    "Automatic" (callers that predate schedule types).
    """
    if schedule is None:
        schedule_label = "Karras" if karras else "Automatic"
    else:
        schedule_label = SCHEDULE_LABELS[schedule]
    fields = {
        "Steps": steps,
        "Sampler": SAMPLER_INFO[sampler].a1111_name if sampler in SAMPLER_INFO else sampler,
        "Schedule type": schedule_label,
        "CFG scale": f"{guidance_scale:g}",
        "Seed": seed,
        "Size": f"{width}x{height}",
    }
    fields.update(extra or {})
    fields = {key: value for key, value in fields.items() if value is not None}
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def _quote(value: Any) -> str:
    text = str(value)
    return f'"{text}"' if any(c in text for c in ',:"') else text


def read_a1111_parameters(text: str) -> dict[str, str]:
    """Parse the last line of a ``parameters`` text back into ``{key: value}`` (plus prompt fields)."""
    lines = text.split("\n")
    result: dict[str, str] = {}
    settings = lines[-1]
    for match in re.finditer(r'\s*([\w ]+):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)', settings):
        key, value = match.group(1).strip(), match.group(2).strip()
        result[key] = value[1:-1] if value.startswith('"') else value
    body = lines[:-1]
    negative = [i for i, line in enumerate(body) if line.startswith("Negative prompt: ")]
    if negative:
        result["Prompt"] = "\n".join(body[: negative[0]])
        result["Negative prompt"] = "\n".join(body[negative[0]:])[len("Negative prompt: "):]
    else:
        result["Prompt"] = "\n".join(body)
    return result


_NUMBERED = re.compile(r"^(\d{5})-")


def next_index(folder: Path) -> int:
    """One past the largest ``NNNNN-`` file number in ``folder`` (0 for an empty folder)."""
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def save_new_png(image: Image.Image, folder: Path, stem_suffix: str, parameters: str | None = None) -> Path:
    """Save ``image`` as ``folder/NNNNN-<stem_suffix>.png`` under a number no file uses yet.

    Never overwrites, and never leaves a partial PNG under a numbered name: the image is written to a
    hidden temporary file in ``folder`` (:func:`temporary_name`), flushed to disk, then hard-linked to
    the first free number (a link fails on an existing name, so even a concurrent run never overwrites
    one) and the temporary removed. A run killed mid-write leaves only the temporary, which the next
    call removes (:func:`remove_stale_temporaries`). Raises ``OSError`` when ``folder`` cannot be written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    index = next_index(folder)
    temporary = folder / temporary_name(f"{index:05d}-{stem_suffix}.png")
    try:
        _write_png(image, temporary, parameters)
        path = _link_to_new_number(temporary, folder, stem_suffix, index)
    finally:
        temporary.unlink(missing_ok=True)
    _sync_folder(folder)
    return path


_TEMPORARY = re.compile(r"^\.\d{5}-.*\.png\.tmp-(\d+)$")
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}  # os.link errors of such file systems
_PROCESS_STARTED = time.time()  # when this module loaded: temporaries older than this are not being written by us


def temporary_name(final_name: str, pid: int | None = None) -> str:
    """``.<final name>.tmp-<pid>``: hidden, never matched by :func:`next_index`, and owned by process ``pid``."""
    return f".{final_name}.tmp-{os.getpid() if pid is None else pid}"


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries (:func:`temporary_name`) that runs killed mid-write left in ``folder``; return them.

    A temporary is stale when it is older than this process and the process named in it is gone (or
    is this process, which did not exist when the file was written: the pid of a killed run reused),
    so the temporaries of runs still writing, here or on another machine sharing the folder, stay.
    Other files are never touched.
    """
    removed = []
    for path in folder.iterdir():
        match = _TEMPORARY.match(path.name)
        if match is None:
            continue
        pid = int(match.group(1))
        try:
            if path.stat().st_mtime < _PROCESS_STARTED and (pid == os.getpid() or not _process_alive(pid)):
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # another run removed it first
            continue
    return removed


def _process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (``True`` when that cannot be told: keep its file)."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: it exists but is another user's
        return True
    return True


def _write_png(image: Image.Image, path: Path, parameters: str | None) -> None:
    """Write ``image`` (with the ``parameters`` text chunk) to a new file ``path`` and flush it to disk."""
    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    with open(path, "xb") as handle:
        image.save(handle, format="PNG", pnginfo=info)
        handle.flush()
        os.fsync(handle.fileno())


def _link_to_new_number(temporary: Path, folder: Path, stem_suffix: str, index: int) -> Path:
    """Hard-link the complete ``temporary`` to ``folder/NNNNN-<stem_suffix>.png``, from number ``index`` up
    to the first free one; return that path. The temporary stays (the caller removes it).

    On file systems without hard links (FAT, some network shares) the name is reserved by creating
    it empty in exclusive mode and the temporary then renamed over that placeholder: still no
    overwrite, and a kill can only leave an empty file there, in the instant between the two calls.
    """
    while True:
        path = folder / f"{index:05d}-{stem_suffix}.png"
        try:
            try:
                os.link(temporary, path)
            except OSError as error:
                if isinstance(error, FileExistsError) or error.errno not in _NO_HARD_LINKS:
                    raise
                open(path, "xb").close()  # reserve the name, then move the complete file onto it
                os.replace(temporary, path)
            return path
        except FileExistsError:
            index += 1


def _sync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries (the new name) to disk where the system allows it (not on Windows)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems cannot sync a folder; the file itself is synced
        pass
    finally:
        os.close(descriptor)


def make_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile same-sized images row by row into one image (``columns`` defaults to ~sqrt(n))."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid
