"""Build the training dataset from the ``data`` section of a config."""

from __future__ import annotations

import logging
from pathlib import Path

from florence.config import SourceConfig, TrainConfig
from florence.data.dataset import ImageTextDataset, RetrievalDataset
from florence.data.sources import (
    CaptionSource,
    ClassificationSource,
    CocoCaptionSource,
    ImageTextSource,
)
from florence.data.streaming import Shard, ShardedImageText, shards_from_urls
from florence.data.templates import TRAIN_TEMPLATES
from florence.data.transforms import RandomResizedCropFlip

_logger = logging.getLogger(__name__)

TEMPLATE_SETS = {"train": TRAIN_TEMPLATES, "none": None}


def _existing(path: str | None, key: str, source: SourceConfig) -> Path:
    if not path:
        raise ValueError(f"data.train source of type {source.type!r} needs {key}")
    resolved = Path(path)
    if not resolved.exists():
        raise FileNotFoundError(
            f"{key}={path!r} of a {source.type!r} training source does not exist "
            f"(relative paths are resolved from {Path.cwd()}); fix the path or run from the repository root"
        )
    return resolved


def split_retrieval(dataset: RetrievalDataset, split: str | None, sizes: list[int], seed: int) -> RetrievalDataset:
    """Keep the ``train`` or ``test`` part of a seeded image split, or everything without a split."""
    if split is None:
        return dataset
    if split not in ("train", "test") or len(sizes) != 2:
        raise ValueError(f"split={split!r} with split_sizes={sizes} is invalid; use split: train|test and split_sizes: [n_train, n_test]")
    train, test = dataset.split_images(sizes[0], sizes[1], seed=seed)
    return train if split == "train" else test


def build_source(source: SourceConfig) -> ImageTextSource:
    """Turn one ``data.train`` entry into an image-text-label source."""
    if source.type == "webdataset":
        raise ValueError("a webdataset source streams tar shards and has no sample list; it cannot be read as files")
    if source.type == "classification":
        _check_templates(source)
        location = source.root or source.path
        if source.archive is None:
            _existing(location, "root (or path)", source)
        return ClassificationSource(
            location,
            templates=TEMPLATE_SETS[source.templates],
            archive=str(_existing(source.archive, "archive", source)) if source.archive else None,
            classes_file=source.classes_file,
        )

    path = _existing(source.path, "path", source)
    if source.split is None:
        if source.type == "coco":
            return CocoCaptionSource(path, image_root=source.image_root)
        return CaptionSource(path, image_root=source.image_root)

    # NOTE: a split source labels each caption by its text hash; a label column is not read.
    dataset = RetrievalDataset(path, image_root=source.image_root)
    dataset = split_retrieval(dataset, source.split, source.split_sizes, source.split_seed)
    return dataset.to_source()


def _check_templates(source: SourceConfig) -> None:
    if source.templates not in TEMPLATE_SETS:
        raise ValueError(f"templates={source.templates!r} is invalid; use one of {', '.join(TEMPLATE_SETS)}")


def build_sharded_dataset(config: TrainConfig) -> ShardedImageText:
    """Build the streaming dataset of a config whose ``data.train`` lists only webdataset sources."""
    shards: list[Shard] = []
    offset = 0
    for entry in config.data.train:
        _check_templates(entry)
        if not entry.urls or not isinstance(entry.urls, (str, list)):
            raise ValueError(
                f"a webdataset training source needs urls: a shard folder, a brace pattern such as "
                f"shards/train-{{000000..000009}}.tar, or a list of them; got {entry.urls!r}"
            )
        found = shards_from_urls(entry.urls, entry.index, TEMPLATE_SETS[entry.templates], first_id=offset)
        offset += sum(shard.samples for shard in found)
        shards.extend(found)
        _logger.info("training shards %s: %d shards, %d samples", entry.urls, len(found), sum(s.samples for s in found))

    # One shuffle buffer mixes the samples of every source, so it takes the largest size given.
    transform = RandomResizedCropFlip(config.data.image_size, scale=config.data.crop_scale)
    return ShardedImageText(
        shards,
        transform,
        strict=config.data.strict,
        seed=config.seed,
        shuffle_buffer=max(entry.shuffle_buffer for entry in config.data.train),
    )


def build_train_dataset(config: TrainConfig) -> ImageTextDataset | ShardedImageText:
    """Build the training data: a map-style dataset over files, or a stream of tar shards."""
    streamed = [entry.type == "webdataset" for entry in config.data.train]
    if any(streamed) and not all(streamed):
        others = sorted({entry.type for entry in config.data.train if entry.type != "webdataset"})
        raise ValueError(
            f"data.train mixes webdataset sources with {', '.join(others)} sources, but a run reads "
            f"either tar shards or files. Write the other sources to shards with `florence data "
            f"shards --config ...` and list those shards instead"
        )
    if all(streamed):
        return build_sharded_dataset(config)

    sources = [build_source(source) for source in config.data.train]
    for entry, source in zip(config.data.train, sources):
        _logger.info("training source %s %s: %d samples", entry.type, entry.root or entry.path, len(source))
    # Samples stay uint8 until the trainer normalises the whole batch (normalize_batch),
    # which keeps per-sample loading cheap.
    transform = RandomResizedCropFlip(config.data.image_size, scale=config.data.crop_scale)
    return ImageTextDataset(sources, transform, strict=config.data.strict, seed=config.seed)
