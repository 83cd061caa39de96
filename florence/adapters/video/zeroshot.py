"""Zero-shot action recognition with a Florence image-text model.

A video embedding is either the mean of the L2-normalised image embeddings of its sampled
frames (``tower="frames"``), or the image projection of a Video CoSwin inflated from the
image tower (``tower="video"``). Class names become prompts with templates, the prompt
embeddings of a class are averaged (CLIP's prompt ensembling, via
``build_zero_shot_classifier``), and each test view's softmax probabilities are averaged over
the views.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from florence.adapters.video.inflate import inflate_coswin
from florence.adapters.video.model import VideoCoSwin
from florence.adapters.video.sampling import average_view_scores, load_test_views
from florence.evaluation.zeroshot import build_zero_shot_classifier

_logger = logging.getLogger(__name__)

# Prompt templates for actions, chosen for this module: Kinetics class names are verb phrases
# ("playing guitar"), which read as "a video of a person playing guitar."
VIDEO_TEMPLATES: tuple[str, ...] = (
    "a video of a person {}.",
    "a photo of a person {}.",
    "a video of {}.",
    "{}.",
)

TOWERS = ("frames", "video")

LABEL_MAP_FOLDER = Path(__file__).parent / "label_maps"
# Label maps shipped in LABEL_MAP_FOLDER; SOURCE.md there names their origin.
LABEL_MAPS = ("kinetics400", "ucf101", "ntu60")


@dataclass(frozen=True)
class VideoPrediction:
    """Class probabilities of one video, averaged over its test views, with the top-k labels."""

    path: Path
    probabilities: torch.Tensor
    top_labels: list[str]
    top_probabilities: list[float]


class VideoEncoder(nn.Module):
    """Maps ``[B, 3, T, H, W]`` clips to L2-normalised Florence embeddings ``[B, D]``.

    ``tower="frames"`` runs the image tower on every frame and averages the normalised frame
    embeddings. ``tower="video"`` runs a Video CoSwin inflated from the image tower (centre-tap
    inflation, so a static clip embeds as its frame does) and applies the image projection.
    """

    def __init__(self, model: nn.Module, tower: str = "frames", temporal_window: int = 2) -> None:
        super().__init__()
        if tower not in TOWERS:
            raise ValueError(f"unknown tower {tower!r}; valid values: {', '.join(TOWERS)}")
        self.model = model
        self.tower = tower
        self.video_tower: VideoCoSwin | None = None
        if tower == "video":
            self.video_tower = inflate_coswin(model.visual, temporal_window=temporal_window)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        if self.video_tower is not None:
            features = self.model.image_projection(self.video_tower(clips))
            return F.normalize(features.float(), dim=-1)

        batch_size, channels, num_frames, height, width = clips.shape
        frames = clips.permute(0, 2, 1, 3, 4).reshape(batch_size * num_frames, channels, height, width)
        frame_embeddings = self.model.encode_image(frames, normalize=True)
        mean_embedding = frame_embeddings.view(batch_size, num_frames, -1).mean(dim=1)
        return F.normalize(mean_embedding, dim=-1)


def zero_shot_scorer(
    model: nn.Module,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str] = VIDEO_TEMPLATES,
    tower: str = "frames",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return a function from test views ``[V, 3, T, H, W]`` to zero-shot class probabilities ``[V, C]``.

    The probabilities are the softmax of the cosine similarities times the model's logit
    scale (capped at 100, as in CLIP).
    """
    encoder = VideoEncoder(model.eval(), tower).eval()
    classifier = build_zero_shot_classifier(model, tokenizer, list(classnames), list(templates))
    logit_scale = model.logit_scale.exp().clamp(max=100.0).item()

    @torch.inference_mode()
    def score_views(views: torch.Tensor) -> torch.Tensor:
        return (logit_scale * encoder(views) @ classifier).softmax(dim=-1)

    return score_views


@torch.inference_mode()
def classify_videos(
    model: nn.Module,
    tokenizer,
    paths: Sequence[str | Path],
    classnames: Sequence[str],
    templates: Sequence[str] = VIDEO_TEMPLATES,
    num_frames: int = 8,
    image_size: int | None = None,
    mode: str = "uniform",
    frame_interval: int = 2,
    num_clips: int = 1,
    num_crops: int = 1,
    tower: str = "frames",
    top: int = 5,
) -> list[VideoPrediction]:
    """Rank ``classnames`` for each video by zero-shot similarity, averaged over test views.

    ``image_size`` defaults to the image tower's nominal size. ``model`` is a Florence model
    (``encode_text``, ``visual``, ``image_projection`` and ``logit_scale``).
    """
    model.eval()
    image_size = image_size or model.visual.img_size[0]
    score_views = zero_shot_scorer(model, tokenizer, classnames, templates, tower)

    predictions = []
    for path in paths:
        views = load_test_views(path, num_frames, image_size, mode, frame_interval, num_clips, num_crops)
        probabilities = average_view_scores(score_views, views)
        values, indices = probabilities.topk(min(top, len(classnames)))
        predictions.append(
            VideoPrediction(
                path=Path(path),
                probabilities=probabilities,
                top_labels=[classnames[index] for index in indices.tolist()],
                top_probabilities=values.tolist(),
            )
        )
        _logger.debug("%s: top-1 %s (%.3f)", path, predictions[-1].top_labels[0], values[0].item())
    return predictions


def top_k_accuracy(predictions: Sequence[VideoPrediction], labels: Sequence[str], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Return ``{"top1": ..., "top5": ...}``: the fraction of videos whose label is in their top k."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    results = {}
    for k in ks:
        hits = [label in prediction.top_labels[:k] for prediction, label in zip(predictions, labels)]
        if any(len(prediction.top_labels) < k for prediction in predictions):
            raise ValueError(f"top{k} needs predictions with at least {k} labels; pass top >= {k}")
        results[f"top{k}"] = sum(hits) / len(hits) if hits else 0.0
    return results


def read_label_map(spec: str | Path) -> list[str]:
    """Read class names, one per line, from a shipped label map (see ``LABEL_MAPS``) or a text file."""
    path = LABEL_MAP_FOLDER / f"{spec}.txt" if str(spec) in LABEL_MAPS else Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"label map {spec!r} not found; pass one of {', '.join(LABEL_MAPS)} or a text file with one class per line"
        )
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"label map {path} is empty; write one class name per line")
    return names
