"""List the images of a collection and read them back by their source string.

A source is the string that names one image in embeddings, indexes and search results:

- an absolute file path, for images in folders, matched by globs, or listed in CSV/TSV files;
- ``/abs/path/shard.tar#member.jpg``, for an image member of a tar shard (the WebDataset
  and img2dataset layout).
"""

from __future__ import annotations

import csv
import glob
import io
import tarfile
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from florence.data.sources import IMAGE_EXTENSIONS

TAR_SEPARATOR = ".tar#"

# CSV/TSV columns read as the image path, in order of preference.
PATH_COLUMNS = ("path", "image", "filepath", "file_name", "filename")


class ImageTooLargeError(ValueError):
    """An image whose width times height exceeds the pixel limit (a possible decompression bomb)."""


def list_images(inputs: Iterable[str]) -> list[str]:
    """Return the sources of every image named by ``inputs``, without duplicates, in input order.

    Each input is an image file, a folder (searched recursively, sorted), a glob pattern, a
    CSV or TSV file with a path column (one of ``PATH_COLUMNS``, relative to the file's folder
    unless absolute), or a ``.tar`` shard. Raises FileNotFoundError for an input that names
    nothing and ValueError for a CSV without a path column.
    """
    sources: dict[str, None] = {}
    for item in inputs:
        for source in _expand_input(item):
            sources.setdefault(source, None)
    return list(sources)


def _expand_input(item: str) -> list[str]:
    path = Path(item)
    if any(character in item for character in "*?["):
        matches = sorted(glob.glob(item, recursive=True))
        return [str(Path(match).resolve()) for match in matches if _is_image_name(match)]

    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_image_name(p.name))
        return [str(p.resolve()) for p in files]

    if not path.is_file():
        raise FileNotFoundError(f"input {item} not found; pass image files, folders, globs, CSV/TSV files or .tar shards")

    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _read_path_table(path)
    if suffix == ".tar":
        return _list_tar(path)
    return [str(path.resolve())]


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _read_path_table(path: Path) -> list[str]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        columns = reader.fieldnames or []
        column = next((name for name in PATH_COLUMNS if name in columns), None)
        if column is None:
            raise ValueError(f"{path} has no image path column; name one of {', '.join(PATH_COLUMNS)} (columns: {columns})")

        sources = []
        for row in reader:
            value = (row.get(column) or "").strip()
            if value:
                sources.append(str((path.parent / value).resolve()))
    return sources


def _list_tar(path: Path) -> list[str]:
    resolved = path.resolve()
    with tarfile.open(resolved) as archive:
        names = [member.name for member in archive if member.isfile() and _is_image_name(member.name)]
    return [f"{resolved}#{name}" for name in names]


def split_tar_source(source: str) -> tuple[str, str] | None:
    """Return (shard path, member name) for a tar source, or None for a plain file path."""
    position = source.rfind(TAR_SEPARATOR)
    if position < 0:
        return None
    cut = position + len(".tar")
    return source[:cut], source[cut + 1 :]


class SourceReader:
    """Reader of images by source string that keeps tar shards open between reads.

    Not thread-safe: a tar handle has one file position, so use one reader per thread.
    """

    def __init__(self) -> None:
        self._archives: dict[str, tarfile.TarFile] = {}

    def read_bytes(self, source: str) -> bytes:
        """Return the encoded bytes of ``source``; raises OSError or KeyError when it is missing."""
        parts = split_tar_source(source)
        if parts is None:
            return Path(source).read_bytes()

        shard, member = parts
        archive = self._archives.get(shard)
        if archive is None:
            archive = self._archives[shard] = tarfile.open(shard)  # noqa: SIM115 (closed in close())
        handle = archive.extractfile(member)
        if handle is None:
            raise OSError(f"{member} in {shard} is not a regular file")
        return handle.read()

    def close(self) -> None:
        for archive in self._archives.values():
            archive.close()
        self._archives.clear()


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode encoded image bytes into an RGB image, checking the pixel count before decoding.

    Raises ImageTooLargeError when width * height exceeds ``max_pixels``, and one of PIL's
    errors (``PIL.UnidentifiedImageError`` is an OSError) for data that is not a readable image.
    """
    try:
        opened = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(str(error)) from None
    except UnidentifiedImageError:
        # PIL's own message contains the repr of the in-memory file, which is no help to a user.
        raise UnidentifiedImageError("not a readable image: the data is in no image format PIL can decode") from None

    with opened as image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLargeError(
                f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}"
            )
        return image.convert("RGB")


def describe_read_error(error: Exception) -> str:
    """Return why an image could not be read, in words, for error messages and the ``error`` column.

    ``error`` is one of the errors that ``SourceReader.read_bytes`` and ``decode_image`` raise.
    """
    if isinstance(error, (ImageTooLargeError, UnidentifiedImageError)):
        return str(error)
    if isinstance(error, OSError) and error.strerror:
        return str(error.strerror)
    if isinstance(error, KeyError):
        return f"member {error.args[0] if error.args else ''} not found in the tar shard"
    return f"not a readable image: {type(error).__name__}: {error}"
