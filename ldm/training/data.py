"""Training data: image/caption datasets, robust decoding, transforms, aspect-ratio buckets, latent caching.

Sources (:func:`load_image_caption_dataset`), read through the ``datasets`` library (imported
lazily: inference code never loads it):

* a local folder in the ``imagefolder`` convention: images plus ``metadata.jsonl`` or
  ``metadata.csv`` with a ``file_name`` column and a caption column (default ``text``);
* a folder of images with same-named ``.txt`` captions (``cat.png`` + ``cat.txt``);
* a Hugging Face hub dataset id such as ``"lambdalabs/naruto-blip-captions"`` (needs a network).

:class:`ImageCaptionDataset` checks every image once up front and never crashes a run on bad
data: unreadable or corrupt images and tiny images are skipped, non-RGB images (grayscale,
palette, RGBA composited on white, 16-bit) are converted, huge images are reduced before the
final resize, and missing captions become ``""``. What happened is counted in a
:class:`DataReport` (``dataset.report.summary()`` is one log line).

Aspect-ratio bucketing (as in NovelAI's and kohya-ss's trainers): :func:`make_buckets` lists
sizes of about ``resolution**2`` pixels whose sides are multiples of ``step``; each image goes to
the bucket of nearest aspect ratio (:func:`nearest_bucket`) and is resized to cover it, then
cropped. :class:`BucketBatchSampler` yields batches drawn from one bucket at a time,
deterministic for a seed and resumable from ``(epoch, batch_index)``.

:func:`cache_latents` encodes every image once with the VAE and stores the latents with the
captions in one safetensors file, reused while the dataset, transforms and VAE are unchanged.

Randomness (random crop, flip) is a pure function of ``(seed, epoch, index)``, so results do not
depend on DataLoader workers, and a resumed run sees the same augmentations.

Every sample also says how it was made, as SDXL's size conditioning needs it (Podell et al. 2023, sec. 2.2):
``original_size`` = the image's ``(height, width)`` before resizing (after EXIF orientation) and
``crop_top_left`` = ``(top, left)`` of the crop in the resized image (mirrored with the image when flipped,
so it is the crop of the image the model sees); the target size is the sample's own size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import safe_open

from ldm.errors import ConfigError
from ldm.formats import checkpoints

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_EXIF_ORIENTATION = 0x0112
_MAX_EXAMPLES = 20



# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def load_image_caption_dataset(
    source: str | Path,
    *,
    image_column: str = "image",
    caption_column: str = "text",
    split: str = "train",
    cache_dir: str | Path | None = None,
    repeats_column: str | None = None,
):
    """Open an image/caption dataset as a ``datasets.Dataset`` with columns ``image`` and ``text``
    (and ``repeats`` when ``repeats_column`` is given).

    Images are *not* decoded here: the ``image`` column holds ``{"path", "bytes"}`` records
    (``datasets.Image(decode=False)``) that :class:`ImageCaptionDataset` decodes robustly.

    Args:
        source: a local folder (``metadata.jsonl``/``metadata.csv`` captions, or same-named
            ``.txt`` files) or a hub dataset id.
        image_column, caption_column: column names in the source (renamed to ``image``/``text``).
            They do not apply to ``.txt`` folders.
        split: the split to read.
        cache_dir: where ``datasets`` keeps its Arrow cache (default: its own).
        repeats_column: a column of whole numbers: how often each image appears per epoch (kohya's
            ``num_repeats``; e.g. a few instance images repeated to balance many prior images).
    Raises:
        ConfigError: the source does not exist or holds no captions, a hub id while offline or
            unreachable, or a missing image/caption column (the message lists the columns).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if _has_metadata(path):
            dataset = _load_imagefolder(path, split, cache_dir)
        elif repeats_column is not None:
            raise ConfigError(f"{path} has .txt captions, which have no {repeats_column!r} column; "
                              "use metadata.jsonl for per-image repeats")
        else:
            return _load_txt_caption_folder(path)
    elif path.exists():
        raise ConfigError(f"dataset source {path} is a file; give a folder or a hub dataset id")
    elif _HUB_ID.match(str(source)) and not str(source).startswith((".", "~")):
        dataset = _load_hub_dataset(str(source), split, cache_dir)
    else:
        raise ConfigError(f"dataset folder not found: {path}")
    return _select_columns(dataset, image_column, caption_column, str(source), repeats_column)


