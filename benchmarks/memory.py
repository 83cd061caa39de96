"""Peak memory and time of one UniCL training step with and without the memory savers.

Two comparisons, each case in a fresh process so that one case's allocations cannot hide in
another's peak:

- gradient cache: a batch of 256 in chunks of 32 against the whole batch at once;
- activation checkpointing: florence-b (CoSwin-B at 224 plus the 12-layer text tower) at
  batch 32, with and without checkpointing every block of both towers.

A step is forward, UniCL loss and backward, without the optimizer update. Peak memory is the
process's peak resident set size during the step minus its size just before the step, so
the weights and the inputs are not counted but the gradients are. The step is run twice and
the second is timed. Images are random (memory and time do not depend on pixel values);
texts are real prompts through the real tokenizer. The script prints a Markdown report and
writes it as the "Memory savers" section of docs/benchmarks.md.

    python -m benchmarks.memory [--cases NAME ...] [--docs docs/benchmarks.md | --no-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks._report import environment_table, update_section

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTION_TITLE = "Memory savers"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# name: (model, image size, batch, grad cache chunk, activation checkpointing)
CASES: dict[str, tuple[str, int, int, int, bool]] = {
    "tiny-256": ("florence-tiny", 32, 256, 0, False),
    "tiny-256-cache-32": ("florence-tiny", 32, 256, 32, False),
    "t112-256": ("florence-t", 112, 256, 0, False),
    "t112-256-cache-32": ("florence-t", 112, 256, 32, False),
    "b224-32": ("florence-b", 224, 32, 0, False),
    "b224-32-checkpointing": ("florence-b", 224, 32, 0, True),
}


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_resident_bytes() -> int:
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(name: str) -> dict[str, float]:
    """Run case ``name`` in this process and return its peak step memory and step time."""
    from florence.models import create_model
    from florence.tokenizer import get_tokenizer
    from florence.training.grad_cache import backward_with_grad_cache
    from florence.training.loss import unicl_loss

    model_name, image_size, batch, chunk, checkpointing = CASES[name]
    torch.manual_seed(0)
    model = create_model(model_name, vision_cfg={"img_size": image_size}).train()
    model.set_grad_checkpointing(checkpointing)
    images = torch.randn(batch, 3, image_size, image_size)
    tokens = get_tokenizer()([f"a photo of a {CLASSES[index % 10]}, number {index}." for index in range(batch)])
    labels = torch.arange(batch)

    def step() -> None:
        model.zero_grad(set_to_none=False)
        if chunk:
            backward_with_grad_cache(model, images, tokens, lambda i, t, s: unicl_loss(i, t, labels, s), chunk)
            return
        image_features, text_features, logit_scale = model(images, tokens)
        unicl_loss(image_features, text_features, labels, logit_scale).backward()

    before = _resident_bytes()
    step()
    peak = _peak_resident_bytes() - before
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return {"peak_gib": peak / 2**30, "step_s": seconds, "images_per_s": batch / seconds}


def run_case(name: str) -> dict[str, float]:
    """Measure case ``name`` in a fresh Python process."""
    command = [sys.executable, "-m", "benchmarks.memory", "--worker", name]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def format_report(results: dict[str, dict[str, float]], command: str) -> str:
    lines = [
        ("One UniCL step (forward, loss, backward; no optimizer update) in float32, each case in a "
        "fresh process. Peak memory is the rise of the process's peak resident set during the "
        "step, so it counts activations and gradients but not weights or inputs. The second of "
        "two steps is timed."),
        "",
        ("| case | model | image | batch | grad cache chunk | checkpointing | peak step memory (GiB) "
        "| step (s) | images/s |"),
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name, values in results.items():
        model_name, image_size, batch, chunk, checkpointing = CASES[name]
        lines.append(
            f"| {name} | {model_name} | {image_size} | {batch} | {chunk or 'off'} "
            f"| {'on' if checkpointing else 'off'} | {values['peak_gib']:.2f} | {values['step_s']:.2f} "
            f"| {values['images_per_s']:.1f} |"
        )
    lines += [
        "",
        *_ratios(results),
        "",
        ("Each time is one step, so with other jobs on the machine (see the load average) the time "
        "ratios are rough; the memory figures do not depend on load."),
        "",
    ]
    lines += environment_table(command)
    return "\n".join(lines)


def _ratios(results: dict[str, dict[str, float]]) -> list[str]:
    """Return one sentence per measured (saver, plain) pair, with the memory saved and the time added."""
    pairs = [
        ("tiny-256-cache-32", "tiny-256"),
        ("t112-256-cache-32", "t112-256"),
        ("b224-32-checkpointing", "b224-32"),
    ]
    sentences = []
    for saver, plain in pairs:
        if saver in results and plain in results:
            memory = results[saver]["peak_gib"] / results[plain]["peak_gib"]
            slower = results[saver]["step_s"] / results[plain]["step_s"]
            sentences.append(
                f"- `{saver}` against `{plain}`: {memory:.0%} of the peak step memory, "
                f"{slower:.2f}x the step time."
            )
    return sentences


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="cases to run (default: all)")
    parser.add_argument("--docs", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md", help="Markdown file to update")
    parser.add_argument("--no-docs", action="store_true", help="print the report only")
    parser.add_argument("--worker", choices=list(CASES), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker)))
        return

    results = {}
    for name in args.cases:
        results[name] = run_case(name)
        print(f"{name}: {results[name]}", file=sys.stderr)
    arguments = sys.argv[1:] if argv is None else argv
    report = format_report(results, shlex.join(["python", "-m", "benchmarks.memory", *arguments]))
    print(report)
    if not args.no_docs:
        update_section(args.docs, SECTION_TITLE, report)
        print(f"\nwrote section '## {SECTION_TITLE}' of {args.docs}", file=sys.stderr)


if __name__ == "__main__":
    main()
