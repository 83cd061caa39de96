"""The Florence dual encoder: CoSwin image tower, Transformer text tower, linear projections."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from florence.models.coswin import CoSwin
from florence.models.text import TextTransformer

INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = 100.0


class Florence(nn.Module):
    """CoSwin + Transformer dual encoder mapping images and texts into one embedding space.

    The logit scale is learned in log space, starts at ln(1/0.07) as in CLIP and open_clip, and
    is capped at 100 by ``clamp_logit_scale``, which the trainer calls after every optimizer step.
    """

    def __init__(
        self,
        embed_dim: int,
        vision_cfg: dict[str, Any],
        text_cfg: dict[str, Any],
        init_logit_scale: float = INIT_LOGIT_SCALE,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.visual = CoSwin(**vision_cfg, num_classes=0, device=device, dtype=dtype)
        self.text = TextTransformer(**text_cfg, device=device, dtype=dtype)
        self.image_projection = nn.Linear(self.visual.num_features, embed_dim, bias=False, device=device, dtype=dtype)
        self.text_projection = nn.Linear(self.text.width, embed_dim, bias=False, device=device, dtype=dtype)
        self.logit_scale = nn.Parameter(torch.full((), init_logit_scale, device=device, dtype=dtype))
        if device is None or torch.device(device).type != "meta":
            nn.init.normal_(self.image_projection.weight, std=self.visual.num_features**-0.5)
            nn.init.normal_(self.text_projection.weight, std=self.text.width**-0.5)

    @property
    def context_length(self) -> int:
        return self.text.context_length

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed images [B, 3, H, W] into [B, embed_dim].

        Normalised features are L2-normalised in float32, whatever the autocast dtype; with
        ``normalize=False`` the projection output keeps the dtype autocast gives it.
        """
        features = self.image_projection(self.visual(images))
        return F.normalize(features.float(), dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed token ids [B, L] into [B, embed_dim], L2-normalised in float32 like ``encode_image``."""
        features = self.text_projection(self.text(tokens))
        return F.normalize(features.float(), dim=-1) if normalize else features

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return normalised image features, text features and the (capped) logit scale."""
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that get no weight decay beyond norms and biases."""
        names = {"logit_scale"}
        names |= {f"visual.{name}" for name in self.visual.no_weight_decay()}
        names |= {f"text.{name}" for name in self.text.no_weight_decay()}
        return names
