"""Safetensors weights with the model config inside, and atomic writes."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = "1"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    # NamedTemporaryFile creates the file with mode 0600, so give it the mode a plain open() would.
    os.chmod(handle.name, 0o666 & ~_UMASK)
    os.replace(handle.name, path)


def _read_umask() -> int:
    """Return the process umask. Reading it means setting it, so this runs once, at import."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def save_weights(
    model: torch.nn.Module, path: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Save ``model``'s weights as safetensors, with its name and config in the metadata.

    ``state_dict`` replaces ``model.state_dict()`` as the weights to write, for example the full
    state dict gathered from an FSDP-sharded model, whose own tensors are shards.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format_version": FORMAT_VERSION}
    if hasattr(model, "model_name"):
        metadata["model_name"] = model.model_name
        metadata["model_config"] = json.dumps(model.model_config)
    if state_dict is None:
        state_dict = model.state_dict()
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in state_dict.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_metadata(path: str | Path) -> dict[str, str]:
    path = _weights_path(path)
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a safetensors file, or of the one in a checkpoint folder, onto the CPU."""
    path = _weights_path(path)
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def _load_state(
    model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, strict: bool
) -> tuple[list[str], list[str]]:
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing:
        _logger.warning("%s: %d missing keys: %s", path, len(missing), ", ".join(missing[:20]))
    if unexpected:
        _logger.warning("%s: %d unexpected keys: %s", path, len(unexpected), ", ".join(unexpected[:20]))
    if strict and (missing or unexpected):
        raise RuntimeError(f"{path} does not match the model: missing {missing}, unexpected {unexpected}")
    return missing, unexpected


def load_weights(model: torch.nn.Module, path: str | Path, strict: bool = False) -> tuple[list[str], list[str]]:
    """Load safetensors weights into ``model``; log and return (missing, unexpected) keys.

    With ``strict=True`` any missing or unexpected key raises instead.
    """
    path = _weights_path(path)
    return _load_state(model, read_weights(path), path, strict)


def _window_of_table(rows: int, name: str) -> int:
    """Return the square window size ``M`` of a bias table with ``(2M - 1)**2`` rows."""
    side = math.isqrt(rows)
    if side * side != rows or side % 2 == 0:
        raise ValueError(f"{name} has {rows} rows, which is not (2M - 1)^2 for a square window M")
    return (side + 1) // 2


def load_pretrained(model: torch.nn.Module, path: str | Path, strict: bool = True) -> tuple[list[str], list[str]]:
    """Load weights trained at another window size, as the start of a new training stage.

    Each relative position bias table whose shape differs from ``model``'s is resized by
    bicubic interpolation, the recipe Swin uses to go from window 7 at 224 to window 12 at
    384. Every other tensor must match. Only square windows are resized.
    """
    from florence.models.layers import resize_relative_position_bias_table

    path = _weights_path(path)
    state = read_weights(path)
    targets = model.state_dict()
    resized: set[tuple[int, int]] = set()
    for name, table in state.items():
        if not name.endswith("relative_position_bias_table") or name not in targets:
            continue
        target = targets[name]
        if table.shape == target.shape:
            continue
        old_window = _window_of_table(table.shape[0], name)
        new_window = _window_of_table(target.shape[0], name)
        state[name] = resize_relative_position_bias_table(table, (old_window,) * 2, (new_window,) * 2)
        resized.add((old_window, new_window))
    for old_window, new_window in sorted(resized):
        _logger.info("%s: resized relative position bias tables from window %d to %d", path, old_window, new_window)

    mismatched = [
        name for name, tensor in state.items() if name in targets and tensor.shape != targets[name].shape
    ]
    if mismatched:
        source = read_metadata(path).get("model_name", "an unnamed model")
        raise ValueError(
            f"{path} contains {source} weights, whose shapes differ from the model being trained in "
            f"{len(mismatched)} tensors (first: {mismatched[0]} {tuple(state[mismatched[0]].shape)} against "
            f"{tuple(targets[mismatched[0]].shape)}); set model (and model_overrides) to the checkpoint's "
            "architecture, or start without init_from"
        )
    return _load_state(model, state, path, strict)


def load_model(path: str | Path, device: str | torch.device | None = None, **overrides: Any) -> torch.nn.Module:
    """Build the model described by a checkpoint's metadata and load its weights."""
    from florence.models import create_model

    metadata = read_metadata(path)
    if "model_name" not in metadata:
        raise ValueError(
            f"{_weights_path(path)} has no model_name in its metadata; build the model with "
            "florence.create_model(name) and load it with florence.checkpoint.load_weights"
        )
    config = json.loads(metadata["model_config"])
    model = create_model(metadata["model_name"], device=device, **{**config, **overrides})
    load_weights(model, path)
    return model


def _weights_path(path: str | Path) -> Path:
    """Accept a safetensors file or a checkpoint folder that contains one."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found (relative paths start at {Path.cwd()}); pass a {WEIGHTS_NAME} "
            "file or a folder containing one, or run 'florence train' first to create the default one"
        )
    return path
