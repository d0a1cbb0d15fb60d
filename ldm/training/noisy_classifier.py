"""Training the default model's noise-aware classifier (object and colour of the procedural world).

Recipe (``scripts/toy/train_classifier.py``): procedural training-split images encoded once with the
default model's autoencoder (posterior mean, scaled: exactly the latents its U-Net learned), then
cross-entropy of :class:`ldm.models.noisy_classifier.NoisyLatentClassifier` on ``x_t = sqrt(abar_t) z +
sqrt(1 - abar_t) eps`` at uniform ``t`` of the model's own schedule (Dhariwal & Nichol 2021, sec. 4:
the classifier must read every noise level the sampler passes through). Checkpoints every
``checkpoint_every`` steps (weights, optimizer, RNG) make a killed run resume where it stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.models.noisy_classifier import ClassifierConfig, NoisyLatentClassifier
from ldm.toy.procedural import COLOURS, OBJECTS, ProceduralDataset, images_to_tensor
from ldm.training import run_state

logger = logging.getLogger(__name__)

HEADS = {"object": OBJECTS, "colour": COLOURS}


@dataclass
class ClassifierRecipe:
    pool_size: int = 20_000
    data_seed: int = 2
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    final_lr: float = 5e-5
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    checkpoint_every: int = 500


@torch.no_grad()
def encode_pool(pipe, recipe: ClassifierRecipe, cache: Path) -> dict[str, torch.Tensor]:
    """``{"latents": [N, C, h, w], "object": [N], "colour": [N]}`` of the first ``pool_size`` training-split
    samples, cached in ``cache`` (recomputed when the cache holds another pool size)."""
    if cache.is_file():
        pool = torch.load(cache, weights_only=True)
        if len(pool["latents"]) == recipe.pool_size:
            return pool
    dataset = ProceduralDataset(seed=recipe.data_seed, split="train", image_size=pipe.config.sampling.height)
    latents, objects, colours, start = [], [], [], time.perf_counter()
    for first in range(0, recipe.pool_size, 256):
        samples = dataset.take(min(256, recipe.pool_size - first), start=first)
        latents.append(pipe.vae.encode_latents(images_to_tensor([s.image for s in samples])).float())
        objects += [OBJECTS.index(s.object) for s in samples]
        colours += [COLOURS.index(s.colour) for s in samples]
    pool = {"latents": torch.cat(latents), "object": torch.tensor(objects), "colour": torch.tensor(colours)}
    logger.info("encoded %d latents in %.0f s", len(pool["latents"]), time.perf_counter() - start)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(pool, cache)
    return pool


def noisy_batch(pool: dict[str, torch.Tensor], alphas_cumprod: torch.Tensor, batch_size: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(x_t [B, C, h, w], t [B], labels)``: random pool rows noised at uniform ``t`` (Ho et al. 2020, eq. 4)."""
    index = torch.randint(len(pool["latents"]), (batch_size,), generator=generator)
    t = torch.randint(len(alphas_cumprod), (batch_size,), generator=generator)
    z = pool["latents"][index]
    eps = torch.randn(z.shape, generator=generator)
    abar = alphas_cumprod[t].float().view(-1, 1, 1, 1)
    return abar.sqrt() * z + (1 - abar).sqrt() * eps, t.float(), {name: pool[name][index] for name in HEADS}


def classification_loss(model: NoisyLatentClassifier, x_t, t, labels) -> torch.Tensor:
    logits = model(x_t, t)
    return sum(F.cross_entropy(logits[name], labels[name]) for name in labels)


@torch.no_grad()
def accuracy_by_noise(model: NoisyLatentClassifier, pool, alphas_cumprod, timesteps=(0, 250, 500, 750, 900, 999),
                      n: int = 512, seed: int = 123) -> dict[int, dict[str, float]]:
    """Per-family accuracy at fixed timesteps on ``n`` pool rows (a quick check of what the classifier reads)."""
    g = torch.Generator().manual_seed(seed)
    result = {}
    for step in timesteps:
        index = torch.randint(len(pool["latents"]), (n,), generator=g)
        z = pool["latents"][index]
        abar = alphas_cumprod[step].float()
        x_t = abar.sqrt() * z + (1 - abar).sqrt() * torch.randn(z.shape, generator=g)
        logits = model(x_t, torch.full((n,), float(step)))
        result[step] = {name: (logits[name].argmax(-1) == pool[name][index]).float().mean().item() for name in HEADS}
    return result


def train_classifier(pipe, recipe: ClassifierRecipe, run_dir: Path, pool: dict[str, torch.Tensor],
                     config: ClassifierConfig | None = None) -> tuple[NoisyLatentClassifier, float]:
    """Train (or resume) in ``run_dir`` on ``pool`` (:func:`encode_pool`); returns the classifier (eval mode)
    and the training seconds."""
    config = config or ClassifierConfig(in_channels=pipe.config.vae.latent_channels, heads=HEADS,
                                        num_train_timesteps=pipe.schedule.num_train_timesteps)
    alphas_cumprod = pipe.schedule.alphas_cumprod
    torch.manual_seed(recipe.seed)
    model = NoisyLatentClassifier(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    step, elapsed = 0, 0.0
    resumed = run_state.load_latest_checkpoint(run_dir)
    if resumed is not None:
        weights, state = resumed
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
    model.train()
    start = time.perf_counter() - elapsed
    while step < recipe.steps:
        lr = run_state.warmup_cosine_lr(step, base_lr=recipe.lr, warmup_steps=recipe.warmup_steps,
                                        total_steps=recipe.steps, final_lr=recipe.final_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)  # resumable: one per step
        loss = classification_loss(model, *noisy_batch(pool, alphas_cumprod, recipe.batch_size, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % 100 == 0:
            logger.info("step %d/%d loss %.4f lr %.2e (%.0f s)", step, recipe.steps, loss.item(), lr,
                        time.perf_counter() - start)
        if step % recipe.checkpoint_every == 0 or step == recipe.steps:
            run_state.save_checkpoint(run_dir, step, model.state_dict(),
                                      {"optimizer": optimizer.state_dict(), "elapsed": time.perf_counter() - start})
    model.eval()
    return model, time.perf_counter() - start


__all__ = ["ClassifierRecipe", "HEADS", "encode_pool", "noisy_batch", "classification_loss", "accuracy_by_noise",
           "train_classifier"]
