"""Video CoSwin-T inference speed: clips/s on 16 x 224 x 224 clips, float32 and bfloat16 autocast.

Video CoSwin-T has CoSwin-T's widths, depths and heads, an 8 x 7 x 7 window and the default 3D
stem (temporal kernel 3, stride 2), with random weights and no classifier, so each forward pass
returns pooled ``[B, 768]`` features. Each case is a precision and a batch size. A precision's
cases run once each to warm up, then ``--runs`` timed times in alternating order (see
``benchmarks._timing.time_alternating``); the table reports medians.

    python -m benchmarks.video [--cases fp32:1 fp32:2 bf16:1 bf16:2] [--runs 5] [--bf16-runs N]
                               [--frames 16] [--size 224] [--threads N] [--device cpu] [--no-docs]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

import torch

from benchmarks._report import environment_table, update_section
from benchmarks._timing import autocast, load_average, pick_device, time_alternating
from florence.adapters.video import VideoCoSwin
from florence.precision import has_fast_bf16

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTION_TITLE = "Video CoSwin inference"
PRECISIONS = ("fp32", "bf16")


def parse_case(text: str) -> tuple[str, int]:
    """Parse ``PRECISION:BATCH`` (e.g. ``bf16:2``) into ``(precision, batch)``."""
    precision, _, batch = text.partition(":")
    if precision not in PRECISIONS or not batch.isdigit() or int(batch) < 1:
        raise argparse.ArgumentTypeError(f"case {text!r} is not PRECISION:BATCH with PRECISION in {PRECISIONS}, e.g. bf16:2")
    return precision, int(batch)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", type=parse_case, default=[("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)],
                        help="PRECISION:BATCH cases (default: fp32:1 fp32:2 bf16:1 bf16:2)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per case after one warm-up (default: 5)")
    parser.add_argument("--bf16-runs", type=int, help="timed runs per bf16 case (default: --runs)")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (default: 16)")
    parser.add_argument("--size", type=int, default=224, help="frame height and width in pixels (default: 224)")
    parser.add_argument("--threads", type=int, help="torch threads on the CPU (default: torch's default)")
    parser.add_argument("--device", help="torch device (default: cuda:0 if available, else cpu)")
    parser.add_argument("--docs", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md", help="Markdown file to update")
    parser.add_argument("--no-docs", action="store_true", help="print the report only")
    args = parser.parse_args(argv)
    args.bf16_runs = args.bf16_runs or args.runs
    for name in ("runs", "bf16_runs", "frames", "size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return args


def build_model(device: torch.device, frames: int, size: int) -> VideoCoSwin:
    """Return Video CoSwin-T with seeded random weights and no classifier, in eval mode."""
    torch.manual_seed(0)
    return VideoCoSwin(num_frames=frames, img_size=size, num_classes=0, drop_path_rate=0.0).to(device).eval()


def measure(
    model: VideoCoSwin, device: torch.device, precision: str, batches: list[int], runs: int, frames: int, size: int
) -> dict[int, list[float]]:
    """Return the seconds of every timed forward pass, per batch size, at ``precision``."""
    clips = {batch: torch.randn(batch, 3, frames, size, size, device=device) for batch in batches}

    def forward(batch: int) -> None:
        with torch.inference_mode(), autocast(device, precision):
            model(clips[batch])

    cases = {batch: (lambda batch=batch: forward(batch)) for batch in batches}
    return time_alternating(cases, runs, device)


def format_report(
    results: dict[tuple[str, int], list[float]],
    model: VideoCoSwin,
    device: torch.device,
    args: argparse.Namespace,
    load_at_start: str,
    command: str,
) -> str:
    parameters = sum(parameter.numel() for parameter in model.parameters())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        (f"Video CoSwin-T ({parameters / 1e6:.1f}M parameters, window {'x'.join(map(str, model.window_size))}, "
         f"random weights, no classifier) on `{device}` ({device_name}), one forward pass of "
         f"`[B, 3, {args.frames}, {args.size}, {args.size}]` clips under `torch.inference_mode`. One warm-up "
         "pass per case, then timed passes alternating between the batch sizes of a precision; medians."),
        "",
        "| precision | batch | median s per pass | clips/s | fastest pass (s) | timed passes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for (precision, batch), seconds in results.items():
        median = statistics.median(seconds)
        lines.append(f"| {precision} | {batch} | {median:.2f} | {batch / median:.3f} | {min(seconds):.2f} | {len(seconds)} |")
    if any(precision == "bf16" for precision, _ in results) and not has_fast_bf16(device):
        lines += [
            "",
            (f"`{device}` has no bfloat16 matrix instructions (`florence.precision.has_fast_bf16` is False), so "
             "PyTorch emulates bf16 autocast here and it is slower than fp32."),
        ]
    environment = environment_table(command)
    at_end = next(index for index, line in enumerate(environment) if line.startswith("| load average"))
    environment[at_end:at_end] = [f"| device | {device_name} |", f"| load average (1, 5, 15 min) at the start | {load_at_start} |"]
    lines += ["", *environment]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else pick_device()
    load_at_start = load_average()
    model = build_model(device, args.frames, args.size)

    results: dict[tuple[str, int], list[float]] = {}
    for precision in PRECISIONS:
        batches = sorted({batch for case_precision, batch in args.cases if case_precision == precision})
        if not batches:
            continue
        runs = args.bf16_runs if precision == "bf16" else args.runs
        print(f"{precision}: batches {batches}, {runs} timed runs each", file=sys.stderr, flush=True)
        seconds = measure(model, device, precision, batches, runs, args.frames, args.size)
        results.update({(precision, batch): seconds[batch] for batch in batches})

    arguments = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "benchmarks.video", *arguments])
    report = format_report(results, model, device, args, load_at_start, command)
    print(report)
    if not args.no_docs:
        update_section(args.docs, SECTION_TITLE, report)
        print(f"wrote section '## {SECTION_TITLE}' of {args.docs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
