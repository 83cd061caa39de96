"""FLOP counts of CoSwin-T and Swin-T, and the peak float32 matmul rate of this machine.

Convention: FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``, which counts
2 FLOPs per multiply-accumulate of matrix multiplications, convolutions and attention
(``mm``, ``addmm``, ``bmm``, ``convolution``, ``scaled_dot_product_attention`` and their
backward passes). Element-wise work (softmax, LayerNorm, GELU, additions) is not counted.
A training step counts forward plus backward, where backward costs about twice the forward.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._timing import synchronize
from benchmarks.encoder import IMAGE_SIZE, build_encoders


@dataclass
class ModelFlops:
    """FLOPs per image of one encoder at 224: inference (no head) and training step (1000-class head)."""

    name: str
    forward: int
    train_step: int


def count_flops(model: torch.nn.Module, images: torch.Tensor, backward: bool) -> int:
    """Return the FLOPs of one forward pass of ``model`` on ``images``, plus its backward if asked."""
    with FlopCounterMode(display=False) as counter:
        output = model(images)
        if backward:
            F.cross_entropy(output, torch.zeros(output.shape[0], dtype=torch.long, device=output.device)).backward()
    return counter.get_total_flops()


def encoder_flops(device: torch.device) -> tuple[ModelFlops, ModelFlops]:
    """Return the per-image FLOPs of (CoSwin-T, timm Swin-T), counted on one 224 x 224 image."""
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    features = build_encoders(device, num_classes=0)
    classifiers = build_encoders(device, num_classes=1000)

    results = []
    for name, encoder, classifier in zip(("CoSwin-T", "Swin-T"), features, classifiers):
        with torch.no_grad():
            forward = count_flops(encoder.eval(), image, backward=False)
        train_step = count_flops(classifier.train(), image, backward=True)
        results.append(ModelFlops(name, forward, train_step))
    return results[0], results[1]


def matmul_peak(device: torch.device, runs: int, size: int | None = None) -> float:
    """Return the median FLOP/s of a ``size`` x ``size`` float32 matmul (2 * size**3 FLOPs each).

    The default size is 2048 on CPU and 8192 on CUDA. On CUDA, float32 matmuls use TF32 only if
    ``torch.backends.cuda.matmul.allow_tf32`` is set, so the peak is what the current setting gives.
    """
    size = size or (8192 if device.type == "cuda" else 2048)
    left = torch.randn(size, size, device=device)
    right = torch.randn(size, size, device=device)
    torch.mm(left, right)
    synchronize(device)

    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        torch.mm(left, right)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(seconds)
