"""The UniCL training loop: one process, or one process per device when launched by torchrun."""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from florence.checkpoint import load_pretrained, save_weights
from florence.config import TrainConfig, to_dict
from florence.data.dataset import collate_image_text
from florence.data.streaming import ShardedImageText, ShardStream
from florence.data.transforms import normalize_batch
from florence.models import count_parameters, create_model
from florence.precision import resolve_precision
from florence.tokenizer import get_tokenizer
from florence.training.checkpointing import (
    TrainingState,
    latest_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from florence.training.data import build_train_dataset
from florence.training.distributed import (
    agree_on_stop,
    average_gradients,
    broadcast_parameters,
    clip_grad_norm,
    gather_full_state_dicts,
    global_unicl_loss,
    init_distributed,
    pad_to_largest,
    shard_model,
    smallest_batch_size,
)
from florence.training.grad_cache import backward_with_grad_cache
from florence.training.loss import unicl_loss
from florence.training.metrics import MetricsWriter
from florence.training.nonfinite import NonfiniteCounter
from florence.training.optim import cosine_lr, param_groups
from florence.training.sampler import ResumableBatchSampler, SeededSampleDataset

_logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_context(precision: str, device: torch.device) -> AbstractContextManager:
    """Return the autocast context of ``precision`` ("fp32", "bf16" or "fp16") on ``device``; fp32 runs without one."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def deduplicate_texts(texts: list[str]) -> tuple[list[str], torch.Tensor]:
    """Return the unique texts and, per input text, the index of its unique copy.

    Identical texts have identical embeddings, so the text tower runs once per unique text and
    the features are gathered back. Gradients through the gather add up over the copies, which
    equals the gradient of running every copy.
    """
    position: dict[str, int] = {}
    inverse = [position.setdefault(text, len(position)) for text in texts]
    return list(position), torch.tensor(inverse, dtype=torch.long)


class Trainer:
    """Train a Florence model with the UniCL loss as ``config`` describes."""

    def __init__(self, config: TrainConfig, device: str | torch.device | None = None) -> None:
        self.config = config
        self.distributed = init_distributed(device)
        self.device = self.distributed.device
        if not self.distributed.is_main_process:
            # Rank 0 reports progress for the job; the other ranks log only warnings and errors.
            logging.getLogger("florence").setLevel(logging.WARNING)
        self.output_dir = Path(config.output_dir)
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        # NOTE: every rank uses the same seed, so the ranks draw the same drop-path masks for their rows.
        seed_everything(config.seed)

        self.tokenizer = get_tokenizer()
        self.model = create_model(config.model, **config.model_overrides).to(self.device)
        if config.init_from:
            load_pretrained(self.model, config.init_from)
            _logger.info("initialised the weights from %s", config.init_from)
        self.model.set_grad_checkpointing(config.grad_checkpointing)
        self.sharded = self.distributed.is_distributed and config.strategy == "fsdp"
        if config.strategy == "fsdp" and not self.distributed.is_distributed:
            _logger.info("strategy=fsdp has no effect in a single-process run")
        self.ddp = self._wrap_distributed()
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, config.optim.weight_decay),
            lr=config.optim.lr,
            betas=config.optim.betas,
            eps=config.optim.eps,
        )
        self.precision = resolve_precision(config.precision, self.device)
        if self.precision == "fp16" and self.device.type == "cpu":
            _logger.warning("precision=fp16 is slow on the CPU, which lacks fast float16 matmuls; use bf16 there")
        # Dynamic loss scaling keeps float16 gradients from underflowing; a no-op otherwise.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.dataset = build_train_dataset(config)
        self.state = TrainingState(step=0, epoch=0, batch_in_epoch=0)
        self.skipped_samples = 0
        self.nonfinite = NonfiniteCounter(config.max_nonfinite_steps)
        _logger.info(
            "model %s: %.2fM parameters; %d training samples",
            config.model,
            count_parameters(self.model) / 1e6,
            len(self.dataset),
        )

    def _wrap_distributed(self) -> DistributedDataParallel | None:
        """Wrap the model in DistributedDataParallel in a multi-process run without gradient cache.

        The gradient cache runs several backward passes per step, so there the ranks start from
        rank 0's weights and the trainer averages gradients itself once per step. With
        ``strategy=fsdp`` the model is sharded in place instead and None is returned.
        """
        if not self.distributed.is_distributed:
            return None
        if self.sharded:
            shard_model(self.model, self.device)
            return None
        if self.config.grad_cache_chunk > 0:
            broadcast_parameters(self.model)
            return None
        device_ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids)

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def maybe_resume(self) -> None:
        if not self.config.resume:
            if latest_checkpoint(self.checkpoint_dir) is not None:
                _logger.warning(
                    "%s already has checkpoints; this run starts at step 0 and overwrites them "
                    "(pass --resume to continue instead, or choose another output_dir)",
                    self.checkpoint_dir,
                )
            return
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            _logger.info("resume requested but %s has no checkpoint; starting from step 0", self.checkpoint_dir)
            return
        self.state = load_training_checkpoint(path, self.model, self.optimizer)
        if self.state.grad_scaler is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(self.state.grad_scaler)

    def _loader(self) -> tuple[ResumableBatchSampler | ShardStream, DataLoader]:
        """Return the loader from the current data position and what maps batches to positions."""
        if isinstance(self.dataset, ShardedImageText):
            stream = self.dataset.stream(
                self.config.data.batch_size,
                rank=self.distributed.rank,
                world_size=self.distributed.world_size,
                num_workers=self.config.data.num_workers,
                epoch=self.state.epoch,
                batch_in_epoch=self.state.batch_in_epoch,
            )
            # The stream's workers yield whole batches, and the DataLoader takes them in turn.
            loader = DataLoader(
                stream,
                batch_size=None,
                num_workers=self.config.data.num_workers,
                persistent_workers=False,
                generator=torch.Generator().manual_seed(self.config.seed),
            )
            return stream, loader

        sampler = ResumableBatchSampler(
            len(self.dataset),
            self.config.data.batch_size,
            seed=self.config.seed,
            epoch=self.state.epoch,
            batch_in_epoch=self.state.batch_in_epoch,
            rank=self.distributed.rank,
            world_size=self.distributed.world_size,
        )
        loader = DataLoader(
            SeededSampleDataset(self.dataset, self.config.seed),
            batch_sampler=sampler,
            num_workers=self.config.data.num_workers,
            collate_fn=collate_image_text,
            persistent_workers=False,
            # A private generator keeps worker seeding from consuming the global RNG stream,
            # which would make a resumed run diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(self.config.seed),
        )
        return sampler, loader

    def _autocast(self):
        return autocast_context(self.precision, self.device)

    def _forward_backward(
        self, images: torch.Tensor, tokens: torch.Tensor, inverse: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Compute the loss over the global batch, accumulate its gradient and return the loss.

        ``tokens`` contains the unique texts and ``inverse`` maps each sample to its row. With
        several processes the loss covers the batches of all ranks (see ``global_unicl_loss``).
        Under fp16 the gradients are those of the scaled loss; the returned loss is unscaled.
        """
        if self.config.grad_cache_chunk > 0:
            num_images = images.shape[0]
            if self.sharded:
                images, tokens = pad_to_largest(images, tokens)

            def compute_loss(image_features, text_features, logit_scale):
                loss = global_unicl_loss(image_features[:num_images], text_features[inverse], labels, logit_scale)
                return self.scaler.scale(loss)

            scaled_loss = backward_with_grad_cache(
                self.model, images, tokens, compute_loss, self.config.grad_cache_chunk, self._autocast
            )
            average_gradients(self.model)
            return scaled_loss / self.scaler.get_scale() if self.scaler.is_enabled() else scaled_loss

        if self.ddp is not None or self.sharded:
            # The forward pass must go through the DistributedDataParallel wrapper, which
            # prepares the gradient all-reduce of the backward pass, or under FSDP through the
            # root's forward, which gathers the root's parameters.
            module = self.ddp if self.ddp is not None else self.model
            with self._autocast():
                image_features, text_features, logit_scale = module(images, tokens)
            loss = global_unicl_loss(image_features, text_features[inverse], labels, logit_scale)
            self.scaler.scale(loss).backward()
            if self.sharded:
                average_gradients(self.model)
            return loss

        with self._autocast():
            image_features = self.model.encode_image(images)
            text_features = self.model.encode_text(tokens)[inverse]
        logit_scale = self.model.logit_scale.exp().clamp(max=100.0)
        loss = unicl_loss(image_features, text_features, labels, logit_scale)
        self.scaler.scale(loss).backward()
        return loss

    def train_step(self, images: torch.Tensor, texts: list[str], labels: torch.Tensor) -> dict[str, float]:
        """Run forward, backward and one optimizer step; return the step's scalars.

        A step whose loss or gradient norm is not finite leaves the weights and the optimizer
        state untouched and returns ``nonfinite=1.0``. Every rank computes the same loss and the
        same (reduced) gradient norm, so all ranks skip the same steps.
        """
        config = self.config
        lr = cosine_lr(self.state.step, config.steps, config.optim.lr, config.optim.warmup_steps, config.optim.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        unique_texts, inverse = deduplicate_texts(texts)
        tokens = self.tokenizer(unique_texts).to(self.device, non_blocking=True)
        images = normalize_batch(images.to(self.device, non_blocking=True))
        labels = labels.to(self.device, non_blocking=True)

        self.optimizer.zero_grad(set_to_none=True)
        loss = self._forward_backward(images, tokens, inverse.to(self.device), labels).item()
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(clip_grad_norm(self.model.parameters(), config.optim.grad_clip))
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.scaler.step(self.optimizer)
            self.model.clamp_logit_scale()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        # Lowers the loss scale after an overflow and raises it after a run of finite steps.
        self.scaler.update()
        values = {
            "loss": loss,
            "lr": lr,
            "logit_scale": self.model.logit_scale.exp().item(),
            "grad_norm": grad_norm,
            "nonfinite": float(not finite),
        }
        if self.scaler.is_enabled():
            values["loss_scale"] = self.scaler.get_scale()
        return values

    def _stop_after_nonfinite_limit(self) -> None:
        """Checkpoint and stop after ``max_nonfinite_steps`` non-finite steps in a row.

        The checkpoint contains the weights of the last finite step, since skipped steps change
        nothing, at the data position after the bad batches, so ``--resume`` continues past them.

        Raises:
            FloatingPointError: ``max_nonfinite_steps`` steps in a row were not finite.
        """
        limit = self.config.max_nonfinite_steps
        if not self.nonfinite.limit_reached:
            return
        self.save_checkpoint()
        raise FloatingPointError(
            f"{limit} steps in a row, up to step {self.state.step}, had a non-finite loss or gradient; "
            f"the last finite weights are saved in {self.checkpoint_dir}. Lower optim.lr, use precision=bf16 "
            "or fp32, or check the data, then continue with --resume (max_nonfinite_steps sets the limit)"
        )

    def save_checkpoint(self) -> None:
        """Write a training checkpoint from rank 0, the only rank that writes in a multi-process run.

        Under FSDP every rank must call this, because the full weights and optimizer state are
        gathered from all ranks onto rank 0 first.
        """
        model_state = optimizer_state = None
        if self.sharded:
            model_state, optimizer_state = gather_full_state_dicts(self.model, self.optimizer)
        if not self.distributed.is_main_process:
            return
        self.state.grad_scaler = self.scaler.state_dict() if self.scaler.is_enabled() else None
        save_training_checkpoint(
            self.checkpoint_dir,
            self.model,
            self.optimizer,
            self.state,
            to_dict(self.config),
            keep=self.config.keep_checkpoints,
            model_state_dict=model_state,
            optimizer_state_dict=optimizer_state,
        )

    def full_model(self) -> torch.nn.Module | None:
        """Return a model with all weights in place, for evaluation and the final weights file.

        Without FSDP this is the training model itself. Under FSDP every rank must call this:
        the full state dict is gathered onto rank 0, which returns an unsharded copy on its
        device, and the other ranks return None.
        """
        if not self.sharded:
            return self.model
        model_state, _ = gather_full_state_dicts(self.model)
        if not self.distributed.is_main_process:
            return None
        # NOTE: rank 0 then keeps the full weights twice, on the CPU and on its device, so the
        # model itself (without gradients or optimizer state) must fit on one device.
        copy = create_model(self.config.model, device=self.device, **self.config.model_overrides)
        copy.load_state_dict(model_state)
        return copy

    def fit(self, evaluate=None, stop_after: int | None = None) -> dict[str, Any]:
        """Train until ``config.steps`` (or ``max_seconds``); return the final metrics.

        ``evaluate(model, step) -> dict`` runs on rank 0 every ``eval.every`` steps and at the
        end. Under FSDP every rank must pass an ``evaluate`` (the other ranks' is not called),
        because all ranks take part in gathering the model that rank 0 evaluates.
        ``stop_after`` ends the run at that step as an interruption would, after a checkpoint;
        the learning-rate schedule still spans ``config.steps``.
        """
        config = self.config
        end_step = min(config.steps, stop_after) if stop_after is not None else config.steps
        self.maybe_resume()
        main_process = self.distributed.is_main_process
        metrics = MetricsWriter(self.output_dir) if main_process else None
        self.model.train()
        start = time.perf_counter()
        window_start, window_images = start, 0
        progress = tqdm(
            total=config.steps,
            initial=self.state.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not main_process,
        )
        last: dict[str, Any] = {}

        sampler, loader = self._loader()
        batches = iter(loader)
        consumed = 0
        try:
            while self.state.step < end_step:
                images, texts, labels, skipped = next(batches)
                consumed += 1
                self.skipped_samples += skipped
                # Every rank must skip the same steps, or the others would wait in the all-gather.
                fewest_images = smallest_batch_size(images.shape[0], self.device)
                if fewest_images < 2:
                    _logger.warning("skipping a batch with %d readable images on some rank", fewest_images)
                    continue
                values = self.train_step(images, texts, labels)
                self.state.step += 1
                self.state.epoch, self.state.batch_in_epoch = sampler.position_after(consumed)
                # An estimate of the global count: ranks that skipped unreadable images hold fewer.
                window_images += images.shape[0] * self.distributed.world_size
                last = values
                self.nonfinite.record(
                    self.state.step, values["loss"], values["grad_norm"], bool(values["nonfinite"]), self.scaler.is_enabled()
                )

                if self.state.step % config.log_every == 0 or self.state.step == end_step:
                    now = time.perf_counter()
                    values["images_per_second"] = window_images / max(now - window_start, 1e-9)
                    values["skipped_samples"] = self.skipped_samples
                    values["nonfinite_steps"] = self.nonfinite.total
                    window_start, window_images = now, 0
                    if metrics is not None:
                        metrics.write(self.state.step, values)
                    progress.set_postfix(
                        {
                            "img/s": f"{values['images_per_second']:.0f}",
                            "loss": f"{values['loss']:.3f}",
                            "lr": f"{values['lr']:.2e}",
                            "scale": f"{values['logit_scale']:.1f}",
                        }
                    )
                progress.update(1)

                self._stop_after_nonfinite_limit()
                if config.checkpoint_every and self.state.step % config.checkpoint_every == 0:
                    self.save_checkpoint()
                if evaluate and config.eval.every and self.state.step % config.eval.every == 0:
                    eval_model = self.full_model()
                    if main_process:
                        metrics.write(self.state.step, evaluate(eval_model, self.state.step))
                        self.model.train()
                # Rank 0 decides, so that all ranks stop after the same step.
                if config.max_seconds and agree_on_stop(time.perf_counter() - start > config.max_seconds, self.device):
                    _logger.info("stopping at step %d: max_seconds=%s reached", self.state.step, config.max_seconds)
                    break
        finally:
            progress.close()
            # Dropping the iterator shuts its DataLoader workers down.
            batches = None

        train_seconds = time.perf_counter() - start
        if not (config.checkpoint_every and self.state.step % config.checkpoint_every == 0):
            self.save_checkpoint()
        final_model = self.full_model()
        if main_process:
            save_weights(final_model, self.output_dir / "model.safetensors")
        results: dict[str, Any] = {
            "step": self.state.step,
            "train_seconds": train_seconds,
            "final_loss": last.get("loss"),
            "skipped_samples": self.skipped_samples,
            "nonfinite_steps": self.nonfinite.total,
        }
        if evaluate and main_process:
            results.update(evaluate(final_model, self.state.step))
        if metrics is not None:
            metrics.write(self.state.step, results)
            metrics.close()
        if self.skipped_samples:
            _logger.warning("%d unreadable samples were skipped (see warnings above for paths)", self.skipped_samples)
        return results
