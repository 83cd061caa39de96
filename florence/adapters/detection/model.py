"""The Florence detector: CoSwin + FPN + Dynamic Head with ATSS, and text or linear classification."""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import (
    batched_nms,
    clip_boxes_to_image,
    generalized_box_iou_loss,
    sigmoid_focal_loss,
)

from florence.adapters.detection.atss import (
    atss_assign,
    centerness_targets,
    decode_boxes,
    make_anchors,
)
from florence.adapters.detection.dyhead import DynamicHead
from florence.adapters.detection.fpn import FeaturePyramid
from florence.data.transforms import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from florence.evaluation.templates import SIMPLE_TEMPLATES
from florence.models import create_model

_logger = logging.getLogger(__name__)

MODEL_NAME = "florence-detector"
CLASSIFIERS = ("text", "linear")

DEFAULT_DETECTOR_CONFIG: dict[str, Any] = {
    "backbone": "florence-t",  # florence model whose CoSwin and text tower are used
    "backbone_overrides": {},  # merged into that model's config (vision_cfg, text_cfg, embed_dim)
    "backbone_stages": 3,  # last CoSwin stages fed to the FPN
    "channels": 256,
    "num_levels": 5,  # P3-P7 on a standard CoSwin
    "num_blocks": 6,
    "groups": 16,
    "octave_scale": 8.0,
    "classifier": "text",  # "text": dot product with prompt embeddings; "linear": closed set
    "class_names": [],  # training classes; the linear classifier has one output per name
    "templates": list(SIMPLE_TEMPLATES),
    # ATSS and Dynamic Head defaults of the public configs.
    "top_k": 9,
    "focal_alpha": 0.25,
    "focal_gamma": 2.0,
    "prior_prob": 0.01,
    "box_loss_weight": 2.0,
    "score_threshold": 0.05,
    "pre_nms_top_k": 1000,
    "nms_iou": 0.6,
    "max_detections": 100,
}


def detector_config(**overrides: Any) -> dict[str, Any]:
    """Return the default detector config with ``overrides``, rejecting unknown keys."""
    unknown = sorted(set(overrides) - set(DEFAULT_DETECTOR_CONFIG))
    if unknown:
        raise ValueError(f"unknown detector config keys {unknown}; valid keys: {', '.join(DEFAULT_DETECTOR_CONFIG)}")
    config = copy.deepcopy(DEFAULT_DETECTOR_CONFIG)
    config.update(copy.deepcopy(overrides))
    if config["classifier"] not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {config['classifier']!r}; valid values: {', '.join(CLASSIFIERS)}")
    if config["classifier"] == "linear" and not config["class_names"]:
        raise ValueError("the linear classifier needs class_names, one per output")
    return config


class Scale(nn.Module):
    """A learned scalar per pyramid level for the box deltas, as FCOS and ATSS use."""

    def __init__(self) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.value


