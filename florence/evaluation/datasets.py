"""Evaluation datasets named in a benchmark suite: class folders, CSV, COCO JSON, caption tables, WebDataset.

A suite's ``datasets`` section maps a name to a spec (see ``DatasetSpec``). Each split is
read here into either a labelled image set (``ClassificationSplit``) or an image set with
several captions per image (``RetrievalSplit``). Class names and prompt templates come from
data files: either the ones shipped in ``florence/evaluation/data/<set>/`` as
``classnames.<language>.txt`` and ``templates.<language>.txt``, or a file the suite names.

Every split also gets a data fingerprint: the SHA-256 of the format, the annotation file
bytes, the list of image paths with their byte sizes, the selected subset and the class
names. NOTE: image bytes are not hashed, so an image rewritten in place with the same size
keeps the fingerprint. Delete the feature cache after editing images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, Subset

from florence.data.dataset import ClassificationDataset, RetrievalDataset
from florence.data.sources import read_classes_file
from florence.evaluation.models import ImageTransform
from florence.evaluation.templates import resolve_templates

logger = logging.getLogger(__name__)

CLASSIFICATION_FORMATS = ("folder", "csv", "wds")
RETRIEVAL_FORMATS = ("coco", "captions", "wds")
# Caption tables of video files (florence.evaluation.video), for the video_retrieval task.
VIDEO_FORMATS = ("video_captions",)
FORMATS = ("folder", "csv", "coco", "captions", "wds", "video_captions")
SPLIT_KEYS = ("path", "archive", "classes_file", "image_root", "max_images")

# WebDataset member suffixes read for the image, the class index and the captions.
WDS_IMAGE_KEYS = "jpg;jpeg;png;webp"
WDS_LABEL_KEYS = "cls;label"
WDS_CAPTION_KEYS = "txt;caption;json"


@dataclass
class SplitSpec:
    """One split of a dataset: where its files are and which subset to use.

    ``path`` is a class folder root, a CSV of ``path,class_name`` rows, a COCO caption JSON,
    a caption TSV/CSV, or a WebDataset shard pattern (``shards/test-{000000..000009}.tar``).
    A ``video_captions`` split may give a list of caption tables.
    ``max_images`` keeps a seeded random subset of that many images (the first ones in shard
    order for WebDataset, which cannot be indexed).
    """

    path: str | list[str]
    archive: str | None = None
    classes_file: str | None = None
    image_root: str | None = None
    max_images: int | None = None


@dataclass
class DatasetSpec:
    """A dataset entry of a suite: its format, splits, class names, templates and language."""

    name: str
    format: str
    test: SplitSpec
    train: SplitSpec | None = None
    classnames: str | None = None
    templates: str | list[str] = "simple"
    language: str = "en"


@dataclass
class ClassificationSplit:
    """Labelled images: ``dataset`` yields ``(image_tensor, class_index)``."""

    dataset: Dataset | IterableDataset
    classes: list[str]
    fingerprint: str


@dataclass
class RetrievalSplit:
    """Images with captions: ``dataset`` yields ``(image_tensor, image_index)``.

    For WebDataset splits, ``captions`` and ``caption_to_image`` stay empty until a pass over
    ``dataset`` fills them, because captions are stored next to the images in the shards.
    """

    dataset: Dataset | IterableDataset
    captions: list[str]
    caption_to_image: list[int]
    fingerprint: str


def shipped_prompt_sets() -> list[str]:
    """Return the names of the class-name and template sets shipped in ``florence/evaluation/data``."""
    root = resources.files("florence.evaluation") / "data"
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("_"))


def read_prompt_file(set_name: str, kind: str, language: str) -> list[str]:
    """Read the shipped ``classnames`` or ``templates`` file of ``set_name`` in ``language``, one entry per line."""
    path = resources.files("florence.evaluation") / "data" / set_name / f"{kind}.{language}.txt"
    if not path.is_file():
        available = _shipped_languages(set_name, kind)
        raise FileNotFoundError(
            f"no shipped {kind} for {set_name!r} in language {language!r} "
            f"(available: {', '.join(available) or 'none'}); "
            f"shipped sets: {', '.join(shipped_prompt_sets())}. Pass a file path instead"
        )

    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_classnames(spec: DatasetSpec, data_classes: Sequence[str]) -> list[str]:
    """Return the class names used in prompts: the suite's file or shipped set, else the data's own names.

    Raises ValueError when the count differs from the number of classes in the data,
    because prompt ``i`` must describe class index ``i``.
    """
    if spec.classnames is None:
        return list(data_classes)

    if Path(spec.classnames).is_file():
        names = read_classes_file(spec.classnames)
    else:
        names = read_prompt_file(spec.classnames, "classnames", spec.language)

    if data_classes and len(names) != len(data_classes):
        raise ValueError(
            f"dataset {spec.name!r}: classnames {spec.classnames!r} lists {len(names)} classes but the data has "
            f"{len(data_classes)} ({', '.join(list(data_classes)[:5])}, ...); pass a class-name file in the "
            "data's class order"
        )
    return names


def load_templates(spec: DatasetSpec) -> list[str]:
    """Return the prompt templates: a list, a shipped set, a florence set name (heldout, imagenet, simple) or a file."""
    templates = spec.templates
    if isinstance(templates, str) and templates in shipped_prompt_sets():
        return read_prompt_file(templates, "templates", spec.language)

    return resolve_templates(templates)


def build_classification_split(
    spec: DatasetSpec, split: SplitSpec, transform: ImageTransform, seed: int
) -> ClassificationSplit:
    """Read a classification split (``folder``, ``csv`` or ``wds``) with the model's transform."""
    if spec.format == "wds":
        classes = load_classnames(spec, [])
        if spec.classnames is None:
            raise ValueError(
                f"dataset {spec.name!r}: WebDataset shards store class indices only; set 'classnames' to a "
                "class-name file or a shipped set"
            )
        dataset = WebDatasetClassification(split.path, transform, split.max_images)
        fingerprint = _fingerprint(spec, split, seed, dataset.shard_stats(), classes)
        return ClassificationSplit(dataset, classes, fingerprint)

    _check_exists(split.path, spec.name)
    if split.archive is not None:
        _check_exists(split.archive, spec.name)

    data = ClassificationDataset(split.path, transform, archive=split.archive, classes_file=split.classes_file)
    classes = load_classnames(spec, data.classes)
    indices = _subset(len(data), split.max_images, seed)
    image_list = [(data.source.image_path(i), data.targets[i]) for i in indices]
    fingerprint = _fingerprint(spec, split, seed, image_list, classes)
    dataset: Dataset = data if len(indices) == len(data) else Subset(data, indices)
    return ClassificationSplit(dataset, classes, fingerprint)


