"""Metrics sinks: a JSONL file and TensorBoard."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)


class MetricsWriter:
    """Append one JSON object per record to ``metrics.jsonl`` and mirror scalars to TensorBoard.

    NOTE: after a resume, records between the last checkpoint and the interruption appear twice
    in the JSONL file. Readers should keep the last record for each step.
    """

    def __init__(self, output_dir: Path, tensorboard: bool = True) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self._tensorboard = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError as error:
                _logger.warning("TensorBoard logging is off: %s (pip install tensorboard)", error)

    def write(self, step: int, values: dict[str, Any]) -> None:
        record = {"step": step, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
