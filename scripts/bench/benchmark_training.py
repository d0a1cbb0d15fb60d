#!/usr/bin/env python
"""Training throughput (samples/s) of our loop against a diffusers-style loop, same model, same run.

    python scripts/bench/benchmark_training.py                       # the shipped default model, batch 64
    python scripts/bench/benchmark_training.py --model path/to/model --batch 8 --steps 10

"Ours" is ``ldm.training.trainer.train`` itself (accelerate, our U-Net, DDPM objective, AdamW, grad
clipping, caption dropout, EMA of the U-Net) on cached procedural latents. "Theirs" is the loop of
diffusers' ``train_text_to_image.py`` written out: ``UNet2DConditionModel`` + transformers
``CLIPTextModel`` loaded from the same model saved as a diffusers folder, ``DDPMScheduler.add_noise``,
MSE, AdamW, grad clipping and ``EMAModel``, on the same latents and captions with the same batch.
Both train the U-Net only with the text encoder frozen (what that script does), without min-SNR.
The two run alternately in rounds so that a change in machine load hits both alike; each round
is ``--steps`` optimizer steps, after one untimed warm-up step per side before the first round
(ours also pays its per-run set-up inside each round's first step). Prints samples/s and the ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


from ldm.formats import checkpoints
from ldm.training.run_config import parse_run_config
from ldm.training.trainer import train

logger = logging.getLogger("benchmark_training")


def our_config(model: str, batch: int, steps: int, pool: int) -> dict:
    """The ``scripts/train.py`` config both loops follow (U-Net only, EMA, no min-SNR)."""
    return {
        "model": {"init": model},
        "data": {"kind": "procedural", "seed": 0, "pool_size": pool},
        "training": {"batch_size": batch, "steps": steps, "lr": 1e-4, "final_lr": 1e-4, "warmup_steps": 0,
                     "weight_decay": 0.01, "grad_clip": 1.0, "caption_dropout": 0.1, "min_snr_gamma": None,
                     "ema_decay": 0.999, "checkpoint_every": 10 ** 9, "train_text_encoder": False},
    }


def run_ours(config: dict, run_dir: Path, latents_cache: Path) -> float:
    """One round of ``train`` in a fresh run folder (sharing the latent cache); samples/s of its loop."""
    run_dir.mkdir(parents=True)
    for suffix in (".safetensors", ".json"):
        (run_dir / f"latents{suffix}").hardlink_to(latents_cache.with_suffix(suffix))
    result = train(parse_run_config(config, source="benchmark"), run_dir, progress=False)
    return result.samples_per_second


class DiffusersLoop:
    """The training step of diffusers' ``examples/text_to_image/train_text_to_image.py``."""

    def __init__(self, folder: Path, latents: torch.Tensor, captions: list[str], batch: int) -> None:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from diffusers.training_utils import EMAModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").requires_grad_(False).eval()
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet").train()
        self.scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
        self.ema = EMAModel(self.unet.parameters(), decay=0.999, model_cls=UNet2DConditionModel,
                            model_config=self.unet.config)
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=1e-4, weight_decay=0.01)
        self.latents, self.captions, self.batch = latents, captions, batch
        self.generator = torch.Generator().manual_seed(0)

    def step(self) -> float:
        index = torch.randint(len(self.latents), (self.batch,), generator=self.generator)
        keep = torch.rand(self.batch, generator=self.generator) >= 0.1  # caption dropout
        captions = [self.captions[i] if k else "" for i, k in zip(index.tolist(), keep.tolist())]
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = self.text_encoder(ids)[0]
        latents = self.latents[index]
        noise = torch.randn(latents.shape, generator=self.generator)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (self.batch,),
                                  generator=self.generator)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prediction = self.unet(noisy, timesteps, hidden, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.unet.parameters())
        return loss.item()

    def samples_per_second(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        return steps * self.batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the model shipped in the package)")
    parser.add_argument("--batch", type=int, default=64, help="samples per optimizer step (default 64)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per round (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--pool", type=int, default=1024, help="procedural images encoded once (default 1024)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logger.setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)

    from ldm.pipeline import DEFAULT_MODEL_DIR, Txt2ImgPipeline

    model = str(args.model or DEFAULT_MODEL_DIR)
    config = our_config(model, args.batch, args.steps, args.pool)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        Txt2ImgPipeline.from_pretrained(model).save_pretrained(tmp / "diffusers", format="diffusers")
        warm = tmp / "warm-up"
        train(parse_run_config({**config, "training": {**config["training"], "steps": 1}}, source="benchmark"),
              warm, progress=False)  # encodes the latent pool once; every round reuses it
        cache = warm / "latents.safetensors"
        latents = checkpoints.load_state_dict(cache)["latents"]
        captions = json.loads(cache.with_suffix(".json").read_text(encoding="utf-8"))
        theirs_loop = DiffusersLoop(tmp / "diffusers", latents, captions, args.batch)
        theirs_loop.step()  # warm-up, as the one-step run above is for ours
        ours, theirs = [], []
        for round_ in range(args.rounds):
            ours.append(run_ours(config, tmp / f"ours-{round_}", cache))
            theirs.append(theirs_loop.samples_per_second(args.steps))
            logger.info("round %d: ours %.1f samples/s, diffusers-style %.1f samples/s", round_, ours[-1], theirs[-1])
    mine, other = statistics.median(ours), statistics.median(theirs)
    print(f"model {model}, batch {args.batch}, {args.steps} steps x {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    print("| loop | samples/s (median) |")
    print("|---|---|")
    print(f"| ours (ldm.training.trainer.train) | {mine:.1f} |")
    print(f"| diffusers-style (UNet2DConditionModel + DDPMScheduler + AdamW + EMAModel) | {other:.1f} |")
    print(f"ratio ours/diffusers-style: {mine / other:.2f} (above 1 means we train faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
