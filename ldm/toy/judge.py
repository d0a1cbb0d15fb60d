"""The judge: a small CNN that reads procedural images, used to score generated ones.

It has three heads on shared features: object kind (12 classes), object colour (8) and
background colour (12), with the class names of ``ldm.toy.procedural``. Its penultimate
features (global-average-pooled, ``[B, F]``) feed a Frechet distance between image sets,
the FID recipe with this judge in place of Inception.

    judge = Judge.load()                       # the weights shipped in ldm/toy/judge_model/
    judge.classify(images)                     # [{"object": "bicycle", "object_prob": 0.99, ...}, ...]
    frechet_distance(judge.features(real), judge.features(fake))
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ldm.config_io import strict_from_dict
from ldm.toy.procedural import BACKGROUNDS, COLOURS, OBJECTS, images_to_tensor

logger = logging.getLogger(__name__)

DEFAULT_JUDGE_PATH = Path(__file__).resolve().parent / "judge_model" / "judge.safetensors"
HEADS = ("object", "colour", "background")


@dataclass
class JudgeConfig:
    """Architecture and label names of the judge.

    shape_channels: widths of the shape trunk (it reads only the foreground map).
    colour_channels: widths of the colour trunk (it reads RGB plus the foreground map).
    Each trunk is: stride-2 conv, conv, stride-2 conv, conv, stride-2 conv, conv, using
    widths (c0, c1, c2, c2, c3, c3); the feature dimension F is the sum of both c3.
    """

    image_size: int = 64
    shape_channels: tuple[int, ...] = (16, 32, 48, 64)
    colour_channels: tuple[int, ...] = (16, 16, 32, 32)
    objects: tuple[str, ...] = OBJECTS
    colours: tuple[str, ...] = COLOURS
    backgrounds: tuple[str, ...] = BACKGROUNDS

    def __post_init__(self):
        for name in ("shape_channels", "colour_channels", "objects", "colours", "backgrounds"):
            setattr(self, name, tuple(getattr(self, name)))
        for name in ("shape_channels", "colour_channels"):
            if len(getattr(self, name)) != 4:
                raise ValueError(f"{name} must have 4 entries, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "JudgeConfig":
        return strict_from_dict(cls, d)


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def _trunk(c_in: int, channels: tuple[int, ...]) -> nn.Sequential:
    c0, c1, c2, c3 = channels
    return nn.Sequential(  # spatial sizes for a 64x64 input
        _conv_bn_relu(c_in, c0, stride=2), _conv_bn_relu(c0, c1),  # 32x32
        _conv_bn_relu(c1, c2, stride=2), _conv_bn_relu(c2, c2),  # 16x16
        _conv_bn_relu(c2, c3, stride=2), _conv_bn_relu(c3, c3),  # 8x8
    )


def foreground_map(x: Tensor) -> Tensor:
    """Colour-invariant view of an image: distance of each pixel from the background colour.

    The background colour is the per-channel median of the 1-pixel border. The Euclidean
    RGB distance is divided by the image's largest distance (at least 0.3, so a blank
    image stays near 0), giving the object as a bright silhouette whatever its colours.

    Args:
        x: [B, 3, H, W] in [-1, 1].
    Returns:
        [B, 1, H, W] in [0, 1].
    """
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], dim=-1)  # [B, 3, L]
    background = border.median(dim=-1).values[:, :, None, None]
    distance = (x - background).norm(dim=1, keepdim=True)
    return distance / distance.amax(dim=(2, 3), keepdim=True).clamp_min(0.3)


class Judge(nn.Module):
    """Object / colour / background classifier on ``image_size`` RGB images in [-1, 1].

    Two small trunks: the shape trunk sees only ``foreground_map(x)``, so object kind is read
    from the silhouette and cannot lean on colour (a CNN given raw RGB learns the 12 shapes
    under 96 colour pairs far more slowly); the colour trunk sees RGB plus that map. The
    object head reads shape features, the colour and background heads colour features.
    """

    def __init__(self, config: JudgeConfig | None = None):
        super().__init__()
        self.config = config = config or JudgeConfig()
        self.shape_trunk = _trunk(1, config.shape_channels)
        self.colour_trunk = _trunk(4, config.colour_channels)
        shape_dim, colour_dim = config.shape_channels[-1], config.colour_channels[-1]
        self.object_head = nn.Linear(shape_dim, len(config.objects))
        self.colour_head = nn.Linear(colour_dim, len(config.colours))
        self.background_head = nn.Linear(colour_dim, len(config.backgrounds))

    @property
    def feature_dim(self) -> int:
        return self.config.shape_channels[-1] + self.config.colour_channels[-1]

    def _pooled(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [B, 3, S, S] -> (shape features [B, Fs], colour features [B, Fc])."""
        mask = foreground_map(x) * 2 - 1
        shape = self.shape_trunk(mask).mean(dim=(2, 3))
        colour = self.colour_trunk(torch.cat([x, mask], dim=1)).mean(dim=(2, 3))
        return shape, colour

    def embed(self, x: Tensor) -> Tensor:
        """x: [B, 3, S, S] in [-1, 1] -> penultimate features [B, F] (shape then colour)."""
        return torch.cat(self._pooled(x), dim=1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: [B, 3, S, S] in [-1, 1] -> logits {"object": [B, 12], "colour": [B, 8], "background": [B, 12]}."""
        shape, colour = self._pooled(x)
        return {"object": self.object_head(shape), "colour": self.colour_head(colour),
                "background": self.background_head(colour)}

    # -- inference helpers ------------------------------------------------------------------

    def prepare(self, images: Sequence[Image.Image] | Image.Image | Tensor) -> Tensor:
        """PIL image(s) or a Tensor [B, 3, H, W] in [-1, 1] -> Tensor [B, 3, S, S] in [-1, 1]."""
        size = self.config.image_size
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, Tensor):
            x = images.detach().float()
            if x.ndim != 4 or x.shape[1] != 3:
                raise ValueError(f"expected a [B, 3, H, W] tensor, got shape {tuple(x.shape)}")
            if x.shape[-2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            return x
        resized = [im if im.size == (size, size) else im.convert("RGB").resize((size, size), Image.Resampling.BOX)
                   for im in images]
        return images_to_tensor(resized)

    @torch.no_grad()
    def _batched(self, images, fn, batch_size: int) -> list[Tensor]:
        was_training = self.training
        self.eval()
        x = self.prepare(images)
        device = next(self.parameters()).device
        try:
            return [fn(x[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
        finally:
            self.train(was_training)

    def features(self, images, batch_size: int = 256) -> Tensor:
        """Penultimate (pooled) features, float32 Tensor [B, F] on the CPU."""
        chunks = self._batched(images, lambda x: self.embed(x).float().cpu(), batch_size)
        return torch.cat(chunks) if chunks else torch.zeros(0, self.feature_dim)

    def probabilities(self, images, batch_size: int = 256) -> dict[str, Tensor]:
        """Softmax probabilities per head: {"object": [B, 12], "colour": [B, 8], "background": [B, 12]}."""
        chunks = self._batched(
            images, lambda x: {k: v.float().softmax(-1).cpu() for k, v in self(x).items()}, batch_size)
        return {head: torch.cat([c[head] for c in chunks]) for head in HEADS}

    def classify(self, images, batch_size: int = 256) -> list[dict]:
        """Top class and its probability per image and head.

        Returns:
            One dict per image: object, object_prob, colour, colour_prob, background, background_prob.
        """
        probs = self.probabilities(images, batch_size)
        names = {"object": self.config.objects, "colour": self.config.colours,
                 "background": self.config.backgrounds}
        results = [{} for _ in range(len(probs["object"]))]
        for head in HEADS:
            best_prob, best = probs[head].max(dim=-1)
            for row, (p, k) in zip(results, zip(best_prob.tolist(), best.tolist())):
                row[head] = names[head][k]
                row[f"{head}_prob"] = p
        return results

    # -- weights -----------------------------------------------------------------------------

    def save(self, path: str | Path, dtype: torch.dtype = torch.float16, extra_metadata: dict | None = None) -> None:
        """Save weights as safetensors (floating tensors in ``dtype``) with the config in the metadata."""
        from safetensors.torch import save_file

        state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu()
                 for k, v in self.state_dict().items()}
        metadata = {"format": "ldm-judge", "config": json.dumps(self.config.to_dict())}
        metadata.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra_metadata or {}).items()})
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> "Judge":
        """Load a saved judge (default: the shipped weights), in float32 and eval mode."""
        from safetensors import safe_open

        path = Path(path) if path is not None else DEFAULT_JUDGE_PATH
        if not path.is_file():
            raise FileNotFoundError(f"judge weights not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if "config" not in metadata:
            raise ValueError(f"{path} has no 'config' in its safetensors metadata; not a judge file")
        judge = cls(JudgeConfig.from_dict(json.loads(metadata["config"])))
        judge.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        return judge.to(device).eval()


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula).

    d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})

    Computed in float64. The trace of the matrix square root uses
    tr (S_a S_b)^{1/2} = tr (A S_b A)^{1/2} with A = S_a^{1/2}: S_a S_b is similar to the
    symmetric positive semi-definite A S_b A, so the trace is the sum of the square roots of
    its eigenvalues (``torch.linalg.eigvalsh``, tiny negative round-off clamped to 0). This
    avoids the complex, occasionally unstable general ``scipy.linalg.sqrtm`` of a
    non-symmetric product, and works for singular covariances (fewer samples than features).

    Args:
        feats_a, feats_b: [N, F] and [M, F] arrays or tensors, N, M >= 2.
    """
    a, b = _as_float64(feats_a), _as_float64(feats_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected [N, F] and [M, F] features, got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least 2 samples in each set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T, correction=1), torch.cov(b.T, correction=1)
    sqrt_a = _psd_sqrt(cov_a)
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return float(distance)


def _as_float64(x) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """Symmetric square root of a positive semi-definite matrix via eigh."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T
