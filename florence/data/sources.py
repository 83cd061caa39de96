"""Sources of (image, text, label) samples for UniCL training.

A source lists samples and loads them one at a time. ``ImageTextDataset`` concatenates
several sources, so one run can mix captioned images and class-labelled images:

- ``CaptionSource``: a CSV, TSV or JSONL table of image paths and captions, with an optional
  label column that makes rows with the same label positives of each other.
- ``CocoCaptionSource``: a COCO caption JSON file, one sample per (image, caption).
- ``ClassificationSource``: images in one folder per class, or listed in a CSV, optionally
  inside a zip archive. The text is a prompt template filled with the class name.
- ``ImageTextPairSource``: in-memory lists of image paths and texts, the base of the first two.

Labels follow UniCL: a label is the ``text_label`` hash of the raw text before any prompt
template is applied, so every image of a class is a positive of every other image of the class.
"""

import abc
import csv
import io
import json
import logging
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from florence.data.labels import text_label
from florence.data.templates import TRAIN_TEMPLATES

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGE_LOAD_ERRORS",
    "CaptionSource",
    "ClassificationSource",
    "CocoCaptionSource",
    "ImageTextPairSource",
    "ImageTextSource",
    "ZipImageReader",
    "class_prompt_name",
    "read_caption_table",
    "read_coco_captions",
]

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Exceptions that mean "this file is not a readable image". PIL raises OSError (including
# UnidentifiedImageError and FileNotFoundError) for missing, truncated and non-image files.
# A zip entry with a bad CRC raises BadZipFile.
IMAGE_LOAD_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
    zipfile.BadZipFile,
    EOFError,
)

PathLike = str | os.PathLike[str]


def class_prompt_name(name: str) -> str:
    """Return the class name as it appears in prompts: underscores become spaces."""
    return name.replace("_", " ")


def load_rgb(path: PathLike) -> Image.Image:
    """Load an image file fully and convert it to RGB, closing the file.

    Raises one of ``IMAGE_LOAD_ERRORS`` for a missing, truncated or non-image file. Truncated
    JPEGs raise only while ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is False (the PIL default).
    """
    with Image.open(path) as image:
        return image.convert("RGB")


class ZipImageReader:
    """Reader of images stored in a zip archive, with one archive handle per process.

    A ``zipfile.ZipFile`` handle has a single file position, so DataLoader workers must not
    share it. The reader opens the archive lazily and opens it again when it runs in a new
    process (a forked worker) or after unpickling (a spawned worker).
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"zip archive not found: {self.path}")
        self._handle: zipfile.ZipFile | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_pid"] = None
        return state

    def _archive(self) -> zipfile.ZipFile:
        if self._handle is None or self._pid != os.getpid():
            self._handle = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._handle

    def names(self) -> list[str]:
        return self._archive().namelist()

    def describe(self, entry: str) -> str:
        """Return a location string for messages, e.g. ``train/cat/0001.jpg in /data/train.zip``."""
        return f"{entry} in {self.path}"

    def load_rgb(self, entry: str) -> Image.Image:
        """Load the image stored as ``entry`` and convert it to RGB."""
        try:
            data = self._archive().read(entry)
        except KeyError:
            raise FileNotFoundError(f"entry {entry!r} not found in {self.path}") from None
        return load_rgb(io.BytesIO(data))


class ImageTextSource(abc.ABC):
    """Base class of the sample lists that ``ImageTextDataset`` concatenates."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def image_path(self, index: int) -> str:
        """Return where the image of sample ``index`` is stored, for messages."""

    @abc.abstractmethod
    def load_image(self, index: int) -> Image.Image:
        """Load the RGB image of sample ``index``, raising one of ``IMAGE_LOAD_ERRORS``."""

    @abc.abstractmethod
    def text(self, index: int, rng: np.random.Generator) -> str:
        """Return the text of sample ``index``, using ``rng`` for any random choice."""

    @abc.abstractmethod
    def label(self, index: int) -> int:
        """Return the non-negative 63-bit UniCL label of sample ``index``."""


