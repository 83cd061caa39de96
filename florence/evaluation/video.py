"""Video-text retrieval in a benchmark suite: the ``video_captions`` format and the ``video_retrieval`` task.

A ``video_captions`` split is one or more TSV or CSV caption tables with ``path`` and
``caption`` columns (other columns are ignored), several rows per video allowed. Relative
video paths start at the folder of the table that lists them, and rows for the same video
file in several tables belong to one video. Each video is embedded as the mean of the
L2-normalised image embeddings of its sampled frames (``florence.adapters.video.retrieval``),
averaged over ``num_clips`` temporal clips of one centre crop. With ``tower: video`` a florence
model's CoSwin is inflated to a Video CoSwin, which embeds each clip as a whole.

NOTE: frames are normalised with the CLIP mean and std (``normalize_clip``), not with the
model's own image transform. florence and most open_clip models use these values, but a
model trained with other statistics is scored on slightly shifted inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from florence.data.sources import read_caption_table
from florence.evaluation._common import autocast, resolve_device
from florence.evaluation.datasets import (
    DatasetSpec,
    SplitSpec,
    _annotation_digest,
    _check_exists,
    _subset,
)

if TYPE_CHECKING:
    from florence.evaluation.runner import SuiteRunner
    from florence.evaluation.suite import RunSpec

logger = logging.getLogger(__name__)

VIDEO_PATH_COLUMN = "path"
CAPTION_COLUMN = "caption"


@dataclass
class VideoRetrievalSplit:
    """Videos with captions: ``caption_to_video[j]`` is the index in ``videos`` of caption ``j``'s video."""

    videos: list[Path]
    captions: list[str]
    caption_to_video: list[int]
    fingerprint: str


def split_paths(split: SplitSpec) -> list[str]:
    """Return the caption tables of a split, whose ``path`` is one path or a list of them."""
    return list(split.path) if isinstance(split.path, list) else [split.path]


def read_video_captions(paths: list[str]) -> tuple[list[Path], list[str], list[int]]:
    """Read ``(videos, captions, caption_to_video)`` from caption tables, videos in order of first appearance."""
    video_index: dict[Path, int] = {}
    videos: list[Path] = []
    captions: list[str] = []
    caption_to_video: list[int] = []
    for table in map(Path, paths):
        for video, caption, _ in read_caption_table(table, VIDEO_PATH_COLUMN, CAPTION_COLUMN, label_key=None):
            location = Path(video) if Path(video).is_absolute() else (table.parent / video).resolve()
            if location not in video_index:
                video_index[location] = len(videos)
                videos.append(location)
            captions.append(caption)
            caption_to_video.append(video_index[location])
    return videos, captions, caption_to_video


def build_video_retrieval_split(spec: DatasetSpec, split: SplitSpec, seed: int) -> VideoRetrievalSplit:
    """Read a ``video_captions`` split; ``max_images`` keeps a seeded random subset of that many videos."""
    paths = split_paths(split)
    for path in paths:
        _check_exists(path, spec.name)
    videos, captions, caption_to_video = read_video_captions(paths)
    if not videos:
        raise ValueError(f"dataset {spec.name!r}: {', '.join(paths)} list no videos; add rows with path and caption")

    keep = _subset(len(videos), split.max_images, seed)
    if len(keep) < len(videos):
        new_index = {old: new for new, old in enumerate(keep)}
        pairs = [(caption, new_index[video]) for caption, video in zip(captions, caption_to_video) if video in new_index]
        videos = [videos[old] for old in keep]
        captions = [caption for caption, _ in pairs]
        caption_to_video = [video for _, video in pairs]

    fingerprint = _video_fingerprint(paths, videos, captions, caption_to_video, split.max_images, seed)
    return VideoRetrievalSplit(videos, captions, caption_to_video, fingerprint)


