"""Profile CoSwin-T and timm's Swin-T with torch.profiler and tabulate where the time goes.

Each model runs one warm-up and then one profiled pass of the chosen mode on the same random
batch. The table lists the operators with the most self CPU time, in milliseconds and as a
share of the pass, side by side. The report is printed and written as the "Profile" section
of docs/benchmarks.md.

    python -m benchmarks.profile [--mode train|infer|infer-bf16] [--batch-size 4] [--threads N] [--no-docs]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from benchmarks._report import environment_table, update_section
from benchmarks._timing import autocast, pick_device
from benchmarks.encoder import IMAGE_SIZE, build_encoders

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTION_TITLE = "Profile"
MODES = ("train", "infer", "infer-bf16")


def run_pass(model: torch.nn.Module, images: torch.Tensor, mode: str, device: torch.device) -> None:
    """Run one pass: a classification training step, or an inference forward in fp32 or bf16."""
    if mode == "train":
        model.zero_grad(set_to_none=True)
        logits = model(images)
        F.cross_entropy(logits, torch.zeros(images.shape[0], dtype=torch.long, device=device)).backward()
        return
    with torch.inference_mode(), autocast(device, "bf16" if mode == "infer-bf16" else "fp32"):
        model(images)


def profile_operators(model: torch.nn.Module, images: torch.Tensor, mode: str, device: torch.device) -> dict[str, float]:
    """Return the self time in milliseconds of each operator during one profiled pass."""
    model.train(mode == "train")
    run_pass(model, images, mode, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        run_pass(model, images, mode, device)

    # NOTE: the CUDA branch (device self time) has not been run; only the CPU branch has.
    times = {}
    for event in profiler.key_averages():
        self_us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if self_us > 0:
            times[event.key] = self_us / 1000
    return times


def format_table(florence: dict[str, float], peer: dict[str, float], rows: int) -> list[str]:
    florence_total, peer_total = sum(florence.values()), sum(peer.values())
    names = sorted(set(florence) | set(peer), key=lambda name: -(florence.get(name, 0.0) + peer.get(name, 0.0)))
    lines = [
        "| operator | CoSwin-T (ms) | share | Swin-T (ms) | share |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in names[:rows]:
        ours, theirs = florence.get(name, 0.0), peer.get(name, 0.0)
        lines.append(
            f"| `{name}` | {ours:,.1f} | {ours / florence_total:.1%} | {theirs:,.1f} | {theirs / peer_total:.1%} |"
        )
    lines.append(f"| total self time | {florence_total:,.1f} | 100% | {peer_total:,.1f} | 100% |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES, default="train", help="pass to profile (default: train)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per pass (default: 4)")
    parser.add_argument("--rows", type=int, default=15, help="operators listed (default: 15)")
    parser.add_argument("--threads", type=int, help="torch threads on CPU (default: torch's default)")
    parser.add_argument("--docs", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md", help="Markdown file to update")
    parser.add_argument("--no-docs", action="store_true", help="print the report only")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.rows < 1:
        parser.error("--batch-size and --rows must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = pick_device()
    coswin, swin = build_encoders(device, num_classes=1000)
    images = torch.randn(args.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)

    florence_times = profile_operators(coswin, images, args.mode, device)
    peer_times = profile_operators(swin, images, args.mode, device)

    arguments = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "benchmarks.profile", *arguments])
    lines = [
        (f"Self time per operator of one `{args.mode}` pass (batch {args.batch_size}, {IMAGE_SIZE}px, "
        f"random weights, 1000-class head) on `{device}`, from `torch.profiler`, after one warm-up pass. "
        "Profiler overhead and background load inflate the small operators."),
        "",
        *format_table(florence_times, peer_times, args.rows),
        "",
        *environment_table(command),
    ]
    report = "\n".join(lines)
    print(report)
    if not args.no_docs:
        update_section(args.docs, SECTION_TITLE, report)
        print(f"\nwrote section '## {SECTION_TITLE}' of {args.docs}", file=sys.stderr)


if __name__ == "__main__":
    main()
