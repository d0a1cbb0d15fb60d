#!/usr/bin/env python
"""Train the default model's autoencoder on procedural images (resumable).

    python scripts/toy/train_autoencoder.py --config configs/default-vae.yaml --run-dir runs/vae

Two stages, each resumable (re-running the same command continues from the newest checkpoint):

1. the whole autoencoder on random crops (reconstruction + a tiny KL term); at its end the
   scaling factor is set to 1/std of the latents (Rombach et al. 2022, Sec. 4.3.2 / App. G);
2. optionally (``decoder_finetune.steps > 0``) the decoder alone on full images with the encoder
   frozen, as Stability did for SD's "ft-MSE" VAE: sharper images, identical latents, so a
   diffusion model trained on the stage-1 latents stays valid;
3. optionally (``joint_finetune.steps > 0``) encoder and decoder together on full images, with
   ``anchor_weight * |mu - mu_2|^2`` tying the posterior mean to the stage-2 encoder's, so the
   latents move only slightly (the log prints their relative drift) and a diffusion model trained
   on them stays valid, while the encoder can put more detail into them.

The result is written to ``<run-dir>/vae.safetensors`` + ``vae.yaml``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml


from autoencoder.losses import autoencoder_loss, psnr, reconstruction_terms
from autoencoder.model import AutoencoderConfig, AutoencoderKL
from ldm.cli import OneLineErrorParser
from ldm.errors import ConfigError
from ldm.formats import checkpoints
from ldm.training import run_state
from ldm.config_io import check_keys, read_yaml, strict_from_dict
from ldm.toy.procedural import ProceduralDataset, images_to_tensor

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


@dataclasses.dataclass
class DecoderFinetuneConfig:
    steps: int = 0
    batch_size: int = 16
    crop_size: int = 64
    lr: float = 5e-4
    final_lr: float = 1e-5
    warmup_steps: int = 20
    grad_clip: float = 1.0
    checkpoint_every: int = 250


@dataclasses.dataclass
class JointFinetuneConfig(DecoderFinetuneConfig):
    anchor_weight: float = 0.02  # weight of the mean squared latent drift from the stage-2 encoder


SECTIONS = {"model": AutoencoderConfig, "training": VAETrainConfig, "decoder_finetune": DecoderFinetuneConfig,
            "joint_finetune": JointFinetuneConfig}


def read_config(path: Path) -> tuple[AutoencoderConfig, VAETrainConfig, DecoderFinetuneConfig, JointFinetuneConfig]:
    """The config's sections, read strictly: an unknown key or a bad value is a ConfigError naming its dotted path."""
    data = read_yaml(path) or {}
    check_keys(data, SECTIONS, source=str(path))
    sections = tuple(strict_from_dict(cls, data.get(name) or {}, source=str(path), key=name)
                     for name, cls in SECTIONS.items())
    check_counts(sections[1:], source=str(path))
    return sections


def check_counts(stages, *, source: str) -> None:
    """Refuse step counts, batch sizes and checkpoint intervals that would train nothing or never stop:
    ``training.steps`` >= 1, the fine-tuning stages' steps >= 0 (0 skips the stage), the rest >= 1."""
    for section, stage in zip(list(SECTIONS)[1:], stages):
        for name in ("steps", "batch_size", "checkpoint_every"):
            least = 0 if name == "steps" and section != "training" else 1
            if getattr(stage, name) < least:
                raise ConfigError(f"{source}: {section}.{name} must be >= {least}, got {getattr(stage, name)}")


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


def full_model_loss(model: AutoencoderKL, batch: torch.Tensor, generator: torch.Generator, kl_weight: float):
    reconstruction, posterior = model(batch, generator=generator)
    return autoencoder_loss(batch, reconstruction, posterior, kl_weight=kl_weight)


def decoder_loss(model: AutoencoderKL, batch: torch.Tensor, generator: torch.Generator):
    """L1 + MSE of the decoder on the frozen encoder's posterior mean."""
    with torch.no_grad():
        latents = model.encode(batch).mode()
    reconstruction = model.decode(latents)
    l1, mse = reconstruction_terms(batch, reconstruction)
    return l1 + mse, {"l1": l1.item(), "mse": mse.item()}