def _video_fingerprint(
    tables: list[str], videos: list[Path], captions: list[str], caption_to_video: list[int], max_images: int | None, seed: int
) -> str:
    """Hash the caption tables, the video list with byte sizes, the captions and the subset.

    NOTE: video bytes are not hashed, so a video rewritten in place with the same size keeps
    the fingerprint, as images do in ``datasets._fingerprint``.
    """
    payload = {
        "format": "video_captions",
        "tables": [_annotation_digest(table) for table in tables],
        "videos": [[str(video), video.stat().st_size if video.is_file() else None] for video in videos],
        "captions": [[caption, video] for caption, video in zip(captions, caption_to_video)],
        "max_images": max_images,
        "subset_seed": seed if max_images is not None else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def encode_readable_videos(
    model: Any, videos: list[Path], options: dict[str, Any], image_size: int, autocast_dtype: torch.dtype | None = None
) -> tuple[Tensor, list[int]]:
    """Embed each readable video into float32 CPU features ``[N, D]`` and return the indices of those embedded.

    Unreadable videos are logged and left out.
    """
    from florence.adapters.video.io import VideoDecodeError
    from florence.adapters.video.retrieval import encode_videos

    sampling = {
        "num_frames": options["num_frames"],
        "image_size": image_size,
        "mode": options["sampling"],
        "frame_interval": options["frame_interval"],
        "num_clips": options["num_clips"],
        "tower": options.get("tower", "frames"),
    }
    encoder = video_tower_model(model) if sampling["tower"] == "video" else model
    device = resolve_device(model, None)
    embeddings, kept = [], []
    for index, video in enumerate(videos):
        try:
            with autocast(device, autocast_dtype):
                embeddings.append(encode_videos(encoder, [video], **sampling)[0].float().cpu())
            kept.append(index)
        except VideoDecodeError as error:
            logger.warning("skipping unreadable video %s and its captions: %s", video, error)
    if not embeddings:
        raise ValueError(f"none of the {len(videos)} videos could be decoded; see the warnings above")
    return torch.stack(embeddings), kept


def video_tower_model(model: Any) -> Any:
    """Return the florence model inside an ``EvalModel``, whose CoSwin tower can be inflated to Video CoSwin."""
    inner = getattr(model, "model", model)
    if not (hasattr(inner, "visual") and hasattr(inner, "image_projection")):
        raise ValueError(
            f"tower: video inflates a florence CoSwin image tower, and {type(inner).__name__} has none; "
            "use tower: frames for this model"
        )
    return inner


def run_video_retrieval(runner: SuiteRunner, run: RunSpec, dataset: DatasetSpec) -> dict[str, float]:
    """Return video-to-text and text-to-video R@k (percent) with 95% cluster-bootstrap intervals.

    Videos that cannot be decoded are left out with their captions and counted in
    ``num_unreadable_videos``.
    """
    from florence.evaluation.retrieval import retrieval_ranks
    from florence.evaluation.runner import (
        encode_texts_by_length,
        retrieval_metrics_with_ci,
    )
    from florence.evaluation.tasks import model_image_size

    split = runner.split(dataset, "test")
    image_size = model_image_size(runner.model.model)
    video_features, kept = encode_readable_videos(
        runner.model, split.videos, run.options, image_size, runner.suite.autocast_dtype
    )
    new_index = {old: new for new, old in enumerate(kept)}
    pairs = [(caption, new_index[video]) for caption, video in zip(split.captions, split.caption_to_video) if video in new_index]
    captions = [caption for caption, _ in pairs]
    caption_to_video = torch.tensor([video for _, video in pairs])

    text_features = encode_texts_by_length(runner.model, captions, runner.suite.batch_size, runner.suite.autocast_dtype)
    video_to_text, text_to_video = retrieval_ranks(video_features, text_features, caption_to_video)
    metrics = retrieval_metrics_with_ci(
        video_to_text, text_to_video, caption_to_video, run.options["ks"],
        seed=runner.suite.seed, samples=runner.suite.bootstrap_samples,
    )
    metrics = {name.replace("image", "video"): value for name, value in metrics.items()}
    metrics["num_videos"] = len(kept)
    metrics["num_captions"] = len(captions)
    metrics["num_unreadable_videos"] = len(split.videos) - len(kept)
    return metrics
