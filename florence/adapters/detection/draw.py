"""Detection on single images and drawing of labelled boxes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.functional import pil_to_tensor

from florence.adapters.detection.data import collate_detection, resize_longer_side
from florence.adapters.detection.model import FlorenceDetector

# Distinct box colours, cycled by class index (the tab10 palette of matplotlib).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


@torch.no_grad()
def detect_image(
    model: FlorenceDetector,
    image: Image.Image,
    class_names: Sequence[str],
    image_size: int = 640,
    min_score: float = 0.3,
) -> dict[str, torch.Tensor]:
    """Detect ``class_names`` in a PIL image; boxes come back in the image's own pixels.

    Only detections with a score of at least ``min_score`` are returned.
    """
    pixels = pil_to_tensor(image.convert("RGB")).float() / 255
    resized, _, scale = resize_longer_side(pixels, torch.zeros(0, 4), image_size)
    batch, _ = collate_detection([(resized, {})])
    device = next(model.parameters()).device
    prediction = model.eval().predict(batch.to(device), [tuple(resized.shape[-2:])], class_names)[0]
    keep = prediction["scores"] >= min_score
    return {
        "boxes": prediction["boxes"][keep].cpu() / scale,
        "scores": prediction["scores"][keep].cpu(),
        "labels": prediction["labels"][keep].cpu(),
    }


def draw_detections(
    image: Image.Image, prediction: dict[str, torch.Tensor], class_names: Sequence[str], path: str | Path
) -> None:
    """Write ``image`` with one box and a "name score" label per detection to ``path``."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(2, round(max(canvas.size) / 300))
    for box, score, label in zip(prediction["boxes"].tolist(), prediction["scores"].tolist(), prediction["labels"].tolist()):
        colour = PALETTE[label % len(PALETTE)]
        draw.rectangle(box, outline=colour, width=width)
        text = f"{class_names[label]} {score:.2f}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), text, font=font)
        top_offset = bottom - top + 2
        draw.rectangle((left, top - top_offset, right + 4, bottom - top_offset), fill=colour)
        draw.text((box[0] + 2, box[1] - top_offset), text, fill="white", font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
