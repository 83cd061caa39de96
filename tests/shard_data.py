"""Shards of real images for the streaming tests: the shipped CIFAR-10 subset and Flickr8k."""

import os
from pathlib import Path

import pytest

from florence.data.shards import ShardIndex, write_shards
from florence.data.sources import ClassificationSource
from florence.data.streaming import ShardedImageText, shards_from_urls
from florence.data.transforms import RandomResizedCropFlip

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "data" / "cifar10_quickstart"


def flickr_dir() -> Path:
    """Return the Flickr8k subset of the shared data folder, or skip the test."""
    shared = Path(os.environ.get("FLORENCE_SHARED_DATA", REPO.parent / "shared" / "data"))
    path = shared / "flickr8k_800"
    if not path.is_dir():
        pytest.skip(f"test data {path} not found; set FLORENCE_SHARED_DATA to the shared data folder")
    return path


def quickstart_source() -> ClassificationSource:
    return ClassificationSource(
        QUICKSTART / "train", templates=None, classes_file=QUICKSTART / "classes.txt"
    )


def write_quickstart_shards(folder: Path, limit: int, max_samples: int) -> ShardIndex:
    """Write ``limit`` shuffled quickstart training images to shards of ``max_samples``."""
    return write_shards([quickstart_source()], folder, max_samples=max_samples, limit=limit)


def open_shards(
    urls, templates=None, *, strict: bool = False, shuffle_buffer: int = 64, index=None
) -> ShardedImageText:
    return ShardedImageText(
        shards_from_urls(urls, index, templates),
        RandomResizedCropFlip(32),
        strict=strict,
        seed=0,
        shuffle_buffer=shuffle_buffer,
    )