def anchored_loss(model: AutoencoderKL, batch: torch.Tensor, generator: torch.Generator,
                  reference: AutoencoderKL, anchor_weight: float):
    """L1 + MSE of the whole autoencoder on posterior means, plus ``anchor_weight`` times the mean
    squared distance of those means from the frozen ``reference`` encoder's."""
    latents = model.encode(batch).mode()
    with torch.no_grad():
        anchor = reference.encode(batch).mode()
    reconstruction = model.decode(latents)
    l1, mse = reconstruction_terms(batch, reconstruction)
    drift = (latents - anchor).pow(2).mean()
    return l1 + mse + anchor_weight * drift, {"l1": l1.item(), "mse": mse.item()}


@torch.no_grad()
def relative_drift(model: AutoencoderKL, reference: AutoencoderKL, images: torch.Tensor) -> float:
    """RMS distance of ``model``'s posterior means from ``reference``'s, relative to their std."""
    model.eval()
    latents, anchor = model.encode(images).mode(), reference.encode(images).mode()
    model.train()
    return ((latents - anchor).pow(2).mean() / anchor.var()).sqrt().item()


def run_stage(name: str, model: AutoencoderKL, parameters: list, stage, run_dir: Path, pool: torch.Tensor,
              eval_images: torch.Tensor, loss_fn, seed: int) -> float:
    """Train ``parameters`` for ``stage.steps`` steps with checkpoints in ``run_dir``; returns seconds spent."""
    optimizer = torch.optim.AdamW(parameters, lr=stage.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, elapsed = 0, 0.0
    resumed = run_state.load_latest_checkpoint(run_dir)
    if resumed is not None:
        weights, state = resumed
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state.get("elapsed", 0.0)
        run_state.set_rng_state(state["rng"])
    model.train()
    last_log, started, first_step = time.perf_counter(), time.perf_counter() - elapsed, step
    session_start = time.perf_counter()
    while step < stage.steps:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)  # data depends only on the step
        batch = random_crops(pool, stage.batch_size, stage.crop_size, generator)
        lr = run_state.warmup_cosine_lr(step, base_lr=stage.lr, warmup_steps=stage.warmup_steps,
                                       total_steps=stage.steps, final_lr=stage.final_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, parts = loss_fn(model, batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, stage.grad_clip)
        optimizer.step()
        step += 1
        if time.perf_counter() - last_log > 30 or step == stage.steps:
            rate = (step - first_step) / max(1e-9, time.perf_counter() - session_start)
            logger.info("%s step %d/%d loss %.4f (l1 %.4f mse %.4f) lr %.2e %.2f steps/s",
                        name, step, stage.steps, loss.item(), parts["l1"], parts["mse"], lr, rate)
            last_log = time.perf_counter()
        if step % stage.checkpoint_every == 0 or step == stage.steps:
            logger.info("%s step %d: eval PSNR %.2f dB", name, step, evaluate(model, eval_images))
            state = {"optimizer": optimizer.state_dict(), "rng": run_state.rng_state(),
                     "elapsed": time.perf_counter() - started}
            run_state.save_checkpoint(run_dir, step, model.state_dict(), state)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="train_autoencoder.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/default-vae.yaml"))
    parser.add_argument("--run-dir", type=Path, default=Path("runs/vae"))
    parser.add_argument("--steps", type=int, help="override training.steps (>= 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--update-model", type=Path, metavar="FOLDER",
                        help="afterwards, put the trained autoencoder into this pipeline folder (same architecture "
                             "and scaling factor; its U-Net and text encoder are kept)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from ldm.errors import LdmError

    try:
        model_config, cfg, decoder_cfg, joint_cfg = read_config(args.config)
        if args.update_model:
            check_model_folder(args.update_model, model_config)  # before training, not after it
    except (LdmError, ValueError, OSError) as error:
        print(f"train_autoencoder.py: error: {error}", file=sys.stderr)
        return 2
    if args.steps is not None:
        cfg.steps = args.steps

    torch.manual_seed(cfg.seed)
    model = AutoencoderKL(model_config)
    start = time.perf_counter()
    pool = image_pool(cfg.seed, cfg.pool_size)
    eval_images = images_to_tensor([s.image for s in ProceduralDataset(cfg.seed + 1, "all").take(cfg.eval_images)])
    logger.info("generated %d training images in %.1f s", len(pool), time.perf_counter() - start)

    seconds = run_stage("autoencoder", model, list(model.parameters()), cfg, args.run_dir, pool, eval_images,
                        lambda m, b, g: full_model_loss(m, b, g, cfg.kl_weight), cfg.seed)
    scaling = latent_scaling_factor(model, eval_images)
    if decoder_cfg.steps > 0:
        decoder_parameters = [*model.decoder.parameters(), *model.post_quant_conv.parameters()]
        model.encoder.requires_grad_(False), model.quant_conv.requires_grad_(False)
        seconds += run_stage("decoder", model, decoder_parameters, decoder_cfg, args.run_dir / "decoder", pool,
                             eval_images, decoder_loss, cfg.seed + 7)
    if joint_cfg.steps > 0:
        reference = copy.deepcopy(model).eval().requires_grad_(False)  # the stage-2 autoencoder
        model.requires_grad_(True)
        seconds += run_stage("joint", model, list(model.parameters()), joint_cfg, args.run_dir / "joint", pool,
                             eval_images,
                             lambda m, b, g: anchored_loss(m, b, g, reference, joint_cfg.anchor_weight),
                             cfg.seed + 11)
        logger.info("latent drift from stage 2: %.4f of the latent std", relative_drift(model, reference, eval_images))
    finish(model, model_config, scaling, eval_images, args.run_dir, seconds)
    if args.update_model:
        update_model(args.update_model, model, dataclasses.replace(model_config, scaling_factor=scaling))
    return 0


def check_model_folder(folder: Path, config: AutoencoderConfig) -> None:
    """Raise unless ``folder`` holds a pipeline whose autoencoder has ``config``'s architecture
    (the scaling factor is only known after stage 1; :func:`update_model` checks it)."""
    from ldm.config import load_config

    theirs = load_config(folder / "config.yaml").vae
    if dataclasses.replace(theirs, scaling_factor=config.scaling_factor) != config:
        raise ValueError(f"{folder}: its autoencoder has a different architecture than {config}")


def update_model(folder: Path, model: AutoencoderKL, config: AutoencoderConfig) -> None:
    """Replace the autoencoder weights of the pipeline saved in ``folder``, keeping its storage dtype,
    its other components, its model card and its ``training.json``."""
    from ldm.pipeline import Txt2ImgPipeline

    pipe = Txt2ImgPipeline.from_pretrained(folder)
    if pipe.vae.config.to_dict() != config.to_dict():
        raise ValueError(f"{folder}: its autoencoder config differs from the trained one; not replacing it")
    dtype = next(iter(checkpoints.load_state_dict(folder / "model.safetensors").values())).dtype
    note = (folder / "training.json").read_text(encoding="utf-8") if (folder / "training.json").is_file() else None
    pipe.vae.load_state_dict(model.state_dict())
    pipe.save_pretrained(folder, dtype=dtype)
    if note is not None:
        checkpoints.write_text_atomic(folder / "training.json", note)
    logger.info("updated the autoencoder of %s (%s)", folder, dtype)


@torch.no_grad()
def latent_scaling_factor(model: AutoencoderKL, eval_images: torch.Tensor) -> float:
    """1 / std of the posterior-mean latents, so the diffusion model sees unit-variance ``z``."""
    model.eval()
    latents = torch.cat([model.encode(chunk).mode() for chunk in eval_images.split(64)])
    logger.info("latent std %.4f -> scaling_factor %.5f", latents.std().item(), 1.0 / latents.std().item())
    return round(1.0 / latents.std().item(), 5)


@torch.no_grad()
def finish(model: AutoencoderKL, config: AutoencoderConfig, scaling: float, eval_images: torch.Tensor,
           run_dir: Path, seconds: float) -> None:
    """Write the final weights and config (with the stage-1 scaling factor)."""
    final_config = dataclasses.replace(config, scaling_factor=scaling)
    checkpoints.save_safetensors_atomic(model.state_dict(), run_dir / "vae.safetensors")
    checkpoints.write_text_atomic(run_dir / "vae.yaml", yaml.safe_dump({"model": final_config.to_dict(),
                                                                       "training_seconds": round(seconds)}))
    logger.info("final PSNR %.2f dB, %.0f s of training", evaluate(model, eval_images), seconds)


if __name__ == "__main__":
    sys.exit(main())
