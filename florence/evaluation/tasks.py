"""Evaluation tasks wired to data on disk: used by the CLI and by in-training evaluation."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Subset

from florence.config import RetrievalEvalConfig, TrainConfig, ZeroShotEvalConfig
from florence.data.dataset import ClassificationDataset, RetrievalDataset
from florence.data.transforms import build_eval_transform
from florence.evaluation.retrieval import evaluate_retrieval
from florence.evaluation.templates import resolve_templates
from florence.evaluation.zeroshot import (
    build_zero_shot_classifier,
    classify,
    zero_shot_accuracy,
)

_logger = logging.getLogger(__name__)


def model_image_size(model: torch.nn.Module) -> int:
    """Input size the model was configured for (its CoSwin ``img_size``)."""
    size = getattr(model.visual, "img_size", 224)
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def subset_indices(length: int, size: int, seed: int = 0) -> list[int]:
    """Return ``size`` sorted indices drawn at random from ``range(length)``, the same for a seed.

    A random subset rather than the first ``size`` rows, because evaluation files are often
    sorted by class, which would make the first rows a single class.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(length, generator=generator)[:size].sort().values.tolist()


def run_zero_shot(
    model: torch.nn.Module,
    tokenizer: Callable,
    root: str,
    archive: str | None = None,
    classes_file: str | None = None,
    templates: str | list[str] = "heldout",
    max_images: int | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Zero-shot top-1/top-5 of ``model`` on a folder per class (or a CSV of path + label)."""
    transform = build_eval_transform(model_image_size(model))
    dataset = ClassificationDataset(root, transform, archive=archive, classes_file=classes_file)
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images={max_images} is invalid; pass a positive number of images, or null for all")
    if max_images is not None and max_images < len(dataset):
        dataset_view = Subset(dataset, subset_indices(len(dataset), max_images))
    else:
        dataset_view = dataset
    loader = DataLoader(dataset_view, batch_size=batch_size, num_workers=num_workers)

    start = time.perf_counter()
    prompts = resolve_templates(templates)
    classifier = build_zero_shot_classifier(model, tokenizer, dataset.classes, prompts)
    metrics = zero_shot_accuracy(model, classifier, loader)
    metrics["seconds"] = time.perf_counter() - start
    _logger.info("zero-shot on %s: top-1 %.2f%%, top-5 %.2f%%", root, metrics["top1"], metrics["top5"])
    return {f"zeroshot_{key}": value for key, value in metrics.items()}


def run_retrieval(
    model: torch.nn.Module,
    tokenizer: Callable,
    path: str,
    image_root: str | None = None,
    split: str | None = None,
    split_sizes: Sequence[int] = (),
    split_seed: int = 0,
    batch_size: int = 256,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Image-text retrieval recalls of ``model`` on a captions TSV or COCO caption JSON.

    With ``split`` (``train`` or ``test``) and ``split_sizes`` (n_train, n_test), only that part
    of a seeded random split of the images is searched, as in the training config.
    """
    from florence.training.data import split_retrieval

    transform = build_eval_transform(model_image_size(model))
    dataset = RetrievalDataset(path, transform, image_root=image_root)
    dataset = split_retrieval(dataset, split, list(split_sizes), split_seed)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)

    start = time.perf_counter()
    metrics = evaluate_retrieval(model, tokenizer, loader, dataset.captions, dataset.caption_to_image)
    metrics["seconds"] = time.perf_counter() - start
    _logger.info("retrieval on %s: %s", path, metrics)
    return {f"retrieval_{key}": value for key, value in metrics.items()}


def build_evaluator(config: TrainConfig, tokenizer: Callable) -> Callable[[torch.nn.Module, int], dict] | None:
    """Return ``evaluate(model, step)`` for the tasks in ``config.eval``, or None when there are none."""
    zeroshot: ZeroShotEvalConfig | None = config.eval.zeroshot
    retrieval: RetrievalEvalConfig | None = config.eval.retrieval
    if zeroshot is None and retrieval is None:
        return None

    def evaluate(model: torch.nn.Module, step: int) -> dict[str, Any]:
        results: dict[str, Any] = {}
        if zeroshot is not None:
            results.update(
                run_zero_shot(
                    model,
                    tokenizer,
                    root=zeroshot.root or zeroshot.path,
                    archive=zeroshot.archive,
                    classes_file=zeroshot.classes_file,
                    templates=zeroshot.templates or "heldout",
                    max_images=zeroshot.max_images,
                    batch_size=config.eval.batch_size,
                )
            )
        if retrieval is not None:
            results.update(
                run_retrieval(
                    model,
                    tokenizer,
                    path=retrieval.path,
                    image_root=retrieval.image_root,
                    split=retrieval.split,
                    split_sizes=retrieval.split_sizes,
                    split_seed=retrieval.split_seed,
                    batch_size=config.eval.batch_size,
                )
            )
        _logger.info("step %d evaluation: %s", step, {k: round(v, 2) for k, v in results.items() if isinstance(v, float)})
        return results

    return evaluate


def classify_files(
    model: torch.nn.Module,
    tokenizer: Callable,
    paths: Sequence[str],
    labels: Sequence[str],
    templates: str | list[str] = "heldout",
) -> list[tuple[str, list[tuple[str, float]]]]:
    """Rank ``labels`` for each image file; unreadable files raise with their path."""
    transform = build_eval_transform(model_image_size(model))
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(transform(image.convert("RGB")))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
            raise ValueError(f"cannot read image {path}: {error}") from None
    rankings = classify(model, tokenizer, torch.stack(images), list(labels), templates=resolve_templates(templates))
    return list(zip(paths, rankings))
