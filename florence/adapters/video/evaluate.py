"""Action recognition accuracy on a labelled video dataset, with multi-view testing.

Each video is cut into ``num_clips x num_crops`` test views, a scoring function maps the
views to class scores (a fine-tuned classifier's softmax, or zero-shot probabilities), and
the scores are averaged over the views. Top-1, top-5 and mean per-class recall, each with a
95% bootstrap interval over the videos, come from ``florence.evaluation.stats``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from florence.adapters.video.dataset import VideoDataset
from florence.adapters.video.io import VideoDecodeError
from florence.adapters.video.sampling import average_view_scores, load_test_views
from florence.evaluation._common import target_rank

_logger = logging.getLogger(__name__)

ScoreFunction = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ViewSampling:
    """Test-view settings: ``num_clips`` temporal clips x ``num_crops`` square crops of ``num_frames`` frames."""

    num_frames: int = 8
    image_size: int = 224
    sampling: str = "uniform"
    frame_interval: int = 2
    num_clips: int = 1
    num_crops: int = 1

    def load(self, path: str | Path) -> torch.Tensor:
        """Decode the views of one video as ``[num_clips * num_crops, 3, T, S, S]``."""
        return load_test_views(
            path, self.num_frames, self.image_size, self.sampling, self.frame_interval, self.num_clips, self.num_crops
        )


@dataclass
class VideoEvalResult:
    """Metrics in percent, one prediction per scored video, and the videos that could not be read."""

    metrics: dict[str, float]
    predictions: list[dict[str, Any]]
    unreadable: list[tuple[str, str]] = field(default_factory=list)


@torch.inference_mode()
def score_videos(
    score_views: ScoreFunction, paths: Sequence[str | Path], views: ViewSampling
) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """Return the view-averaged scores ``[N, C]`` of the readable videos, their positions in ``paths``, and the unreadable ones.

    A video that fails to decode is logged and left out.
    """
    scores, kept, unreadable = [], [], []
    for position, path in enumerate(paths):
        try:
            clip_views = views.load(path)
        except VideoDecodeError as error:
            _logger.warning("skipping unreadable video %s: %s", path, error)
            unreadable.append((str(path), str(error)))
            continue
        scores.append(average_view_scores(score_views, clip_views).float())
        kept.append(position)
    if not scores:
        raise ValueError(f"none of the {len(paths)} videos could be decoded; see the warnings above")
    return torch.stack(scores), kept, unreadable


def evaluate_video_classification(
    score_views: ScoreFunction,
    dataset: VideoDataset,
    views: ViewSampling,
    top: int = 5,
    seed: int = 0,
    bootstrap_samples: int = 1000,
) -> VideoEvalResult:
    """Score every video of ``dataset`` over its test views and compute top-1, top-5 and mean per-class recall.

    ``score_views`` maps views ``[V, 3, T, S, S]`` to scores ``[V, len(dataset.classes)]``.
    Only the dataset's video list and labels are used, so its own clip size does not matter.
    With fewer than 5 classes, top-5 is top-C and therefore 100.
    """
    from florence.evaluation.stats import classification_metrics

    if len(dataset) == 0:
        raise ValueError("the dataset has no readable videos; see the warnings above")
    paths = [video for video, _, _ in dataset.samples]
    scores, kept, unreadable = score_videos(score_views, paths, views)
    if scores.shape[1] != len(dataset.classes):
        raise ValueError(f"the scores have {scores.shape[1]} classes but the dataset has {len(dataset.classes)}")
    labels = torch.tensor([dataset.samples[position][1] for position in kept])

    metrics: dict[str, Any] = classification_metrics(scores, labels, seed=seed, samples=bootstrap_samples)
    metrics["num_videos"] = len(kept)
    metrics["num_unreadable"] = len(unreadable) + len(dataset.skipped)
    metrics["num_classes"] = len(dataset.classes)
    predictions = [
        _prediction(paths[position], dataset.classes, int(label), row, top)
        for position, label, row in zip(kept, labels, scores)
    ]
    unreadable = [(str(video), error) for video, error in dataset.skipped] + unreadable
    return VideoEvalResult(metrics, predictions, unreadable)


def _prediction(path: Path, classes: Sequence[str], label: int, scores: torch.Tensor, top: int) -> dict[str, Any]:
    values, indices = scores.topk(min(top, len(classes)))
    rank = int(target_rank(scores[None], torch.tensor([label]))[0]) + 1
    return {
        "path": str(path),
        "label": classes[label],
        "label_rank": rank,
        "top_labels": [classes[index] for index in indices.tolist()],
        "top_scores": [round(value, 6) for value in values.tolist()],
    }
