"""Training configuration: typed dataclasses loaded from YAML with ``key=value`` overrides.

Unknown keys are errors that list the valid ones, so a typo never silently falls back to a
default.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRECISIONS = ("fp32", "bf16", "fp16", "auto")


@dataclass
class SourceConfig:
    """One training source. ``type`` is ``classification``, ``captions``, ``coco`` or ``webdataset``.

    classification: ``root`` is a folder per class, or ``path`` a CSV whose images may sit in
    the zip ``archive``. ``templates`` names a template set: ``train`` for CLIP's 80 ImageNet
    templates plus "{}.", or ``none`` for raw class names.
    captions: ``path`` is a CSV, TSV or JSONL with ``image`` and ``caption`` columns.
    coco: ``path`` is a COCO caption JSON and ``image_root`` its image folder.
    webdataset: ``urls`` names tar shards (a folder written by ``florence data shards``, a
    brace pattern, a list, or ``pipe:``/``https:`` URLs) and ``index`` optionally the index file
    with their sample counts. ``templates`` applies to the class-labelled samples in them.
    """

    type: str = "classification"
    root: str | None = None
    path: str | None = None
    archive: str | None = None
    image_root: str | None = None
    classes_file: str | None = None
    templates: str = "train"
    # captions/coco only: with split_sizes [n_train, n_test], keep the "train" or "test" part of
    # a seeded random split of the images (every caption of an image stays with it).
    split: str | None = None
    split_sizes: list[int] = field(default_factory=list)
    split_seed: int = 0
    # webdataset only. ``urls`` is a string or a list of strings, so it is not converted.
    urls: Any = None
    index: str | None = None
    shuffle_buffer: int = 1000


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)
    image_size: int = 224
    batch_size: int = 256
    num_workers: int = 2
    strict: bool = False
    crop_scale: tuple[float, float] = (0.35, 1.0)


@dataclass
class OptimConfig:
    lr: float = 5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    grad_clip: float = 1.0


@dataclass
class ZeroShotEvalConfig:
    """Zero-shot classification on a folder per class (or CSV + archive)."""

    root: str | None = None
    path: str | None = None
    archive: str | None = None
    classes_file: str | None = None
    # Prompt templates; held-out ones by default so the score measures transfer to new prompts.
    templates: list[str] = field(default_factory=list)
    max_images: int | None = None


@dataclass
class RetrievalEvalConfig:
    """Image-text retrieval on a captions TSV or COCO caption JSON."""

    path: str | None = None
    image_root: str | None = None
    split: str | None = None
    split_sizes: list[int] = field(default_factory=list)
    split_seed: int = 0


@dataclass
class EvalConfig:
    every: int = 0
    batch_size: int = 256
    zeroshot: ZeroShotEvalConfig | None = None
    retrieval: RetrievalEvalConfig | None = None


# Data-parallel strategies of a multi-process run (torchrun). "ddp" replicates the model on
# every rank, and "fsdp" shards parameters, gradients and optimizer state over the ranks.
STRATEGIES = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    model: str = "florence-tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # Weights to start from (a model.safetensors or a checkpoint folder), as a later stage of a
    # staged recipe does. Bias tables of another window size are resized, and --resume wins over it.
    init_from: str | None = None
    output_dir: str = "runs/quickstart"
    steps: int = 1000
    # Stop training early when this many seconds have passed (0: no limit). The schedule still
    # follows ``steps``, so a run cut by time ends before its learning rate reaches ``min_lr``.
    max_seconds: float = 0.0
    seed: int = 0
    # fp32; bf16 autocast; fp16 autocast with dynamic loss scaling (GradScaler); or auto: bf16
    # where the device has bfloat16 matrix instructions, else fp32 (florence.precision).
    precision: str = "fp32"
    # A step whose loss or gradient is not finite is skipped; this many in a row stop the run.
    max_nonfinite_steps: int = 10
    threads: int = 0
    grad_checkpointing: bool = False
    # Gradient cache: run each tower on at most this many samples at a time (0: off). The loss
    # and its gradient still cover the whole batch, and each step costs a second forward pass.
    grad_cache_chunk: int = 0
    # Data-parallel strategy under torchrun, one of STRATEGIES; a single-process run ignores it.
    strategy: str = "ddp"
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not supported; use one of {', '.join(PRECISIONS)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is invalid; valid strategies: {', '.join(STRATEGIES)}")
        if self.steps <= 0:
            raise ValueError(f"steps={self.steps} must be positive")
        if self.grad_cache_chunk < 0:
            raise ValueError(f"grad_cache_chunk={self.grad_cache_chunk} must be 0 (off) or a positive chunk size")
        if self.data.batch_size <= 1:
            raise ValueError(f"data.batch_size={self.data.batch_size} must be at least 2 for a contrastive loss")
        if not self.data.train:
            raise ValueError("data.train is empty; list at least one source (see florence/configs/quickstart.yaml)")
        for source in self.data.train:
            if source.type not in ("classification", "captions", "coco", "webdataset"):
                raise ValueError(
                    f"data.train source type {source.type!r} is invalid; use classification, captions, coco or webdataset"
                )


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, building nested dataclasses strictly."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)

    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None:
            return None
        non_none = [arg for arg in args if arg is not type(None)]
        return _convert(value, non_none[0], where)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping of {annotation.__name__} fields, got {value!r}")
        return from_dict(annotation, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return [_convert(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_convert(item, arg, where) for item, arg in zip(value, args))
    if origin is dict or annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if annotation in (int, float, str):
        try:
            return annotation(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be of type {annotation.__name__}, got {value!r}") from None
    return value


def from_dict(cls: type, values: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from ``values``; unknown keys raise with the valid names."""
    types = _field_types(cls)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} in {where}; valid keys: {', '.join(types)}")
    kwargs = {name: _convert(value, types[name], f"{where}.{name}") for name, value in values.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_override(values: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict; the value is parsed as YAML (numbers, lists, ...)."""
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like key=value, e.g. optim.lr=1e-3")
    key, raw = override.split("=", 1)
    parsed = yaml.safe_load(raw) if raw else ""
    parts = key.split(".")
    node = values
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
            continue
        node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ValueError(f"override {override!r}: {part} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = parsed
    else:
        node[last] = parsed


SHARED_DATA_VARIABLE = "FLORENCE_SHARED_DATA"
DEFAULT_SHARED_DATA = "../shared/data"


def expand_variables(value: Any) -> Any:
    """Expand ``$VARIABLE`` in every string; ``$FLORENCE_SHARED_DATA`` defaults to ../shared/data."""
    if isinstance(value, dict):
        return {key: expand_variables(item) for key, item in value.items()}
    if isinstance(value, list):
        return [expand_variables(item) for item in value]
    if isinstance(value, str) and "$" in value:
        shared = os.environ.get(SHARED_DATA_VARIABLE, DEFAULT_SHARED_DATA)
        value = value.replace("${" + SHARED_DATA_VARIABLE + "}", shared).replace("$" + SHARED_DATA_VARIABLE, shared)
        return os.path.expandvars(value)
    return value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML training config, apply ``key=value`` overrides and validate the result."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: invalid YAML: {error}") from error
        if not isinstance(values, dict):
            raise ValueError(f"{path} must contain a mapping of config keys, got {type(values).__name__}")
    for override in overrides or []:
        apply_override(values, override)
    config = from_dict(TrainConfig, expand_variables(values))
    config.validate()
    return config
