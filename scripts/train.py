#!/usr/bin/env python
"""Train a text-to-image model (U-Net and text encoder jointly) on cached VAE latents; resumable.

    python scripts/train.py --config configs/default-model.yaml [--run-dir runs/default]

Re-running the same command resumes from the newest checkpoint in --run-dir (weights, EMA,
optimizer, step and RNG). ``--export`` writes the EMA weights of the newest checkpoint as a
pipeline folder (``output`` in the config) in float16, without training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autoencoder.model import AutoencoderConfig, AutoencoderKL  # noqa: E402
from ldm import checkpoints, objectives, training  # noqa: E402
from ldm.config import PipelineConfig  # noqa: E402
from ldm.ema import EMA  # noqa: E402
from ldm.pipeline import Txt2ImgPipeline  # noqa: E402
from ldm.procedural import ProceduralDataset, images_to_tensor  # noqa: E402
from ldm.schedule import NoiseSchedule  # noqa: E402
from ldm.text_encoders import build_text_encoder  # noqa: E402
from ldm.unet import UNetModel  # noqa: E402

logger = logging.getLogger("train")


@dataclasses.dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 64
    steps: int = 20000
    lr: float = 6e-4
    final_lr: float = 5e-5
    warmup_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    min_snr_gamma: float | None = 5.0
    noise_offset: float = 0.0
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    keep_checkpoints: int = 2


@dataclasses.dataclass
class DataConfig:
    seed: int = 0
    pool_size: int = 60000


def _strict(cls, values: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values or {}) - known)
    if unknown:
        raise SystemExit(f"train.py: error: {where}: unknown key {unknown[0]!r}")
    return cls(**(values or {}))


def read_config(path: Path) -> tuple[dict, Path, DataConfig, TrainConfig, Path]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    unknown = sorted(set(data) - {"model", "vae", "data", "training", "output"})
    if unknown:
        raise SystemExit(f"train.py: error: {path}: unknown key {unknown[0]!r}")
    return (data["model"], Path(data["vae"]), _strict(DataConfig, data.get("data"), f"{path}: data"),
            _strict(TrainConfig, data.get("training"), f"{path}: training"), Path(data["output"]))


def load_vae(folder: Path) -> AutoencoderKL:
    """The frozen autoencoder written by ``scripts/train_autoencoder.py``."""
    meta = yaml.safe_load((folder / "vae.yaml").read_text(encoding="utf-8"))
    vae = AutoencoderKL(AutoencoderConfig.from_dict(meta["model"]))
    vae.load_state_dict(checkpoints.load_state_dict(folder / "vae.safetensors"))
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def latent_pool(vae: AutoencoderKL, data: DataConfig, cache: Path) -> tuple[torch.Tensor, list[str]]:
    """Posterior-mean latents ``z`` ``[N, C, h, w]`` of ``pool_size`` procedural images, with captions.

    Encoded once and cached in the run folder, so resuming skips the encoding.
    """
    if cache.with_suffix(".json").is_file():
        captions = json.loads(cache.with_suffix(".json").read_text(encoding="utf-8"))
        return checkpoints.load_state_dict(cache)["latents"], captions
    dataset = ProceduralDataset(seed=data.seed, split="train")
    latents, captions, start = [], [], time.perf_counter()
    for first in range(0, data.pool_size, 256):
        samples = dataset.take(min(256, data.pool_size - first), start=first)
        latents.append(vae.encode_latents(images_to_tensor([s.image for s in samples])))
        captions.extend(s.caption for s in samples)
    latents = torch.cat(latents)
    logger.info("encoded %d latents in %.0f s (std %.3f)", len(latents), time.perf_counter() - start, latents.std())
    checkpoints.save_safetensors_atomic({"latents": latents}, cache)
    cache.with_suffix(".json").write_text(json.dumps(captions), encoding="utf-8")
    return latents, captions


def build_pipeline_config(model: dict, vae: AutoencoderKL) -> PipelineConfig:
    return PipelineConfig.from_dict({**model, "vae": vae.config.to_dict()}, source="model")


def training_step(unet, text_encoder, schedule: NoiseSchedule, z: torch.Tensor, captions: list[str],
                  cfg: TrainConfig, prediction: str, generator: torch.Generator) -> torch.Tensor:
    """One DDPM loss evaluation (Algorithm 1) on a batch of latents ``z`` ``[B, C, h, w]``."""
    captions = objectives.drop_captions(captions, cfg.caption_dropout, generator=generator)
    context = text_encoder(text_encoder.tokenizer(captions))
    t = objectives.sample_timesteps(len(z), schedule.config.num_train_timesteps, generator=generator)
    eps = objectives.sample_noise(z, generator=generator, offset=cfg.noise_offset)
    abar = schedule.alphas_cumprod[t].float()
    x_t = objectives.add_noise(z, eps, abar)
    target = objectives.training_target(z, eps, abar, prediction)
    weights = objectives.min_snr_weights(abar, cfg.min_snr_gamma, prediction)
    return objectives.diffusion_loss(unet(x_t, t.float(), context), target, weights)


def export(config: PipelineConfig, vae: AutoencoderKL, ema_unet: dict, ema_text: dict, output: Path,
           note: dict) -> None:
    """Write the EMA weights as a pipeline folder in float16."""
    unet, text_encoder = UNetModel(config.unet), build_text_encoder(config.text_encoder)
    unet.load_state_dict(ema_unet)
    text_encoder.load_state_dict(ema_text)
    pipe = Txt2ImgPipeline(config, unet, vae, text_encoder)
    pipe.save_pretrained(output, dtype=torch.float16)
    (output / "training.json").write_text(json.dumps(note, indent=2) + "\n", encoding="utf-8")
    logger.info("exported EMA weights to %s", output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/default-model.yaml"))
    parser.add_argument("--run-dir", type=Path, default=Path("runs/default"))
    parser.add_argument("--steps", type=int, help="override training.steps")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--export", action="store_true", help="only export the newest checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dict, vae_dir, data_cfg, cfg, output = read_config(args.config)
    if args.steps:
        cfg.steps = args.steps

    vae = load_vae(vae_dir)
    config = build_pipeline_config(model_dict, vae)
    torch.manual_seed(cfg.seed)
    unet, text_encoder = UNetModel(config.unet), build_text_encoder(config.text_encoder)
    schedule = NoiseSchedule(config.schedule)
    ema_unet, ema_text = EMA(unet, cfg.ema_decay), EMA(text_encoder, cfg.ema_decay)
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, elapsed = 0, 0.0
    resumed = training.load_latest_checkpoint(args.run_dir)
    if resumed is not None:
        weights, state = resumed
        parts = checkpoints.split_components(weights)
        unet.load_state_dict(parts["unet"])
        text_encoder.load_state_dict(parts["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        step, elapsed = state["step"], state.get("elapsed", 0.0)
        training.set_rng_state(state["rng"])
    note = {"config": str(args.config), "steps": step, "train_seconds": round(elapsed),
            "samples_seen": step * cfg.batch_size}
    if args.export:
        export(config, vae, ema_unet.shadow, ema_text.shadow, output, note)
        return 0

    latents, captions = latent_pool(vae, data_cfg, args.run_dir / "latents.safetensors")
    unet.train(), text_encoder.train()
    started, last_log, running = time.perf_counter() - elapsed, time.perf_counter(), None
    session_start, session_first_step = time.perf_counter(), step
    while step < cfg.steps:
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # data depends only on step
        index = torch.randint(len(latents), (cfg.batch_size,), generator=generator)
        lr = training.warmup_cosine_lr(step, base_lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                                       total_steps=cfg.steps, final_lr=cfg.final_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = training_step(unet, text_encoder, schedule, latents[index], [captions[i] for i in index.tolist()],
                             cfg, config.schedule.prediction, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip)
        optimizer.step()
        ema_unet.update(unet), ema_text.update(text_encoder)
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if time.perf_counter() - last_log > 60 or step == cfg.steps:
            rate = (step - session_first_step) * cfg.batch_size / (time.perf_counter() - session_start)
            logger.info("step %d/%d loss %.4f lr %.2e %.1f samples/s", step, cfg.steps, running, lr, rate)
            last_log = time.perf_counter()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            weights = checkpoints.join_components({"unet": unet.state_dict(),
                                                   "text_encoder": text_encoder.state_dict()})
            state = {"optimizer": optimizer.state_dict(), "ema_unet": ema_unet.state_dict(),
                     "ema_text": ema_text.state_dict(), "rng": training.rng_state(),
                     "elapsed": time.perf_counter() - started}
            training.save_checkpoint(args.run_dir, step, weights, state, keep=cfg.keep_checkpoints)
    note.update(steps=step, train_seconds=round(time.perf_counter() - started), samples_seen=step * cfg.batch_size)
    export(config, vae, ema_unet.shadow, ema_text.shadow, output, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
