"""UniCL: bidirectional image-text-label contrastive loss (Yang et al. 2022; Florence Eq. 1-3)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def unicl_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Compute the UniCL loss for one batch of L2-normalised features.

    Every pair (i, k) with ``labels[i] == labels[k]`` is a positive, in both directions; each
    row's loss is the mean negative log-softmax over its positives. The result is
    ``(L_i2t + L_t2i) / 2`` with both terms averaged over the batch, so with all labels
    distinct it equals CLIP's InfoNCE as open_clip's ``ClipLoss`` computes it. The paper writes
    sums over the batch without the halving; that only scales the loss.

    Logits and softmax are computed in float32 whatever the input dtype.
    """
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image features {tuple(image_features.shape)} and text features "
            f"{tuple(text_features.shape)} must have the same shape"
        )
    if labels.shape != image_features.shape[:1]:
        raise ValueError(f"expected one label per sample ({image_features.shape[0]}), got shape {tuple(labels.shape)}")

    logits = logit_scale * image_features.float() @ text_features.float().T
    positives = (labels[:, None] == labels[None, :]).float()
    positives_per_row = positives.sum(dim=1)

    image_to_text = -(positives * F.log_softmax(logits, dim=1)).sum(dim=1) / positives_per_row
    # The positive mask is symmetric, so the same mask serves the columns.
    text_to_image = -(positives * F.log_softmax(logits, dim=0)).sum(dim=0) / positives_per_row
    return (image_to_text.mean() + text_to_image.mean()) / 2


class UniCLLoss(nn.Module):
    """Module wrapper around :func:`unicl_loss`."""

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        labels: torch.Tensor,
        logit_scale: torch.Tensor | float,
    ) -> torch.Tensor:
        return unicl_loss(image_features, text_features, labels, logit_scale)
