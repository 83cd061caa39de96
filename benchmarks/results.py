"""Accuracy runs behind docs/results.md: the quickstart against the timm + open_clip baseline,
and the 30-minute CIFAR-10 + Flickr8k run.

Usage (from the repository root, on an otherwise idle machine):

    python -m benchmarks.results quickstart   # about 20 minutes: baseline 600 s, then florence
    python -m benchmarks.results full         # about 32 minutes

Each command runs the training jobs as subprocesses one after the other, so both figures of a
comparison come from the same machine in the same session, and writes its section of
docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from benchmarks._report import environment_rows, update_section

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results.md"
HEADER = "# Results\n\nAccuracy measured by `python -m benchmarks.results`, with the commands that produced it.\n"


def shared_data() -> Path:
    return Path(os.environ.get("FLORENCE_SHARED_DATA", REPO.parent / "shared" / "data"))


def run(command: list[str], log: Path) -> tuple[str, float]:
    """Run ``command`` from the repository root; return its stdout and wall-clock seconds."""
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        completed = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=handle, text=True)
    seconds = time.perf_counter() - start
    print(completed.stdout, flush=True)
    if completed.returncode != 0:
        sys.exit(f"{command[0]} exited with {completed.returncode}; see {log}")
    return completed.stdout, seconds


def read_metric(output: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}: ([0-9.]+)", output, re.MULTILINE)
    if match is None:
        sys.exit(f"'{name}' not found in the output:\n{output}")
    return float(match.group(1))


def environment_table() -> str:
    rows = environment_rows() + [("date", date.today().isoformat())]
    return "| setting | value |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in rows)


def quickstart(log_dir: Path) -> None:
    baseline_script = REPO.parent / "shared" / "baselines" / "timm_openclip_unicl.py"
    baseline_command = [sys.executable, str(baseline_script), "600", str(shared_data() / "cifar10")]
    baseline_output, baseline_seconds = run(baseline_command, log_dir / "baseline.log")
    match = re.search(r"(\d+) steps in (\d+)s, zero-shot top-1 ([0-9.]+)%", baseline_output)
    if match is None:
        sys.exit(f"the baseline printed no result line:\n{baseline_output}")
    baseline_top1 = float(match.group(3))

    florence_command = ["florence", "train", "output_dir=runs/results_quickstart"]
    florence_output, florence_seconds = run(florence_command, log_dir / "florence_quickstart.log")
    florence_top1 = read_metric(florence_output, "zeroshot_top1")
    florence_steps = int(read_metric(florence_output, "step"))

    body = f"""Zero-shot CIFAR-10 top-1 on the same 2,000 test images (the first 200 per class of the
official test split, shipped in `data/cifar10_quickstart/test`). florence averages 8 prompt
templates that appear in none of its 81 training templates. The baseline uses its own 4
evaluation templates, one of which ("a photo of a {{}}.") is also among its 8 training
templates. Both runs were made one after the other on the same machine. florence's run stops
at `max_seconds: 450` (the quickstart's cap) if it has not finished its steps by then.

| run | training data | steps x batch | wall clock (whole command) | zero-shot top-1 |
|---|---|---|---:|---:|
| florence quickstart (`florence-tiny`, bf16) | 13,430 shipped images | {florence_steps} x 256 | {florence_seconds:.0f} s | **{florence_top1:.1f}%** |
| timm Swin + open_clip tokenizer baseline (fp32) | all 50,000 images | {match.group(1)} x 256 | {baseline_seconds:.0f} s | {baseline_top1:.1f}% |

Commands:

```bash
florence train output_dir=runs/results_quickstart
python ../shared/baselines/timm_openclip_unicl.py 600 ../shared/data/cifar10
```

{environment_table()}
"""
    update_section(RESULTS, "Quickstart against the timm + open_clip baseline", body, header=HEADER)


def full(log_dir: Path) -> None:
    command = ["florence", "train", "--config", "configs/cifar10_flickr.yaml"]
    output, seconds = run(command, log_dir / "florence_full.log")
    metrics = {
        key: read_metric(output, key)
        for key in (
            "step",
            "train_seconds",
            "zeroshot_top1",
            "zeroshot_top5",
            "retrieval_image_to_text_R@1",
            "retrieval_image_to_text_R@5",
            "retrieval_image_to_text_R@10",
            "retrieval_text_to_image_R@1",
            "retrieval_text_to_image_R@5",
            "retrieval_text_to_image_R@10",
        )
    }
    (log_dir / "florence_full.json").write_text(json.dumps(metrics, indent=2))
    body = f"""`florence-tiny` pretrained on all 50,000 CIFAR-10 training images (one of the 81 training
templates per sample) plus 600 Flickr8k photos with their 3,000 captions, all at 32x32. The
run may last at most 30 minutes (`max_seconds: 1800`), and its 1,900 steps finished within
that, in the training seconds below. Zero-shot CIFAR-10 is measured on the 10,000 test images
with held-out templates; retrieval searches among the other 200 Flickr8k photos (1,000
captions; a seeded split of the 800).

| metric | value |
|---|---:|
| training steps (batch 256) | {metrics['step']:.0f} |
| training seconds | {metrics['train_seconds']:.0f} |
| whole command, seconds | {seconds:.0f} |
| CIFAR-10 zero-shot top-1 | **{metrics['zeroshot_top1']:.2f}%** |
| CIFAR-10 zero-shot top-5 | {metrics['zeroshot_top5']:.2f}% |
| Flickr image-to-text R@1 / R@5 / R@10 | {metrics['retrieval_image_to_text_R@1']:.1f} / {metrics['retrieval_image_to_text_R@5']:.1f} / {metrics['retrieval_image_to_text_R@10']:.1f} |
| Flickr text-to-image R@1 / R@5 / R@10 | {metrics['retrieval_text_to_image_R@1']:.1f} / {metrics['retrieval_text_to_image_R@5']:.1f} / {metrics['retrieval_text_to_image_R@10']:.1f} |

Chance levels: 10% top-1 on CIFAR-10; among 200 images, text-to-image R@1 is 0.5% and R@10
is 5%. Retrieval is above chance but far from useful: at 32x32 a Flickr photo keeps little of
what its captions describe, and 3,000 captions are few next to 50,000 labelled images.

Command:

```bash
florence train --config configs/cifar10_flickr.yaml
```

{environment_table()}
"""
    update_section(RESULTS, "CIFAR-10 + Flickr8k, 30 minutes", body, header=HEADER)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", choices=["quickstart", "full"])
    parser.add_argument("--log-dir", default="runs/results_logs", help="where the runs' stderr logs go")
    args = parser.parse_args()
    log_dir = REPO / args.log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    {"quickstart": quickstart, "full": full}[args.run](log_dir)


if __name__ == "__main__":
    main()