class ImageTextPairSource(ImageTextSource):
    """Image-text pairs given as lists, one sample per pair.

    ``labels`` defaults to ``text_label(text)`` for each text, so only identical texts are
    positives of each other.
    """

    def __init__(
        self,
        image_paths: Sequence[PathLike],
        texts: Sequence[str],
        labels: Sequence[int] | None = None,
    ):
        if len(image_paths) != len(texts):
            raise ValueError(f"got {len(image_paths)} image paths but {len(texts)} texts")
        if labels is not None and len(labels) != len(texts):
            raise ValueError(f"got {len(labels)} labels but {len(texts)} texts")

        self.image_paths = [Path(p) for p in image_paths]
        self.texts = list(texts)
        if labels is None:
            self.labels = [text_label(t) for t in self.texts]
        else:
            self.labels = [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.texts)

    def image_path(self, index: int) -> str:
        return str(self.image_paths[index])

    def load_image(self, index: int) -> Image.Image:
        return load_rgb(self.image_paths[index])

    def text(self, index: int, rng: np.random.Generator) -> str:
        return self.texts[index]

    def label(self, index: int) -> int:
        return self.labels[index]


def _resolve(value: str, root: Path) -> Path:
    path = Path(value)
    if path.is_absolute():
        return path
    return root / path


def _iter_table_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, row) from a CSV, TSV or JSONL file, chosen by the file suffix."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        delimiter = "\t" if suffix == ".tsv" else ","
        # utf-8-sig drops a byte order mark, which would otherwise become part of a column name.
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            for row in reader:
                yield reader.line_num, row
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {line_number}: invalid JSON: {err}") from err
                if not isinstance(row, dict):
                    raise ValueError(f"{path}, line {line_number}: expected a JSON object")
                yield line_number, row
    else:
        raise ValueError(f"unsupported caption file {path}: expected a .csv, .tsv or .jsonl suffix")


def read_caption_table(
    path: PathLike,
    image_key: str = "image",
    caption_key: str = "caption",
    label_key: str | None = "label",
) -> list[tuple[str, str, str | None]]:
    """Read (image value, caption, label value or None) rows from a CSV, TSV or JSONL file.

    Raises ValueError naming the file and line for a row without an image value or with an
    empty or whitespace-only caption, because such a row is a bug in the data. Captions are
    returned verbatim, since their exact bytes define their labels.
    """
    path = Path(path)
    rows = []
    for line_number, row in _iter_table_rows(path):
        location = f"{path}, line {line_number}"
        for key in (image_key, caption_key):
            if key not in row:
                raise ValueError(f"{location}: missing column {key!r}. Columns: {sorted(row)}")

        image = row[image_key]
        caption = row[caption_key]
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"{location}: missing image path in column {image_key!r}")
        if caption is not None and not isinstance(caption, str):
            raise ValueError(f"{location}: caption must be a string, got {caption!r}")
        if not caption or not caption.strip():
            raise ValueError(
                f"{location}: empty caption in column {caption_key!r}. "
                f"Every row needs a caption, so fix or remove this row"
            )

        label = row.get(label_key) if label_key is not None else None
        if label is not None and str(label).strip() == "":
            label = None
        rows.append((image, caption, None if label is None else str(label)))

    if not rows:
        raise ValueError(f"no rows found in caption file {path}")
    return rows


