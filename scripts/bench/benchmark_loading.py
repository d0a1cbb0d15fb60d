#!/usr/bin/env python
"""Load time and peak memory of a full-size SD 1.5 single-file checkpoint: ours against diffusers.

    python scripts/bench/benchmark_loading.py                       # writes .benchmark-load/ once, then measures
    python scripts/bench/benchmark_loading.py --clean               # ... and deletes .benchmark-load/ afterwards
    python scripts/bench/benchmark_loading.py --workdir /tmp/load   # keep the 4.3 GB file elsewhere
    python scripts/bench/benchmark_loading.py --dtype float16       # load the fp32 file as fp16

The first run writes, into ``--workdir``:

* ``sd15-random.safetensors``: an original CompVis-layout SD 1.5 checkpoint (U-Net, VAE, CLIP
  ViT-L/14 text encoder) with random fp32 weights, about 4.3 GB like ``v1-5-pruned-emaonly``.
  It carries no config metadata of this package, so our loader infers the config from the
  weights, as for any community file. It is written by a subprocess that holds the weights once
  (safetensors writes straight from the tensors' memory).
* ``diffusers-configs/``: a diffusers pipeline folder with configs, tokenizer and scheduler but no
  weights, so that diffusers' ``from_single_file`` runs offline (given only the CompVis YAML it
  would download the text encoder's config from the hub).

Each loader then runs in a fresh subprocess, so the peak resident memory it reports is its own:

* ours: ``Txt2ImgPipeline.from_single_file(file)``;
* diffusers: ``StableDiffusionPipeline.from_single_file(file, original_config=configs/sd-v1-inference.yaml,
  config=diffusers-configs/, local_files_only=True)``.

Memory is the peak resident set size (``getrusage().ru_maxrss``). The baseline is the peak after
the loader's imports (torch, transformers, diffusers), so "load peak - baseline" is what loading
added. safetensors memory-maps the file: a loaded tensor stays backed by the file's pages until
something reads it, and the pages it reads count as resident (file-backed, clean, so the kernel
can drop them under pressure) rather than as allocated (anonymous) memory. A loader that keeps
the mapped tensors therefore shows almost no growth right after loading. The "after first use"
columns read every weight once, as the first generated image does, and are the fair comparison
of what a loaded pipeline costs; ``anon`` is the part of it that is private allocated memory.
The page cache is warmed before each measurement, so load times do not include disk reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

logger = logging.getLogger("benchmark_loading")

CHECKPOINT_NAME = "sd15-random.safetensors"
DIFFUSERS_CONFIGS = "diffusers-configs"
COMPVIS_YAML = REPO / "configs" / "sd-v1-inference.yaml"
LOADERS = ("ours", "diffusers")
MIB = 1024 * 1024
SELF_IGNORE = "*\n"
TARGET_RATIO = 1.3  # issue 5: peak memory of loading within ~1.3x the file size


# ============================================================================================
# The cached inputs (written once)
# ============================================================================================


def sd15_config():
    """Stable Diffusion 1.5's architecture (the CompVis ``v1-inference.yaml``), 512x512 native size."""
    from autoencoder.model import AutoencoderConfig
    from ldm.config import PipelineConfig, SamplingDefaults
    from ldm.sampling.schedule import ScheduleConfig
    from ldm.models.text_encoders import TextEncoderConfig
    from ldm.models.unet import UNetConfig

    return PipelineConfig(
        unet=UNetConfig(), vae=AutoencoderConfig(), text_encoder=TextEncoderConfig.sd1(),
        schedule=ScheduleConfig(), sampling=SamplingDefaults(height=512, width=512, sampler="ddim"),
    )


def write_random_checkpoint(path: Path) -> None:
    """Write an original-layout SD 1.5 file with random fp32 weights, holding the weights once.

    The pipeline's state dicts are views of its parameters, the original-layout dict only renames
    them, and safetensors writes from the tensors' memory, so peak memory is about one file size.
    """
    import torch

    from ldm.formats import checkpoints
    from ldm.pipeline import Txt2ImgPipeline
    from ldm.formats.single_file_write import original_state_dict

    config = sd15_config()
    torch.manual_seed(0)
    start = time.perf_counter()
    pipe = Txt2ImgPipeline.from_config(config)
    logger.info("built a random SD 1.5 pipeline in %.1f s", time.perf_counter() - start)
    parts = {name: getattr(pipe, name).state_dict() for name in checkpoints.COMPONENT_PREFIXES}
    state, _ = original_state_dict(config, parts)
    # No "ldm_config" metadata: like a community file, the config has to come from the weights.
    checkpoints.save_safetensors_atomic(state, path, metadata={"format": "pt"})
    logger.info("wrote %s (%.2f GB) in %.1f s; peak RSS of the writer %.0f MiB", path,
                path.stat().st_size / 1e9, time.perf_counter() - start, peak_rss_mib())


