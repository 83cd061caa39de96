"""Checks of the shipped CIFAR-10 subset in data/cifar10_quickstart."""

import csv
import zipfile

MAX_BYTES = 15_000_000
TRAIN_PER_CLASS = 1343
TEST_PER_CLASS = 200


def test_quickstart_layout_and_counts(quickstart_dir):
    classes = (quickstart_dir / "classes.txt").read_text().split()

    assert len(classes) == 10
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        assert sorted(p.name for p in (quickstart_dir / split).iterdir()) == sorted(classes)
        for name in classes:
            files = sorted(p.name for p in (quickstart_dir / split / name).iterdir())
            assert files == [f"{i:04d}.jpg" for i in range(per_class)], f"{split}/{name}"


def test_quickstart_size_limit(quickstart_dir):
    file_bytes = sum(p.stat().st_size for p in quickstart_dir.rglob("*") if p.is_file())

    assert file_bytes <= MAX_BYTES


def test_quickstart_source_md_counts(quickstart_dir):
    text = (quickstart_dir / "SOURCE.md").read_text()

    assert f"train: {10 * TRAIN_PER_CLASS:,} images" in text
    assert f"test: {10 * TEST_PER_CLASS:,} images" in text
    assert "Krizhevsky" in text


def test_quickstart_bytes_match_source_zip(quickstart_dir, cifar_dir):
    compared = 0
    for split in ("train", "test"):
        with open(cifar_dir / f"{split}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        with zipfile.ZipFile(cifar_dir / f"{split}.zip") as archive:
            for row in rows[::97]:
                shipped = quickstart_dir / row["path"]
                if not shipped.exists():
                    continue
                assert shipped.read_bytes() == archive.read(row["path"]), row["path"]
                compared += 1

    assert compared >= 100
