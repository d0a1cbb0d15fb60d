#!/usr/bin/env python
"""A bounded load test of the HTTP server on loopback: concurrent clients, checked answers, memory.

    python scripts/bench/serve_load.py                       # 8 clients, 40 requests, 2 rounds
    python scripts/bench/serve_load.py --clients 4 --requests 20 --steps 8

Starts the server (the shipped model) on a free loopback port, sends one warm-up request, then
runs ``--rounds`` rounds of ``--requests`` txt2img requests (each with its own seed) from
``--clients`` concurrent clients. Every answer must be 200 with its own seed in ``info`` and in
the PNG's parameters; afterwards a few of the seeds are requested again one at a time and must
give bitwise the same images. Reports throughput, latency p50/p95 per round, and the server's
resident memory after the warm-up and after each round (growth across rounds would be a leak).
Traffic goes only to 127.0.0.1 and stops after the set number of requests.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import requests

from ldm.server.process import ServerProcess

logger = logging.getLogger("serve_load")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=40, help="requests per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, help="the server's torch threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server_args = ["--threads", str(args.threads)] if args.threads else []
    with ServerProcess(server_args) as server:
        summary = run(server, args)
    print(json.dumps(summary, indent=2) if args.json else report(summary, args))
    return 0 if summary["failures"] == 0 else 1


def run(server: ServerProcess, args: argparse.Namespace) -> dict:
    memory = psutil.Process(server.pid)
    body = {"prompt": "a red house", "steps": args.steps, "width": args.size, "height": args.size}
    session = requests.Session()
    ask(session, server.url, body, seed=10**6)  # warm-up: first-call costs are not load
    summary = {"rss_mib": {"after warm-up": rss_mib(memory)}, "rounds": [], "failures": 0}
    answers = {}
    for round_index in range(args.rounds):
        seeds = [round_index * args.requests + i for i in range(args.requests)]
        started = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(lambda seed: ask(requests, server.url, body, seed), seeds))
        wall = time.monotonic() - started
        latencies = sorted(latency for latency, _ in results)
        failures = [problem for _, (problem, _image) in results if problem]
        answers.update({seed: image for seed, (_, (problem, image)) in zip(seeds, results) if not problem})
        summary["failures"] += len(failures)
        summary["rounds"].append({"requests": len(seeds), "failures": failures[:5], "wall_s": round(wall, 2),
                                  "images_per_s": round(len(seeds) / wall, 2),
                                  "p50_s": round(statistics.median(latencies), 2),
                                  "p95_s": round(latencies[max(0, round(0.95 * len(latencies)) - 1)], 2)})
        summary["rss_mib"][f"after round {round_index + 1}"] = rss_mib(memory)
        logger.info("round %d: %s", round_index + 1, summary["rounds"][-1])
    for seed in list(answers)[:: max(1, len(answers) // 4)]:  # a few again, alone: same bytes
        _latency, (problem, image) = ask(session, server.url, body, seed)
        if problem or image != answers[seed]:
            summary["failures"] += 1
            logger.error("seed %d: the image alone differs from the one under load (%s)", seed, problem)
    return summary


def ask(session, url: str, body: dict, seed: int) -> tuple[float, tuple[str | None, str | None]]:
    """One request -> (latency in s, (problem or None, the base64 image))."""
    started = time.monotonic()
    try:
        response = session.post(url + "/sdapi/v1/txt2img", json={**body, "seed": seed}, timeout=600)
    except requests.RequestException as error:
        return time.monotonic() - started, (f"seed {seed}: {error}", None)
    latency = time.monotonic() - started
    if response.status_code != 200:
        return latency, (f"seed {seed}: HTTP {response.status_code} {response.text[:200]}", None)
    result = response.json()
    info = json.loads(result["info"])
    if info["all_seeds"] != [seed] or f"Seed: {seed}," not in info["infotexts"][0] or len(result["images"]) != 1:
        return latency, (f"seed {seed}: answered with seeds {info['all_seeds']}", None)
    return latency, (None, result["images"][0])


def rss_mib(process: psutil.Process) -> float:
    return round(process.memory_info().rss / 2**20, 1)


def report(summary: dict, args: argparse.Namespace) -> str:
    lines = [f"{args.clients} clients, {args.requests} requests per round, {args.size}x{args.size}, "
             f"{args.steps} steps; failures: {summary['failures']}",
             "| round | images/s | p50 s | p95 s | wall s |", "|---|---|---|---|---|"]
    lines += [f"| {i + 1} | {r['images_per_s']} | {r['p50_s']} | {r['p95_s']} | {r['wall_s']} |"
              for i, r in enumerate(summary["rounds"])]
    lines.append("server RSS (MiB): " + ", ".join(f"{key} {value}" for key, value in summary["rss_mib"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
