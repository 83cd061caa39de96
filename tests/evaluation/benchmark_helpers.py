"""Helpers for the benchmark-suite tests: a tiny open_clip config file and suite files on the shared data."""

import json
import os
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]

# A randomly initialised open_clip CLIP small enough to encode a few hundred 32x32 images in
# seconds on one core: 2 vision and 2 text layers of width 64, 32-dim embeddings.
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 2, "width": 64, "head_width": 32, "mlp_ratio": 2.0, "patch_size": 8, "image_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}


def write_tiny_clip_config(folder: Path) -> Path:
    path = folder / "tiny-clip-bench.json"
    path.write_text(json.dumps(TINY_CLIP_CONFIG))
    return path


def require_shared(*parts: str) -> Path:
    root = Path(os.environ.get("FLORENCE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    path = root.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"test data {path} not found; set FLORENCE_SHARED_DATA to the shared data folder")
    return path


def cifar_dataset(test_images: int = 200, train_images: int | None = 400) -> dict:
    folder = require_shared("cifar10")
    spec = {
        "format": "csv",
        "test": {
            "path": str(folder / "test.csv"),
            "archive": str(folder / "test.zip"),
            "classes_file": str(folder / "classes.txt"),
            "max_images": test_images,
        },
        "classnames": "cifar10",
        "templates": "cifar10",
    }
    if train_images is not None:
        spec["train"] = {
            "path": str(folder / "train.csv"),
            "archive": str(folder / "train.zip"),
            "classes_file": str(folder / "classes.txt"),
            "max_images": train_images,
        }
    return spec


def flickr_dataset(images: int = 40) -> dict:
    folder = require_shared("flickr8k_800")
    return {"format": "captions", "test": {"path": str(folder / "captions.tsv"), "max_images": images}}


def write_suite(folder: Path, datasets: dict, runs: list[dict], **settings) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "suite.yaml"
    suite = {"name": "test_suite", "seed": 0, "batch_size": 64, "bootstrap_samples": 50, **settings}
    suite.update({"datasets": datasets, "runs": runs})
    path.write_text(yaml.safe_dump(suite))
    return path
