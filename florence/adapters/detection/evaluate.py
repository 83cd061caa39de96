"""COCO box evaluation with pycocotools: AP over IoU 0.5:0.95, AP50, AP75 and AP by object size."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from typing import Any

import torch

_logger = logging.getLogger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_coco_detections(
    image_id: int, prediction: dict[str, torch.Tensor], category_ids: Sequence[int], scale: float = 1.0
) -> list[dict[str, Any]]:
    """Convert one image's predictions to COCO result records.

    ``prediction`` boxes are x1, y1, x2, y2 in the resized input; dividing by ``scale`` maps them
    back to the original image. ``labels`` index ``category_ids``.
    """
    boxes = prediction["boxes"].detach().cpu().double() / scale
    records = []
    for box, score, label in zip(boxes.tolist(), prediction["scores"].tolist(), prediction["labels"].tolist()):
        x1, y1, x2, y2 = box
        records.append(
            {"image_id": int(image_id), "category_id": int(category_ids[label]), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)}
        )
    return records


def coco_evaluate(coco_gt, detections: list[dict[str, Any]], image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """Return AP, AP50, AP75, APs, APm, APl (fractions in [0, 1]) of ``detections`` against ``coco_gt``.

    ``coco_gt`` is a ``pycocotools.coco.COCO``; ``image_ids`` restricts the evaluation to a subset
    of its images. No detections at all gives zeros. A metric with no ground truth (for example
    APs when no box is small) is reported as -1, as pycocotools does.
    """
    from pycocotools.cocoeval import COCOeval

    if not detections:
        _logger.warning("no detections to evaluate; every AP is 0")
        return dict.fromkeys(METRIC_NAMES, 0.0)

    with contextlib.redirect_stdout(io.StringIO()) as captured:
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    _logger.debug("pycocotools summary:\n%s", captured.getvalue())
    return {name: float(value) for name, value in zip(METRIC_NAMES, evaluator.stats[:6])}
