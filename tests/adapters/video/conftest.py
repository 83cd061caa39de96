"""Fixtures for the video adapter tests: the real clips of the shared data folder.

The folder is ``$FLORENCE_SHARED_DATA`` (default: ``shared/data`` next to the repository);
tests that need it are skipped when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from florence.checkpoint import save_weights
from florence.models import create_model

REPO_ROOT = Path(__file__).resolve().parents[3]


def shared_data_folder(name: str) -> Path:
    root = Path(os.environ.get("FLORENCE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    path = root / name
    if not path.exists():
        pytest.skip(f"test data {path} not found; set FLORENCE_SHARED_DATA to the shared data folder")
    return path


@pytest.fixture(scope="session")
def video_clips() -> Path:
    return shared_data_folder("video_clips")


@pytest.fixture(scope="session")
def video_clips2() -> Path:
    return shared_data_folder("video_clips2")


@pytest.fixture(scope="session")
def tiny_model() -> torch.nn.Module:
    """A florence-tiny model with seeded random weights (32 px input)."""
    torch.manual_seed(0)
    return create_model("florence-tiny").eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model: torch.nn.Module, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("checkpoint") / "model.safetensors"
    save_weights(tiny_model, path)
    return path
