"""Train or fine-tune a text-to-image model (full, or LoRA); resumable, multi-GPU through accelerate.

    python scripts/train.py --config configs/finetune-example.yaml [training.lr=1e-5 data.source=my_images ...]
    accelerate launch scripts/train.py --config configs/lora-example.yaml     # several GPUs / mixed precision
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 scripts/train.py --config ...   # several CPU processes
    python scripts/train.py --config configs/default-model.yaml --run-dir runs/default   # the default model

``key=value`` pairs override the config by dotted path (values are YAML: ``training.lora.rank=16``);
an unknown key or a wrongly typed value is an error. Re-running the same command resumes from the
newest checkpoint in --run-dir (weights, optimizer, EMA, RNG and data position); ``--resume latest``
insists on one. ``--export`` only writes the newest checkpoint's (EMA) weights to ``output``.

A run directory remembers the settings that define its run (``run.json``: base model, architecture,
VAE, data, objective, LoRA) and refuses a session with other ones, naming them: pass
``--resume-with-new-settings`` to continue the run with them anyway, or ``--restart`` to move the old
run directory aside (``DIR.previous-N``) and start over. An output that exists and was not written
by this run is never replaced without ``--overwrite``. See ldm/training/trainer.py.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


from ldm.cli import OneLineErrorParser


def parse_args(argv: list[str] | None):
    parser = OneLineErrorParser(prog="train.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="training YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    parser.add_argument("--run-dir", type=Path,
                        help="checkpoints, logs, validation grids (default: run_dir in the config, else runs/<name>)")
    parser.add_argument("--resume", choices=("auto", "latest"), default="auto",
                        help="auto: continue when the run dir has checkpoints; latest: require one")
    changed = parser.add_mutually_exclusive_group()
    changed.add_argument("--restart", action="store_true",
                         help="move the run directory's old run aside (DIR.previous-N) and start a new run")
    changed.add_argument("--resume-with-new-settings", action="store_true",
                         help="continue the run in --run-dir although its defining settings differ from these")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an output (model folder, LoRA file) that this run did not write")
    parser.add_argument("--steps", type=int, help="shortcut for training.steps=N (N >= 1)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--export", action="store_true", help="only export the newest checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.restart and (args.export or args.resume == "latest"):
        parser.error(f"--restart starts a new run: it cannot be combined with "
                     f"{'--export' if args.export else '--resume latest'}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    main_process = int(os.environ.get("RANK", "0")) == 0  # set by accelerate launch / torchrun
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="%(asctime)s %(message)s")
    import torch

    from ldm.errors import LdmError
    from ldm.training.run_config import read_run_config
    from ldm.training.trainer import train

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.overrides) + ([f"training.steps={args.steps}"] if args.steps is not None else [])
    settings_changed = "restart" if args.restart else "continue" if args.resume_with_new_settings else "refuse"
    try:
        config = read_run_config(args.config, overrides)
        run_dir = args.run_dir or Path(config.run_dir or Path("runs") / args.config.stem)
        train(config, run_dir, resume=args.resume, export_only=args.export, progress=not args.no_progress,
              settings_changed=settings_changed, overwrite=args.overwrite)
    except LdmError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
