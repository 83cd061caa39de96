"""Compare florence's CLIP tokenizer with open_clip's SimpleTokenizer on COCO val2017 captions.

Each run builds a fresh tokenizer (so its word caches start empty, as for a new user process)
and tokenizes all 25,014 captions in one call on one thread. Runs alternate between the two
tokenizers so that background load hits both alike. The script prints a Markdown report and
writes it as the "Tokenizer" section of docs/benchmarks.md.

    python -m benchmarks.tokenizer [--runs 5] [--docs docs/benchmarks.md | --no-docs]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch

from benchmarks._report import environment_table, update_section
from florence.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
CAPTIONS_FILE = Path("coco_captions_val2017_textonly") / "captions_val2017.json"
SECTION_TITLE = "Tokenizer"


@dataclass
class Timings:
    """Per-run seconds for one tokenizer."""

    name: str
    build_s: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", type=int, default=5, help="timed runs per tokenizer, at least 1 (default: 5)"
    )
    parser.add_argument(
        "--docs",
        type=Path,
        default=REPO_ROOT / "docs" / "benchmarks.md",
        help="Markdown file whose 'Tokenizer' section is replaced (default: docs/benchmarks.md)",
    )
    parser.add_argument("--no-docs", action="store_true", help="print the report only")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    return args


def load_captions() -> list[str]:
    """Read the COCO val2017 captions from $FLORENCE_SHARED_DATA (default: ../shared/data)."""
    data_dir = Path(os.environ.get("FLORENCE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    path = data_dir / CAPTIONS_FILE
    if not path.is_file():
        raise SystemExit(
            f"COCO captions not found at {path}. Set FLORENCE_SHARED_DATA to the data folder."
        )

    with path.open(encoding="utf-8") as file:
        return [annotation["caption"] for annotation in json.load(file)["annotations"]]


def time_one_run(
    build: Callable[[], Callable], captions: list[str], timings: Timings
) -> torch.Tensor:
    """Build a tokenizer and time one call on all captions, appending the seconds to ``timings``."""
    gc.collect()
    start = time.perf_counter()
    tokenizer = build()
    timings.build_s.append(time.perf_counter() - start)

    gc.collect()
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    tokens = tokenizer(captions)
    timings.cpu_s.append(time.process_time() - cpu_start)
    timings.wall_s.append(time.perf_counter() - wall_start)
    return tokens


def _build_open_clip() -> Callable:
    return open_clip.get_tokenizer("ViT-B-32")


def run_benchmark(captions: list[str], runs: int) -> tuple[Timings, Timings, bool]:
    """Alternate ``runs`` timed runs of each tokenizer and check that their outputs are equal."""
    florence = Timings("florence `Tokenizer`")
    reference = Timings(f"open_clip {open_clip.__version__} `SimpleTokenizer`")
    outputs_equal = True
    for run in range(runs):
        # Swap which tokenizer goes first each run, so neither always follows the other.
        if run % 2 == 0:
            florence_tokens = time_one_run(Tokenizer, captions, florence)
            reference_tokens = time_one_run(_build_open_clip, captions, reference)
        else:
            reference_tokens = time_one_run(_build_open_clip, captions, reference)
            florence_tokens = time_one_run(Tokenizer, captions, florence)
        outputs_equal = outputs_equal and torch.equal(florence_tokens, reference_tokens)
        print(
            f"run {run + 1}/{runs}: florence {florence.wall_s[-1]:.3f} s, "
            f"open_clip {reference.wall_s[-1]:.3f} s",
            file=sys.stderr,
        )
    return florence, reference, outputs_equal


def format_report(
    captions: list[str], florence: Timings, reference: Timings, outputs_equal: bool, command: str
) -> str:
    """Render the Markdown report: one row per tokenizer, the ratio and the environment."""
    count = len(captions)
    lines = [
        (f"Tokenizing all {count:,} COCO val2017 captions in one call, context length 77, "
        f"with a freshly built tokenizer per run (empty word caches). {len(florence.wall_s)} "
        "runs each, alternating which goes first; medians. Build time is reported separately "
        "and is not part of the throughput."),
        "",
        "| tokenizer | captions/s (wall) | captions/s (CPU time) | call (s) | build (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for timings in (florence, reference):
        wall = statistics.median(timings.wall_s)
        cpu = statistics.median(timings.cpu_s)
        build = statistics.median(timings.build_s)
        lines.append(
            f"| {timings.name} | {count / wall:,.0f} | {count / cpu:,.0f} "
            f"| {wall:.3f} | {build:.3f} |"
        )

    wall_ratio = statistics.median(reference.wall_s) / statistics.median(florence.wall_s)
    cpu_ratio = statistics.median(reference.cpu_s) / statistics.median(florence.cpu_s)
    lines += [
        "",
        (f"Speed-up of florence over open_clip: **{wall_ratio:.1f}x** (wall clock), "
        f"{cpu_ratio:.1f}x (CPU time). Identical token ids: {'yes' if outputs_equal else 'NO'}."),
        "",
        *environment_table(command),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    captions = load_captions()

    florence, reference, outputs_equal = run_benchmark(captions, args.runs)
    arguments = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "benchmarks.tokenizer", *arguments])
    report = format_report(captions, florence, reference, outputs_equal, command)
    print(report)

    if not args.no_docs:
        update_section(args.docs, SECTION_TITLE, report)
        print(f"\nwrote section '## {SECTION_TITLE}' of {args.docs}", file=sys.stderr)
    if not outputs_equal:
        raise SystemExit("florence and open_clip produced different token ids")


if __name__ == "__main__":
    main()
