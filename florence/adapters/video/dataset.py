"""Labelled video datasets from a CSV file or from class folders, skipping unreadable videos."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from florence.adapters.video.io import (
    VIDEO_EXTENSIONS,
    VideoDecodeError,
    probe_video,
    read_video,
)
from florence.adapters.video.sampling import (
    normalize_clip,
    random_temporal_crop,
    resize_short_side,
    spatial_crops,
    temporal_views,
)

_logger = logging.getLogger(__name__)


def read_video_csv(path: str | Path, label_column: str = "label") -> list[tuple[Path, str]]:
    """Read ``(video path, label)`` rows from a CSV with a ``path`` column and ``label_column``.

    Relative video paths start at the CSV's folder. Rows with an empty label are left out.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"path", label_column} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} lacks the column(s) {sorted(missing)}; its columns are {reader.fieldnames}")
        rows = [(path.parent / row["path"], row[label_column].strip()) for row in reader]
    return [(video, label) for video, label in rows if label]


def scan_class_folders(root: str | Path) -> list[tuple[Path, str]]:
    """List ``(video path, class name)`` for videos in ``root/<class name>/``, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"video folder {root} not found")
    samples = [
        (video, folder.name)
        for folder in sorted(child for child in root.iterdir() if child.is_dir())
        for video in sorted(folder.iterdir())
        if video.suffix.lower() in VIDEO_EXTENSIONS
    ]
    if not samples:
        raise ValueError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) in the class folders of {root}")
    return samples


class VideoDataset(Dataset):
    """Labelled clips of ``num_frames`` frames at ``size x size``, as ``(float32 [3, T, H, W], class index)``.

    ``source`` is a CSV file (see :func:`read_video_csv`) or a folder of class folders.
    Every video is probed when the dataset is built. Videos that cannot be read are left out,
    logged with their paths and counted in ``skipped``. A video that fails to decode later is
    logged, added to ``skipped`` and replaced by the next readable sample.

    Training (``train=True``) takes a random temporal crop, a random square crop of the
    short-side-resized frames and a random horizontal flip. Evaluation takes the centre clip
    and the centre crop.
    """

    def __init__(
        self,
        source: str | Path,
        num_frames: int = 8,
        size: int = 224,
        mode: str = "uniform",
        frame_interval: int = 2,
        train: bool = False,
        classes: Sequence[str] | None = None,
        label_column: str = "label",
    ) -> None:
        source = Path(source)
        samples = read_video_csv(source, label_column) if source.is_file() else scan_class_folders(source)
        self.classes = list(classes) if classes is not None else sorted({label for _, label in samples})
        class_index = {name: index for index, name in enumerate(self.classes)}
        unknown = sorted({label for _, label in samples if label not in class_index})
        if unknown:
            raise ValueError(f"labels {unknown} of {source} are not in the given classes; add them to classes")

        self.num_frames = num_frames
        self.size = size
        self.mode = mode
        self.frame_interval = frame_interval
        self.train = train
        self.skipped: list[tuple[Path, str]] = []
        self.samples: list[tuple[Path, int, int]] = []
        for video, label in samples:
            try:
                info = probe_video(video)
            except VideoDecodeError as error:
                self._skip(video, error)
                continue
            self.samples.append((video, class_index[label], info.num_frames))
        if self.skipped:
            _logger.warning("%s: skipped %d unreadable videos of %d", source, len(self.skipped), len(samples))

    def _skip(self, video: Path, error: Exception) -> None:
        _logger.warning("skipping unreadable video %s: %s", video, error)
        self.skipped.append((video, str(error)))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for attempt in range(len(self.samples)):
            video, label, total_frames = self.samples[(index + attempt) % len(self.samples)]
            try:
                return self._load(video, total_frames), label
            except VideoDecodeError as error:
                self._skip(video, error)
        raise VideoDecodeError(f"none of the {len(self.samples)} videos could be decoded; see the warnings above")

    def _load(self, video: Path, total_frames: int) -> torch.Tensor:
        if self.train:
            indices = random_temporal_crop(total_frames, self.num_frames, self.mode, self.frame_interval)
        else:
            indices = temporal_views(total_frames, self.num_frames, self.mode, self.frame_interval)[0]
        frames = resize_short_side(read_video(video, indices), self.size)
        if not self.train:
            return normalize_clip(spatial_crops(frames, self.size)[0])

        height, width = frames.shape[-2:]
        top = int(torch.randint(0, height - self.size + 1, (1,)))
        left = int(torch.randint(0, width - self.size + 1, (1,)))
        frames = frames[..., top : top + self.size, left : left + self.size]
        if torch.rand(()) < 0.5:
            frames = TF.horizontal_flip(frames)
        return normalize_clip(frames)
