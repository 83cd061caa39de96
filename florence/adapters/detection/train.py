"""Detector training and evaluation loops on COCO-format data.

Training reuses florence's conventions: AdamW with the decay/no-decay parameter groups,
linear warmup then cosine decay, atomic checkpoints under ``output_dir/checkpoints`` that
resume the step, the data position and the RNG state, and ``metrics.jsonl`` logging.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from florence.adapters.detection.data import (
    CocoDetection,
    collate_detection,
    resolve_split,
)
from florence.adapters.detection.evaluate import coco_evaluate, to_coco_detections
from florence.adapters.detection.model import FlorenceDetector, load_florence_weights
from florence.checkpoint import save_weights
from florence.training.checkpointing import (
    TrainingState,
    latest_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from florence.training.metrics import MetricsWriter
from florence.training.optim import cosine_lr, param_groups

_logger = logging.getLogger(__name__)


@dataclass
class DetectionTrainConfig:
    """Settings of ``florence detect train``; ``detector`` overrides ``DEFAULT_DETECTOR_CONFIG``."""

    data: str
    output_dir: str = "runs/detect"
    split: str | None = "train"
    image_range: str | None = None
    image_size: int = 640
    flip: bool = True
    detector: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 10.0
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    max_seconds: float = 0.0
    seed: int = 0
    threads: int = 0
    resume: bool = False
    device: str = "cpu"


def _batches(dataset: CocoDetection, batch_size: int, seed: int, epoch: int, skip: int):
    """Yield index lists of one epoch in a seed- and epoch-fixed order, from batch ``skip`` on."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    yield from batches[skip:]


def train_detector(config: DetectionTrainConfig) -> dict[str, Any]:
    """Train a detector as ``config`` sets out; write checkpoints, ``model.safetensors`` and metrics."""
    output_dir = Path(config.output_dir)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)

    dataset = CocoDetection(resolve_split(config.data, config.split), config.image_size, config.flip, config.image_range)
    detector_settings = {"class_names": dataset.class_names, **config.detector}
    model = FlorenceDetector(**detector_settings)
    if config.init_from:
        load_florence_weights(model, config.init_from)
    model.to(config.device)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)

    checkpoints = output_dir / "checkpoints"
    state = TrainingState(step=0, epoch=0, batch_in_epoch=0)
    if config.resume and (path := latest_checkpoint(checkpoints)) is not None:
        state = load_training_checkpoint(path, model, optimizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _logger.info("detector: %.2fM trainable parameters; %d training images", trainable / 1e6, len(dataset))

    metrics = MetricsWriter(output_dir, tensorboard=False)
    model.train()
    start = time.perf_counter()
    window_start, window_images = start, 0
    last: dict[str, float] = {}
    batches = _batches(dataset, config.batch_size, config.seed, state.epoch, state.batch_in_epoch)
    while state.step < config.steps:
        indices = next(batches, None)
        if indices is None:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            batches = _batches(dataset, config.batch_size, config.seed, state.epoch, 0)
            continue

        images, targets = collate_detection([dataset[i] for i in indices])
        last = _train_step(model, optimizer, config, state.step, images, targets)
        state.step += 1
        state.batch_in_epoch += 1
        window_images += len(indices)

        if state.step % config.log_every == 0 or state.step == config.steps:
            now = time.perf_counter()
            last["images_per_second"] = window_images / max(now - window_start, 1e-9)
            window_start, window_images = now, 0
            metrics.write(state.step, last)
            _logger.info("step %d: %s", state.step, ", ".join(f"{k} {v:.4g}" for k, v in last.items()))
        if config.checkpoint_every and state.step % config.checkpoint_every == 0:
            save_training_checkpoint(checkpoints, model, optimizer, state, asdict(config), config.keep_checkpoints)
        if config.max_seconds and time.perf_counter() - start > config.max_seconds:
            _logger.info("stopping at step %d: max_seconds=%s reached", state.step, config.max_seconds)
            break

    seconds = time.perf_counter() - start
    save_training_checkpoint(checkpoints, model, optimizer, state, asdict(config), config.keep_checkpoints)
    save_weights(model, output_dir / "model.safetensors")
    results = {"step": state.step, "train_seconds": seconds, "final_loss": last.get("loss")}
    metrics.write(state.step, results)
    metrics.close()
    return results


def _train_step(
    model: FlorenceDetector,
    optimizer: torch.optim.Optimizer,
    config: DetectionTrainConfig,
    step: int,
    images: torch.Tensor,
    targets: list[dict[str, Any]],
) -> dict[str, float]:
    lr = cosine_lr(step, config.steps, config.lr, config.warmup_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    device = torch.device(config.device)
    targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]

    losses = model.loss(model(images.to(device)), targets)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    return {**{name: value.item() for name, value in losses.items()}, "grad_norm": grad_norm.item(), "lr": lr}


@torch.no_grad()
def evaluate_detector(
    model: FlorenceDetector,
    data: str,
    split: str | None = None,
    image_range: str | None = None,
    image_size: int = 640,
    batch_size: int = 4,
    class_names: list[str] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Return COCO AP metrics of ``model`` on a COCO-format split.

    ``class_names`` replaces the dataset's category names as the text prompts, index for index
    (zero-shot evaluation uses the dataset's own names, the default). The detector's training
    classes are used only when it has a linear classifier.
    """
    from pycocotools.coco import COCO

    split_paths = resolve_split(data, split)
    dataset = CocoDetection(split_paths, image_size, flip=False, image_range=image_range)
    if model.model_config["classifier"] == "linear":
        prompts = model.class_names
        if prompts != dataset.class_names:
            raise ValueError(f"the detector's classes {prompts} differ from the dataset's {dataset.class_names}")
    else:
        prompts = class_names or dataset.class_names

    model.eval().to(device)
    detections = []
    start = time.perf_counter()
    for first in range(0, len(dataset), batch_size):
        images, targets = collate_detection([dataset[i] for i in range(first, min(first + batch_size, len(dataset)))])
        predictions = model.predict(images.to(device), [t["size"] for t in targets], prompts)
        for target, prediction in zip(targets, predictions):
            detections += to_coco_detections(target["image_id"], prediction, dataset.category_ids, target["scale"])

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(split_paths.annotation_file))
    results: dict[str, Any] = coco_evaluate(coco, detections, dataset.image_ids)
    stem = split_paths.annotation_file.stem
    results.update(
        split="all" if stem == "instances" else stem.removeprefix("instances_"),
        images=len(dataset), categories=len(dataset.class_names), detections=len(detections),
        eval_seconds=time.perf_counter() - start,
    )
    _logger.info("%s: %s", split_paths.annotation_file, json.dumps(results))
    return results
