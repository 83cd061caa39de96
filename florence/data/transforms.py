"""Image transforms for training and evaluation, on PIL images, returning normalized tensors."""

import math
from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode, v2

__all__ = [
    "OPENAI_DATASET_MEAN",
    "OPENAI_DATASET_STD",
    "build_eval_transform",
    "build_train_transform",
]

# Per-channel RGB mean and std of CLIP's training images, as in open_clip.constants.
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)


def _size_pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    """Return ``image_size`` as (height, width), raising ValueError for invalid sizes."""
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(
            f"image_size must be a positive int or (height, width), got {image_size!r}"
        )
    return size


def _to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def build_train_transform(
    image_size: int | Sequence[int],
    scale: tuple[float, float] = (0.35, 1.0),
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
    hflip: bool = True,
) -> v2.Compose:
    """Build the training transform: random resized crop (bicubic), optional flip, normalize.

    ``scale`` is the range of the crop's area as a fraction of the image area. The aspect
    ratio range is torchvision's default, 3/4 to 4/3.
    """
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")

    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(
            _size_pair(image_size), scale=scale, interpolation=InterpolationMode.BICUBIC
        )
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps.extend(_to_normalized_tensor(mean, std))
    return v2.Compose(steps)


def build_eval_transform(
    image_size: int | Sequence[int],
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
    crop_pct: float = 1.0,
) -> v2.Compose:
    """Build the evaluation transform: resize the shorter side, center crop, normalize.

    The shorter side is resized (bicubic) to ``floor(max(height, width) / crop_pct)`` so the
    aspect ratio is kept, then the center ``image_size`` region is cropped. The default
    ``crop_pct=1.0`` matches CLIP's evaluation preprocessing, and timm's ImageNet default is 0.875.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")

    height, width = _size_pair(image_size)
    resize_to = math.floor(max(height, width) / crop_pct)
    steps: list[v2.Transform] = [
        v2.Resize(resize_to, interpolation=InterpolationMode.BICUBIC),
        v2.CenterCrop((height, width)),
    ]
    steps.extend(_to_normalized_tensor(mean, std))
    return v2.Compose(steps)
