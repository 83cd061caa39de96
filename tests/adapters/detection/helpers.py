"""Tiny detector configs shared by the detection tests."""

import os
from pathlib import Path

from florence.adapters.detection import FlorenceDetector

# Three CoSwin stages at strides 2, 4 and 8, so P3-P7 here are at strides 2 to 32.
TINY_BACKBONE = {
    "embed_dim": 16,
    "vision_cfg": {
        "embed_dim": 16, "depths": [1, 1, 1], "num_heads": [1, 2, 4], "window_size": 4,
        "stem_kernel_size": 3, "stem_stride": 2, "stem_padding": 1, "drop_path_rate": 0.0,
    },
    "text_cfg": {"width": 32, "layers": 1, "heads": 2},
}


def tiny_detector(**overrides) -> FlorenceDetector:
    config = {
        "backbone": "florence-tiny", "backbone_overrides": TINY_BACKBONE, "channels": 16, "num_blocks": 2, "groups": 4,
        "class_names": ["cat", "dog"],
    }
    config.update(overrides)
    return FlorenceDetector(**config)


def shared_data() -> Path:
    root = Path(os.environ.get("FLORENCE_SHARED_DATA", Path(__file__).resolve().parents[3] / ".." / "shared" / "data"))
    return root