class FlorenceDetector(nn.Module):
    """One-stage ATSS detector on CoSwin with a Dynamic Head.

    Images go in as float ``[B, 3, H, W]`` in [0, 1]; normalisation happens inside. With the
    text classifier, class logits are ``scale * cos(region, prompt) + bias`` against the
    Florence text embeddings of the class prompts (GLIP, Li et al. 2021, arXiv 2112.03857, uses
    the same dot-product form), so any class list works at inference. The text tower is frozen.
    """

    def __init__(self, **config: Any) -> None:
        super().__init__()
        self.model_name = MODEL_NAME
        self.model_config = detector_config(**config)
        config = self.model_config

        florence = create_model(config["backbone"], **config["backbone_overrides"])
        self.backbone = florence.visual
        self.text = florence.text
        self.text_projection = florence.text_projection
        for parameter in [*self.text.parameters(), *self.text_projection.parameters()]:
            parameter.requires_grad_(False)

        stages = self.backbone.feature_info[-config["backbone_stages"] :]
        self.strides = [info["reduction"] for info in stages]
        while len(self.strides) < config["num_levels"]:
            self.strides.append(self.strides[-1] * 2)

        channels = config["channels"]
        self.fpn = FeaturePyramid([info["num_chs"] for info in stages], channels, config["num_levels"])
        self.dyhead = DynamicHead(channels, config["num_blocks"], config["groups"])
        self.box_head = nn.Conv2d(channels, 4, 3, padding=1)
        self.centerness_head = nn.Conv2d(channels, 1, 3, padding=1)
        self.box_scales = nn.ModuleList(Scale() for _ in range(config["num_levels"]))

        prior_bias = -math.log((1 - config["prior_prob"]) / config["prior_prob"])
        if config["classifier"] == "text":
            self.region_projection = nn.Conv2d(channels, florence.embed_dim, 3, padding=1)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            self.logit_bias = nn.Parameter(torch.tensor(prior_bias))
        else:
            self.cls_head = nn.Conv2d(channels, len(config["class_names"]), 3, padding=1)
            nn.init.constant_(self.cls_head.bias, prior_bias)
        for conv in (self.box_head, self.centerness_head, getattr(self, "region_projection", None)):
            if conv is not None:
                nn.init.normal_(conv.weight, std=0.01)
                nn.init.zeros_(conv.bias)

        self.register_buffer("pixel_mean", torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)
        self._text_cache: dict[tuple, torch.Tensor] = {}

    @property
    def class_names(self) -> list[str]:
        return list(self.model_config["class_names"])

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed token ids ``[B, L]`` as ``Florence.encode_text`` does."""
        features = self.text_projection(self.text(tokens))
        return F.normalize(features.float(), dim=-1) if normalize else features

    def class_embeddings(self, class_names: Sequence[str]) -> torch.Tensor:
        """Return unit-norm prompt-ensembled text embeddings ``[K, D]`` of ``class_names``.

        The last class list's embeddings are cached per device, which is valid because the text
        tower is frozen. Loading new text weights after a forward pass needs ``_text_cache.clear()``.
        """
        from florence.evaluation.zeroshot import build_zero_shot_classifier
        from florence.tokenizer import get_tokenizer

        device = self.pixel_mean.device
        key = (tuple(class_names), str(device))
        if key not in self._text_cache:
            tokenizer = get_tokenizer(self.text.context_length)
            weights = build_zero_shot_classifier(self, tokenizer, list(class_names), self.model_config["templates"])
            self._text_cache = {key: weights.T.clone()}
        return self._text_cache[key]

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Return the Dynamic Head output maps ``[B, channels, H_l, W_l]`` for every level."""
        images = (images - self.pixel_mean) / self.pixel_std
        stages = self.backbone.forward_intermediates(
            images, indices=self.model_config["backbone_stages"], norm=True, intermediates_only=True
        )
        return self.dyhead(self.fpn(stages))

    def forward(
        self, images: torch.Tensor, class_names: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """Run the head on every level and flatten the outputs over levels.

        Returns a dict with ``cls_logits [B, N, K]``, ``box_deltas [B, N, 4]``, ``centerness [B, N]``
        and ``anchors`` (a list of ``[N_l, 4]`` per level), with ``N = sum_l H_l W_l``.
        ``class_names`` defaults to the training classes; the linear classifier accepts any of
        its training classes, in any order, and no others.
        """
        class_names = self._check_class_names(class_names)
        levels = self.features(images)
        text = self.class_embeddings(class_names) if self.model_config["classifier"] == "text" else None

        cls_logits, box_deltas, centerness = [], [], []
        for level, scale in zip(levels, self.box_scales):
            cls_logits.append(self._classify(level, class_names, text).flatten(2).transpose(1, 2))
            box_deltas.append(scale(self.box_head(level)).flatten(2).transpose(1, 2))
            centerness.append(self.centerness_head(level).flatten(1))

        sizes = [tuple(level.shape[-2:]) for level in levels]
        anchors = make_anchors(sizes, self.strides, self.model_config["octave_scale"], device=images.device)
        return {
            "cls_logits": torch.cat(cls_logits, dim=1),
            "box_deltas": torch.cat(box_deltas, dim=1),
            "centerness": torch.cat(centerness, dim=1),
            "anchors": anchors,
        }

    def _check_class_names(self, class_names: Sequence[str] | None) -> list[str]:
        if class_names is None:
            class_names = self.class_names
        class_names = list(class_names)
        if not class_names:
            raise ValueError("no class names: pass class_names or set them in the detector config")
        if self.model_config["classifier"] == "linear":
            unknown = [name for name in class_names if name not in self.class_names]
            if unknown:
                raise ValueError(
                    f"the linear classifier has no output for {unknown}; it knows {len(self.class_names)} classes "
                    f"({', '.join(self.class_names[:10])}, ...). Train with classifier=text for open class lists"
                )
        return class_names

    def _classify(self, level: torch.Tensor, class_names: list[str], text: torch.Tensor | None) -> torch.Tensor:
        if text is None:
            logits = self.cls_head(level)
            if class_names == self.class_names:
                return logits
            return logits[:, [self.class_names.index(name) for name in class_names]]
        regions = F.normalize(self.region_projection(level), dim=1)
        cosine = torch.einsum("bdhw,kd->bkhw", regions, text.to(regions.dtype))
        return self.logit_scale.exp() * cosine + self.logit_bias

    def loss(self, outputs: dict[str, Any], targets: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Return the ATSS losses: focal classification, centerness-weighted GIoU, centerness BCE.

        ``targets[i]`` has ``boxes [G, 4]`` (x1, y1, x2, y2 in input pixels) and ``labels [G]``
        (indices into the class list of ``outputs``). The focal loss is summed and divided by
        the number of positives over the batch, as ATSS does.
        """
        config = self.model_config
        anchors_per_level = outputs["anchors"]
        anchors = torch.cat(anchors_per_level)
        cls_logits = outputs["cls_logits"]

        cls_targets = torch.zeros_like(cls_logits)
        positive_deltas, positive_anchors, positive_boxes, positive_ctr = [], [], [], []
        for index, target in enumerate(targets):
            assigned = atss_assign(anchors_per_level, target["boxes"], config["top_k"])
            positive = assigned >= 0
            gt_index = assigned[positive]
            cls_targets[index, positive, target["labels"][gt_index]] = 1.0
            positive_deltas.append(outputs["box_deltas"][index, positive])
            positive_anchors.append(anchors[positive])
            positive_boxes.append(target["boxes"][gt_index])
            positive_ctr.append(outputs["centerness"][index, positive])

        deltas, pos_anchors = torch.cat(positive_deltas), torch.cat(positive_anchors)
        boxes, ctr_logits = torch.cat(positive_boxes), torch.cat(positive_ctr)
        num_positives = max(len(boxes), 1)

        cls_loss = sigmoid_focal_loss(
            cls_logits, cls_targets, alpha=config["focal_alpha"], gamma=config["focal_gamma"], reduction="sum"
        ) / num_positives
        if len(boxes) == 0:
            zero = (deltas.sum() + ctr_logits.sum()) * 0.0
            return {"loss": cls_loss + zero, "cls": cls_loss.detach(), "box": zero.detach(), "centerness": zero.detach()}

        ctr_targets = centerness_targets(pos_anchors, boxes)
        predicted = decode_boxes(pos_anchors, deltas)
        giou = generalized_box_iou_loss(predicted, boxes, reduction="none")
        box_loss = (giou * ctr_targets).sum() / ctr_targets.sum().clamp(min=1e-6)
        ctr_loss = F.binary_cross_entropy_with_logits(ctr_logits, ctr_targets, reduction="sum") / num_positives

        total = cls_loss + config["box_loss_weight"] * box_loss + ctr_loss
        return {"loss": total, "cls": cls_loss.detach(), "box": box_loss.detach(), "centerness": ctr_loss.detach()}

    @torch.no_grad()
    def predict(
        self,
        images: torch.Tensor,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Detect objects; return per image ``boxes [M, 4]`` (x1, y1, x2, y2), ``scores [M]``, ``labels [M]``.

        ``image_sizes`` are the (height, width) of each image before padding, for clipping.
        Scores are ``sqrt(sigmoid(cls) * sigmoid(centerness))``; the score threshold applies to
        ``sigmoid(cls)``, then ``pre_nms_top_k`` per level, class-wise NMS and ``max_detections``.
        """
        config = self.model_config
        outputs = self.forward(images, class_names)
        if image_sizes is None:
            image_sizes = [tuple(images.shape[-2:])] * len(images)
        level_sizes = [len(a) for a in outputs["anchors"]]

        results = []
        for index, size in enumerate(image_sizes):
            boxes_all, scores_all, labels_all = [], [], []
            cls_levels = outputs["cls_logits"][index].split(level_sizes)
            delta_levels = outputs["box_deltas"][index].split(level_sizes)
            ctr_levels = outputs["centerness"][index].split(level_sizes)
            for anchors, cls_logits, deltas, ctr in zip(outputs["anchors"], cls_levels, delta_levels, ctr_levels):
                probabilities = cls_logits.sigmoid()
                location, label = (probabilities > config["score_threshold"]).nonzero(as_tuple=True)
                scores = (probabilities[location, label] * ctr[location].sigmoid()).sqrt()
                if len(scores) > config["pre_nms_top_k"]:
                    scores, keep = scores.topk(config["pre_nms_top_k"])
                    location, label = location[keep], label[keep]
                boxes_all.append(clip_boxes_to_image(decode_boxes(anchors[location], deltas[location]), size))
                scores_all.append(scores)
                labels_all.append(label)

            boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
            keep = batched_nms(boxes, scores, labels, config["nms_iou"])[: config["max_detections"]]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{name}" for name in self.backbone.no_weight_decay()} | {"logit_scale", "logit_bias"}


def load_detector(path: str, device: str | torch.device | None = None) -> FlorenceDetector:
    """Build the detector described by a checkpoint's metadata and load its weights (strict)."""
    from florence.checkpoint import load_weights, read_metadata

    metadata = read_metadata(path)
    if metadata.get("model_name") != MODEL_NAME:
        raise ValueError(
            f"{path} contains a {metadata.get('model_name', 'unnamed')!r} model, not a detector; "
            "train one with 'florence detect train'"
        )
    model = FlorenceDetector(**json.loads(metadata["model_config"]))
    load_weights(model, path, strict=True)
    return model.to(device) if device is not None else model


def load_florence_weights(detector: FlorenceDetector, path: str) -> None:
    """Initialise the CoSwin and text tower of ``detector`` from a Florence (UniCL) checkpoint."""
    from florence.checkpoint import read_weights

    state = read_weights(path)
    renamed = {}
    for name, tensor in state.items():
        if name.startswith("visual."):
            renamed["backbone." + name[len("visual."):]] = tensor
        elif name.startswith(("text.", "text_projection.")):
            renamed[name] = tensor
    result = detector.load_state_dict(renamed, strict=False)
    detector._text_cache.clear()
    expected_missing = [n for n in result.missing_keys if n.startswith(("backbone.", "text.", "text_projection."))]
    if expected_missing:
        raise ValueError(
            f"{path} is missing encoder weights the detector needs: {expected_missing[:10]}; "
            "pass a Florence checkpoint of the same backbone config"
        )
    _logger.info("initialised the CoSwin and text tower from %s", path)