def build_retrieval_split(spec: DatasetSpec, split: SplitSpec, transform: ImageTransform, seed: int) -> RetrievalSplit:
    """Read a retrieval split (``coco``, ``captions`` or ``wds``) with the model's transform."""
    if spec.format == "wds":
        dataset = WebDatasetRetrieval(split.path, transform, split.max_images)
        fingerprint = _fingerprint(spec, split, seed, dataset.shard_stats(), [])
        return RetrievalSplit(dataset, dataset.captions, dataset.caption_to_image, fingerprint)

    _check_exists(split.path, spec.name)
    data = RetrievalDataset(split.path, transform, image_root=split.image_root)
    indices = _subset(len(data), split.max_images, seed)
    if len(indices) != len(data):
        data = data.select_images(indices)

    image_list = [(str(path), data.captions[i]) for i, path in _caption_pairs(data)]
    fingerprint = _fingerprint(spec, split, seed, image_list, [])
    return RetrievalSplit(_IndexedImages(data), data.captions, data.caption_to_image, fingerprint)


class WebDatasetClassification(IterableDataset):
    """Classification samples from WebDataset tar shards: an image member and a ``cls`` member per sample."""

    def __init__(self, urls: str, transform: ImageTransform, max_images: int | None = None) -> None:
        self.urls = urls
        self.transform = transform
        self.max_images = max_images

    def shard_stats(self) -> list[tuple[str, int]]:
        return _shard_stats(self.urls)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        for count, (image, label) in enumerate(_wds_pipeline(self.urls).to_tuple(WDS_IMAGE_KEYS, WDS_LABEL_KEYS)):
            if self.max_images is not None and count >= self.max_images:
                return
            yield self.transform(image), int(label)


