"""Fine-tune a Video CoSwin classifier on labelled clips, with the trainer's checkpoints and logs.

Each epoch draws ``clips_per_video`` random temporal crops (plus random spatial crops and
flips) of every training video. After each epoch the model is evaluated on the centre clip of
every evaluation video, a checkpoint is written in the main trainer's layout
(``output_dir/checkpoints/step_*/`` with ``model.safetensors`` and ``trainer_state.pt``), and
one record goes to ``output_dir/metrics.jsonl``. ``output_dir/video_classifier.json`` stores
the architecture, the class names and the clip sampling, which ``florence video eval`` reads.
A run started again with the same ``output_dir`` resumes from its newest checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader

from florence.adapters.video.classifier import (
    classifier_config,
    write_classifier_config,
)
from florence.adapters.video.dataset import VideoDataset
from florence.adapters.video.model import VideoCoSwin
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
class VideoFinetuneConfig:
    """Hyperparameters of :func:`finetune_video_classifier`. ``lr`` is the peak AdamW learning rate."""

    output_dir: str
    epochs: int = 30
    batch_size: int = 4
    clips_per_video: int = 3
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    stop_at_accuracy: float | None = 1.0
    seed: int = 0


@torch.inference_mode()
def evaluate_classifier(model: VideoCoSwin, dataset: VideoDataset, batch_size: int = 4) -> float:
    """Return the top-1 accuracy of ``model`` on ``dataset`` (its centre clips when ``train=False``)."""
    model.eval()
    correct = 0
    for clips, labels in DataLoader(dataset, batch_size=batch_size):
        correct += int((model(clips).argmax(dim=-1) == labels).sum())
    return correct / len(dataset)


def finetune_video_classifier(
    model: VideoCoSwin,
    train_dataset: VideoDataset,
    eval_dataset: VideoDataset,
    config: VideoFinetuneConfig,
) -> dict[str, float]:
    """Train ``model`` (with a head of ``len(train_dataset.classes)`` outputs) and return the last metrics.

    Stops after ``config.epochs`` epochs, or earlier once the evaluation accuracy reaches
    ``config.stop_at_accuracy``.
    """
    if model.num_classes != len(train_dataset.classes):
        raise ValueError(
            f"the model has {model.num_classes} outputs but the dataset has {len(train_dataset.classes)} classes; "
            "call model.reset_classifier(len(dataset.classes)) first"
        )
    output_dir = Path(config.output_dir)
    write_classifier_config(output_dir, classifier_config(model, train_dataset))
    checkpoints = output_dir / "checkpoints"
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    epoch_data = ConcatDataset([train_dataset] * config.clips_per_video)
    steps_per_epoch = -(-len(epoch_data) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs

    torch.manual_seed(config.seed)
    state = TrainingState(step=0, epoch=0, batch_in_epoch=0)
    resume_from = latest_checkpoint(checkpoints)
    if resume_from is not None:
        state = load_training_checkpoint(resume_from, model, optimizer)
        state.epoch += 1

    metrics: dict[str, float] = {}
    writer = MetricsWriter(output_dir, tensorboard=False)
    try:
        for epoch in range(state.epoch, config.epochs):
            model.train()
            generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
            losses = []
            for clips, labels in DataLoader(epoch_data, batch_size=config.batch_size, shuffle=True, generator=generator):
                learning_rate = cosine_lr(state.step, total_steps, config.lr, config.warmup_epochs * steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate
                loss = F.cross_entropy(model(clips), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                state.step += 1

            accuracy = evaluate_classifier(model, eval_dataset, config.batch_size)
            metrics = {"epoch": epoch, "train_loss": sum(losses) / len(losses), "eval_top1": accuracy}
            writer.write(state.step, metrics)
            _logger.info("epoch %d: train loss %.4f, eval top-1 %.3f", epoch, metrics["train_loss"], accuracy)

            state.epoch = epoch
            save_training_checkpoint(checkpoints, model, optimizer, state, asdict(config))
            if config.stop_at_accuracy is not None and accuracy >= config.stop_at_accuracy:
                _logger.info("eval top-1 %.3f reached %.3f; stopping", accuracy, config.stop_at_accuracy)
                break
    finally:
        writer.close()
    return metrics
