"""COCO-format detection data: image folders with ``[x, y, w, h]`` boxes, box-aware resize and flip."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

_logger = logging.getLogger(__name__)

# Padded batches have sides divisible by this, the stride of P5 on a standard CoSwin; P6 and P7
# may then have odd sides, which the pyramid and the Dynamic Head handle.
SIZE_DIVISIBILITY = 32


@dataclass(frozen=True)
class CocoSplit:
    """Annotation file and image folder of one split of a COCO-format dataset."""

    annotation_file: Path
    image_dir: Path


def resolve_split(root: str | Path, split: str | None = None) -> CocoSplit:
    """Find a split under ``root``.

    Two layouts are accepted: ``annotations/instances_<split>.json`` with ``images/<split>/``
    (the ODinW folders), and a single ``instances.json`` with ``images/`` (coco128_det), for
    which ``split`` must be None. ``split`` may list names separated by commas, such as
    ``test,val,valid``; the first that exists is used, because datasets name their splits differently.
    """
    root = Path(root)
    if split is None and (root / "instances.json").is_file():
        return CocoSplit(root / "instances.json", root / "images")
    annotations = sorted(p.name[len("instances_") : -len(".json")] for p in (root / "annotations").glob("instances_*.json"))
    if split is None:
        raise ValueError(f"{root} has no instances.json; pass a split, one of: {', '.join(annotations) or 'none found'}")
    for name in split.split(","):
        path = root / "annotations" / f"instances_{name.strip()}.json"
        if path.is_file():
            return CocoSplit(path, root / "images" / name.strip())
    raise FileNotFoundError(
        f"split {split!r} not found under {root}/annotations; splits there: {', '.join(annotations) or 'none'}"
    )


def parse_image_range(text: str | None, count: int) -> slice:
    """Turn ``"START:STOP"`` (either side may be empty) into a slice over ``count`` sorted images."""
    if not text:
        return slice(0, count)
    try:
        start, stop = (int(part) if part else None for part in text.split(":"))
    except ValueError as error:
        raise ValueError(f"invalid image range {text!r}; expected START:STOP such as 0:32 or 32:") from error
    return slice(start, stop)


class CocoDetection(torch.utils.data.Dataset):
    """Images and boxes of a COCO JSON file, resized so the longer side is ``max_size``.

    Items are ``(image, target)``: ``image`` is float ``[3, h, w]`` in [0, 1]; ``target`` has
    ``boxes [G, 4]`` (x1, y1, x2, y2 in resized pixels), ``labels [G]`` (indices into
    ``class_names``), ``image_id``, ``scale`` (resized / original) and ``size`` (h, w). Crowd
    boxes and boxes under 1 pixel wide or high are dropped. ``flip`` mirrors image and boxes
    with probability 0.5.
    """

    def __init__(
        self, split: CocoSplit, max_size: int = 640, flip: bool = False, image_range: str | None = None
    ) -> None:
        self.split = split
        self.max_size = max_size
        self.flip = flip
        data = json.loads(split.annotation_file.read_text(encoding="utf-8"))
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in categories]
        self.class_names = [c["name"] for c in categories]
        self._label_of = {cid: index for index, cid in enumerate(self.category_ids)}

        images = sorted(data["images"], key=lambda image: image["id"])
        self.images = images[parse_image_range(image_range, len(images))]
        if not self.images:
            raise ValueError(f"image range {image_range!r} selects none of the {len(images)} images of {split.annotation_file}")
        self._annotations: dict[int, list[dict[str, Any]]] = {image["id"]: [] for image in self.images}
        for annotation in data["annotations"]:
            if annotation["image_id"] in self._annotations and not annotation.get("iscrowd", 0):
                self._annotations[annotation["image_id"]].append(annotation)

    @property
    def image_ids(self) -> list[int]:
        return [image["id"] for image in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        info = self.images[index]
        with Image.open(self.split.image_dir / info["file_name"]) as handle:
            image = pil_to_tensor(handle.convert("RGB")).float() / 255

        boxes, labels = [], []
        for annotation in self._annotations[info["id"]]:
            x, y, w, h = annotation["bbox"]
            if w >= 1 and h >= 1:
                boxes.append([x, y, x + w, y + h])
                labels.append(self._label_of[annotation["category_id"]])
        boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)

        image, boxes, scale = resize_longer_side(image, boxes, self.max_size)
        if self.flip and random.random() < 0.5:
            image, boxes = horizontal_flip(image, boxes)
        target = {
            "boxes": boxes,
            "labels": torch.tensor(labels, dtype=torch.long),
            "image_id": info["id"],
            "scale": scale,
            "size": tuple(image.shape[-2:]),
        }
        return image, target


def resize_longer_side(image: torch.Tensor, boxes: torch.Tensor, max_size: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Resize ``[3, H, W]`` so its longer side is ``max_size`` (aspect ratio kept) and scale the boxes to match."""
    height, width = image.shape[-2:]
    scale = max_size / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return image.clamp(0, 1), boxes * scale, scale


def horizontal_flip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    width = image.shape[-1]
    flipped = boxes.clone()
    flipped[:, 0], flipped[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return image.flip(-1), flipped


def collate_detection(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Pad images at the bottom and right to one size divisible by ``SIZE_DIVISIBILITY``."""
    height = max(image.shape[1] for image, _ in batch)
    width = max(image.shape[2] for image, _ in batch)
    height = -(-height // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
    width = -(-width // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
    images = torch.zeros(len(batch), 3, height, width)
    for index, (image, _) in enumerate(batch):
        images[index, :, : image.shape[1], : image.shape[2]] = image
    return images, [target for _, target in batch]
