"""Accuracy runs behind docs/results.md: the quickstart against the timm + open_clip baseline,
and the 30-minute CIFAR-10 + Flickr8k run.

Usage (from the repository root, on an otherwise idle machine):

    python -m benchmarks.results quickstart   # about 20 minutes: baseline 600 s, then florence
    python -m benchmarks.results full         # about 32 minutes
    python -m benchmarks.results recipe       # the three tiny recipe stages, about 15 minutes
    python -m benchmarks.results torchrun     # the quickstart in 2 processes, DDP then FSDP

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
        completed = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=handle, text=True, check=False)
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


def final_record(output_dir: Path) -> dict:
    """Return the last record of a run's metrics.jsonl, the one with the final evaluation."""
    path = REPO / output_dir / "metrics.jsonl"
    if not path.is_file():
        sys.exit(f"{path} not found; run the training first")
    return json.loads(path.read_text().splitlines()[-1])


RECIPE_STAGES = (
    ("1", "prompt templates on class names", "32"),
    ("2", "bare class names, prompts removed", "32"),
    ("3", "bare class names, window 8 to 12", "48"),
)


def recipe(log_dir: Path, train: bool = True) -> None:
    if train:
        for stage, _, _ in RECIPE_STAGES:
            command = ["florence", "train", "--config", f"configs/recipe/tiny_stage{stage}.yaml"]
            run(command, log_dir / f"recipe_stage{stage}.log")

    rows = []
    for stage, texts, size in RECIPE_STAGES:
        record = final_record(Path("runs/recipe_tiny") / f"stage{stage}")
        rows.append(
            f"| {stage} | {texts} | {size} | {record['step']} | {record['train_seconds']:.0f} "
            f"| {record['zeroshot_top1']:.2f}% | {record['zeroshot_top5']:.2f}% |"
        )
    table = "\n".join(rows)
    body = f"""The three stages of `configs/recipe/tiny_stage{{1,2,3}}.yaml`, each starting from the previous
stage's weights, on the 13,430 CIFAR-10 training images shipped in `data/cifar10_quickstart`.
Zero-shot top-1 and top-5 are measured on the 2,000 shipped test images with held-out
templates after each stage. Stage 3 upsamples the 32x32 images to 48x48, so it tests the
resolution change and the bias-table resize, not a gain from detail.

| stage | texts | image size | steps (batch 256) | training seconds | zero-shot top-1 | top-5 |
|---|---|---:|---:|---:|---:|---:|
{table}

Each stage also adds training steps, so the gain of a stage mixes the change it makes with
more training. This run shows that the chain works, not what each stage is worth. The stages
ran one after the other while other jobs shared the 2 cores, so the training seconds are not
speed figures.

Commands:

```bash
florence train --config configs/recipe/tiny_stage1.yaml
florence train --config configs/recipe/tiny_stage2.yaml
florence train --config configs/recipe/tiny_stage3.yaml
```

{environment_table()}
"""
    update_section(RESULTS, "The Florence recipe at florence-tiny size", body, header=HEADER)


def torchrun(log_dir: Path, train: bool = True) -> None:
    rows = []
    for strategy in ("ddp", "fsdp"):
        output_dir = Path("runs") / f"results_2proc_{strategy}"
        seconds_file = log_dir / f"torchrun_{strategy}_seconds.txt"
        if train:
            command = [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "florence.cli.main", "train", "--strategy", strategy,
                "threads=1", "data.batch_size=128", f"output_dir={output_dir}",
            ]
            _, seconds = run(command, log_dir / f"torchrun_{strategy}.log")
            seconds_file.write_text(f"{seconds:.1f}")
        seconds = float(seconds_file.read_text())
        record = final_record(output_dir)
        rows.append(
            f"| {strategy} | {record['step']} | {record['train_seconds']:.0f} | {seconds:.0f} "
            f"| {record['zeroshot_top1']:.2f}% | {record['zeroshot_top5']:.2f}% |"
        )
    table = "\n".join(rows)
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    body = f"""The quickstart config run by `torchrun` in 2 processes on one machine with Gloo, one thread
each, 128 images per process (the quickstart's global batch of 256). Each run trains, then
rank 0 evaluates zero-shot on the 2,000 shipped test images. Training stops at the
quickstart's 450-second cap if the 650 steps take longer.

| strategy | steps | training seconds | whole command, seconds | zero-shot top-1 | top-5 |
|---|---:|---:|---:|---:|---:|
{table}

The load average at the end was {load} (1, 5, 15 minutes). A run that stops at the time cap
before step 650 has seen fewer images, so its accuracy measures the setup under that load,
not the strategy. DDP and FSDP compute the same gradients (tests/training/test_fsdp.py), and
FSDP spends more of each step gathering parameters.

Commands:

```bash
torchrun --standalone --nproc_per_node 2 -m florence.cli.main train --strategy ddp threads=1 data.batch_size=128
torchrun --standalone --nproc_per_node 2 -m florence.cli.main train --strategy fsdp threads=1 data.batch_size=128
```

{environment_table()}
"""
    update_section(RESULTS, "Quickstart in 2 processes", body, header=HEADER)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", choices=["quickstart", "full", "recipe", "torchrun"])
    parser.add_argument("--log-dir", default="runs/results_logs", help="where the runs' stderr logs go")
    parser.add_argument(
        "--no-train", action="store_true", help="recipe and torchrun: write the section from the existing runs"
    )
    args = parser.parse_args()
    log_dir = REPO / args.log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    if args.run in ("recipe", "torchrun"):
        {"recipe": recipe, "torchrun": torchrun}[args.run](log_dir, train=not args.no_train)
        return
    {"quickstart": quickstart, "full": full}[args.run](log_dir)


if __name__ == "__main__":
    main()
