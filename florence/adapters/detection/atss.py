"""ATSS (Zhang et al. 2020, arXiv 1912.02424): anchors, adaptive training sample selection, box coding.

Boxes are ``[x1, y1, x2, y2]`` in input-image pixels throughout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchvision.ops import box_iou

# Box coder weights (wx, wy, ww, wh) of the public ATSS and Dynamic Head configs.
BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# Largest log-scale change a decoded box may have, as in torchvision and detectron2.
MAX_LOG_SCALE = math.log(1000.0 / 16)


def make_anchors(
    sizes: Sequence[tuple[int, int]], strides: Sequence[int], octave_scale: float = 8.0, device=None
) -> list[torch.Tensor]:
    """Return one square anchor per location of every level, ``[H_l * W_l, 4]`` each.

    The anchor of cell ``(i, j)`` on a level of stride ``s`` is centred at ``((j + 0.5) s, (i + 0.5) s)``
    with side ``octave_scale * s``: 64 to 1024 pixels on P3-P7 at the default scale 8.
    """
    anchors = []
    for (height, width), stride in zip(sizes, strides):
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        half = octave_scale * stride / 2
        centres = torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)
        anchors.append(torch.cat([centres - half, centres + half], dim=1))
    return anchors


def box_centres(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, :2] + boxes[:, 2:]) / 2


@torch.no_grad()
def atss_assign(
    anchors_per_level: Sequence[torch.Tensor], gt_boxes: torch.Tensor, top_k: int = 9
) -> torch.Tensor:
    """Assign each anchor the index of its ground-truth box, or -1 for background.

    For every ground-truth box, the candidates are the ``top_k`` anchors per level whose centres
    are closest (L2) to the box centre. The IoU threshold is the mean plus the unbiased standard
    deviation of the candidates' IoUs. A candidate is positive when its IoU is at least the
    threshold and its centre lies strictly inside the box. An anchor positive for several
    boxes goes to the one it overlaps most.

    Args:
        anchors_per_level: ``[N_l, 4]`` anchors per level, in the order used to flatten predictions.
        gt_boxes: ``[G, 4]`` boxes of one image.

    Returns:
        ``[sum N_l]`` long tensor of box indices or -1.
    """
    anchors = torch.cat(list(anchors_per_level))
    assigned = torch.full((len(anchors),), -1, dtype=torch.long, device=anchors.device)
    if len(gt_boxes) == 0:
        return assigned

    ious = box_iou(anchors, gt_boxes)
    distances = torch.cdist(box_centres(anchors), box_centres(gt_boxes))

    candidates = []
    start = 0
    for level in anchors_per_level:
        k = min(top_k, len(level))
        _, nearest = distances[start : start + len(level)].topk(k, dim=0, largest=False)
        candidates.append(nearest + start)
        start += len(level)
    candidates = torch.cat(candidates)  # [K, G]

    candidate_ious = ious.gather(0, candidates)
    # A single candidate has no spread, so its threshold is its own IoU.
    spread = candidate_ious.std(dim=0) if len(candidates) > 1 else torch.zeros_like(candidate_ious[0])
    threshold = candidate_ious.mean(dim=0) + spread
    is_positive = candidate_ious >= threshold

    centres = box_centres(anchors)[candidates]  # [K, G, 2]
    inside = (centres[..., 0] > gt_boxes[:, 0]) & (centres[..., 0] < gt_boxes[:, 2])
    inside &= (centres[..., 1] > gt_boxes[:, 1]) & (centres[..., 1] < gt_boxes[:, 3])
    is_positive &= inside

    # Keep each anchor's IoU only for the boxes that selected it, then take the best box.
    selected = torch.full_like(ious, -1.0)
    gt_index = torch.arange(len(gt_boxes), device=anchors.device).expand_as(candidates)
    selected[candidates[is_positive], gt_index[is_positive]] = ious[candidates[is_positive], gt_index[is_positive]]
    best_iou, best_gt = selected.max(dim=1)
    assigned[best_iou >= 0] = best_gt[best_iou >= 0]
    return assigned


def encode_boxes(anchors: torch.Tensor, boxes: torch.Tensor, weights=BOX_CODER_WEIGHTS) -> torch.Tensor:
    """Return Faster R-CNN deltas ``(dx, dy, dw, dh)`` that move ``anchors`` onto ``boxes``."""
    wx, wy, ww, wh = weights
    anchor_wh = anchors[:, 2:] - anchors[:, :2]
    box_wh = boxes[:, 2:] - boxes[:, :2]
    d_xy = (box_centres(boxes) - box_centres(anchors)) / anchor_wh
    d_wh = torch.log(box_wh / anchor_wh)
    return torch.stack([wx * d_xy[:, 0], wy * d_xy[:, 1], ww * d_wh[:, 0], wh * d_wh[:, 1]], dim=1)


def decode_boxes(anchors: torch.Tensor, deltas: torch.Tensor, weights=BOX_CODER_WEIGHTS) -> torch.Tensor:
    """Invert :func:`encode_boxes`; width and height changes are clamped to ``exp(MAX_LOG_SCALE)``."""
    wx, wy, ww, wh = weights
    anchor_wh = anchors[..., 2:] - anchors[..., :2]
    anchor_xy = (anchors[..., :2] + anchors[..., 2:]) / 2
    d_xy = deltas[..., :2] / deltas.new_tensor([wx, wy])
    d_wh = (deltas[..., 2:] / deltas.new_tensor([ww, wh])).clamp(max=MAX_LOG_SCALE)
    centres = anchor_xy + d_xy * anchor_wh
    half = torch.exp(d_wh) * anchor_wh / 2
    return torch.cat([centres - half, centres + half], dim=-1)


def centerness_targets(anchors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Return FCOS centerness ``sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))`` of anchor centres in boxes."""
    centres = box_centres(anchors)
    left_top = centres - boxes[:, :2]
    right_bottom = boxes[:, 2:] - centres
    horizontal = torch.stack([left_top[:, 0], right_bottom[:, 0]], dim=1)
    vertical = torch.stack([left_top[:, 1], right_bottom[:, 1]], dim=1)
    ratio = (horizontal.min(dim=1).values / horizontal.max(dim=1).values) * (
        vertical.min(dim=1).values / vertical.max(dim=1).values
    )
    return ratio.clamp(min=0).sqrt()
