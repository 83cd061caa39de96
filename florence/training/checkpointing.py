"""Training checkpoints: weights, optimizer, step, RNG and data position, written atomically.

Layout under ``output_dir/checkpoints``::

    step_0000100/model.safetensors    weights with the model config in the metadata
    step_0000100/trainer_state.pt     optimizer, step, data position, RNG states, config
    latest                            name of the newest complete checkpoint folder

A checkpoint folder is written under a temporary name and renamed when complete, and
``latest`` is replaced atomically after that, so an interrupted write never leaves ``latest``
pointing at a partial checkpoint.

The files have the same form whether one process or an FSDP job wrote them: an FSDP job
gathers the full weights and optimizer state onto rank 0 first. So a checkpoint of either kind
resumes under either kind of run.
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from florence.checkpoint import (
    WEIGHTS_NAME,
    atomic_write_bytes,
    load_weights,
    read_weights,
    save_weights,
)
from florence.training.distributed import is_sharded, load_full_state_dicts

_logger = logging.getLogger(__name__)

STATE_NAME = "trainer_state.pt"


@dataclass
class TrainingState:
    step: int
    epoch: int
    batch_in_epoch: int
    # GradScaler.state_dict() of an fp16 run; None for fp32 and bf16.
    grad_scaler: dict[str, Any] | None = None


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_training_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainingState,
    config: dict[str, Any],
    keep: int = 2,
    model_state_dict: dict[str, torch.Tensor] | None = None,
    optimizer_state_dict: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint for ``state.step`` and prune all but the ``keep`` newest.

    ``model_state_dict`` and ``optimizer_state_dict`` replace ``model.state_dict()`` and
    ``optimizer.state_dict()``, for example with the full state dicts gathered from an
    FSDP-sharded model (see ``gather_full_state_dicts``). ``model`` then provides the metadata.
    """
    directory.mkdir(parents=True, exist_ok=True)
    name = f"step_{state.step:07d}"
    final = directory / name
    tmp = directory / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    save_weights(model, tmp / WEIGHTS_NAME, state_dict=model_state_dict)
    torch.save(
        {
            "optimizer": optimizer.state_dict() if optimizer_state_dict is None else optimizer_state_dict,
            "step": state.step,
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "grad_scaler": state.grad_scaler,
            "rng": rng_state(),
            "config": config,
        },
        tmp / STATE_NAME,
    )
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write_bytes(directory / "latest", name.encode())
    _logger.info("saved checkpoint %s", final)

    _prune(directory, keep)
    return final


def _prune(directory: Path, keep: int) -> None:
    folders = sorted(p for p in directory.glob("step_*") if p.is_dir())
    for old in folders[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(directory: Path) -> Path | None:
    """Return the newest complete checkpoint folder, or None when there is none."""
    pointer = directory / "latest"
    if not pointer.is_file():
        return None
    path = directory / pointer.read_text().strip()
    if not (path / STATE_NAME).is_file():
        _logger.warning("%s names %s, which is incomplete; ignoring it", pointer, path)
        return None
    return path


def load_training_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> TrainingState:
    """Restore weights, optimizer and RNG state in place; return the position to continue from.

    ``model`` may be sharded with FSDP. Then every rank must call this, and each rank reads the
    whole checkpoint, so ``path`` must be readable on every node.
    """
    state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=False)
    if is_sharded(model):
        load_full_state_dicts(model, optimizer, read_weights(path / WEIGHTS_NAME), state["optimizer"])
    else:
        load_weights(model, path / WEIGHTS_NAME, strict=True)
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    _logger.info("resumed from %s at step %d", path, state["step"])
    return TrainingState(
        step=state["step"],
        epoch=state["epoch"],
        batch_in_epoch=state["batch_in_epoch"],
        grad_scaler=state.get("grad_scaler"),
    )
