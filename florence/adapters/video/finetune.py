"""Fine-tune a Video CoSwin classifier on labelled clips with the main trainer's machinery.

The loop reuses these parts of ``florence.training``:

- ``distributed``: the process group and gradient clipping;
- ``sampler``: the resumable batch order and the per-sample augmentation seeds;
- ``checkpointing``, ``optim`` and ``metrics``: checkpoints, AdamW groups, the cosine schedule
  and ``metrics.jsonl``;
- ``trainer``: the autocast context.

Data: an epoch is ``clips_per_video`` passes over the training videos, each sample a random
temporal crop, random square crop and random flip seeded by ``(seed, epoch, sample)``. One
optimizer step takes ``batch_size x accum_steps`` samples on each of the ``world_size``
processes, so the global batch is ``batch_size x accum_steps x world_size``. Its loss is the
mean cross-entropy over the global batch, so one process with a batch of ``B x k x W`` gets
the same gradient as ``W`` processes with ``k`` accumulated batches of ``B``. The samples left
after the last full global batch of an epoch are dropped, as in the main trainer.

After each epoch rank 0 evaluates the centre clip of every evaluation video, a checkpoint is
written in the main trainer's layout (``output_dir/checkpoints/step_*/``), and a record goes to
``output_dir/metrics.jsonl``. Running again with the same ``output_dir`` resumes from the newest
checkpoint, also from one written mid-epoch. ``output_dir/video_classifier.json``, written with
the first checkpoint, stores the architecture, the class names and the clip sampling, which
``florence video eval`` reads (see ``florence.adapters.video.classifier``).
``output_dir/classes.txt`` contains the class names, one per line, in the order of the
classifier's outputs, and every ``model.safetensors`` stores the Video CoSwin config in its
metadata.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader

from florence.adapters.video.classifier import (
    VideoClassifierConfig,
    check_classifier_config,
    classifier_config,
    write_classifier_config,
)
from florence.adapters.video.dataset import VideoDataset
from florence.adapters.video.inflate import inflate_coswin
from florence.adapters.video.model import VideoCoSwin
from florence.checkpoint import WEIGHTS_NAME, atomic_write_bytes, save_weights
from florence.models.coswin import CoSwin
from florence.precision import resolve_precision
from florence.training.checkpointing import (
    TrainingState,
    latest_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from florence.training.distributed import (
    DistributedInfo,
    agree_on_stop,
    clip_grad_norm,
    init_distributed,
)
from florence.training.metrics import MetricsWriter
from florence.training.nonfinite import NonfiniteCounter
from florence.training.optim import cosine_lr, param_groups
from florence.training.sampler import ResumableBatchSampler, SeededSampleDataset
from florence.training.trainer import autocast_context

_logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
CLASSES_NAME = "classes.txt"


@dataclass
class VideoFinetuneConfig:
    """Hyperparameters of :func:`finetune_video_classifier`.

    ``batch_size`` is the number of clips per process and forward pass; ``accum_steps`` forward
    passes make one optimizer step. ``lr`` is the peak AdamW learning rate. ``precision="auto"`` picks bf16 on devices with
    bfloat16 matrix instructions and fp32 elsewhere. ``grad_clip`` is the
    maximum global gradient norm (0: no clipping). ``checkpoint_every`` adds a checkpoint every
    that many steps to the one after each epoch (0: after epochs only). A run stops with an error
    after ``max_nonfinite_steps`` steps in a row whose loss or gradient is not finite.
    """

    output_dir: str
    epochs: int = 30
    batch_size: int = 4
    accum_steps: int = 1
    clips_per_video: int = 3
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    grad_clip: float = 1.0
    precision: str = "fp32"
    stop_at_accuracy: float | None = 1.0
    seed: int = 0
    num_workers: int = 0
    log_every: int = 1
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 10

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not supported; use one of {', '.join(PRECISIONS)}")
        for name in ("epochs", "batch_size", "accum_steps", "clips_per_video", "log_every", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("grad_clip", "checkpoint_every", "num_workers", "warmup_epochs", "min_lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be 0 or more")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr} is invalid; pass a positive learning rate such as 0.001")


def build_video_classifier(
    image_model: CoSwin,
    num_classes: int,
    seed: int,
    temporal_window: int = 2,
    num_frames: int = 8,
    image_size: int | None = None,
) -> VideoCoSwin:
    """Inflate ``image_model`` into a Video CoSwin with a new ``num_classes``-way head drawn from ``seed``.

    Seeding here, before the head is drawn, makes runs with the same seed start from the same weights.
    """
    _check_num_classes(num_classes)
    torch.manual_seed(seed)
    model = inflate_coswin(image_model, temporal_window=temporal_window, num_frames=num_frames)
    if image_size is not None:
        model.set_input_size(img_size=image_size)
    model.reset_classifier(num_classes)
    return model


def _check_num_classes(num_classes: int) -> None:
    if num_classes < 2:
        raise ValueError(
            f"the data has {num_classes} class(es); a classifier needs at least 2, so label the videos with 2 or more classes"
        )


def _check_epoch_size(train_dataset: VideoDataset, config: VideoFinetuneConfig, world_size: int) -> None:
    """Raise if one epoch has fewer clips than one global batch, so no optimizer step would run."""
    clips = len(train_dataset) * config.clips_per_video
    global_batch = config.batch_size * config.accum_steps * world_size
    if clips < global_batch:
        raise ValueError(
            f"an epoch has {clips} clips ({len(train_dataset)} videos x {config.clips_per_video} "
            f"clips per video), fewer than one global batch ({config.batch_size} x {config.accum_steps} "
            f"accumulation steps x {world_size} processes); lower --batch-size or --accum-steps, "
            "or raise --clips-per-video"
        )


@torch.inference_mode()
def evaluate_classifier(
    model: VideoCoSwin, dataset: VideoDataset, batch_size: int = 4, precision: str = "fp32"
) -> float:
    """Return the top-1 accuracy of ``model`` on ``dataset`` (its centre clips when ``train=False``)."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for clips, labels in DataLoader(dataset, batch_size=batch_size):
        with autocast_context(precision, device):
            logits = model(clips.to(device))
        correct += int((logits.argmax(dim=-1).cpu() == labels).sum())
    return correct / len(dataset)


