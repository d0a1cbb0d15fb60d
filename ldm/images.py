"""Saving generated images: numbered files that never overwrite, grids, and PNG parameters.

The generation parameters go into a PNG text chunk named ``parameters`` in the format of the
AUTOMATIC1111 web UI, which many tools read back (prompt, then ``Negative prompt: ...``, then
a line of ``Key: value`` pairs).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.sampling.registry import SAMPLER_INFO

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
) -> str:
    """The ``parameters`` text AUTOMATIC1111 writes for one image."""
    fields = {
        "Steps": steps,
        "Sampler": SAMPLER_INFO[sampler].a1111_name if sampler in SAMPLER_INFO else sampler,
        "Schedule type": "Karras" if karras else "Automatic",
        "CFG scale": f"{guidance_scale:g}",
        "Seed": seed,
        "Size": f"{width}x{height}",
    }
    fields.update(extra or {})
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

    Files are opened in exclusive-create mode, so even a concurrent run never overwrites one.
    """
    folder.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    index = next_index(folder)
    while True:
        path = folder / f"{index:05d}-{stem_suffix}.png"
        try:
            with open(path, "xb") as handle:
                image.save(handle, format="PNG", pnginfo=info)
            return path
        except FileExistsError:
            index += 1


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
