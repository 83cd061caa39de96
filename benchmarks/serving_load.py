"""Load test of ``florence serve`` on loopback: concurrent classification and search requests.

Starts ``florence serve`` on 127.0.0.1 with an ephemeral port. ``--concurrency`` clients send
a mix of ``/classify``, ``/search/text`` and ``/search/image`` requests (real Flickr8k photos
and captions) until ``--requests`` have been sent or ``--duration`` seconds have passed,
whichever comes first. The script then checks ``/healthz`` and ``/readyz``, stops the server
and writes the "HTTP API load test" section of docs/benchmarks.md. Exits with status 1 when
any request failed or the server was not healthy afterwards. No traffic leaves 127.0.0.1.

    python -m benchmarks.serving_load --index DIR [--checkpoint CKPT] [--concurrency 8]
        [--requests 600] [--duration 60] [--no-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import httpx
import numpy as np

from benchmarks._report import environment_rows, update_section

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTION_TITLE = "HTTP API load test"
LABELS = "dog, cat, child, beach, bicycle, street, water, grass"
KINDS = ("classify", "search_text", "search_image")


class ServerProcess:
    """``florence serve`` in a subprocess; its log lines are collected by a reader thread."""

    def __init__(self, arguments: list[str]) -> None:
        command = [sys.executable, "-m", "florence.cli.main", "serve", "--host", "127.0.0.1", "--port", "0", *arguments]
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self.url: str | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.log.append(line)
            match = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            if match:
                self.url = match.group(1)

    def wait_ready(self, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("florence serve exited:\n" + "".join(self.log[-20:]))
            if self.url is not None and httpx.get(self.url + "/readyz", timeout=10).status_code == 200:
                return self.url
            time.sleep(0.2)
        raise TimeoutError(f"florence serve was not ready after {timeout} s")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def _load_inputs(data: Path, count: int = 50) -> tuple[list[bytes], list[str]]:
    with open(data / "flickr8k_800" / "captions.tsv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    photos = sorted({row["image"] for row in rows})[:count]
    return [(data / "flickr8k_800" / photo).read_bytes() for photo in photos], [row["caption"] for row in rows[: 5 * count]]


async def _send(client: httpx.AsyncClient, kind: str, number: int, photos: list[bytes], captions: list[str]) -> httpx.Response:
    photo = photos[number % len(photos)]
    if kind == "classify":
        return await client.post("/classify", files={"file": ("photo.jpg", photo, "image/jpeg")}, data={"labels": LABELS})
    if kind == "search_text":
        return await client.post("/search/text", json={"query": captions[number % len(captions)], "k": 10})
    return await client.post("/search/image", files={"file": ("photo.jpg", photo, "image/jpeg")}, data={"k": "10"})


async def run_load(url: str, concurrency: int, max_requests: int, duration: float, photos: list[bytes], captions: list[str]) -> tuple[dict, list[str], float]:
    """Return latencies in seconds per kind, failure messages and the wall time of the run."""
    latencies: dict[str, list[float]] = {kind: [] for kind in KINDS}
    failures: list[str] = []
    counter = iter(range(max_requests))
    deadline = time.monotonic() + duration

    async def client_loop(client: httpx.AsyncClient) -> None:
        for number in counter:
            if time.monotonic() > deadline:
                return
            kind = KINDS[number % len(KINDS)]
            start = time.perf_counter()
            try:
                response = await _send(client, kind, number, photos, captions)
                if response.status_code != 200:
                    failures.append(f"{kind}: {response.status_code} {response.text[:200]}")
                    continue
            except httpx.HTTPError as error:
                failures.append(f"{kind}: {type(error).__name__}: {error}")
                continue
            latencies[kind].append(time.perf_counter() - start)

    start = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return latencies, failures, time.perf_counter() - start


def _row(name: str, values: list[float], wall: float) -> str:
    if not values:
        return f"| {name} | 0 | - | - | - |"
    milliseconds = np.asarray(values) * 1000
    return f"| {name} | {len(values)} | {len(values) / wall:.1f} | {np.percentile(milliseconds, 50):.0f} | {np.percentile(milliseconds, 99):.0f} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, help="index folder written by 'florence index build'")
    parser.add_argument("--checkpoint", help="checkpoint (default: the index's)")
    parser.add_argument("--concurrency", type=int, default=8, help="clients sending at the same time (default: 8)")
    parser.add_argument("--requests", type=int, default=600, help="stop after this many requests (default: 600)")
    parser.add_argument("--duration", type=float, default=60.0, help="stop after this many seconds (default: 60)")
    parser.add_argument("--docs", default=str(REPO_ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()

    data = Path(os.environ.get("FLORENCE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    photos, captions = _load_inputs(data)
    server = ServerProcess(["--index", args.index] + (["--checkpoint", args.checkpoint] if args.checkpoint else []))
    try:
        url = server.wait_ready()
        ready = httpx.get(url + "/readyz", timeout=10).json()
        load_before = os.getloadavg()[0]
        latencies, failures, wall = asyncio.run(run_load(url, args.concurrency, args.requests, args.duration, photos, captions))
        load_after = os.getloadavg()[0]
        healthy = httpx.get(url + "/healthz", timeout=10).status_code == 200 and httpx.get(url + "/readyz", timeout=10).status_code == 200
    finally:
        exit_status = server.stop()

    every = [value for values in latencies.values() for value in values]
    lines = [
        (f"`python -m benchmarks.serving_load --index {args.index} --concurrency {args.concurrency} "
        f"--requests {args.requests} --duration {args.duration:g}`, {date.today()}."),
        (f"`florence serve` on 127.0.0.1 (default batching: up to 32 requests per batch, 5 ms wait) with a "
        f"{args.concurrency}-client httpx load generator in the same machine. Requests rotate through "
        f"`/classify` ({len(LABELS.split(','))} labels, simple template), `/search/text` (a Flickr8k caption, k=10) "
        f"and `/search/image` (a Flickr8k photo, k=10). Model {ready['model']}, {ready['index']['kind']} index of "
        f"{ready['index']['count']} images; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}."),
        "",
        "| requests | count | requests/s | p50 (ms) | p99 (ms) |",
        "|---|---|---|---|---|",
        _row("all", every, wall),
        *(_row(f"`{kind}`", latencies[kind], wall) for kind in KINDS),
        "",
        (f"Failed requests: {len(failures)}. Healthy afterwards (/healthz and /readyz 200): {'yes' if healthy else 'no'}. "
        f"Server exit status after SIGINT: {exit_status}. Wall time: {wall:.1f} s."),
        "",
        "Environment: " + "; ".join(f"{name} {value}" for name, value in environment_rows())
        + f"; load average {load_before:.1f} before and {load_after:.1f} after the run. The server and the load "
        "generator share the CPU with each other and with other jobs, so these numbers are a lower bound and noisy.",
    ]
    report = "\n".join(lines)
    print(report)
    for failure in failures[:10]:
        print("failed:", failure, file=sys.stderr)
    if not args.no_docs:
        update_section(Path(args.docs), SECTION_TITLE, report)
    return 0 if not failures and healthy else 1


if __name__ == "__main__":
    sys.exit(main())
