"""Object detection with CoSwin, an FPN, a Dynamic Head and ATSS, with text-based classification."""

from florence.adapters.detection.model import (
    FlorenceDetector,
    detector_config,
    load_detector,
)

__all__ = ["FlorenceDetector", "detector_config", "load_detector"]
