"""Measure detector training throughput and inference latency at 640 pixels.

Training: images/s of forward, ATSS loss, backward and an AdamW step on batches of real
coco128_det images resized to a longer side of 640, after one untimed warm-up step.
Inference: latency of ``predict`` on one 640-pixel image (batch 1), median over the timed runs
after one warm-up. Weights are random, so the score threshold is lowered to 0 to make NMS run
on a full 1000 candidates per level, the most work it can get.

    python -m benchmarks.detection [--size default|small] [--train-steps 2] [--runs 5] [--no-docs]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from benchmarks._report import environment_rows, update_section
from florence.adapters.detection import FlorenceDetector
from florence.adapters.detection.data import (
    CocoDetection,
    collate_detection,
    resolve_split,
)
from florence.training.optim import param_groups

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTION_TITLE = "Detection training and inference"

# "default": CoSwin-T with the public Dynamic Head settings (256 channels, 6 blocks).
# "small": the CPU-sized detector of the coco128 overfit run in docs/results.md.
SIZES = {
    "default": {"backbone": "florence-t"},
    "small": {
        "backbone": "florence-t",
        "backbone_overrides": {
            "embed_dim": 64,
            "vision_cfg": {"img_size": 320, "embed_dim": 32, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8], "window_size": 5},
            "text_cfg": {"width": 64, "layers": 2, "heads": 2},
        },
        "channels": 64,
        "num_blocks": 1,
        "groups": 8,
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="default", help="detector size (default: CoSwin-T, 6 blocks of 256)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("FLORENCE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")) / "coco128_det")
    parser.add_argument("--batch-size", type=int, default=2, help="training images per step (default: 2)")
    parser.add_argument("--train-steps", type=int, default=2, help="timed training steps (default: 2)")
    parser.add_argument("--runs", type=int, default=5, help="timed inference runs (default: 5)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--docs", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md", help="Markdown file to update")
    parser.add_argument("--no-docs", action="store_true", help="print the report only")
    args = parser.parse_args(argv)
    if not (args.data / "instances.json").is_file():
        parser.error(f"{args.data}/instances.json not found; pass --data or set FLORENCE_SHARED_DATA")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_training(model: FlorenceDetector, dataset: CocoDetection, batch_size: int, steps: int, device: torch.device) -> float:
    """Return training images/s over ``steps`` steps after one warm-up step."""
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    model.train()
    timings = []
    for step in range(steps + 1):
        indices = [(step * batch_size + i) % len(dataset) for i in range(batch_size)]
        images, targets = collate_detection([dataset[i] for i in indices])
        targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
        _sync(device)
        start = time.perf_counter()
        loss = model.loss(model(images.to(device)), targets)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        if step > 0:
            timings.append(time.perf_counter() - start)
    return batch_size * steps / sum(timings)


def measure_latency(model: FlorenceDetector, dataset: CocoDetection, runs: int, device: torch.device) -> list[float]:
    """Return per-run seconds of ``predict`` on one image, after one warm-up run."""
    model.eval()
    model.model_config["score_threshold"] = 0.0
    image, target = dataset[0]
    images, _ = collate_detection([(image, target)])
    images = images.to(device)
    seconds = []
    for run in range(runs + 1):
        _sync(device)
        start = time.perf_counter()
        model.predict(images, [target["size"]])
        _sync(device)
        if run > 0:
            seconds.append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    load_at_start = os.getloadavg()[0]
    torch.manual_seed(0)
    dataset = CocoDetection(resolve_split(args.data), max_size=640, flip=False)
    model = FlorenceDetector(class_names=dataset.class_names, classifier="text", **SIZES[args.size]).to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    images_per_second = measure_training(model, dataset, args.batch_size, args.train_steps, device)
    latencies = measure_latency(model, dataset, args.runs, device)

    rows = [
        ("detector", f"{args.size}: {trainable / 1e6:.1f}M trainable parameters, text classifier with 80 COCO classes"),
        ("input", "coco128_det images, longer side 640, padded to a multiple of 32"),
        ("training", f"{images_per_second:.2f} images/s (batch {args.batch_size}, timed steps: {args.train_steps})"),
        ("inference latency", f"median {statistics.median(latencies) * 1000:.0f} ms, min {min(latencies) * 1000:.0f} ms over {args.runs} runs (batch 1)"),
        ("device", str(device)),
        ("load average at start", f"{load_at_start:.1f} (1 minute; other processes slow CPU runs down)"),
        *environment_rows(),
    ]
    command = "python -m benchmarks.detection " + shlex.join(argv if argv is not None else sys.argv[1:])
    body = "\n".join(
        [
            f"Measured {date.today().isoformat()} with `{command.strip()}`.",
            "",
            "| | |",
            "|---|---|",
            *(f"| {name} | {value} |" for name, value in rows),
        ]
    )
    print(body)
    if not args.no_docs:
        update_section(args.docs, f"{SECTION_TITLE} ({args.size})", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