def read_coco_captions(path: PathLike) -> list[tuple[str, str]]:
    """Read (image file name, caption) pairs from a COCO caption JSON file, in annotation order.

    The file needs ``images`` entries with ``id`` and ``file_name`` and ``annotations``
    entries with ``image_id`` and ``caption``. Raises ValueError for an annotation whose
    image id is not listed or whose caption is empty.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        coco = json.load(f)
    for key in ("images", "annotations"):
        if key not in coco:
            raise ValueError(f"{path}: missing key {key!r}, so this is not a COCO caption file")

    file_names = {image["id"]: image["file_name"] for image in coco["images"]}
    pairs = []
    for position, annotation in enumerate(coco["annotations"]):
        location = f"{path}, annotation {position} (id {annotation.get('id')})"
        image_id = annotation["image_id"]
        caption = annotation.get("caption")
        if image_id not in file_names:
            raise ValueError(f"{location}: image_id {image_id} is not in 'images'")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{location}: empty caption. Fix or remove this annotation")
        pairs.append((file_names[image_id], caption))

    if not pairs:
        raise ValueError(f"no caption annotations found in {path}")
    return pairs


class CaptionSource(ImageTextPairSource):
    """Captioned images listed in a CSV, TSV or JSONL file.

    Args:
        path: the caption file. The suffix selects the format (``.csv``, ``.tsv``, ``.jsonl``).
        image_key: column with the image path, relative to ``image_root`` unless absolute.
        caption_key: column with the caption. Empty captions raise ValueError with the line.
        label_key: optional column with a class label (string or integer). Rows with the
            same label value are positives of each other, with label
            ``text_label("label:" + str(value))``, so the integer 3 and the string "3" match.
            Rows without a value get ``text_label(caption)``, so only identical captions match.
            Set it to None to ignore the column.
        image_root: folder for relative image paths (default: the caption file's folder).
    """

    def __init__(
        self,
        path: PathLike,
        *,
        image_key: str = "image",
        caption_key: str = "caption",
        label_key: str | None = "label",
        image_root: PathLike | None = None,
    ):
        self.path = Path(path)
        root = Path(image_root) if image_root is not None else self.path.parent
        rows = read_caption_table(self.path, image_key, caption_key, label_key)

        image_paths = [_resolve(image, root) for image, _, _ in rows]
        captions = [caption for _, caption, _ in rows]
        labels = [
            text_label(caption) if label is None else text_label("label:" + label)
            for _, caption, label in rows
        ]
        super().__init__(image_paths, captions, labels)


class CocoCaptionSource(ImageTextPairSource):
    """Captioned images from a COCO caption JSON file, one sample per (image, caption).

    ``file_name`` is resolved against ``image_root`` (default: the JSON file's folder).
    Labels are ``text_label(caption)``.
    """

    def __init__(self, annotation_file: PathLike, image_root: PathLike | None = None):
        self.path = Path(annotation_file)
        root = Path(image_root) if image_root is not None else self.path.parent
        pairs = read_coco_captions(self.path)
        super().__init__(
            [_resolve(file_name, root) for file_name, _ in pairs],
            [caption for _, caption in pairs],
        )


def read_classes_file(path: PathLike) -> list[str]:
    """Read class names, one per line, skipping blank lines. Raises ValueError on duplicates."""
    path = Path(path)
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [name for name in names if name]
    if not names:
        raise ValueError(f"no class names found in {path}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate class names in {path}: {duplicates}")
    return names


def _has_image_extension(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _order_classes(found: list[str], classes_file: PathLike | None, where: str) -> list[str]:
    """Return the class order from ``classes_file`` (checked against ``found``), else sorted."""
    if classes_file is None:
        return sorted(found)

    classes = read_classes_file(classes_file)
    missing = sorted(set(found) - set(classes))
    if missing:
        raise ValueError(
            f"classes {missing} of {where} are not listed in {classes_file}. "
            f"Add them to the file or remove their images"
        )
    return classes


def _scan_folders(root: Path) -> dict[str, list[str]]:
    if not root.is_dir():
        raise FileNotFoundError(f"class folder root not found: {root}")
    images = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and _has_image_extension(p.name))
        images[folder.name] = [str(p) for p in files]
    return images


def _scan_archive(reader: ZipImageReader, prefix: str) -> dict[str, list[str]]:
    start = f"{prefix}/" if prefix else ""
    images: dict[str, list[str]] = {}
    for name in sorted(reader.names()):
        if not name.startswith(start) or not _has_image_extension(name):
            continue
        parts = name[len(start) :].split("/")
        if len(parts) < 2:
            continue
        images.setdefault(parts[0], []).append(name)
    return images


def _read_class_csv(path: Path, path_key: str, class_key: str) -> dict[str, list[str]]:
    images: dict[str, list[str]] = {}
    for line_number, row in _iter_table_rows(path):
        for key in (path_key, class_key):
            if not row.get(key):
                raise ValueError(f"{path}, line {line_number}: missing or empty column {key!r}")
        images.setdefault(row[class_key], []).append(row[path_key])
    return images


def _check_templates(templates: Sequence[str] | None) -> tuple[str, ...] | None:
    if templates is None:
        return None
    if isinstance(templates, str):
        raise TypeError(f"templates must be a sequence of strings, not the string {templates!r}")

    templates = tuple(templates)
    if not templates:
        raise ValueError("templates is empty. Pass templates=None to use bare class names")
    for template in templates:
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError):
            valid = False
        else:
            valid = template.count("{}") == 1
        if not valid:
            raise ValueError(f"invalid template {template!r}: it needs exactly one '{{}}' field")
    return templates


class ClassificationSource(ImageTextSource):
    """Class-labelled images whose texts are prompt templates filled with the class name.

    Images come from a folder per class (``root/<class>/**/*.jpg``) or from a CSV with a path
    and a class column (paths relative to the CSV's folder unless absolute). With ``archive``,
    images are read from that zip file instead: the CSV paths are entry names, or
    ``root_or_csv`` is the folder prefix inside the archive (``""`` for the top level).

    Class names come from ``classes_file`` (one per line, in index order) if given, else from
    the sorted folder names or CSV values. ``classes`` contains them with underscores replaced
    by spaces, which is the form used in texts and labels.

    Each time a sample is loaded, its text is one template from ``templates`` chosen with the
    dataset's generator, filled with the class name. With ``templates=None`` the text is the
    bare class name. The label is ``text_label(class name)`` whichever template was drawn, so
    a class's images are positives of each other and of captions equal to the class name.
    """

    def __init__(
        self,
        root_or_csv: PathLike,
        templates: Sequence[str] | None = TRAIN_TEMPLATES,
        *,
        archive: PathLike | None = None,
        classes_file: PathLike | None = None,
        path_key: str = "path",
        class_key: str = "class_name",
    ):
        self.templates = _check_templates(templates)
        self.archive = ZipImageReader(archive) if archive is not None else None

        images_by_class, where = self._find_images(Path(root_or_csv), path_key, class_key)
        folder_names = _order_classes(list(images_by_class), classes_file, where)
        self._images: list[str] = []
        self.targets: list[int] = []
        for class_index, name in enumerate(folder_names):
            found = images_by_class.get(name, [])
            if not found:
                _logger.warning("class %r has no images in %s", name, where)
            self._images.extend(found)
            self.targets.extend([class_index] * len(found))
        if not self._images:
            raise ValueError(
                f"no images found in {where}. Expected files ending in {IMAGE_EXTENSIONS}"
            )

        self.classes = [class_prompt_name(name) for name in folder_names]
        self.class_labels = [text_label(name) for name in self.classes]

    def _find_images(
        self, root_or_csv: Path, path_key: str, class_key: str
    ) -> tuple[dict[str, list[str]], str]:
        if root_or_csv.suffix.lower() in (".csv", ".tsv"):
            images = _read_class_csv(root_or_csv, path_key, class_key)
            if self.archive is None:
                root = root_or_csv.parent
                images = {c: [str(_resolve(p, root)) for p in paths] for c, paths in images.items()}
            return images, str(root_or_csv)

        if self.archive is not None:
            prefix = root_or_csv.as_posix().strip("/")
            prefix = "" if prefix == "." else prefix
            where = f"folder {prefix!r} of {self.archive.path}"
            return _scan_archive(self.archive, prefix), where
        return _scan_folders(root_or_csv), str(root_or_csv)

    def __len__(self) -> int:
        return len(self._images)

    def image_path(self, index: int) -> str:
        if self.archive is not None:
            return self.archive.describe(self._images[index])
        return self._images[index]

    def load_image(self, index: int) -> Image.Image:
        if self.archive is not None:
            return self.archive.load_rgb(self._images[index])
        return load_rgb(self._images[index])

    def text(self, index: int, rng: np.random.Generator) -> str:
        name = self.classes[self.targets[index]]
        if self.templates is None:
            return name
        template = self.templates[int(rng.integers(len(self.templates)))]
        return template.format(name)

    def label(self, index: int) -> int:
        return self.class_labels[self.targets[index]]
