#!/usr/bin/env python
"""Measure classifier guidance on the default model with the judge.

    python scripts/toy/classifier_guidance_eval.py --out runs/classifier-eval

Two experiments (64x64, the model's sampler and steps; the judge reads every image):

1. Unconditional: an empty prompt without classifier-free guidance (the unconditional model), guided
   towards a requested (colour, object) at several classifier scales; the rate at which the judge reads
   the requested object / colour / both. Scale 0 draws any class: the baseline.
2. Text plus classifier guidance: the evaluation prompts of ``scripts/toy/evaluate.py`` (seen and held-out
   pairs) with the model's classifier-free guidance, each guided towards its own pair, with and without
   classifier guidance.

Writes ``classifier_guidance.md`` and ``.json`` into --out, and a grid of experiment 1's images.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from ldm.cli import OneLineErrorParser


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="classifier_guidance_eval.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="base model (default: the shipped one)")
    parser.add_argument("--classifier", type=Path, help="classifier folder (default: the shipped one)")
    parser.add_argument("--scales", default="0,2,4,8", help="classifier scales of experiment 1 (comma-separated)")
    parser.add_argument("--targets", type=int, default=12, help="requested classes in experiment 1 (default 12)")
    parser.add_argument("--seeds", type=int, default=5, help="images per class and scale in experiment 1")
    parser.add_argument("--text-scale", type=float, default=4.0, help="classifier scale of experiment 2")
    parser.add_argument("--n", type=int, default=240, help="prompts of experiment 2 (default 240; at least 20)")
    parser.add_argument("--out", type=Path, default=Path("outputs/classifier-guidance"))
    return parser


def unconditional_experiment(pipe, judge, classifier, scales, targets, seeds):
    from ldm.sampling.classifier_guidance import ClassifierGuidance

    rows, images = [], []
    for scale in scales:
        hits = {"object": 0, "colour": 0, "both": 0}
        for colour, object in targets:
            guidance = ClassifierGuidance(classifier, f"{colour} {object}")
            for seed in range(seeds):
                image = pipe("", guidance_scale=1.0, seed=seed, classifier_guidance=guidance,
                             classifier_scale=scale)[0]
                reading = judge.classify([image])[0]
                hits["object"] += reading["object"] == object
                hits["colour"] += reading["colour"] == colour
                hits["both"] += reading["object"] == object and reading["colour"] == colour
                images.append(image)
        total = len(targets) * seeds
        rows.append({"scale": scale, "n": total, **{k: v / total for k, v in hits.items()}})
        logging.info("unconditional, scale %g: %s", scale, rows[-1])
    return rows, images


def text_experiment(pipe, judge, classifier, scale, n):
    from ldm.sampling.classifier_guidance import ClassifierGuidance
    from ldm.toy.evaluation import accuracy, evaluation_prompts

    prompts = evaluation_prompts(n, heldout_per_pair=min(5, n // 20))
    results = {}
    for label, current in (("without", 0.0), ("with", scale)):
        images = []
        for p in prompts:
            guidance = ClassifierGuidance(classifier, f"{p.colour} {p.object}")
            images += pipe(p.prompt, seed=p.seed, classifier_guidance=guidance, classifier_scale=current)
        results[label] = {"scale": current, **accuracy(judge.classify(images), prompts)}
        logging.info("text, classifier scale %g: %s", current, results[label])
    return results


def markdown(unconditional, text, targets, seeds) -> str:
    lines = ["## Unconditional model (empty prompt, no classifier-free guidance)", "",
             f"{len(targets)} requested classes x {seeds} seeds per scale; the judge's reading.", "",
             "| classifier scale | n | object | colour | both |", "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['scale']:g} | {r['n']} | {r['object']:.1%} | {r['colour']:.1%} | {r['both']:.1%} |"
              for r in unconditional]
    lines += ["", "## Text prompts plus classifier guidance (towards each prompt's own pair)", "",
              "| classifier scale | pairs | n | object | colour | both |",
              "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for result in text.values():
        for group in ("seen", "held_out"):
            row = result[group]
            lines.append(f"| {result['scale']:g} | {group.replace('_', '-')} | {row['n']} | {row['object']:.1%} | "
                         f"{row['colour']:.1%} | {row['both']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        scales = [float(s) for s in args.scales.split(",")]
    except ValueError:
        parser.error(f"--scales must be comma-separated numbers, got {args.scales!r}")
    if args.n < 20 or args.targets < 1 or args.seeds < 1:
        parser.error("--n must be at least 20, --targets and --seeds at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from ldm.cli.stages import DEFAULT_CLASSIFIER
    from ldm.formats.classifier import load_classifier
    from ldm.images import make_grid
    from ldm.pipeline import Txt2ImgPipeline
    from ldm.toy.evaluation import evaluation_prompts
    from ldm.toy.judge import Judge

    started = time.perf_counter()
    pipe, judge = Txt2ImgPipeline.from_pretrained(args.model), Judge.load()
    classifier = load_classifier(args.classifier or DEFAULT_CLASSIFIER)
    targets = []
    for p in evaluation_prompts(240):  # seen and held-out pairs, in the evaluation's balanced order
        if (p.colour, p.object) not in targets and len(targets) < args.targets:
            targets.append((p.colour, p.object))
    unconditional, images = unconditional_experiment(pipe, judge, classifier, scales, targets, args.seeds)
    text = text_experiment(pipe, judge, classifier, args.text_scale, args.n)
    args.out.mkdir(parents=True, exist_ok=True)
    report = markdown(unconditional, text, targets, args.seeds)
    (args.out / "classifier_guidance.md").write_text(report, encoding="utf-8")
    (args.out / "classifier_guidance.json").write_text(json.dumps(
        {"targets": targets, "seeds": args.seeds, "unconditional": unconditional, "text": text,
         "seconds": round(time.perf_counter() - started)}, indent=2) + "\n", encoding="utf-8")
    make_grid(images, columns=len(targets) * args.seeds).save(args.out / "unconditional_grid.png")  # a row per scale
    print(report, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
