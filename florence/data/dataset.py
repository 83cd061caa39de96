"""Datasets: (image, text, label) samples for UniCL training, and evaluation datasets.

``ImageTextDataset`` serves training samples from several sources and can skip unreadable
images. ``ClassificationDataset`` and ``RetrievalDataset`` serve evaluation data and read
every image strictly: an unreadable file raises ``ImageLoadError`` naming the path, because
skipping images would change the metric.
"""

import bisect
import copy
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from florence.data.sources import (
    IMAGE_LOAD_ERRORS,
    ClassificationSource,
    ImageTextPairSource,
    ImageTextSource,
    PathLike,
    load_rgb,
    read_caption_table,
    read_coco_captions,
)

__all__ = [
    "ClassificationDataset",
    "ImageLoadError",
    "ImageTextDataset",
    "RetrievalDataset",
    "collate_image_text",
]

_logger = logging.getLogger(__name__)

ImageTransform = Callable[[Image.Image], torch.Tensor]


class ImageLoadError(RuntimeError):
    """An image file is missing, truncated or not an image."""


def _warn_if_truncated_images_allowed() -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        _logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True, so truncated images load with missing "
            "pixels instead of raising. Set it to False to detect them"
        )


class ImageTextDataset(Dataset):
    """Map-style dataset over the concatenation of several ``ImageTextSource`` objects.

    ``dataset[i]`` returns ``(image, text, label)``: the transformed image, its text and its
    UniCL label as a Python int. Random template choices depend only on ``(seed, epoch, i)``,
    so a run resumed at the same epoch gets the same texts. Call ``set_epoch`` before each
    epoch.

    With ``strict=False``, a missing, truncated or non-image file makes ``dataset[i]`` return
    None, which ``collate_image_text`` drops and counts. Each process logs a warning once per
    path and counts every skip in ``num_skipped``. With ``strict=True`` such a file raises
    ``ImageLoadError`` naming the path.

    NOTE: DataLoader workers hold copies of the dataset, taken when the loader's iterator
    starts. ``set_epoch`` therefore reaches the workers only if they start after it is
    called, as with the default ``persistent_workers=False``. The ``num_skipped``
    counters in worker copies are not visible to the main process, so sum the ``skipped``
    counts that ``collate_image_text`` returns instead.
    """

    def __init__(
        self,
        sources: ImageTextSource | Sequence[ImageTextSource],
        transform: ImageTransform,
        strict: bool = False,
        seed: int = 0,
    ):
        if isinstance(sources, ImageTextSource):
            sources = [sources]
        if not sources:
            raise ValueError("ImageTextDataset needs at least one source")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")

        self.sources = list(sources)
        self.transform = transform
        self.strict = strict
        self.seed = seed
        self.epoch = 0
        self.num_skipped = 0
        self._warned_paths: set[str] = set()
        self._ends = np.cumsum([len(source) for source in self.sources]).tolist()
        _warn_if_truncated_images_allowed()

    def __len__(self) -> int:
        return self._ends[-1]

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that, with the seed and the index, selects each sample's template."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = epoch

    def locate(self, index: int) -> tuple[ImageTextSource, int]:
        """Return the source that contains sample ``index`` and the sample's index there."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")

        source_index = bisect.bisect_right(self._ends, index)
        start = self._ends[source_index - 1] if source_index > 0 else 0
        return self.sources[source_index], index - start

    def text(self, index: int) -> str:
        """Return the text of sample ``index`` in the current epoch, without loading the image."""
        source, local_index = self.locate(index)
        return source.text(local_index, self._sample_rng(index))

    def label(self, index: int) -> int:
        source, local_index = self.locate(index)
        return source.label(local_index)

    def _sample_rng(self, index: int) -> np.random.Generator:
        index = index % len(self)
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int] | None:
        source, local_index = self.locate(index)
        try:
            image = source.load_image(local_index)
        except IMAGE_LOAD_ERRORS as err:
            self._handle_bad_image(source.image_path(local_index), err)
            return None

        text = source.text(local_index, self._sample_rng(index))
        return self.transform(image), text, source.label(local_index)

    def _handle_bad_image(self, path: str, err: Exception) -> None:
        if self.strict:
            raise ImageLoadError(
                f"failed to load image {path}: {err}. Fix or remove the file, or set "
                f"data.strict=false (strict=False in Python) to skip unreadable images"
            ) from err

        self.num_skipped += 1
        if path not in self._warned_paths:
            self._warned_paths.add(path)
            _logger.warning(
                "skipped unreadable image %s: %s (%d skipped so far in this process)",
                path,
                err,
                self.num_skipped,
            )


def collate_image_text(
    batch: Sequence[tuple[torch.Tensor, str, int] | None],
) -> tuple[torch.Tensor, list[str], torch.Tensor, int]:
    """Stack samples into ``(images [B, 3, H, W], texts, labels [B] int64, skipped)``.

    None entries (images that ``ImageTextDataset`` skipped) are dropped and counted in
    ``skipped``, so ``B`` can be smaller than the loader's batch size. When every entry is
    None, ``images`` has shape ``[0, 3, 0, 0]`` and the training step should be skipped.

    NOTE: after a skip, ranks of a distributed run can hold batches of different sizes, so
    code that all-gathers features across ranks must handle unequal sizes.
    """
    samples = [sample for sample in batch if sample is not None]
    skipped = len(batch) - len(samples)
    if not samples:
        return torch.empty(0, 3, 0, 0), [], torch.empty(0, dtype=torch.long), skipped

    images = torch.stack([image for image, _, _ in samples])
    texts = [text for _, text, _ in samples]
    labels = torch.tensor([label for _, _, label in samples], dtype=torch.long)
    return images, texts, labels, skipped


def _raise_load_error(path: str, err: Exception) -> NoReturn:
    raise ImageLoadError(f"failed to load image {path}: {err}. Fix or remove the file") from err


class ClassificationDataset(Dataset):
    """Labelled images returned as ``(image, class_index)``.

    Takes the same inputs as ``ClassificationSource``: a folder per class or a CSV with path
    and class columns, optionally inside a zip ``archive``, with the class order from
    ``classes_file`` or else sorted. ``classes`` contains the class names with underscores
    replaced by spaces, ready for prompt templates. ``targets`` contains each image's class
    index.
    """

    def __init__(
        self,
        root_or_csv: PathLike,
        transform: ImageTransform | None,
        archive: PathLike | None = None,
        classes_file: PathLike | None = None,
        *,
        path_key: str = "path",
        class_key: str = "class_name",
    ):
        self.source = ClassificationSource(
            root_or_csv,
            templates=None,
            archive=archive,
            classes_file=classes_file,
            path_key=path_key,
            class_key=class_key,
        )
        self.transform = transform
        self.classes: list[str] = self.source.classes
        self.targets: list[int] = self.source.targets
        _warn_if_truncated_images_allowed()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Image.Image, int]:
        try:
            image = self.source.load_image(index)
        except IMAGE_LOAD_ERRORS as err:
            _raise_load_error(self.source.image_path(index), err)

        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


class RetrievalDataset(Dataset):
    """Images with several captions each, for image-text retrieval.

    Reads a TSV or CSV caption table with ``image`` and ``caption`` columns (other columns,
    such as ``caption_idx``, are ignored) or a COCO caption JSON file (``.json``). Relative
    image paths are resolved against ``image_root`` (default: the annotation file's folder).

    Attributes:
        images: image paths, in order of first appearance in the file.
        captions: all captions, in file order.
        caption_to_image: for each caption, the index of its image in ``images``.
        image_to_captions: for each image, the indices of its captions in ``captions``.

    ``dataset[i]`` returns image ``i``, transformed if ``transform`` is set. Encode
    ``captions`` separately and use ``caption_to_image`` as the ground truth.
    """

    def __init__(
        self,
        annotation_file: PathLike,
        transform: ImageTransform | None = None,
        image_root: PathLike | None = None,
        *,
        image_key: str = "image",
        caption_key: str = "caption",
    ):
        path = Path(annotation_file)
        root = Path(image_root) if image_root is not None else path.parent
        if path.suffix.lower() == ".json":
            pairs = read_coco_captions(path)
        else:
            rows = read_caption_table(path, image_key, caption_key, label_key=None)
            pairs = [(image, caption) for image, caption, _ in rows]

        image_indices: dict[str, int] = {}
        self.images: list[Path] = []
        self.captions: list[str] = []
        self.caption_to_image: list[int] = []
        for image, caption in pairs:
            if image not in image_indices:
                image_indices[image] = len(self.images)
                self.images.append(Path(image) if Path(image).is_absolute() else root / image)
            self.captions.append(caption)
            self.caption_to_image.append(image_indices[image])

        self.transform = transform
        self.image_to_captions = _invert_mapping(self.caption_to_image, len(self.images))
        _warn_if_truncated_images_allowed()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor | Image.Image:
        try:
            image = load_rgb(self.images[index])
        except IMAGE_LOAD_ERRORS as err:
            _raise_load_error(str(self.images[index]), err)

        if self.transform is not None:
            image = self.transform(image)
        return image

    def select_images(self, image_indices: Sequence[int]) -> "RetrievalDataset":
        """Return a dataset with only the given images, in the given order, and their captions."""
        selected = copy.copy(self)
        selected.images = [self.images[i] for i in image_indices]
        selected.captions = []
        selected.caption_to_image = []
        for new_index, old_index in enumerate(image_indices):
            for caption_index in self.image_to_captions[old_index]:
                selected.captions.append(self.captions[caption_index])
                selected.caption_to_image.append(new_index)

        selected.image_to_captions = _invert_mapping(
            selected.caption_to_image, len(selected.images)
        )
        return selected

    def split_images(
        self, n_train: int, n_test: int, seed: int = 0
    ) -> tuple["RetrievalDataset", "RetrievalDataset"]:
        """Split the images at random into disjoint train and test sets with all their captions.

        The split depends only on ``seed`` and the image order, and each part keeps the file
        order of its images. ``n_train + n_test`` may be less than the number of images.
        """
        if n_train < 0 or n_test < 0 or n_train + n_test > len(self.images):
            raise ValueError(
                f"cannot split {len(self.images)} images into n_train={n_train} and "
                f"n_test={n_test}. Both must be non-negative and sum to at most "
                f"{len(self.images)}"
            )

        order = np.random.default_rng(seed).permutation(len(self.images))
        train_indices = sorted(order[:n_train].tolist())
        test_indices = sorted(order[n_train : n_train + n_test].tolist())
        return self.select_images(train_indices), self.select_images(test_indices)

    def to_source(self) -> ImageTextPairSource:
        """Return every (image, caption) pair as a training source with caption-hash labels."""
        image_paths = [self.images[i] for i in self.caption_to_image]
        return ImageTextPairSource(image_paths, self.captions)


def _invert_mapping(caption_to_image: Sequence[int], num_images: int) -> list[list[int]]:
    image_to_captions: list[list[int]] = [[] for _ in range(num_images)]
    for caption_index, image_index in enumerate(caption_to_image):
        image_to_captions[image_index].append(caption_index)
    return image_to_captions
