"""A noise-aware classifier on noisy latents, for classifier guidance (Dhariwal & Nichol 2021, sec. 4).

The classifier ``p_phi(y | x_t, t)`` reads the variance-preserving noisy latents ``x_t = sqrt(abar_t) z +
sqrt(1 - abar_t) eps`` (what the U-Net reads) and the timestep ``t``; it is trained with cross-entropy on
latents noised at uniformly drawn ``t``, so it stays meaningful all along the sampling chain. Its trunk is
the downsampling half of a small U-Net: ResBlocks with the timestep embedding added (the same
:class:`ldm.models.unet.ResBlock`), strided convolutions, global average pooling, then one linear head per
label family (e.g. ``object`` and ``colour``): ``log p(y | x_t)`` of a requested class is the sum of its
heads' log-softmax values, i.e. the families are modelled as independent given ``x_t``.

    classifier = load_classifier(folder)                   # ldm.formats.classifier
    labels = classifier.labels_for("red bicycle")          # {"colour": 1, "object": 0}
    log_p = classifier.log_prob(x_t, t, labels)            # [B]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.config_io import strict_from_dict
from ldm.errors import ArgumentError
from ldm.models.unet import GroupNorm32, ResBlock, timestep_embedding


@dataclass
class ClassifierConfig:
    """Architecture and label names of a :class:`NoisyLatentClassifier`.

    Attributes:
        in_channels: latent channels.
        channels: width of each resolution level; a stride-2 conv joins consecutive levels.
        blocks_per_level: ResBlocks per level.
        norm_groups: groups of every GroupNorm.
        heads: label family -> class names, e.g. ``{"object": ["bicycle", ...], "colour": [...]}``.
        num_train_timesteps: the diffusion schedule's T (timesteps are read in ``[0, T)``).
    """

    in_channels: int = 4
    channels: tuple[int, ...] = (64, 128, 128)
    blocks_per_level: int = 1
    norm_groups: int = 16
    heads: dict[str, tuple[str, ...]] = field(default_factory=dict)
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.heads = {name: tuple(classes) for name, classes in dict(self.heads).items()}
        if not self.heads or any(len(classes) < 2 for classes in self.heads.values()):
            raise ValueError("heads must name at least one label family with at least two classes")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        d["heads"] = {name: list(classes) for name, classes in self.heads.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClassifierConfig":
        return strict_from_dict(cls, d)


class NoisyLatentClassifier(nn.Module):
    """``forward(x_t [B, C, h, w], t [B]) -> {family: logits [B, classes]}``."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        base, emb_dim = config.channels[0], 4 * config.channels[0]
        self.time_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(config.in_channels, base, 3, padding=1)
        self.blocks = nn.ModuleList()
        channels = base
        for level, width in enumerate(config.channels):
            if level:
                self.blocks.append(nn.Conv2d(channels, width, 3, stride=2, padding=1))  # downsample
            for _ in range(config.blocks_per_level):
                self.blocks.append(ResBlock(width, emb_dim, width, config.norm_groups))
            channels = width
        self.out_norm = GroupNorm32(config.norm_groups, channels)
        self.heads = nn.ModuleDict({name: nn.Linear(channels, len(classes)) for name, classes in config.heads.items()})

    def forward(self, x_t: Tensor, t: Tensor) -> dict[str, Tensor]:
        """Logits of every label family for noisy latents ``x_t [B, C, h, w]`` at timesteps ``t [B]``."""
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        emb = self.time_embed(timestep_embedding(t, self.config.channels[0]).to(x_t.dtype))
        h = self.stem(x_t)
        for block in self.blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        features = F.silu(self.out_norm(h)).mean(dim=(2, 3))  # global average pool [B, C]
        return {name: head(features) for name, head in self.heads.items()}

    def log_prob(self, x_t: Tensor, t: Tensor, labels: Mapping[str, Tensor | int]) -> Tensor:
        """``log p(y | x_t, t) [B]``: the sum over the requested families of their log-softmax at the label."""
        logits = self(x_t, t)
        total = torch.zeros(x_t.shape[0], device=x_t.device, dtype=torch.float32)
        for family, label in labels.items():
            index = torch.as_tensor(label, device=x_t.device).long().expand(x_t.shape[0])
            total = total + logits[family].float().log_softmax(-1).gather(1, index[:, None])[:, 0]
        return total

    def labels_for(self, text: str) -> dict[str, int]:
        """Class indices named in ``text`` ("red bicycle", "bicycle", "red"): each word must be a class
        name of some family, at most one per family.

        Raises:
            ArgumentError: a word that names no class, or two classes of one family.
        """
        labels: dict[str, int] = {}
        for word in text.lower().split():
            families = [name for name, classes in self.config.heads.items() if word in classes]
            if not families:
                known = ", ".join(f"{name}: {' '.join(classes)}" for name, classes in self.config.heads.items())
                raise ArgumentError(f"class {word!r} is not known to the classifier ({known})")
            family = families[0]
            if family in labels:
                raise ArgumentError(f"{text!r} names two classes of the {family} family")
            labels[family] = self.config.heads[family].index(word)
        if not labels:
            raise ArgumentError("the class to guide towards is empty")
        return labels


__all__ = ["ClassifierConfig", "NoisyLatentClassifier"]