def _has_metadata(folder: Path) -> bool:
    return any(next(folder.rglob(name), None) is not None for name in METADATA_FILES)


def _load_imagefolder(folder: Path, split: str, cache_dir):
    import datasets

    try:
        return datasets.load_dataset("imagefolder", data_dir=str(folder), split=split,
                                     cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as error:  # datasets raises many types for a malformed folder; all are the user's to fix
        raise ConfigError(f"cannot read image folder {folder}: {_first_line(error)}") from None


def _load_txt_caption_folder(folder: Path):
    """Rows ``{"image": path, "text": caption or None}`` for every image under ``folder``."""
    import datasets

    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {folder}")
    captions = [_read_caption_file(p.with_suffix(".txt")) for p in images]
    if all(c is None for c in captions):
        raise ConfigError(
            f"no captions found in {folder}: add metadata.jsonl (file_name, text) or a .txt file beside each image"
        )
    rows = datasets.Dataset.from_dict({"image": [str(p) for p in images], "text": captions})
    return rows.cast_column("image", datasets.Image(decode=False))


def _read_caption_file(path: Path) -> str | None:
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8", errors="replace")


def _load_hub_dataset(repo_id: str, split: str, cache_dir):
    if _offline():
        raise ConfigError(
            f"no local folder {repo_id!r}, and hub dataset {repo_id!r} cannot be downloaded in offline mode "
            "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); use a local folder or download it first"
        )
    import datasets

    try:
        return datasets.load_dataset(repo_id, split=split, cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as error:  # network, auth, missing repo or split: all one-line user errors
        raise ConfigError(f"cannot load dataset {repo_id!r} from the hub: {_first_line(error)}") from None


def _offline() -> bool:
    truthy = {"1", "on", "yes", "true"}
    return any(os.environ.get(name, "").strip().lower() in truthy for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _select_columns(dataset, image_column: str, caption_column: str, source: str, repeats_column: str | None = None):
    """Keep the image, caption (and repeats) columns as ``image`` (undecoded), ``text`` (and ``repeats``)."""
    import datasets

    columns = list(dataset.column_names)
    roles = {"image": image_column, "text": caption_column}
    if repeats_column is not None:
        roles["repeats"] = repeats_column
    for role, column in roles.items():
        if column not in columns:
            raise ConfigError(f"{'caption' if role == 'text' else role} column {column!r} not in dataset "
                              f"{source} (columns: {', '.join(columns) or 'none'})")
    dataset = dataset.select_columns(list(roles.values()))
    if any(column != role for role, column in roles.items()):
        dataset = dataset.rename_columns({column: f"__{role}" for role, column in roles.items()})
        dataset = dataset.rename_columns({f"__{role}": role for role in roles})
    if isinstance(dataset.features["image"], datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    return dataset


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --------------------------------------------------------------------------------------------
# Decoding: any image -> RGB
# --------------------------------------------------------------------------------------------


def open_image(value: Any) -> Image.Image:
    """Open an image lazily from a ``{"path", "bytes"}`` record, a path, raw bytes or a PIL image.

    The file is read into memory at once (no file handle stays open).
    """
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, Mapping):
        data = value.get("bytes")
        if data is None:
            data = Path(value["path"]).read_bytes()
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    else:
        data = Path(value).read_bytes()
    return Image.open(io.BytesIO(data))


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` after the EXIF orientation is applied (without decoding pixels)."""
    width, height = image.size
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    * transparency (RGBA, LA, PA, palette or grayscale with a transparent colour) is composited
      over white, so transparent areas do not turn black;
    * 16/32-bit integer and float grayscale (``I;16``, ``I``, ``F``) are rescaled to 8 bits;
    * everything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ...) uses PIL's conversion.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return _high_bit_depth_to_rgb(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit (0..65535), 32-bit integer or float grayscale -> 8-bit RGB."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
    else:
        # I;16* hold 0..65535; mode "I" images come from 16-bit files too unless they fit 8 bits.
        scale = 255.0 / 65535.0 if image.mode.startswith("I;16") or (values.size and values.max() > 255) else 1.0
    eight_bit = np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(eight_bit, mode="L").convert("RGB")


def normalize_caption(value: Any) -> str | None:
    """A caption string, or ``None`` when missing/empty. Lists give their first non-empty entry."""
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if isinstance(v, str) and v.strip()), None)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def resize_and_crop(
    image: Image.Image, size: tuple[int, int], *, crop: str = "center", rng: np.random.Generator | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize ``image`` to cover ``size = (width, height)`` (aspect kept), then crop to exactly ``size``.

    For a square ``size`` this is "resize the shorter side to the resolution, then crop".
    Downscaling goes through PIL's ``reducing_gap`` (fast box reduction first), upscaling and the
    last step use bicubic resampling.

    Returns:
        the cropped image and ``(top, left)`` of the crop in the resized image.
    """
    target_w, target_h = size
    width, height = image.size
    resized_w, resized_h = covering_size(image.size, size)
    if (resized_w, resized_h) != (width, height):
        image = image.resize((resized_w, resized_h), Image.Resampling.BICUBIC, reducing_gap=2.0)
    if crop == "random":
        rng = rng if rng is not None else np.random.default_rng()
        top = int(rng.integers(0, resized_h - target_h + 1))
        left = int(rng.integers(0, resized_w - target_w + 1))
    elif crop == "center":
        top, left = (resized_h - target_h) // 2, (resized_w - target_w) // 2
    else:
        raise ConfigError(f"crop must be 'center' or 'random', got {crop!r}")
    return image.crop((left, top, left + target_w, top + target_h)), (top, left)


def covering_size(image_size: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """``(width, height)`` of an ``image_size = (width, height)`` image resized (aspect kept) to just cover
    ``size = (width, height)``."""
    (width, height), (target_w, target_h) = image_size, size
    scale = max(target_w / width, target_h / height)
    return max(target_w, round(width * scale)), max(target_h, round(height * scale))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor ``[3, H, W]`` in ``[-1, 1]`` (``x / 127.5 - 1``)."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample in one epoch: a pure function of ``(seed, epoch, index)``."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index])


# --------------------------------------------------------------------------------------------
# Aspect-ratio buckets
# --------------------------------------------------------------------------------------------


def make_buckets(resolution: int, *, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """Bucket sizes ``(width, height)`` of at most ``resolution**2`` pixels, sides multiples of ``step``.

    For each width (a multiple of ``step``) the largest height that keeps the area within
    ``resolution**2`` is taken; sizes whose aspect ratio exceeds ``max_aspect`` either way are
    dropped. The square bucket is always present. Sorted by aspect ratio ``width / height``.

    ``step`` should be ``f * 2**(levels - 1)`` (VAE factor times the U-Net's downsampling), i.e.
    64 for Stable Diffusion.
    """
    if resolution < step:
        raise ConfigError(f"resolution {resolution} is smaller than the bucket step {step}")
    area = resolution * resolution
    side = resolution // step * step
    sizes = {(side, side)}
    for width in range(step, int(resolution * max_aspect) + step, step):
        height = area // width // step * step
        if height >= step and 1 / max_aspect <= width / height <= max_aspect:
            sizes.add((width, height))
            sizes.add((height, width))
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest to ``width / height`` (in log ratio)."""
    aspect = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - aspect), i))


class BucketBatchSampler:
    """Batches of same-bucket samples; deterministic for a seed and resumable.

    Each epoch holds index ``i`` ``repeats[i]`` times (default once). The indices of every bucket
    are shuffled (``shuffle=True``) and cut into batches
    of ``batch_size`` (a bucket's last batch may be smaller unless ``drop_last``); then the order
    of all batches is shuffled. Epoch ``e`` is a pure function of ``(seed, e)``.

    Iterating yields lists of ``(index, epoch)`` pairs (the datasets here use the epoch to seed
    augmentations). One ``iter()`` runs from the current position to the end of that epoch and
    then moves the position to the start of the next epoch, so ``for epoch ...: for batch in loader``
    works. Resume with ``set_position(*sampler.position_after(batches_done))``: the position is
    not advanced batch by batch, because DataLoader workers read ahead of training.

    Use as ``DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch)``.
    """

    def __init__(self, bucket_ids: Sequence[int], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, repeats: Sequence[int] | None = None) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        repeats = [1] * len(bucket_ids) if repeats is None else [int(r) for r in repeats]
        if len(repeats) != len(bucket_ids) or min(repeats, default=1) < 1:
            raise ConfigError("repeats must give a whole number >= 1 for every sample")
        self.bucket_ids = [int(b) for b in bucket_ids]
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.batch_index = 0
        self._members: dict[int, list[int]] = {}
        for index, (bucket, count) in enumerate(zip(self.bucket_ids, repeats)):
            self._members.setdefault(bucket, []).extend([index] * count)
        if self.batches_per_epoch == 0:
            raise ConfigError(f"no full batch of {batch_size}: every bucket holds fewer samples (drop_last=True)")

    @property
    def batches_per_epoch(self) -> int:
        count = math.floor if self.drop_last else math.ceil
        return sum(count(len(m) / self.batch_size) for m in self._members.values())

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches (lists of dataset indices) of ``epoch``, in order."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch])
        batches = []
        for bucket in sorted(self._members):
            members = list(self._members[bucket])
            if self.shuffle:
                members = [members[i] for i in rng.permutation(len(members))]
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def set_position(self, epoch: int, batch_index: int = 0) -> None:
        """Continue from batch ``batch_index`` of ``epoch`` (the next batch to yield)."""
        if not 0 <= batch_index <= self.batches_per_epoch:
            raise ValueError(f"batch_index {batch_index} outside 0..{self.batches_per_epoch}")
        self.epoch, self.batch_index = epoch, batch_index

    def position_after(self, batches_done: int) -> tuple[int, int]:
        """``(epoch, batch_index)`` of the next batch after ``batches_done`` batches from the very start."""
        return divmod(batches_done, self.batches_per_epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ConfigError(f"sampler seed {self.seed} differs from the checkpoint's {state['seed']}")
        self.set_position(int(state["epoch"]), int(state["batch_index"]))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.epoch, self.batch_index
        batches = self.epoch_batches(epoch)
        for batch in batches[start:]:
            yield [(index, epoch) for index in batch]
        self.epoch, self.batch_index = epoch + 1, 0


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


@dataclass
class DataReport:
    """What loading the data found; ``summary()`` is one log line."""

    total: int = 0
    used: int = 0
    unreadable: int = 0
    too_small: int = 0
    missing_captions: int = 0
    converted: dict[str, int] = field(default_factory=dict)  # original mode -> count
    downscaled: int = 0  # huge images (a side above huge_side), reduced before the resize
    late_failures: int = 0  # decode errors after the scan (replaced by another sample of the bucket)
    examples: list[str] = field(default_factory=list)  # "what: why", the first few skips

    def note(self, what: str, reason: str) -> None:
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{what}: {reason}")

    @property
    def skipped(self) -> int:
        return self.unreadable + self.too_small

    def summary(self) -> str:
        parts = [f"{self.used} of {self.total} images used"]
        if self.unreadable:
            parts.append(f"{self.unreadable} unreadable skipped")
        if self.too_small:
            parts.append(f"{self.too_small} too small skipped")
        if self.converted:
            modes = ", ".join(f"{mode}: {n}" for mode, n in sorted(self.converted.items()))
            parts.append(f"{sum(self.converted.values())} converted to RGB ({modes})")
        if self.downscaled:
            parts.append(f"{self.downscaled} huge downscaled")
        if self.missing_captions:
            parts.append(f"{self.missing_captions} missing/empty captions")
        if self.late_failures:
            parts.append(f"{self.late_failures} failed to decode late and were replaced")
        return "data: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Record:
    row: int  # row in the source dataset
    width: int  # after EXIF orientation
    height: int
    caption: str
    label: str  # file path or "row N", for messages
    repeats: int = 1  # appearances per epoch


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Map-style dataset of ``{"pixel_values": [3, H, W] in [-1, 1], "caption": str, "index": int,
    "original_size": (height, width), "crop_top_left": (top, left)}`` (the last two: see the module docstring).

    Construction scans every row once (decoding each image, JPEGs at reduced scale) and keeps
    only usable ones; indices refer to the kept samples. With ``bucketing`` each sample's
    ``(H, W)`` is its bucket's size, else ``resolution x resolution``.

    ``dataset[i]`` uses epoch 0; ``dataset[(i, epoch)]`` (what :class:`BucketBatchSampler`
    yields) draws the random crop/flip of that epoch.

    Args:
        rows: a ``datasets.Dataset`` from :func:`load_image_caption_dataset` (or any sequence of
            ``{"image": ..., "text": ...}`` mappings).
        resolution: the square side, or the bucket area's side.
        crop: ``"center"`` or ``"random"``.
        random_flip: flip horizontally with probability 1/2.
        bucketing: aspect-ratio buckets (:func:`make_buckets` with ``bucket_step``, ``max_aspect``).
        min_side: images whose shorter side is below this are skipped (default ``resolution // 4``).
        huge_side: images with a longer side above this are counted as downscaled (they are
            reduced cheaply before the final resize, as every large image is).
        seed: seeds the augmentations.
    """

    def __init__(
        self,
        rows,
        *,
        resolution: int = 512,
        crop: str = "center",
        random_flip: bool = False,
        bucketing: bool = False,
        bucket_step: int = 64,
        max_aspect: float = 2.0,
        min_side: int | None = None,
        huge_side: int = 4096,
        seed: int = 0,
    ) -> None:
        if crop not in ("center", "random"):
            raise ConfigError(f"crop must be 'center' or 'random', got {crop!r}")
        self.rows = rows
        self.resolution = resolution
        self.crop = crop
        self.random_flip = random_flip
        self.seed = seed
        self.min_side = resolution // 4 if min_side is None else min_side
        self.huge_side = huge_side
        self.bucket_sizes = (make_buckets(resolution, step=bucket_step, max_aspect=max_aspect) if bucketing
                             else [(resolution, resolution)])
        self.report = DataReport()
        self.records = self._scan()
        self.bucket_ids = [nearest_bucket(r.width, r.height, self.bucket_sizes) if bucketing else 0
                           for r in self.records]
        self.repeats = [r.repeats for r in self.records]  # for BucketBatchSampler(repeats=...)
        self._bucket_members: dict[int, list[int]] = {}
        for index, bucket in enumerate(self.bucket_ids):
            self._bucket_members.setdefault(bucket, []).append(index)
        logger.info("%s", self.report.summary())
        if not self.records:
            raise ConfigError(f"no usable images in the dataset ({self.report.summary()})")

    # ---------------------------------------------------------------- scan

    def _scan(self) -> list[_Record]:
        records = []
        for row_index in range(len(self.rows)):
            row = self.rows[row_index]
            self.report.total += 1
            label = _row_label(row.get("image"), row_index)
            record = self._check_image(row.get("image"), row_index, label)
            if record is None:
                continue
            caption = normalize_caption(row.get("text"))
            if caption is None:
                self.report.missing_captions += 1
            repeats = _repeat_count(row.get("repeats", 1), label)
            records.append(dataclasses.replace(record, caption=caption or "", repeats=repeats))
        self.report.used = len(records)
        return records

    def _check_image(self, value: Any, row_index: int, label: str) -> _Record | None:
        """Decode once to prove the image readable; ``None`` (counted) when it must be skipped."""
        try:
            image = open_image(value)
            width, height = oriented_size(image)
            mode = image.mode
            image.draft(None, (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))  # JPEG: decode at 1/8
            image.load()
        except Exception as error:  # any decoder failure means "skip this file", never a crash
            self.report.unreadable += 1
            self.report.note(label, f"unreadable ({_decode_error_reason(error)})")
            return None
        if min(width, height) < self.min_side:
            self.report.too_small += 1
            self.report.note(label, f"too small ({width}x{height} < {self.min_side} px)")
            return None
        if mode != "RGB":
            self.report.converted[mode] = self.report.converted.get(mode, 0) + 1
        if max(width, height) > self.huge_side:
            self.report.downscaled += 1
        return _Record(row=row_index, width=width, height=height, caption="", label=label)

    # ---------------------------------------------------------------- items

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key) -> dict[str, Any]:
        index, epoch = _split_key(key)
        rng = sample_rng(self.seed, epoch, index)
        flip = self.random_flip and bool(rng.random() < 0.5)
        return self.load(index, flip=flip, crop=self.crop, rng=rng)

    def load(self, index: int, *, flip: bool = False, crop: str = "center",
             rng: np.random.Generator | None = None) -> dict[str, Any]:
        """Sample ``index`` with explicit augmentation choices (used by :func:`cache_latents`).

        A file that fails now although it passed the scan (changed on disk, truncated JPEG tail)
        is replaced by the next sample of the same bucket and counted in ``report.late_failures``.
        """
        for candidate in self._candidates(index):
            try:
                pixels, crop_top_left = self._pixels(candidate, flip=flip, crop=crop, rng=rng)
            except Exception as error:  # see docstring: never crash a run on one bad file
                self.report.late_failures += 1
                logger.warning("skipping %s: %s", self.records[candidate].label, _first_line(error))
                continue
            record = self.records[candidate]
            return {"pixel_values": pixels, "caption": record.caption, "index": candidate,
                    "original_size": (record.height, record.width), "crop_top_left": crop_top_left}
        raise RuntimeError(f"every image of bucket {self.bucket_sizes[self.bucket_ids[index]]} failed to decode")

    def _candidates(self, index: int) -> Iterator[int]:
        """``index``, then the other samples of its bucket in order (replacements for a broken file)."""
        yield index
        members = self._bucket_members[self.bucket_ids[index]]
        start = members.index(index)
        yield from (members[(start + step) % len(members)] for step in range(1, len(members)))

    def _pixels(self, index: int, *, flip: bool, crop: str,
                rng: np.random.Generator | None) -> tuple[torch.Tensor, tuple[int, int]]:
        """``([3, H, W] in [-1, 1], (top, left) of the crop in the resized, possibly flipped image)``."""
        record = self.records[index]
        size = self.bucket_sizes[self.bucket_ids[index]]
        image = open_image(self.rows[record.row]["image"])
        needed = size if (record.width, record.height) == image.size else (size[1], size[0])
        image.draft(None, _draft_request(image.size, needed))  # JPEG: decode directly at a reduced scale
        image = to_rgb(ImageOps.exif_transpose(image))
        resized_width = covering_size(image.size, size)[0]
        image, (top, left) = resize_and_crop(image, size, crop=crop, rng=rng)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = resized_width - size[0] - left  # the same window, seen in the mirrored image
        return image_to_tensor(image), (top, left)

    # ---------------------------------------------------------------- identity

    def fingerprint(self) -> str:
        """A hash of the kept samples (file identity, size, caption) and of the transform settings."""
        digest = hashlib.sha256()
        settings = {"resolution": self.resolution, "buckets": self.bucket_sizes, "crop": self.crop}
        digest.update(json.dumps(settings, sort_keys=True).encode())
        for record, bucket in zip(self.records, self.bucket_ids):
            digest.update(json.dumps([record.label, record.width, record.height, record.caption, bucket]).encode())
            digest.update(_content_identity(self.rows[record.row]["image"]).encode())
        return digest.hexdigest()


def _repeat_count(value: Any, label: str) -> int:
    """A row's ``repeats`` value as a positive int (missing -> 1); anything else is a config error."""
    if value is None:
        return 1
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{label}: repeats must be a whole number >= 1, got {value!r}")
    return value


def _decode_error_reason(error: BaseException) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not a recognised image format"
    if isinstance(error, FileNotFoundError):
        return "file not found"
    return f"{type(error).__name__}: {_first_line(error)}"


def _split_key(key) -> tuple[int, int]:
    if isinstance(key, (tuple, list)):
        index, epoch = key
        return int(index), int(epoch)
    return int(key), 0


def _row_label(value: Any, row_index: int) -> str:
    if isinstance(value, Mapping) and value.get("path"):
        return str(value["path"])
    if isinstance(value, (str, Path)):
        return str(value)
    return f"row {row_index}"


def _content_identity(value: Any) -> str:
    """Cheap identity of an image's content: bytes hash, or path + size + mtime."""
    if isinstance(value, Mapping) and value.get("bytes") is not None:
        return hashlib.sha256(value["bytes"]).hexdigest()
    path = value["path"] if isinstance(value, Mapping) else value
    try:
        stat = Path(path).stat()
    except (OSError, TypeError):
        return str(path)
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def _draft_request(image_size: tuple[int, int], needed: tuple[int, int]) -> tuple[int, int]:
    """The size to ask ``Image.draft`` for: at least what covering ``needed`` requires."""
    scale = max(needed[0] / image_size[0], needed[1] / image_size[1])
    return max(1, math.ceil(image_size[0] * scale)), max(1, math.ceil(image_size[1] * scale))


def collate_batch(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack a batch: ``pixel_values [B, 3, H, W]`` (or ``latents [B, C, h, w]``), ``captions``, ``indices``, and
    when the items carry them ``original_size [B, 2]`` and ``crop_top_left [B, 2]`` (int64)."""
    batch: dict[str, Any] = {
        "captions": [item["caption"] for item in items],
        "indices": torch.tensor([item["index"] for item in items]),
    }
    for name in ("pixel_values", "latents"):
        if name in items[0]:
            batch[name] = torch.stack([item[name] for item in items])
    for name in ("original_size", "crop_top_left"):
        if name in items[0]:
            batch[name] = torch.tensor([list(item[name]) for item in items], dtype=torch.int64)
    return batch


# --------------------------------------------------------------------------------------------
# Latent caching
# --------------------------------------------------------------------------------------------

CACHE_FORMAT = "ldm-latent-cache-1"


class CachedLatentDataset(torch.utils.data.Dataset):
    """Map-style dataset of ``{"latents": z [C, h, w], "caption": str, "index": int}`` from a cache file.

    ``z`` is already scaled by the VAE's ``scaling_factor``. With flipped latents stored, the
    horizontal flip is drawn per ``(seed, epoch, index)`` exactly as in :class:`ImageCaptionDataset`.
    ``bucket_ids`` match the image dataset, so :class:`BucketBatchSampler` works unchanged. Items also
    carry ``original_size`` and ``crop_top_left`` (of the flipped crop when flipped) when the cache has them
    (``sizes``: per sample ``[height, width, top, left, flipped left]``).
    """

    def __init__(self, latents: list[torch.Tensor], captions: list[str], bucket_ids: list[int], *,
                 flipped: list[torch.Tensor] | None = None, seed: int = 0,
                 sizes: list[list[int]] | None = None) -> None:
        self.latents = latents
        self.flipped = flipped
        self.captions = captions
        self.bucket_ids = bucket_ids
        self.seed = seed
        self.sizes = sizes

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, key) -> dict[str, Any]:
        index, epoch = _split_key(key)
        flip = self.flipped is not None and bool(sample_rng(self.seed, epoch, index).random() < 0.5)
        latents = (self.flipped if flip else self.latents)[index]
        item = {"latents": latents, "caption": self.captions[index], "index": index}
        if self.sizes is not None:
            height, width, top, left, flipped_left = self.sizes[index]
            item |= {"original_size": (height, width), "crop_top_left": (top, flipped_left if flip else left)}
        return item


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """Hash of a VAE's config and weights (a changed VAE invalidates cached latents)."""
    digest = hashlib.sha256()
    config = getattr(vae, "config", None)
    if config is not None:
        digest.update(json.dumps(config.to_dict() if hasattr(config, "to_dict") else repr(config),
                                 sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def cache_latents(
    vae: torch.nn.Module,
    dataset: ImageCaptionDataset,
    path: str | Path,
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> CachedLatentDataset:
    """Encode every sample once with ``vae`` and store the latents and captions at ``path``.

    An existing cache whose fingerprint (dataset samples and transforms, VAE config and weights)
    matches is loaded instead of recomputed. Latents are the posterior mean times the scaling
    factor (``vae.encode_latents``); with ``dataset.random_flip`` the flipped images are encoded
    too. The file is written with :func:`ldm.formats.checkpoints.save_safetensors_atomic`, so an
    interrupted run never leaves a half-written cache.

    Raises:
        ConfigError: the dataset uses random crops (their latents cannot be computed once).
    """
    if dataset.crop == "random":
        raise ConfigError("latent caching needs crop='center' (random crops change every epoch)")
    path = Path(path)
    identity = f"{dataset.fingerprint()}|{vae_fingerprint(vae)}|flip={dataset.random_flip}"
    fingerprint = hashlib.sha256(identity.encode()).hexdigest()
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except Exception:  # an unreadable cache is simply rebuilt
            metadata = {}
        if metadata.get("format") == CACHE_FORMAT and metadata.get("fingerprint") == fingerprint:
            logger.info("using cached latents %s", path)
            return _cached_dataset(checkpoints.load_state_dict(path), metadata, dataset.seed)
        logger.info("latent cache %s is stale; recomputing", path)

    device = torch.device(device) if device is not None else next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    tensors: dict[str, torch.Tensor] = {}
    captions = [""] * len(dataset)
    sizes = [[0, 0, 0, 0, 0] for _ in range(len(dataset))]  # height, width, top, left, flipped left
    for flip in ((False, True) if dataset.random_flip else (False,)):
        for chunk in _bucket_chunks(dataset.bucket_ids, batch_size):
            items = [dataset.load(i, flip=flip, crop="center") for i in chunk]
            images = torch.stack([item["pixel_values"] for item in items]).to(device, dtype)
            z = vae.encode_latents(images).float().cpu()
            for i, item, latent in zip(chunk, items, z):
                tensors[f"{'flipped' if flip else 'latents'}.{i}"] = latent
                captions[i] = item["caption"]
                top, left = item["crop_top_left"]
                sizes[i][4] = left
                if not flip:
                    sizes[i][:4] = [*item["original_size"], top, left]
    metadata = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "count": str(len(dataset)),
                "flipped": str(int(dataset.random_flip)), "captions": json.dumps(captions, ensure_ascii=False),
                "bucket_ids": json.dumps(dataset.bucket_ids), "sizes": json.dumps(sizes)}
    checkpoints.save_safetensors_atomic(tensors, path, metadata=metadata)
    logger.info("cached %d latents in %s", len(dataset), path)
    return _cached_dataset(tensors, metadata, dataset.seed)


def _bucket_chunks(bucket_ids: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    members: dict[int, list[int]] = {}
    for index, bucket in enumerate(bucket_ids):
        members.setdefault(bucket, []).append(index)
    for bucket in sorted(members):
        indices = members[bucket]
        for start in range(0, len(indices), batch_size):
            yield indices[start:start + batch_size]


def _cached_dataset(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], seed: int) -> CachedLatentDataset:
    count = int(metadata["count"])
    flipped = [tensors[f"flipped.{i}"] for i in range(count)] if metadata.get("flipped") == "1" else None
    sizes = json.loads(metadata["sizes"]) if "sizes" in metadata else None  # caches written before sizes: none
    return CachedLatentDataset([tensors[f"latents.{i}"] for i in range(count)], json.loads(metadata["captions"]),
                               json.loads(metadata["bucket_ids"]), flipped=flipped, seed=seed, sizes=sizes)


__all__ = [
    "load_image_caption_dataset", "ImageCaptionDataset", "DataReport", "BucketBatchSampler", "make_buckets",
    "nearest_bucket", "resize_and_crop", "image_to_tensor", "to_rgb", "open_image", "collate_batch",
    "cache_latents", "CachedLatentDataset", "vae_fingerprint",
]