def write_classes(output_dir: str | Path, classes: Sequence[str]) -> Path:
    """Write ``output_dir/classes.txt`` atomically: one class name per line, in output order."""
    bad = [name for name in classes if "\n" in name or not name.strip()]
    if bad:
        raise ValueError(f"class names {bad!r} are empty or contain a line break; fix the labels in the data")
    path = Path(output_dir) / CLASSES_NAME
    atomic_write_bytes(path, "".join(f"{name}\n" for name in classes).encode("utf-8"))
    return path


class _VideoFinetuner:
    """One fine-tuning job on this process: model, optimizer, data position and the step loop."""

    def __init__(
        self,
        model: VideoCoSwin,
        train_dataset: VideoDataset,
        eval_dataset: VideoDataset,
        config: VideoFinetuneConfig,
        distributed: DistributedInfo,
        classifier: VideoClassifierConfig,
    ) -> None:
        self.config = config
        self.classifier = classifier
        self.distributed = distributed
        self.device = distributed.device
        self.main_process = distributed.is_main_process
        self.output_dir = Path(config.output_dir)
        self.model = model.to(self.device)
        self.eval_dataset = eval_dataset
        # DistributedDataParallel copies rank 0's weights to every rank when it is created.
        device_ids = [self.device] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(model, device_ids=device_ids) if distributed.is_distributed else None
        self.optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
        # "auto" becomes bf16 where the device has bfloat16 matrix instructions, else fp32.
        self.precision = resolve_precision(config.precision, self.device)
        if self.precision == "fp16" and self.device.type == "cpu":
            _logger.warning("precision=fp16 is slow on most CPUs, which lack fast float16 matmuls; use fp32 there")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

        self.train_data = SeededSampleDataset(ConcatDataset([train_dataset] * config.clips_per_video), config.seed)
        self.global_batch = config.batch_size * config.accum_steps * distributed.world_size
        self.steps_per_epoch = len(self.train_data) // self.global_batch
        self.total_steps = self.steps_per_epoch * config.epochs
        self.state = TrainingState(step=0, epoch=0, batch_in_epoch=0)
        self.nonfinite = NonfiniteCounter(config.max_nonfinite_steps)

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def resume(self) -> None:
        """Continue from the newest checkpoint in ``output_dir``, if there is one."""
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return
        self.state = load_training_checkpoint(path, self.model, self.optimizer)
        if self.state.grad_scaler is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(self.state.grad_scaler)

    def _batches(self) -> tuple[ResumableBatchSampler, DataLoader]:
        # Each yielded batch is this rank's share of one optimizer step: batch_size x accum_steps clips.
        sampler = ResumableBatchSampler(
            len(self.train_data),
            self.config.batch_size * self.config.accum_steps,
            seed=self.config.seed,
            epoch=self.state.epoch,
            batch_in_epoch=self.state.batch_in_epoch,
            rank=self.distributed.rank,
            world_size=self.distributed.world_size,
        )
        loader = DataLoader(
            self.train_data,
            batch_sampler=sampler,
            num_workers=self.config.num_workers,
            generator=torch.Generator().manual_seed(self.config.seed),
        )
        return sampler, loader

    def _micro_batches(self, clips: torch.Tensor, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        size = self.config.batch_size
        return [(clips[start : start + size], labels[start : start + size]) for start in range(0, len(labels), size)]

    def train_step(self, clips: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Run ``accum_steps`` forward and backward passes and one optimizer step; return the step's scalars.

        A step whose global loss or gradient norm is not finite leaves the weights and the
        optimizer state untouched and returns ``nonfinite=1.0``. All ranks see the same global
        loss and gradient norm, so they skip the same steps.
        """
        config = self.config
        warmup_steps = config.warmup_epochs * self.steps_per_epoch
        lr = cosine_lr(self.state.step, self.total_steps, config.lr, warmup_steps, config.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        self.optimizer.zero_grad(set_to_none=True)
        module = self.ddp if self.ddp is not None else self.model
        # DistributedDataParallel averages gradients over ranks. This factor turns that average into
        # the gradient of the mean loss over the global batch, however the batch is split.
        scale = self.distributed.world_size / self.global_batch
        loss_sum = torch.zeros((), device=self.device)
        micro_batches = self._micro_batches(clips.to(self.device), labels.to(self.device))
        for index, (micro_clips, micro_labels) in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            # Only the last backward pass of a step all-reduces the gradients.
            sync = self.ddp.no_sync() if self.ddp is not None and not last else nullcontext()
            with sync:
                with autocast_context(self.precision, self.device):
                    logits = module(micro_clips)
                summed = F.cross_entropy(logits.float(), micro_labels, reduction="sum")
                self.scaler.scale(summed * scale).backward()
            loss_sum += summed.detach()

        if self.distributed.is_distributed:
            dist.all_reduce(loss_sum)
        loss = loss_sum.item() / self.global_batch
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(clip_grad_norm(self.model.parameters(), config.grad_clip or math.inf))
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.scaler.step(self.optimizer)
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update()
        values = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "nonfinite": float(not finite)}
        if self.scaler.is_enabled():
            values["loss_scale"] = self.scaler.get_scale()
        return values

    def _count_nonfinite(self, values: dict[str, float]) -> None:
        """Count and log a skipped step as the main trainer does; stop after too many in a row.

        Raises:
            FloatingPointError: ``max_nonfinite_steps`` steps in a row were not finite.
        """
        self.nonfinite.record(
            self.state.step, values["loss"], values["grad_norm"], bool(values["nonfinite"]), self.scaler.is_enabled()
        )
        if self.nonfinite.limit_reached:
            self.save_checkpoint()
            raise FloatingPointError(
                f"{self.nonfinite.limit} steps in a row, up to step {self.state.step}, had a non-finite loss or "
                f"gradient; the last finite weights are saved in {self.checkpoint_dir}. Lower --lr, use "
                "--precision bf16 or fp32, or check the data, then run the same command again to continue"
            )

    def save_checkpoint(self) -> None:
        """Write a training checkpoint from rank 0, with the class names and model config in its config.

        The first checkpoint also writes ``video_classifier.json`` and ``classes.txt``, so a run
        that fails before it leaves no classifier files behind to block a corrected rerun.
        """
        if not self.main_process:
            return
        write_classifier_config(self.output_dir, self.classifier)
        write_classes(self.output_dir, self.eval_dataset.classes)
        self.state.grad_scaler = self.scaler.state_dict() if self.scaler.is_enabled() else None
        config = {
            **asdict(self.config),
            "classes": self.eval_dataset.classes,
            "model_config": self.model.model_config,
            "world_size": self.distributed.world_size,
            "resolved_precision": self.precision,
        }
        save_training_checkpoint(
            self.checkpoint_dir, self.model, self.optimizer, self.state, config, keep=self.config.keep_checkpoints
        )

    def _end_epoch(self, epoch: int, losses: list[float], metrics: MetricsWriter | None) -> tuple[dict[str, Any], bool]:
        """Evaluate on rank 0, checkpoint, log; return the epoch's record and whether to stop."""
        record: dict[str, Any] = {"epoch": epoch}
        stop = False
        if self.main_process:
            accuracy = evaluate_classifier(self.model, self.eval_dataset, self.config.batch_size, self.precision)
            self.model.train()
            record.update(
                train_loss=sum(losses) / len(losses) if losses else math.nan,
                eval_top1=accuracy,
                nonfinite_steps=self.nonfinite.total,
            )
            _logger.info("epoch %d: train loss %.4f, eval top-1 %.3f", epoch, record["train_loss"], accuracy)
            target = self.config.stop_at_accuracy
            stop = target is not None and accuracy >= target
            if stop:
                _logger.info("eval top-1 %.3f reached %.3f; stopping", accuracy, target)
        self.save_checkpoint()
        if metrics is not None:
            metrics.write(self.state.step, record)
        # Rank 0 decides, so that all ranks stop after the same epoch.
        return record, agree_on_stop(stop, self.device)

    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``epochs`` epochs or the target accuracy; return the last epoch's record.

        ``stop_after`` ends the run after that global step, with a checkpoint, as an
        interruption would; the learning-rate schedule still spans ``epochs``.
        """
        self.resume()
        end_step = self.total_steps if stop_after is None else min(self.total_steps, stop_after)
        metrics = MetricsWriter(self.output_dir, tensorboard=False) if self.main_process else None
        record: dict[str, Any] = {"step": self.state.step}
        losses: list[float] = []
        sampler, loader = self._batches()
        batches = iter(loader)
        consumed = 0
        window_start = time.perf_counter()
        self.model.train()
        try:
            while self.state.step < end_step:
                clips, labels = next(batches)
                consumed += 1
                values = self.train_step(clips, labels)
                epoch = self.state.epoch
                self.state.step += 1
                self.state.epoch, self.state.batch_in_epoch = sampler.position_after(consumed)
                if not values["nonfinite"]:
                    losses.append(values["loss"])
                self._count_nonfinite(values)
                if metrics is not None and self.state.step % self.config.log_every == 0:
                    now = time.perf_counter()
                    values["clips_per_second"] = self.global_batch * self.config.log_every / max(now - window_start, 1e-9)
                    window_start = now
                    metrics.write(self.state.step, values)

                if self.state.batch_in_epoch == 0:
                    record, stop = self._end_epoch(epoch, losses, metrics)
                    losses = []
                    if stop:
                        break
                elif self.state.step == end_step or (
                    self.config.checkpoint_every and self.state.step % self.config.checkpoint_every == 0
                ):
                    self.save_checkpoint()
        finally:
            batches = None
            if metrics is not None:
                metrics.close()
        if self.main_process:
            save_weights(self.model, self.output_dir / WEIGHTS_NAME)
        return {**record, "step": self.state.step, "nonfinite_steps": self.nonfinite.total}


def finetune_video_classifier(
    model: VideoCoSwin,
    train_dataset: VideoDataset,
    eval_dataset: VideoDataset,
    config: VideoFinetuneConfig,
    distributed: DistributedInfo | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train ``model`` (with a head of ``len(train_dataset.classes)`` outputs) and return the last metrics.

    Stops after ``config.epochs`` epochs, or earlier once rank 0's evaluation accuracy reaches
    ``config.stop_at_accuracy``. Under ``torchrun`` pass the ``init_distributed()`` result as
    ``distributed`` (or leave it None to join the process group here); only rank 0 evaluates,
    logs progress and writes files, and the caller leaves the group afterwards. Every rank gets
    rank 0's weights. ``stop_after`` ends the run after that step with a checkpoint.

    The returned record has ``epoch``, ``train_loss`` (mean over the epoch's finite steps, or over
    the steps since a resume), ``eval_top1``, ``step`` and ``nonfinite_steps``; on ranks other
    than 0 only ``epoch``, ``step`` and ``nonfinite_steps``.

    NOTE: evaluation runs on rank 0 alone, while the other ranks wait, which is fine for the
    small evaluation sets this adapter targets.
    """
    if model.num_classes != len(train_dataset.classes):
        raise ValueError(
            f"the model has {model.num_classes} outputs but the dataset has {len(train_dataset.classes)} classes; "
            "call model.reset_classifier(len(dataset.classes)) first"
        )
    if list(eval_dataset.classes) != list(train_dataset.classes):
        raise ValueError("the evaluation dataset's classes differ from the training dataset's; pass classes=train.classes")
    _check_num_classes(len(train_dataset.classes))
    distributed = distributed if distributed is not None else init_distributed()
    _check_epoch_size(train_dataset, config, distributed.world_size)
    # Every rank checks a resumed folder against this run, so all ranks fail together on a mismatch.
    # Rank 0 writes the file with the first checkpoint.
    classifier = classifier_config(model, train_dataset)
    check_classifier_config(config.output_dir, classifier)
    if not distributed.is_main_process:
        # Rank 0 reports progress for the job; the other ranks log only warnings and errors.
        logging.getLogger("florence").setLevel(logging.WARNING)
    torch.manual_seed(config.seed)
    finetuner = _VideoFinetuner(model, train_dataset, eval_dataset, config, distributed, classifier)
    return finetuner.fit(stop_after)