def write_diffusers_configs(folder: Path) -> None:
    """A diffusers pipeline folder with every config and the tokenizer but no weights."""
    from ldm.formats import diffusers_folder as diffusers_io
    from ldm.formats import text_keys as text_keymap
    from ldm.formats import unet_keys as unet_keymap
    from ldm.formats import vae_keys as vae_keymap
    from ldm.models.tokenizer import ClipTokenizer

    config = sd15_config()
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    diffusers_io.write_json(_mkdir(temporary) / "model_index.json", diffusers_io.model_index(config))
    for name, keymap in (("unet", unet_keymap), ("vae", vae_keymap), ("text_encoder", text_keymap)):
        diffusers_io.write_json(_mkdir(temporary / name) / "config.json",
                                diffusers_io.component_config_json(name, keymap, config))
    ClipTokenizer(max_length=config.text_encoder.max_length, pad=config.text_encoder.pad).save_pretrained(
        _mkdir(temporary / "tokenizer"))
    diffusers_io.write_json(_mkdir(temporary / "scheduler") / "scheduler_config.json",
                            diffusers_io.scheduler_json(config))
    temporary.rename(folder)


def _mkdir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def prepare_workdir(workdir: Path) -> Path:
    """Create the cached checkpoint and configs folder when missing; return the checkpoint path."""
    workdir.mkdir(parents=True, exist_ok=True)
    ignore_file = workdir / ".gitignore"
    if not ignore_file.exists():  # a self-ignoring folder: the 4 GB file stays out of `git status`
        ignore_file.write_text(SELF_IGNORE, encoding="utf-8")
    checkpoint = workdir / CHECKPOINT_NAME
    if not checkpoint.is_file():
        logger.info("writing %s (once; a few minutes on a small CPU)", checkpoint)
        run_child(["--write-checkpoint", str(checkpoint)])
    if not (workdir / DIFFUSERS_CONFIGS).is_dir():
        write_diffusers_configs(workdir / DIFFUSERS_CONFIGS)
    return checkpoint


def warm_page_cache(path: Path, chunk_bytes: int = 64 * MIB) -> None:
    """Read the file once so that both loaders find it in the page cache (no disk time measured)."""
    with open(path, "rb") as handle:
        while handle.read(chunk_bytes):
            pass


# ============================================================================================
# Measuring one loader (runs in its own subprocess)
# ============================================================================================


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mib() -> dict[str, float]:
    """Current resident memory split into ``anon`` (allocated) and ``file`` (mapped file pages), MiB."""
    fields = {"RssAnon": "anon", "RssFile": "file"}
    resident = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in fields:
                resident[fields[name]] = int(value.split()[0]) / 1024
    return resident


def import_loader(loader: str, dtype_name: str):
    """Import everything ``loader`` needs (so imports count in the baseline) and return the load function."""
    import torch
    from transformers import CLIPTextModel  # noqa: F401  (both build one; imported lazily by each)

    dtype = getattr(torch, dtype_name)

    if loader == "ours":
        import ldm.formats.single_file  # noqa: F401  (imported inside from_single_file)
        from ldm.pipeline import Txt2ImgPipeline

        def load(checkpoint: Path):
            pipe = Txt2ImgPipeline.from_single_file(checkpoint, dtype=dtype)
            return [pipe.unet, pipe.vae, pipe.text_encoder]

        return load

    import diffusers
    import diffusers.loaders.single_file_utils  # noqa: F401

    diffusers.utils.logging.disable_progress_bar()

    def load(checkpoint: Path):
        configs = checkpoint.parent / DIFFUSERS_CONFIGS
        pipe = diffusers.StableDiffusionPipeline.from_single_file(
            str(checkpoint), original_config=str(COMPVIS_YAML), config=str(configs),
            local_files_only=True, safety_checker=None, torch_dtype=dtype)
        return [pipe.unet, pipe.vae, pipe.text_encoder]

    return load


def read_every_weight(modules) -> tuple[int, float]:
    """Read each parameter and buffer once; return (bytes of weights, a checksum that forces the reads)."""
    import torch

    total_bytes, checksum = 0, 0.0
    with torch.no_grad():
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                total_bytes += tensor.numel() * tensor.element_size()
                checksum += float(tensor.float().sum()) if tensor.is_floating_point() else float(tensor.sum())
    return total_bytes, checksum


