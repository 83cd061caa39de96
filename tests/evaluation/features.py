"""Frozen image features of real CIFAR-10 photos for the probe tests.

The photos are the CIFAR-10 subset shipped in ``data/cifar10_quickstart``. The encoder is a
randomly initialised open_clip CLIP seeded with 0, so its features are weak but real and
repeatable. Features are computed once per process and cached.
"""

import functools
from pathlib import Path

import open_clip
import torch
from PIL import Image
from torch import Tensor

DATA = Path(__file__).resolve().parents[2] / "data" / "cifar10_quickstart"
IMAGE_SIZE = 32
ENCODE_BATCH_SIZE = 256


def class_names() -> list[str]:
    return [name for name in (DATA / "classes.txt").read_text().splitlines() if name]


def build_encoder(seed: int = 0) -> open_clip.CLIP:
    """Build a randomly initialised open_clip CLIP for 32x32 images with 64-dim features."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=64,
        vision_cfg={"layers": 2, "width": 64, "head_width": 32, "mlp_ratio": 2.0, "patch_size": 4, "image_size": IMAGE_SIZE},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    )
    return model.eval()


def image_paths(split: str, per_class: int, skip: int = 0) -> tuple[list[Path], list[int]]:
    """Return ``per_class`` image paths of every class of ``split``, after the first ``skip``, with labels."""
    paths, labels = [], []
    for label, name in enumerate(class_names()):
        files = sorted((DATA / split / name).glob("*.jpg"))[skip : skip + per_class]
        paths += files
        labels += [label] * len(files)

    return paths, labels


@functools.lru_cache(maxsize=8)
def cifar_features(split: str, per_class: int, skip: int = 0) -> tuple[Tensor, Tensor]:
    """Return the encoder's image features ``[N, 64]`` and labels ``[N]`` of ``per_class`` photos per class."""
    paths, labels = image_paths(split, per_class, skip)
    transform = open_clip.image_transform(IMAGE_SIZE, is_train=False)
    model = build_encoder()

    chunks = []
    with torch.inference_mode():
        for start in range(0, len(paths), ENCODE_BATCH_SIZE):
            images = torch.stack([transform(Image.open(path).convert("RGB")) for path in paths[start : start + ENCODE_BATCH_SIZE]])
            chunks.append(model.encode_image(images))

    return torch.cat(chunks).clone(), torch.tensor(labels)
