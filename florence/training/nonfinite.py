"""Count training steps skipped because their loss or gradient norm was not finite."""

from __future__ import annotations

import logging
import math

_logger = logging.getLogger(__name__)


class NonfiniteCounter:
    """Counter of skipped non-finite steps, in total and in a row, with a limit on the run of them.

    An fp16 step whose loss is finite but whose gradient overflowed is loss scaling at work: it
    is counted like the others but logged at INFO instead of WARNING.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.in_a_row = 0

    @property
    def limit_reached(self) -> bool:
        """True once ``limit`` steps in a row were not finite."""
        return self.in_a_row >= self.limit

    def record(self, step: int, loss: float, grad_norm: float, skipped: bool, loss_scaling: bool) -> None:
        """Count and log step ``step`` if it was ``skipped``, or else reset the run of skipped steps."""
        if not skipped:
            self.in_a_row = 0
            return

        self.total += 1
        self.in_a_row += 1
        overflow = loss_scaling and math.isfinite(loss)
        _logger.log(
            logging.INFO if overflow else logging.WARNING,
            "step %d: loss %s, gradient norm %s; skipped the update (%d in a row, limit %d)",
            step,
            loss,
            grad_norm,
            self.in_a_row,
            self.limit,
        )