def measure(loader: str, checkpoint: Path, dtype_name: str) -> dict[str, float]:
    """Time one load and record memory: baseline, peak during load, and after reading every weight."""
    load = import_loader(loader, dtype_name)
    baseline = peak_rss_mib()
    start = time.perf_counter()
    modules = load(checkpoint)
    seconds = time.perf_counter() - start
    load_peak = peak_rss_mib()
    weight_bytes, _ = read_every_weight(modules)
    return {
        "loader": loader,
        "seconds": seconds,
        "baseline_mib": baseline,
        "load_peak_mib": load_peak,
        "used_peak_mib": peak_rss_mib(),
        "used_anon_mib": resident_mib()["anon"],
        "weights_mib": weight_bytes / MIB,
    }


# ============================================================================================
# Driver
# ============================================================================================


def run_child(arguments: list[str]) -> str:
    """Run this script with ``arguments`` in a fresh Python; return its stdout (its log goes to ours)."""
    command = [sys.executable, str(Path(__file__).resolve()), *arguments]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(arguments)} failed with exit status {result.returncode}")
    return result.stdout


def measure_in_subprocess(loader: str, checkpoint: Path, dtype_name: str) -> dict[str, float]:
    warm_page_cache(checkpoint)
    output = run_child(["--measure", loader, str(checkpoint), "--dtype", dtype_name])
    return json.loads(output.strip().splitlines()[-1])


def table(results: list[dict[str, float]], file_mib: float) -> str:
    """A markdown table; ratios are memory added by loading divided by the file size."""
    lines = [
        "| loader | load s | baseline MiB | load peak MiB | load peak - baseline MiB | ratio to file "
        "| after first use: peak MiB | peak - baseline MiB | ratio to file | anon MiB | weights MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        added_load = r["load_peak_mib"] - r["baseline_mib"]
        added_used = r["used_peak_mib"] - r["baseline_mib"]
        lines.append(
            f"| {r['loader']} | {r['seconds']:.1f} | {r['baseline_mib']:.0f} | {r['load_peak_mib']:.0f} "
            f"| {added_load:.0f} | {added_load / file_mib:.2f} | {r['used_peak_mib']:.0f} | {added_used:.0f} "
            f"| {added_used / file_mib:.2f} | {r['used_anon_mib']:.0f} | {r['weights_mib']:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".benchmark-load"),
                        help="folder for the cached checkpoint and diffusers configs (default: .benchmark-load)")
    parser.add_argument("--clean", action="store_true", help="delete --workdir when done")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="precision the loaders convert to (the file stays fp32; default float32)")
    parser.add_argument("--loaders", nargs="+", choices=LOADERS, default=list(LOADERS), help="which loaders to run")
    # Internal: the subprocesses.
    parser.add_argument("--write-checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=2, metavar=("LOADER", "FILE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    if args.write_checkpoint:
        write_random_checkpoint(args.write_checkpoint)
        return 0
    if args.measure:
        loader, checkpoint = args.measure
        print(json.dumps(measure(loader, Path(checkpoint), args.dtype)))
        return 0

    try:
        checkpoint = prepare_workdir(args.workdir)
        results = []
        for loader in args.loaders:
            logger.info("measuring %s", loader)
            results.append(measure_in_subprocess(loader, checkpoint, args.dtype))
        file_mib = checkpoint.stat().st_size / MIB
    finally:
        if args.clean:
            remove_workdir(args.workdir)
    print_report(results, file_mib, args.dtype)
    return 0


def print_report(results: list[dict[str, float]], file_mib: float, dtype_name: str) -> None:
    import diffusers
    import torch

    print(f"\nLoading an SD 1.5-layout single file: {file_mib:.0f} MiB of random fp32 weights, as {dtype_name}, "
          f"page cache warm; torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(table(results, file_mib))
    ours = next((r for r in results if r["loader"] == "ours"), None)
    if ours is not None:  # the process's overall peak is the one after first use
        ratio = (ours["used_peak_mib"] - ours["baseline_mib"]) / file_mib
        print(f"\nours: peak memory added {ratio:.2f}x the file size "
              f"({'within' if ratio <= TARGET_RATIO else 'ABOVE'} the {TARGET_RATIO}x target)")


def remove_workdir(workdir: Path) -> None:
    """Delete what this script wrote (never anything else a mistaken ``--workdir`` might hold)."""
    (workdir / CHECKPOINT_NAME).unlink(missing_ok=True)
    shutil.rmtree(workdir / DIFFUSERS_CONFIGS, ignore_errors=True)
    ignore_file = workdir / ".gitignore"
    if ignore_file.is_file() and ignore_file.read_text(encoding="utf-8") == SELF_IGNORE:
        ignore_file.unlink()
    try:
        workdir.rmdir()
    except OSError:
        logger.warning("left %s in place: it holds files this script did not write", workdir)


if __name__ == "__main__":
    sys.exit(main())
