"""Measure florence against timm and open_clip in one process and write the table to docs/benchmarks.md.

Each figure runs florence and its peer on the same work, alternating runs, and reports the
medians and the throughput ratio (above 1: florence is faster). The result is written as the
"Speed against timm and open_clip" section of docs/benchmarks.md. The tokenizer figure reuses
``benchmarks.tokenizer`` and rewrites its section, the memory figure runs two cases of
``benchmarks.memory`` in fresh processes, the evaluation figure runs
``benchmarks.eval_throughput`` when that module exists, and the video figure runs
``benchmarks.video``, which writes its own section.

    python -m benchmarks [--quick] [--figures NAME ...] [--runs 3] [--threads N] [--no-docs]

On a machine with CUDA every model figure runs on GPU 0, otherwise on the CPU with torch's
default thread count or ``--threads``.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch

from benchmarks import encoder, flops, memory, tokenizer, train_step
from benchmarks._report import environment_rows, update_section
from benchmarks._timing import Comparison, load_average, pick_device
from florence.precision import has_fast_bf16

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTION_TITLE = "Speed against timm and open_clip"
FIGURES = ("encoder", "train_step", "unicl", "flops", "tokenizer", "memory", "eval", "video")
MEMORY_CASES = ("b224-32", "b224-32-checkpointing")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short run: 2 timed runs, batch 8 for inference and 4 for training, no memory, evaluation or video figure",
    )
    parser.add_argument("--figures", nargs="+", choices=FIGURES, default=list(FIGURES), help="figures to run (default: all)")
    parser.add_argument("--runs", type=int, help="timed runs per model and figure, after one warm-up (default: 3; 2 with --quick)")
    parser.add_argument("--batch-size", type=int, help="inference batch (default: 32; 8 with --quick)")
    parser.add_argument("--train-batch-size", type=int, help="training step batch (default: 16; 4 with --quick)")
    parser.add_argument(
        "--threads", type=int, help="torch threads on CPU (default: torch's default)"
    )
    parser.add_argument("--docs", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md", help="Markdown file to update")
    parser.add_argument("--no-docs", action="store_true", help="print the report only")
    args = parser.parse_args(argv)

    args.runs = args.runs or (2 if args.quick else 3)
    args.batch_size = args.batch_size or (8 if args.quick else 32)
    args.train_batch_size = args.train_batch_size or (4 if args.quick else 16)
    for name in ("runs", "batch_size", "train_batch_size", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.quick:
        args.figures = [name for name in args.figures if name not in ("memory", "eval", "video")]
    return args


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_tokenizer(runs: int, command: str) -> tuple[Comparison | None, str]:
    """Run the tokenizer benchmark on one thread; return its comparison and its own report.

    Without the COCO captions the comparison is None and the report is the reason.
    """
    try:
        captions = tokenizer.load_captions()
    except SystemExit as error:
        return None, str(error)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        florence, reference, outputs_equal = tokenizer.run_benchmark(captions, runs)
    finally:
        torch.set_num_threads(threads)
    if not outputs_equal:
        raise RuntimeError("florence and open_clip tokenizers produced different token ids")

    comparison = Comparison(
        figure=f"tokenizer, all {len(captions):,} COCO val2017 captions, one thread",
        florence=florence.name,
        peer=reference.name,
        items=len(captions),
        florence_s=florence.wall_s,
        peer_s=reference.wall_s,
        goal=5.0,
    )
    report = tokenizer.format_report(captions, florence, reference, outputs_equal, command)
    return comparison, report


def run_memory() -> list[str]:
    """Run the activation checkpointing pair of ``benchmarks.memory``; return a table row.

    ``benchmarks.memory`` runs on the CPU and measures the host's resident memory, also on a
    machine with CUDA.
    """
    results = {name: memory.run_case(name) for name in MEMORY_CASES}
    plain, saver = results[MEMORY_CASES[0]], results[MEMORY_CASES[1]]
    return [
        (f"| peak memory of a training step, florence-b, batch 32, 224px | with activation checkpointing: "
        f"{saver['peak_gib']:.2f} GiB | without: {plain['peak_gib']:.2f} GiB "
        f"| {saver['peak_gib'] / plain['peak_gib']:.0%} of the memory, {saver['step_s'] / plain['step_s']:.2f}x "
        "the step time | report | – |")
    ]


def run_eval(no_docs: bool) -> list[str]:
    """Run ``benchmarks.eval_throughput`` if it exists; return a table row that points at its section."""
    if importlib.util.find_spec("benchmarks.eval_throughput") is None:
        return [("| zero-shot evaluation end to end | – | clip-benchmark | not measured: `benchmarks/eval_throughput.py` "
                "does not exist in this checkout | 1.5x | – |")]

    command = [sys.executable, "-m", "benchmarks.eval_throughput", *(["--no-docs"] if no_docs else [])]
    result = subprocess.run(command, cwd=REPO_ROOT, check=False)
    outcome = "see the Evaluation throughput section" if result.returncode == 0 else f"failed (exit {result.returncode})"
    return [f"| zero-shot evaluation end to end | florence | clip-benchmark | {outcome} | 1.5x | – |"]


def run_video(runs: int, threads: int | None, device: torch.device, no_docs: bool) -> list[str]:
    """Run ``benchmarks.video`` in a fresh process; return a table row that points at its section.

    Where bf16 is emulated (see ``florence.precision``) one bf16 pass takes minutes, so the
    bf16 case is cut to batch 1 and one timed run there.
    """
    command = [sys.executable, "-m", "benchmarks.video", "--runs", str(runs), "--device", str(device)]
    if not has_fast_bf16(device):
        command += ["--cases", "fp32:1", "fp32:2", "bf16:1", "--bf16-runs", "1"]
    if threads:
        command += ["--threads", str(threads)]
    if no_docs:
        command.append("--no-docs")
    result = subprocess.run(command, cwd=REPO_ROOT, check=False)
    outcome = "see the Video CoSwin inference section" if result.returncode == 0 else f"failed (exit {result.returncode})"
    return [f"| Video CoSwin-T inference, 16 x 224 x 224 clips | florence | – | {outcome} | report | – |"]


def comparison_row(comparison: Comparison) -> str:
    if comparison.goal is None:
        goal, met = "report", "–"
    else:
        goal = f"{comparison.goal:g}x"
        met = "yes" if comparison.ratio >= comparison.goal else "**no**"
    return (
        f"| {comparison.figure} | {comparison.florence}: {comparison.florence_per_s:,.1f}/s "
        f"| {comparison.peer}: {comparison.peer_per_s:,.1f}/s | **{comparison.ratio:.2f}x** | {goal} | {met} |"
    )


def flops_table(
    device: torch.device, runs: int, inference: Comparison | None, training: Comparison | None
) -> list[str]:
    """Return the FLOPs table: cost per image, images/s per GFLOP, and the share of the matmul peak."""
    coswin, swin = flops.encoder_flops(device)
    peak = flops.matmul_peak(device, runs=max(runs, 3))
    lines = [
        f"Measured peak of a large float32 matmul on this device: **{peak / 1e9:,.1f} GFLOP/s**.",
        "",
        ("| model | GFLOP/image, inference | GFLOP/image, training step | inference images/s (fp32) "
        "| images/s per GFLOP | training images/s | achieved GFLOP/s in training | share of matmul peak |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model_flops, side in ((coswin, "florence"), (swin, "peer")):
        inference_rate = getattr(inference, f"{side}_per_s") if inference else None
        training_rate = getattr(training, f"{side}_per_s") if training else None
        lines.append(_flops_row(model_flops, inference_rate, training_rate, peak))
    return lines


def _flops_row(model_flops: flops.ModelFlops, inference_rate: float | None, training_rate: float | None, peak: float) -> str:
    forward_gflop = model_flops.forward / 1e9
    train_gflop = model_flops.train_step / 1e9
    cells = [model_flops.name, f"{forward_gflop:.2f}", f"{train_gflop:.2f}"]
    if inference_rate is None:
        cells += ["–", "–"]
    else:
        cells += [f"{inference_rate:.1f}", f"{inference_rate / forward_gflop:.2f}"]
    if training_rate is None:
        cells += ["–", "–", "–"]
    else:
        achieved = training_rate * model_flops.train_step
        cells += [f"{training_rate:.1f}", f"{achieved / 1e9:,.1f}", f"{achieved / peak:.0%}"]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = pick_device()
    load_at_start = load_average()
    # NOTE: the CUDA path (device "cuda") shares every line with the CPU path but has not been run.
    _log(f"device {device}, {torch.get_num_threads()} threads, figures {', '.join(args.figures)}")

    arguments = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "benchmarks", *arguments])
    rows: list[str] = []
    comparisons: dict[str, Comparison] = {}
    if "encoder" in args.figures:
        for precision in ("fp32", "bf16"):
            _log(f"encoder inference {precision}")
            comparisons[f"encoder-{precision}"] = encoder.measure_inference(device, args.batch_size, args.runs, precision)
    if "train_step" in args.figures:
        _log("encoder training step")
        comparisons["train_step"] = train_step.measure_encoder_step(device, args.train_batch_size, args.runs)
    if "unicl" in args.figures:
        _log("dual-encoder training step")
        comparisons["unicl"] = train_step.measure_dual_encoder_step(device, args.train_batch_size, args.runs)
    rows += [comparison_row(comparison) for comparison in comparisons.values()]

    if "tokenizer" in args.figures:
        _log("tokenizer")
        comparison, tokenizer_report = run_tokenizer(5 if not args.quick else 1, command)
        if comparison is None:
            rows.append(f"| tokenizer, COCO val2017 captions | – | open_clip | not measured: {tokenizer_report} | 5x | – |")
        else:
            rows.append(comparison_row(comparison))
            if not args.no_docs:
                update_section(args.docs, tokenizer.SECTION_TITLE, tokenizer_report)
    if "eval" in args.figures:
        _log("evaluation throughput")
        rows += run_eval(args.no_docs)
    if "memory" in args.figures:
        _log("memory")
        rows += run_memory()
    if "video" in args.figures:
        _log("Video CoSwin inference")
        rows += run_video(args.runs, args.threads, device, args.no_docs)

    flops_lines = []
    if "flops" in args.figures:
        _log("FLOPs and matmul peak")
        flops_lines = flops_table(device, args.runs, comparisons.get("encoder-fp32"), comparisons.get("train_step"))

    report = format_report(rows, flops_lines, args, device, load_at_start, command)
    print(report)
    if not args.no_docs:
        update_section(args.docs, SECTION_TITLE, report)
        _log(f"wrote section '## {SECTION_TITLE}' of {args.docs}")


def format_report(
    rows: list[str], flops_lines: list[str], args: argparse.Namespace, device: torch.device, load_at_start: str, command: str
) -> str:
    lines = [
        (f"florence against its peer on the same work in one process, on `{device}`. Each model runs once to "
        f"warm up, then {args.runs} timed runs alternating with the peer's; medians. Ratio is florence's "
        "throughput over the peer's. Training steps are zero_grad, forward, loss and backward (no "
        "optimizer update), in float32. Weights are random."),
        "",
        "| figure | florence | peer | ratio | goal | met |",
        "|---|---|---|---:|---|---|",
        *rows,
    ]
    if flops_lines:
        lines += ["", *flops_lines, "", flops.__doc__.split("\n\n")[1].replace("\n", " ").replace("``", "`")]
    lines += [
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in environment_rows()),
        f"| device | {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'} |",
        f"| load average (1, 5, 15 min) at the start | {load_at_start} |",
        f"| load average (1, 5, 15 min) at the end | {load_average()} |",
        f"| date | {date.today().isoformat()} |",
        f"| command | `{command}` |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