class WebDatasetRetrieval(IterableDataset):
    """Retrieval samples from WebDataset tar shards: an image and its captions per sample.

    Captions are a ``txt`` member with one caption per line, or a ``json`` member with a
    ``captions`` list (or a single ``caption``). Iterating fills ``captions`` and
    ``caption_to_image`` in image order, so read them only after a full pass in this process.
    """

    def __init__(self, urls: str, transform: ImageTransform, max_images: int | None = None) -> None:
        self.urls = urls
        self.transform = transform
        self.max_images = max_images
        self.captions: list[str] = []
        self.caption_to_image: list[int] = []

    def shard_stats(self) -> list[tuple[str, int]]:
        return _shard_stats(self.urls)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        self.captions.clear()
        self.caption_to_image.clear()
        samples = _wds_pipeline(self.urls).to_tuple(WDS_IMAGE_KEYS, WDS_CAPTION_KEYS, "__key__")
        for index, (image, captions, key) in enumerate(samples):
            if self.max_images is not None and index >= self.max_images:
                return
            for caption in _wds_captions(captions, key):
                self.captions.append(caption)
                self.caption_to_image.append(index)
            yield self.transform(image), index


class _IndexedImages(Dataset):
    """A ``RetrievalDataset`` view that yields ``(image, image_index)``."""

    def __init__(self, data: RetrievalDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.data[index], index


def _wds_pipeline(urls: str):
    import webdataset

    return webdataset.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")


def _wds_captions(value: object, key: str) -> list[str]:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str):
        captions = [line.strip() for line in value.splitlines() if line.strip()]
    elif isinstance(value, dict):
        captions = value.get("captions") or [value.get("caption")]
    else:
        captions = list(value) if isinstance(value, list) else []

    captions = [caption for caption in captions if isinstance(caption, str) and caption.strip()]
    if not captions:
        raise ValueError(f"WebDataset sample {key!r} has no caption; store one caption per line in its .txt member")
    return captions


def _shard_stats(urls: str) -> list[tuple[str, int]]:
    import braceexpand

    stats = []
    for url in braceexpand.braceexpand(urls):
        path = Path(url)
        if not path.is_file():
            raise FileNotFoundError(f"WebDataset shard {path} not found; check the shard pattern {urls!r}")
        stats.append((path.name, path.stat().st_size))
    return stats


def _caption_pairs(data: RetrievalDataset) -> list[tuple[int, Path]]:
    return [(caption_index, data.images[image]) for caption_index, image in enumerate(data.caption_to_image)]


def _subset(length: int, max_images: int | None, seed: int) -> list[int]:
    from florence.evaluation.tasks import subset_indices

    if max_images is None or max_images >= length:
        return list(range(length))
    return subset_indices(length, max_images, seed)


def _check_exists(path: str, dataset: str) -> None:
    if not Path(path).exists():
        hint = ""
        if "FLORENCE_SHARED_DATA" not in os.environ:
            hint = " Set FLORENCE_SHARED_DATA (or the variable the suite names) to the data folder."
        raise FileNotFoundError(f"dataset {dataset!r}: {path} not found (relative paths start at {Path.cwd()}).{hint}")


def _annotation_digest(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        return ""
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(spec: DatasetSpec, split: SplitSpec, seed: int, items: Sequence[Any], classes: Sequence[str]) -> str:
    """Hash what determines a split's samples: format, annotations, image list, sizes, subset and class names."""
    sizes = []
    for item in items:
        location = str(item[0])
        path = Path(location)
        sizes.append(path.stat().st_size if path.is_file() else None)

    archive = Path(split.archive) if split.archive else None
    payload = {
        "format": spec.format,
        "annotations": _annotation_digest(split.path),
        "archive": [archive.name, archive.stat().st_size] if archive and archive.is_file() else None,
        "items": [[str(item[0]), str(item[1])] for item in items],
        "sizes": sizes,
        "max_images": split.max_images,
        "subset_seed": seed if split.max_images is not None else None,
        "classes": list(classes),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _shipped_languages(set_name: str, kind: str) -> list[str]:
    folder = resources.files("florence.evaluation") / "data" / set_name
    if not folder.is_dir():
        return []
    prefix = f"{kind}."
    return sorted(
        entry.name[len(prefix) : -len(".txt")]
        for entry in folder.iterdir()
        if entry.name.startswith(prefix) and entry.name.endswith(".txt")
    )
