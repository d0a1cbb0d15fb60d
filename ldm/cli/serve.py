"""Serve a model over AUTOMATIC1111's HTTP API (``/sdapi/v1/*``) and a page at ``/``.

    python scripts/serve.py                                   # the shipped model on http://127.0.0.1:7860
    python scripts/serve.py --model path/to/sd15 --models-dir models/ --api-auth me:secret
    python scripts/serve.py --listen --api-auth me:secret     # reachable from other machines

Binds 127.0.0.1 unless ``--listen`` is given. Needs the ``serve`` extra (``pip install -e ".[serve]"``).
Mistakes (a missing model, a bad --api-auth, a port in use) are one line and exit code 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys
from pathlib import Path

from ldm.cli import OneLineErrorParser
from ldm.hardware import DTYPE_NAMES

LOOPBACK = "127.0.0.1"
EVERYWHERE = "0.0.0.0"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="serve.py", description="Serve a model over AUTOMATIC1111's HTTP API "
                                "(/sdapi/v1/txt2img, img2img, progress, ...) and a web page at /.")
    parser.add_argument("--model", help="model folder, single file or hub id to start with (default: the shipped "
                        "model)")
    parser.add_argument("--models-dir", type=Path, help="folder of models that clients may switch to "
                        "(sd_model_checkpoint); only models found there can be named")
    parser.add_argument("--host", help=f"address to bind (default {LOOPBACK}; {EVERYWHERE} with --listen); "
                        "anything but a loopback address needs --listen")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free port, logged)")
    parser.add_argument("--listen", action="store_true", help="accept connections from other machines "
                        f"(binds {EVERYWHERE} unless --host is given); use with --api-auth")
    parser.add_argument("--api-auth", metavar="USER:PASS[,USER:PASS...]",
                        help="HTTP basic auth on every route, the page included")
    parser.add_argument("--cors-allow-origins", metavar="ORIGIN[,ORIGIN...]",
                        help="let pages from these origins call the API (default: none)")
    parser.add_argument("--device", default="auto", help="auto (cuda, mps, then cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="auto", help="as txt2img.py --dtype")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    limits = parser.add_argument_group("limits per request (checked before any work)")
    limits.add_argument("--max-body-mb", type=float, default=32, help="request body size, MiB (default 32)")
    limits.add_argument("--max-pixels", type=int, default=1024 * 1024, help="width x height (default 1048576)")
    limits.add_argument("--max-side", type=int, default=2048, help="longest image side (default 2048)")
    limits.add_argument("--max-steps", type=int, default=150, help="sampling steps (default 150)")
    limits.add_argument("--max-images", type=int, default=16, help="batch_size x n_iter (default 16)")
    limits.add_argument("--max-prompt-chars", type=int, default=4000, help="prompt length (default 4000)")
    limits.add_argument("--max-queue", type=int, default=64, help="jobs waiting at once (default 64)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a non-loopback --host without --listen, a bad --api-auth, limits below 1."""
    if args.host is None:
        args.host = EVERYWHERE if args.listen else LOOPBACK
    elif not args.listen and not is_loopback(args.host):
        parser.error(f"--host {args.host} is not a loopback address: add --listen to serve other machines")
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    args.credentials = parse_credentials(parser, args.api_auth) if args.api_auth else None
    for flag in ("max_pixels", "max_side", "max_steps", "max_images", "max_prompt_chars", "max_queue", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if not args.max_body_mb > 0:
        parser.error(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    if args.models_dir is not None and not args.models_dir.is_dir():
        parser.error(f"--models-dir {args.models_dir} is not a folder")
    if args.listen and args.credentials is None:
        logging.getLogger("serve").warning("--listen without --api-auth: anyone who reaches this machine can use it")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_credentials(parser: argparse.ArgumentParser, text: str) -> dict[str, str]:
    credentials = {}
    for pair in text.split(","):
        user, sep, password = pair.partition(":")
        if not sep or not user or not password:
            parser.error("--api-auth takes USER:PASS (several separated by commas), with both parts non-empty")
        credentials[user] = password
    return credentials


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    check_arguments(parser, args)
    try:
        import fastapi  # noqa: F401  (the serve extra)
        import uvicorn
    except ImportError as error:
        parser.error(f"the server needs the serve extra: pip install -e \".[serve]\" ({error.name} is missing)")

    from ldm.errors import LdmError

    try:
        app = build_app(args)
    except LdmError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    try:
        listening = bind(args.host, args.port)
    except OSError as error:  # the port is taken, the address is not this machine's
        print(f"{parser.prog}: error: cannot listen on {args.host}:{args.port}: {error.strerror or error}",
              file=sys.stderr)
        return 2
    logging.getLogger("serve").info("serving on http://%s:%d", args.host, listening.getsockname()[1])
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, server_header=False)
    uvicorn.Server(config).run(sockets=[listening])
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (bound here, so that a taken port is a one-line error)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((host.strip("[]"), port))
        listening.listen(128)
    except OSError:
        listening.close()
        raise
    return listening


def build_app(args: argparse.Namespace):
    """Load the start-up model and build the application (the model loads once, here)."""
    import torch

    from ldm.hardware import pick_device, pick_precision
    from ldm.pipeline import Txt2ImgPipeline
    from ldm.server.app import Server, create_app
    from ldm.server.catalogue import Catalogue
    from ldm.server.limits import Limits
    from ldm.server.options import ServerOptions
    from ldm.server.worker import Worker

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device, what="--device")
    precision = pick_precision(args.dtype, device)

    def load(entry):
        pipe = Txt2ImgPipeline.from_pretrained(entry.path, device=device, dtype=precision.dtype)
        if precision.channels_last:
            pipe.to(memory_format=precision.memory_format)
        return pipe

    initial = Path(args.model).expanduser() if args.model is not None else None
    catalogue = Catalogue(args.models_dir.resolve() if args.models_dir is not None else None, initial)
    limits = Limits(max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_pixels=args.max_pixels,
                    max_side=args.max_side, max_steps=args.max_steps, max_images=args.max_images,
                    max_prompt_chars=args.max_prompt_chars, max_queue=args.max_queue)
    worker = Worker(load, max_queue=limits.max_queue)
    worker.start(catalogue.initial)
    origins = tuple(origin.strip() for origin in (args.cors_allow_origins or "").split(",") if origin.strip())
    server = Server(worker=worker, catalogue=catalogue, options=ServerOptions(catalogue.initial.title), limits=limits,
                    credentials=args.credentials, cors_origins=origins)
    return create_app(server)


if __name__ == "__main__":
    sys.exit(main())
