"""Training steps: CoSwin-T against timm's Swin-T, and florence-t against an open_clip CLIP.

A step is ``zero_grad``, forward, loss and backward, without the optimizer update, so it
measures the models and not the optimizer. All weights are random and nothing is downloaded.

- Encoder step: both encoders with a 1000-class head, stochastic depth 0.1, cross-entropy on
  random labels.
- Dual-encoder step: ``florence-t`` (CoSwin-T plus a 12-layer, 512-wide text tower) with the
  UniCL loss against open_clip's ``CLIP`` built with the same sizes (timm Swin-T as image
  tower through open_clip's ``TimmModel``, average pooling and a linear projection to 512, the
  same text tower) with its ``ClipLoss``. All captions in a batch differ, so UniCL equals
  CLIP's InfoNCE. Captions are real prompts through each library's own tokenizer.
"""

from __future__ import annotations

import open_clip
import timm
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from benchmarks._timing import Comparison, autocast, time_alternating
from benchmarks.encoder import IMAGE_SIZE, PEER_MODEL, build_encoders
from florence.models import create_model
from florence.tokenizer import get_tokenizer
from florence.training.loss import unicl_loss

DUAL_MODEL = "florence-t"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def measure_encoder_step(device: torch.device, batch_size: int, runs: int, precision: str = "fp32") -> Comparison:
    """Time one classification training step of each image encoder on the same batch."""
    coswin, swin = build_encoders(device, num_classes=1000)
    coswin.train()
    swin.train()
    images = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    labels = torch.randint(0, 1000, (batch_size,), device=device)

    def step(model: torch.nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        with autocast(device, precision):
            logits = model(images)
        F.cross_entropy(logits.float(), labels).backward()

    seconds = time_alternating({"florence": lambda: step(coswin), "peer": lambda: step(swin)}, runs, device)
    return Comparison(
        figure=f"image encoder training step, {precision}, batch {batch_size}, {IMAGE_SIZE}px",
        florence="CoSwin-T",
        peer=f"timm {timm.__version__} Swin-T",
        items=batch_size,
        florence_s=seconds["florence"],
        peer_s=seconds["peer"],
        goal=1.1,
    )


def build_open_clip_peer(device: torch.device) -> torch.nn.Module:
    """Return an open_clip ``CLIP`` with the tower sizes of ``florence-t`` and a timm Swin-T image tower."""
    vision = CLIPVisionCfg(
        image_size=IMAGE_SIZE, timm_model_name=PEER_MODEL, timm_pool="avg", timm_proj="linear", timm_drop_path=0.1
    )
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)
    return open_clip.CLIP(embed_dim=512, vision_cfg=vision, text_cfg=text).to(device)


def measure_dual_encoder_step(device: torch.device, batch_size: int, runs: int, precision: str = "fp32") -> Comparison:
    """Time one contrastive training step of florence-t (UniCL) and the open_clip peer (ClipLoss)."""
    torch.manual_seed(0)
    florence = create_model(DUAL_MODEL).to(device).train()
    peer = build_open_clip_peer(device).train()
    clip_loss = open_clip.ClipLoss()

    captions = [f"a photo of a {CLASSES[index % len(CLASSES)]}, number {index}." for index in range(batch_size)]
    florence_tokens = get_tokenizer()(captions).to(device)
    peer_tokens = open_clip.get_tokenizer("ViT-B-32")(captions).to(device)
    images = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    labels = torch.arange(batch_size, device=device)

    def florence_step() -> None:
        florence.zero_grad(set_to_none=True)
        with autocast(device, precision):
            image_features, text_features, logit_scale = florence(images, florence_tokens)
        unicl_loss(image_features, text_features, labels, logit_scale).backward()

    def peer_step() -> None:
        peer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            image_features, text_features, logit_scale = peer(images, peer_tokens)
        clip_loss(image_features.float(), text_features.float(), logit_scale).backward()

    seconds = time_alternating({"florence": florence_step, "peer": peer_step}, runs, device)
    return Comparison(
        figure=f"dual-encoder contrastive training step, {precision}, batch {batch_size}, {IMAGE_SIZE}px",
        florence=f"`{DUAL_MODEL}`, UniCL loss",
        peer=f"open_clip {open_clip.__version__} `CLIP` of the same sizes, `ClipLoss`",
        items=batch_size,
        florence_s=seconds["florence"],
        peer_s=seconds["peer"],
        goal=1.1,
    )
