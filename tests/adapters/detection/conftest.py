"""Fixtures for the detection tests."""

from pathlib import Path

import pytest

from tests.adapters.detection.helpers import shared_data


@pytest.fixture
def coco128() -> Path:
    path = shared_data() / "coco128_det"
    if not (path / "instances.json").is_file():
        pytest.skip(f"coco128_det not found under {path.parent}; set FLORENCE_SHARED_DATA to the shared data folder")
    return path
