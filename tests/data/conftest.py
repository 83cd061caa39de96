"""Fixtures for the data tests: real images from the shared data folder and the shipped subset.

The shared folder is ``$FLORENCE_SHARED_DATA`` (default ``../shared/data`` next to the
repository). Tests that need it skip when it is missing. The CIFAR-10 quickstart subset in
``data/cifar10_quickstart`` ships with the repository.
"""

import os
from pathlib import Path

import pytest

from florence.data import build_eval_transform

REPO_ROOT = Path(__file__).resolve().parents[2]
QUICKSTART_DIR = REPO_ROOT / "data" / "cifar10_quickstart"


def shared_data_dir() -> Path:
    return Path(os.environ.get("FLORENCE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(
            f"test data {path} not found; set FLORENCE_SHARED_DATA to the shared data folder"
        )
    return path


@pytest.fixture(scope="session")
def flickr_dir() -> Path:
    """Flickr8k subset: ``images/*.jpg``, ``captions.tsv`` and ``captions_coco_format.json``."""
    return require(shared_data_dir() / "flickr8k_800")


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """CIFAR-10: ``train.zip``, ``test.zip``, ``train.csv``, ``test.csv`` and ``classes.txt``."""
    return require(shared_data_dir() / "cifar10")


@pytest.fixture(scope="session")
def quickstart_dir() -> Path:
    return require(QUICKSTART_DIR)


IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def transform():
    """Evaluation transform to 32x32, the size of the CIFAR-10 images used in these tests."""
    return build_eval_transform(IMAGE_SIZE)
