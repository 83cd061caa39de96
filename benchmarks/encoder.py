"""Image encoder inference: CoSwin-T against timm's Swin-T, images/s at 224.

Both models are built with random weights and no classifier (``num_classes=0``), so each
forward pass returns pooled ``[B, 768]`` features. Runs use ``torch.inference_mode`` and, for
``bf16``, autocast to bfloat16 on the model's device.
"""

from __future__ import annotations

import timm
import torch

from benchmarks._timing import Comparison, autocast, time_alternating
from florence.models import create_coswin

PEER_MODEL = "swin_tiny_patch4_window7_224"
IMAGE_SIZE = 224


def build_encoders(device: torch.device, num_classes: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Return (CoSwin-T, timm Swin-T) with random weights on ``device``, seeded alike."""
    torch.manual_seed(0)
    coswin = create_coswin("coswin_tiny", num_classes=num_classes, drop_path_rate=0.1).to(device)
    swin = timm.create_model(PEER_MODEL, pretrained=False, num_classes=num_classes, drop_path_rate=0.1).to(device)
    return coswin, swin


def measure_inference(device: torch.device, batch_size: int, runs: int, precision: str) -> Comparison:
    """Time one forward pass of a ``batch_size`` x 3 x 224 x 224 batch through each encoder."""
    coswin, swin = build_encoders(device)
    coswin.eval()
    swin.eval()
    images = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)

    def forward(model: torch.nn.Module) -> None:
        with torch.inference_mode(), autocast(device, precision):
            model(images)

    seconds = time_alternating({"florence": lambda: forward(coswin), "peer": lambda: forward(swin)}, runs, device)
    return Comparison(
        figure=f"image encoder inference, {precision}, batch {batch_size}, {IMAGE_SIZE}px",
        florence="CoSwin-T",
        peer=f"timm {timm.__version__} `{PEER_MODEL}`",
        items=batch_size,
        florence_s=seconds["florence"],
        peer_s=seconds["peer"],
        goal=1.1,
    )
