#!/usr/bin/env python
"""Train the default model's autoencoder on procedural images (resumable).

    python scripts/train_autoencoder.py --config configs/default-vae.yaml --run-dir runs/vae

Re-running the same command resumes from the newest checkpoint in --run-dir. When training
ends, the scaling factor is set to 1/std of the latents (Rombach et al. 2022, Sec. 4.3.2 /
App. G) and the autoencoder is written to ``<run-dir>/vae.safetensors`` + ``vae.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autoencoder.losses import autoencoder_loss, psnr  # noqa: E402
from autoencoder.model import AutoencoderConfig, AutoencoderKL  # noqa: E402
from ldm import checkpoints, training  # noqa: E402
from ldm.procedural import ProceduralDataset, images_to_tensor  # noqa: E402

logger = logging.getLogger("train_autoencoder")


@dataclasses.dataclass
class VAETrainConfig:
    seed: int = 0
    pool_size: int = 20000
    crop_size: int = 32
    batch_size: int = 32
    steps: int = 5000
    lr: float = 2e-3
    final_lr: float = 1e-4
    warmup_steps: int = 50
    kl_weight: float = 1e-6
    grad_clip: float = 1.0
    checkpoint_every: int = 250
    eval_images: int = 256


def read_config(path: Path) -> tuple[AutoencoderConfig, VAETrainConfig]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    unknown = sorted(set(data) - {"model", "training"})
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}")
    model = AutoencoderConfig.from_dict(data.get("model", {}))
    fields = {f.name for f in dataclasses.fields(VAETrainConfig)}
    bad = sorted(set(data.get("training", {})) - fields)
    if bad:
        raise ValueError(f"{path}: training: unknown key {bad[0]!r}")
    return model, VAETrainConfig(**data.get("training", {}))


def image_pool(seed: int, n: int, split: str = "train") -> torch.Tensor:
    """``n`` procedural images as uint8 ``[n, 3, 64, 64]`` (kept small: 12 KB per image)."""
    samples = ProceduralDataset(seed=seed, split=split).take(n)
    return torch.stack([torch.from_numpy(np.array(s.image)).permute(2, 0, 1) for s in samples])


def random_crops(pool: torch.Tensor, batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random ``size``x``size`` crops with random horizontal flips, float ``[batch, 3, size, size]`` in [-1, 1]."""
    index = torch.randint(len(pool), (batch,), generator=generator)
    full = pool.shape[-1]
    top = torch.randint(full - size + 1, (batch,), generator=generator)
    left = torch.randint(full - size + 1, (batch,), generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    crops = torch.stack([pool[i, :, y:y + size, x:x + size] for i, y, x in zip(index, top, left)])
    crops = torch.where(flip[:, None, None, None], crops.flip(-1), crops)
    return crops.float() / 127.5 - 1


@torch.no_grad()
def evaluate(model: AutoencoderKL, images: torch.Tensor) -> float:
    """Mean PSNR (dB) of posterior-mean reconstructions of float images in [-1, 1]."""
    model.eval()
    scores = [psnr(chunk, model.decode(model.encode(chunk).mode())) for chunk in images.split(64)]
    model.train()
    return torch.cat(scores).mean().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/default-vae.yaml"))
    parser.add_argument("--run-dir", type=Path, default=Path("runs/vae"))
    parser.add_argument("--steps", type=int, help="override training.steps")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    model_config, cfg = read_config(args.config)
    if args.steps:
        cfg.steps = args.steps

    torch.manual_seed(cfg.seed)
    model = AutoencoderKL(model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, elapsed = 0, 0.0
    resumed = training.load_latest_checkpoint(args.run_dir)
    if resumed is not None:
        weights, state = resumed
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state.get("elapsed", 0.0)
        training.set_rng_state(state["rng"])

    start = time.perf_counter()
    pool = image_pool(cfg.seed, cfg.pool_size)
    eval_images = images_to_tensor([s.image for s in ProceduralDataset(cfg.seed + 1, "all").take(cfg.eval_images)])
    logger.info("generated %d training images in %.1f s", len(pool), time.perf_counter() - start)

    model.train()
    last_log, started = time.perf_counter(), time.perf_counter() - elapsed
    while step < cfg.steps:
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # data depends only on the step
        batch = random_crops(pool, cfg.batch_size, cfg.crop_size, generator)
        lr = training.warmup_cosine_lr(step, base_lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                                       total_steps=cfg.steps, final_lr=cfg.final_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        reconstruction, posterior = model(batch, generator=generator)
        loss, parts = autoencoder_loss(batch, reconstruction, posterior, kl_weight=cfg.kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        if time.perf_counter() - last_log > 30 or step == cfg.steps:
            rate = step / max(1e-9, time.perf_counter() - started)
            logger.info("step %d/%d loss %.4f (l1 %.4f mse %.4f) lr %.2e %.2f steps/s",
                        step, cfg.steps, loss.item(), parts["l1"], parts["mse"], lr, rate)
            last_log = time.perf_counter()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            logger.info("step %d: eval PSNR %.2f dB", step, evaluate(model, eval_images))
            state = {"optimizer": optimizer.state_dict(), "rng": training.rng_state(),
                     "elapsed": time.perf_counter() - started}
            training.save_checkpoint(args.run_dir, step, model.state_dict(), state)

    finish(model, model_config, eval_images, args.run_dir, time.perf_counter() - started)
    return 0


@torch.no_grad()
def finish(model: AutoencoderKL, config: AutoencoderConfig, eval_images: torch.Tensor, run_dir: Path,
           seconds: float) -> None:
    """Set the latent scaling factor to 1/std and write the final weights and config."""
    model.eval()
    latents = torch.cat([model.encode(chunk).mode() for chunk in eval_images.split(64)])
    scaling = 1.0 / latents.std().item()
    final_config = dataclasses.replace(config, scaling_factor=round(scaling, 5))
    checkpoints.save_safetensors_atomic(model.state_dict(), run_dir / "vae.safetensors")
    (run_dir / "vae.yaml").write_text(yaml.safe_dump({"model": final_config.to_dict(),
                                                      "training_seconds": round(seconds)}), encoding="utf-8")
    logger.info("final PSNR %.2f dB, latent std %.4f -> scaling_factor %.5f, %.0f s of training",
                evaluate(model, eval_images), latents.std().item(), scaling, seconds)


if __name__ == "__main__":
    sys.exit(main())
