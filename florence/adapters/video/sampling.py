"""Frame sampling, clip transforms and multi-view testing for video models.

Two temporal sampling schemes, with mmaction2's names:

- **uniform** (as in TSN): the video is cut into ``num_frames``
  equal segments and one frame is taken from each, so a clip spans the whole video;
- **dense**: ``num_frames`` frames ``frame_interval`` apart from one
  start frame. A clip that runs past the end reads the last frame again.

Multi-view testing takes ``num_clips`` temporal clips times ``num_crops`` spatial crops, runs
the model on each view and averages the scores. Uniform sampling places the clips by shifting
the offset inside each segment, and dense sampling spaces their starts evenly. One spatial crop
is the centre crop, and three are both ends and the centre of the longer side.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from florence.adapters.video.io import probe_video, read_video
from florence.data.transforms import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

SAMPLING_MODES = ("uniform", "dense")


def uniform_indices(total_frames: int, num_frames: int, offset: float = 0.5) -> list[int]:
    """Take frame ``floor((i + offset) * total_frames / num_frames)`` of each of ``num_frames`` segments.

    ``offset`` in [0, 1) is the position inside each segment (0.5: its middle). A video shorter
    than ``num_frames`` repeats frames.
    """
    _check_counts(total_frames, num_frames)
    if not 0.0 <= offset < 1.0:
        raise ValueError(f"offset must be in [0, 1), got {offset}")
    return [min(math.floor((index + offset) * total_frames / num_frames), total_frames - 1) for index in range(num_frames)]


def dense_indices(total_frames: int, num_frames: int, frame_interval: int, start: int) -> list[int]:
    """Take ``num_frames`` frames ``frame_interval`` apart from ``start``; past the end reads the last frame."""
    _check_counts(total_frames, num_frames)
    if frame_interval < 1:
        raise ValueError(f"frame_interval must be >= 1, got {frame_interval}")
    return [min(start + index * frame_interval, total_frames - 1) for index in range(num_frames)]


def temporal_views(
    total_frames: int, num_frames: int, mode: str = "uniform", frame_interval: int = 2, num_clips: int = 1
) -> list[list[int]]:
    """Return the frame indices of ``num_clips`` evenly placed test clips."""
    _check_mode(mode)
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    if mode == "uniform":
        return [uniform_indices(total_frames, num_frames, (clip + 0.5) / num_clips) for clip in range(num_clips)]

    span = (num_frames - 1) * frame_interval + 1
    free = max(total_frames - span, 0)
    starts = [round(free * (clip + 0.5) / num_clips) for clip in range(num_clips)]
    return [dense_indices(total_frames, num_frames, frame_interval, start) for start in starts]


def random_temporal_crop(
    total_frames: int,
    num_frames: int,
    mode: str = "uniform",
    frame_interval: int = 2,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Return the frame indices of one random training clip: a random offset per segment, or a random start."""
    _check_mode(mode)
    _check_counts(total_frames, num_frames)
    if mode == "uniform":
        offsets = torch.rand(num_frames, generator=generator).tolist()
        return [
            min(math.floor((index + offset) * total_frames / num_frames), total_frames - 1)
            for index, offset in enumerate(offsets)
        ]

    span = (num_frames - 1) * frame_interval + 1
    start = int(torch.randint(0, max(total_frames - span, 0) + 1, (1,), generator=generator))
    return dense_indices(total_frames, num_frames, frame_interval, start)


def resize_short_side(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``uint8 [T, H, W, 3]`` frames so the shorter side is ``size`` (bicubic); return ``[T, 3, H', W']``."""
    frames = frames.permute(0, 3, 1, 2)
    return TF.resize(frames, size, interpolation=InterpolationMode.BICUBIC, antialias=True)


def spatial_crops(frames: torch.Tensor, size: int, num_crops: int = 1) -> list[torch.Tensor]:
    """Cut ``num_crops`` square ``size`` crops from ``[T, 3, H, W]`` frames along the longer side.

    One crop is the centre crop. Three crops are the two ends and the centre of the longer side,
    as mmaction2's ``ThreeCrop``.
    """
    if num_crops not in (1, 3):
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
    height, width = frames.shape[-2:]
    if min(height, width) < size:
        raise ValueError(f"frames of {height}x{width} are smaller than the crop size {size}; resize them first")

    top, left = (height - size) // 2, (width - size) // 2
    if num_crops == 1:
        offsets = [(top, left)]
    elif width >= height:
        offsets = [(top, 0), (top, left), (top, width - size)]
    else:
        offsets = [(0, left), (top, left), (height - size, left)]
    return [frames[..., y : y + size, x : x + size] for y, x in offsets]


def normalize_clip(
    frames: torch.Tensor,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
) -> torch.Tensor:
    """Convert ``uint8 [T, 3, H, W]`` frames to a normalised float32 clip ``[3, T, H, W]``."""
    if frames.dtype != torch.uint8:
        raise TypeError(f"normalize_clip expects uint8 frames, got {frames.dtype}")
    mean_tensor = torch.tensor(mean).view(1, -1, 1, 1)
    std_tensor = torch.tensor(std).view(1, -1, 1, 1)
    clip = (frames.float().div_(255) - mean_tensor).div_(std_tensor)
    return clip.permute(1, 0, 2, 3).contiguous()


def load_test_views(
    path: str | Path,
    num_frames: int,
    size: int,
    mode: str = "uniform",
    frame_interval: int = 2,
    num_clips: int = 1,
    num_crops: int = 1,
) -> torch.Tensor:
    """Decode the ``num_clips x num_crops`` test views of a video as ``[V, 3, T, size, size]``.

    Frames are decoded once for all clips, resized so the shorter side is ``size`` and cropped.
    Views are ordered clip-major (all crops of clip 0, then clip 1).
    """
    info = probe_video(path)
    clips = temporal_views(info.num_frames, num_frames, mode, frame_interval, num_clips)
    needed = sorted({index for clip in clips for index in clip})
    frames = resize_short_side(read_video(path, needed), size)
    position = {index: row for row, index in enumerate(needed)}

    views = []
    for clip in clips:
        clip_frames = frames[[position[index] for index in clip]]
        views.extend(normalize_clip(crop) for crop in spatial_crops(clip_frames, size, num_crops))
    return torch.stack(views)


def average_view_scores(score_fn: Callable[[torch.Tensor], torch.Tensor], views: torch.Tensor) -> torch.Tensor:
    """Run ``score_fn`` on ``[V, 3, T, H, W]`` views and return the mean of its ``[V, C]`` scores, ``[C]``."""
    scores = score_fn(views)
    if scores.ndim != 2 or scores.shape[0] != views.shape[0]:
        raise ValueError(f"score_fn must return [V, C] scores for {views.shape[0]} views, got {tuple(scores.shape)}")
    return scores.mean(dim=0)


def _check_counts(total_frames: int, num_frames: int) -> None:
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")


def _check_mode(mode: str) -> None:
    if mode not in SAMPLING_MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; valid values: {', '.join(SAMPLING_MODES)}")
