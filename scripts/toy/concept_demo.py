#!/usr/bin/env python
"""Fine-tuning demonstration: teach the default model a concept it has never seen (crescent moons).

    python scripts/toy/concept_demo.py data --out data/moons --n 80 --prior 800 --repeats 10  # the custom dataset
    python scripts/train.py --config configs/moon-finetune.yaml             # full fine-tune
    python scripts/train.py --config configs/moon-lora.yaml                 # LoRA
    python scripts/toy/concept_demo.py measure --out runs/moon-demo \\
        base=ldm/toy/default_model full=runs/moon-finetune/model \\
        lora=ldm/toy/default_model+runs/moon-lora/model/lora.safetensors

``measure`` reports, per model: the share of generations for "an illustration of a <colour> moon"
(8 colours x 8 seeds, a prompt template the training captions never use) that a moon detector
reads as moons, the judge's colour accuracy on them, and the standard evaluation of the old concepts
(``ldm.toy.evaluation``: 240 prompts, seen and held-out pairs, Frechet distance) to show what the
fine-tune kept. The moon detector (``ldm.toy.new_concept.ConceptDetector``) is fitted on moons and
procedural images with seeds disjoint from the fine-tuning set; its held-out accuracy is printed.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch


from ldm.cli import OneLineErrorParser

logger = logging.getLogger("concept_demo")


def parse_model_spec(spec: str) -> tuple[str, str, str | None]:
    """``NAME=MODEL[+LORA_FILE]`` -> (name, model, lora or None)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"expected NAME=MODEL[+LORA_FILE], got {spec!r}")
    model, _, lora = rest.partition("+")
    return name, model, lora or None


def load_model(model: str, lora: str | None):
    from ldm.formats.lora import load_lora
    from ldm.pipeline import Txt2ImgPipeline

    pipe = Txt2ImgPipeline.from_pretrained(model)
    if lora:
        load_lora(pipe, lora)
    return pipe


def concept_scores(pipe, judge, detector, per_colour: int, batch_size: int = 16) -> tuple[dict, list]:
    """Generate the moon prompts (prompt ``i`` with seed ``i``) and read them."""
    from ldm.toy.evaluation import EvalPrompt, generate_images
    from ldm.toy.new_concept import eval_prompts

    prompts = eval_prompts(per_colour)
    requests = [EvalPrompt(prompt, colour, "moon", held_out=False, seed=i) for i, (prompt, colour) in enumerate(prompts)]
    images = generate_images(pipe, requests, pipe.sampling_options(), batch_size=batch_size)
    p_moon = detector.probability(images)
    colours = [r["colour"] for r in judge.classify(images)]
    return {
        "n": len(images),
        "moon": (p_moon > 0.5).float().mean().item(),
        "mean_p_moon": p_moon.mean().item(),
        "colour": sum(c == want for c, (_, want) in zip(colours, prompts)) / len(prompts),
    }, images


def old_concept_scores(pipe, judge) -> dict:
    from ldm.toy.evaluation import EvaluationSettings, evaluate

    result = evaluate(pipe, judge, EvaluationSettings())
    generated = result.accuracy["generated"]
    return {"seen_object": generated["seen"]["object"], "seen_colour": generated["seen"]["colour"],
            "seen_both": generated["seen"]["both"], "held_out_both": generated["held_out"]["both"],
            "frechet_ratio": result.frechet["ratio"]}


def markdown(rows: dict, detector_accuracy: dict) -> str:
    lines = [
        "| model | moon prompts: read as moon | moon colour correct | old: seen object | old: seen colour "
        "| old: seen both | old: held-out both | old: FD / floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        c, o = r["concept"], r["old"]
        lines.append(f"| {name} | {100 * c['moon']:.1f}% | {100 * c['colour']:.1f}% | {100 * o['seen_object']:.1f}% "
                     f"| {100 * o['seen_colour']:.1f}% | {100 * o['seen_both']:.1f}% "
                     f"| {100 * o['held_out_both']:.1f}% | {o['frechet_ratio']:.2f}x |")
    lines.append("")
    lines.append(f"Moon detector on held-out real and VAE-decoded images: moons {100 * detector_accuracy['moons']:.1f}% "
                 f"recognised, other kinds {100 * detector_accuracy['other_kinds']:.1f}% rejected.")
    return "\n".join(lines) + "\n"


def measure(args) -> None:
    from ldm.images import make_grid
    from ldm.toy.judge import Judge
    from ldm.toy.new_concept import fit_detector

    specs = [parse_model_spec(s) for s in args.models]
    args.out.mkdir(parents=True, exist_ok=True)
    judge = Judge.load(args.judge)
    detector = accuracy = None
    rows = {}
    for name, model, lora in specs:
        pipe = load_model(model, lora)
        if detector is None:
            detector, accuracy = fit_detector(judge, pipe.vae)
        concept, images = concept_scores(pipe, judge, detector, args.per_colour)
        rows[name] = {"model": model, "lora": lora, "concept": concept, "old": old_concept_scores(pipe, judge)}
        make_grid(images[:: args.per_colour][:8] + images[1:: args.per_colour][:8], columns=8).save(
            args.out / f"moons-{name}.png")
        logger.info("%s: %s", name, json.dumps(rows[name]))
    table = markdown(rows, accuracy)
    (args.out / "concept.json").write_text(json.dumps({"detector": accuracy, "models": rows}, indent=2) + "\n")
    (args.out / "concept.md").write_text(table, encoding="utf-8")
    print(table)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="write the custom moon dataset (imagefolder + metadata.jsonl)")
    data.add_argument("--out", type=Path, required=True)
    data.add_argument("--n", type=int, default=80, help="number of images (default 80)")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--prior", type=int, default=0,
                      help="also write this many images of the known kinds (prior preservation; default 0)")
    data.add_argument("--repeats", type=int, default=1,
                      help="the moons' repeats column: appearances per epoch (default 1)")
    run = commands.add_parser("measure", help="measure models on moon prompts and on the old concepts")
    run.add_argument("models", nargs="+", help="NAME=MODEL_FOLDER[+LORA_FILE]")
    run.add_argument("--out", type=Path, default=Path("runs/moon-demo"))
    run.add_argument("--per-colour", type=int, default=8, help="moon images per colour (default 8)")
    run.add_argument("--judge", help="judge weights (default: the shipped judge)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    from ldm.errors import LdmError

    try:
        if args.command == "data":
            from ldm.toy.new_concept import export_moon_folder

            if args.repeats < 1:
                raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
            export_moon_folder(args.out, args.n, args.seed, prior=args.prior, repeats=args.repeats)
        else:
            measure(args)
    except (LdmError, FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"concept_demo.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
