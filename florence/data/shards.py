"""Write training sources to tar shards in the img2dataset layout, with an index of sample counts.

Each sample is three tar members that share a key, written by webdataset's ``TarWriter``:

- ``<key>.jpg``: the image file's bytes, unchanged. PNG and WebP files keep their bytes and get
  a ``.png`` or ``.webp`` member, and images in other formats are re-encoded as PNG.
- ``<key>.txt``: the caption, or the class name (underscores replaced by spaces) for a
  class-labelled image.
- ``<key>.json``: ``path`` (where the image came from) and, when the source has one, the label:
  ``label`` for a caption table's label column, or ``class`` and ``class_index`` for a
  class-labelled image. For a ``class`` entry the reader fills a prompt template with the
  class name at read time, so the same shards serve training with and without templates.

The index file (``index.json`` by default) lists every shard with its sample count, so a
reader knows the epoch length without opening the shards. A writer that is stopped keeps
every finished shard, and a rerun with the same settings continues after the last one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset
from PIL import Image

from florence.data.sources import (
    IMAGE_LOAD_ERRORS,
    CaptionSource,
    ClassificationSource,
    ImageTextPairSource,
    ImageTextSource,
    PathLike,
    read_caption_table,
)

__all__ = [
    "DEFAULT_INDEX_NAME",
    "INDEX_FORMAT",
    "ShardIndex",
    "ShardRecord",
    "read_shard_index",
    "write_shards",
]

_logger = logging.getLogger(__name__)

INDEX_FORMAT = "florence-shards/1"
DEFAULT_INDEX_NAME = "index.json"

# Image formats whose bytes go into the shard unchanged, with the member extension for each.
_KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_TAR_BLOCK = 512
_MAX_WARNINGS = 20


@dataclass
class ShardRecord:
    """One finished shard. ``first`` and ``end`` are positions in the writer's sample order.

    The shard contains the readable images among positions ``first`` to ``end - 1``, and
    ``skipped`` counts the unreadable ones there.
    """

    name: str
    samples: int
    bytes: int
    first: int
    end: int
    skipped: int = 0


@dataclass
class ShardIndex:
    """The contents of an index file: the shards in order and the settings that wrote them."""

    shards: list[ShardRecord] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    complete: bool = False

    @property
    def total_samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    @property
    def skipped(self) -> int:
        return sum(shard.skipped for shard in self.shards)

    def to_json(self) -> str:
        values = {
            "format": INDEX_FORMAT,
            "total_samples": self.total_samples,
            "skipped": self.skipped,
            "complete": self.complete,
            "settings": self.settings,
            "shards": [asdict(shard) for shard in self.shards],
        }
        return json.dumps(values, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> ShardIndex:
        """Parse an index file's text, raising ValueError that names ``where`` if it is invalid."""
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"shard index {where} is not valid JSON: {err}") from err
        if not isinstance(values, dict) or values.get("format") != INDEX_FORMAT:
            raise ValueError(
                f"{where} is not a florence shard index (expected \"format\": \"{INDEX_FORMAT}\"). "
                f"Write shards with `florence data shards`"
            )

        shards = []
        for position, entry in enumerate(values.get("shards", [])):
            if not isinstance(entry.get("name"), str) or not isinstance(entry.get("samples"), int):
                raise ValueError(f"shard {position} of index {where} needs a name and a sample count")  # noqa: TRY004
            shards.append(
                ShardRecord(
                    name=entry["name"],
                    samples=entry["samples"],
                    bytes=int(entry.get("bytes", 0)),
                    first=int(entry.get("first", 0)),
                    end=int(entry.get("end", 0)),
                    skipped=int(entry.get("skipped", 0)),
                )
            )
        return cls(shards, dict(values.get("settings", {})), bool(values.get("complete", False)))


def read_shard_index(location: str | os.PathLike[str]) -> ShardIndex:
    """Read an index file from a local path or any URL that ``webdataset.gopen`` opens."""
    location = str(location)
    try:
        with webdataset.gopen(location, "rb") as stream:
            text = stream.read().decode("utf-8")
    except OSError as err:
        raise FileNotFoundError(f"cannot read shard index {location}: {err}") from err
    return ShardIndex.from_json(text, location)


@dataclass
class _Sample:
    image: bytes
    extension: str
    text: str
    meta: dict[str, Any]


class _SampleReader:
    """Read the image bytes, text and metadata of each sample of a list of sources."""

    def __init__(self, sources: Sequence[ImageTextSource]):
        self.sources = list(sources)
        self.ends = np.cumsum([len(source) for source in self.sources]).tolist()
        self._raw_labels = [self._read_raw_labels(source) for source in self.sources]
        self._archives: dict[Path, zipfile.ZipFile] = {}

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    @staticmethod
    def _read_raw_labels(source: ImageTextSource) -> list[str | None] | None:
        # CaptionSource keeps only the hashed labels, so the label column is read again to
        # store its value. The reader hashes it back to the same label.
        if not isinstance(source, CaptionSource):
            return None
        rows = read_caption_table(source.path)
        if len(rows) != len(source):
            raise ValueError(
                f"reading {source.path} again gave {len(rows)} rows instead of {len(source)}"
            )
        return [label for _, _, label in rows]

    def locate(self, position: int) -> tuple[int, int]:
        source_index = int(np.searchsorted(self.ends, position, side="right"))
        start = self.ends[source_index - 1] if source_index > 0 else 0
        return source_index, position - start

    def describe(self, position: int) -> str:
        source_index, index = self.locate(position)
        return self.sources[source_index].image_path(index)

    def fingerprint(self) -> str:
        """Return a digest of every sample's image location and label, to detect changed sources."""
        digest = hashlib.blake2b(digest_size=16)
        for source in self.sources:
            digest.update(f"{type(source).__name__}:{len(source)}\n".encode())
            for index in range(len(source)):
                digest.update(f"{source.image_path(index)}\t{source.label(index)}\n".encode())
        return digest.hexdigest()

    def _image_bytes(self, source: ImageTextSource, index: int) -> bytes:
        if isinstance(source, ClassificationSource) and source.archive is not None:
            path = source.archive.path
            if path not in self._archives:
                self._archives[path] = zipfile.ZipFile(path)
            # NOTE: the entry name is a private attribute of ClassificationSource.
            return self._archives[path].read(source._images[index])
        if isinstance(source, (ClassificationSource, ImageTextPairSource)):
            return Path(source.image_path(index)).read_bytes()

        encoded = io.BytesIO()
        source.load_image(index).save(encoded, format="PNG")
        return encoded.getvalue()

    def read(self, position: int) -> _Sample:
        """Read one sample, raising one of ``IMAGE_LOAD_ERRORS`` (or KeyError) for a bad image."""
        source_index, index = self.locate(position)
        source = self.sources[source_index]
        data = self._image_bytes(source, index)
        data, extension = _checked_image(data)

        meta: dict[str, Any] = {"path": source.image_path(index)}
        if isinstance(source, ClassificationSource):
            class_index = source.targets[index]
            meta["class"] = source.classes[class_index]
            meta["class_index"] = class_index
            text = meta["class"]
        else:
            text = source.text(index, np.random.default_rng(0))
            raw_labels = self._raw_labels[source_index]
            if raw_labels is not None and raw_labels[index] is not None:
                meta["label"] = raw_labels[index]
        return _Sample(data, extension, text, meta)

    def close(self) -> None:
        for archive in self._archives.values():
            archive.close()
        self._archives.clear()


def _checked_image(data: bytes) -> tuple[bytes, str]:
    """Decode ``data`` fully and return the bytes to store with their member extension.

    Raises one of ``IMAGE_LOAD_ERRORS`` for data that is not a complete image.
    """
    with Image.open(io.BytesIO(data)) as image:
        image_format = image.format
        rgb = image.convert("RGB")
    if image_format in _KEPT_FORMATS:
        return data, _KEPT_FORMATS[image_format]

    encoded = io.BytesIO()
    rgb.save(encoded, format="PNG")
    return encoded.getvalue(), "png"


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file and a rename, with the umask's permissions."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def _member_bytes(size: int) -> int:
    """Return the bytes a tar member of ``size`` bytes takes: a header and padded data."""
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _check_pattern(pattern: str) -> None:
    try:
        names = {pattern % 0, pattern % 1}
    except (TypeError, ValueError):
        names = set()
    if len(names) != 2 or "/" in pattern:
        raise ValueError(
            f"invalid shard name pattern {pattern!r}: it needs one %d field for the shard "
            f"number, e.g. train-%06d.tar, and no folder"
        )


class _ShardWriter:
    """Write shards to ``output_dir`` one at a time, each through a temporary file."""

    def __init__(self, reader: _SampleReader, output_dir: Path, pattern: str, max_samples: int, max_bytes: int):
        self.reader = reader
        self.output_dir = output_dir
        self.pattern = pattern
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.skipped = 0

    def write(self, shard_number: int, order: np.ndarray, first: int, key_start: int, limit: int | None) -> ShardRecord:
        """Write the next shard from ``order[first:]`` and return its record.

        The shard ends when it contains ``max_samples`` or ``limit`` samples, when it reaches
        ``max_bytes``, or when ``order`` ends. Keys continue from ``key_start``.
        """
        name = self.pattern % shard_number
        final = self.output_dir / name
        temporary = self.output_dir / f".{name}.tmp"
        samples, size, skipped, position = 0, 2 * _TAR_BLOCK, 0, first
        capacity = self.max_samples if limit is None else min(self.max_samples, limit)

        with open(temporary, "wb") as stream:
            # A fixed mtime makes shards written from the same data byte-identical.
            with webdataset.TarWriter(stream, encoder=False, mtime=0) as tar:
                while position < len(order) and samples < capacity and size < self.max_bytes:
                    sample = self._read(int(order[position]))
                    position += 1
                    if sample is None:
                        skipped += 1
                        continue
                    size += self._write_sample(tar, f"{key_start + samples:09d}", sample)
                    samples += 1
            stream.flush()
            os.fsync(stream.fileno())

        if samples == 0:
            temporary.unlink()
        else:
            os.replace(temporary, final)
            _logger.info("wrote shard %s: %d samples, %.1f MB", final, samples, final.stat().st_size / 1e6)
        return ShardRecord(name, samples, final.stat().st_size if samples else 0, first, position, skipped)

    def _read(self, position: int) -> _Sample | None:
        try:
            return self.reader.read(position)
        except (*IMAGE_LOAD_ERRORS, KeyError) as err:
            self.skipped += 1
            level = logging.WARNING if self.skipped <= _MAX_WARNINGS else logging.DEBUG
            _logger.log(level, "skipped unreadable image %s: %s", self.reader.describe(position), err)
            if self.skipped == _MAX_WARNINGS:
                _logger.warning("%d unreadable images so far; logging further ones at debug level (-v)", self.skipped)
            return None

    @staticmethod
    def _write_sample(tar: webdataset.TarWriter, key: str, sample: _Sample) -> int:
        members = {
            sample.extension: sample.image,
            "txt": sample.text.encode("utf-8"),
            "json": json.dumps(sample.meta, ensure_ascii=False).encode("utf-8"),
        }
        tar.write({"__key__": key, **members})
        return sum(_member_bytes(len(data)) for data in members.values())


def _resume_point(index_path: Path, output_dir: Path, settings: dict[str, Any]) -> ShardIndex:
    """Return the finished shards of an earlier run with these settings, or an empty index."""
    if not index_path.is_file():
        return ShardIndex(settings=settings)

    previous = ShardIndex.from_json(index_path.read_text(encoding="utf-8"), str(index_path))
    if previous.settings != settings:
        changed = sorted(key for key in settings.keys() | previous.settings.keys() if settings.get(key) != previous.settings.get(key))
        raise ValueError(
            f"{output_dir} contains shards written with other settings (changed: {', '.join(changed)}). "
            f"Write to a new folder, or delete {output_dir} to start over"
        )

    kept = []
    for shard in previous.shards:
        path = output_dir / shard.name
        if not path.is_file() or path.stat().st_size != shard.bytes:
            _logger.warning("shard %s is missing or has another size; writing it and the following shards again", path)
            break
        kept.append(shard)
    return ShardIndex(kept, settings, complete=previous.complete and len(kept) == len(previous.shards))


def write_shards(
    sources: Sequence[ImageTextSource],
    output_dir: PathLike,
    *,
    pattern: str = "train-%06d.tar",
    max_samples: int = 10_000,
    max_size_mb: float = 1000.0,
    seed: int = 0,
    shuffle: bool = True,
    limit: int | None = None,
    index_name: str = DEFAULT_INDEX_NAME,
) -> ShardIndex:
    """Write the samples of ``sources`` to tar shards in ``output_dir`` and return the index.

    Args:
        sources: training sources, as ``florence.training.data.build_source`` makes them.
        output_dir: folder for the shards and the index file. It is created if missing.
        pattern: shard file name with one ``%d`` field for the shard number.
        max_samples: maximum samples per shard.
        max_size_mb: a shard is closed once it reaches this size in MB (10**6 bytes), so it can
            exceed it by one sample.
        seed: seed of the sample order when ``shuffle`` is true.
        shuffle: write the samples in a seeded random order. Shards of a class-folder source
            written in order would each hold one class, and a reader's shuffle buffer could not
            mix the classes into batches.
        limit: write at most this many samples, the first ones of the sample order.
        index_name: file name of the index in ``output_dir``.

    Unreadable images are skipped, counted in the index and logged with their path. Each
    shard and the index are written to temporary files and renamed, so a stopped writer
    leaves only complete shards. A rerun with the same sources and settings keeps them and
    continues, and a rerun with other settings raises ValueError.
    """
    _check_pattern(pattern)
    if max_samples <= 0 or max_size_mb <= 0:
        raise ValueError(f"max_samples={max_samples} and max_size_mb={max_size_mb} must both be positive")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit={limit} must be positive, or None to write every sample")

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    reader = _SampleReader(sources)
    if len(reader) == 0:
        raise ValueError("the sources hold no samples, so there is nothing to write")

    settings = {
        "pattern": pattern,
        "max_samples": max_samples,
        "max_size_mb": max_size_mb,
        "seed": seed,
        "shuffle": shuffle,
        "limit": limit,
        "num_source_samples": len(reader),
        "sources": reader.fingerprint(),
    }
    index_path = output_dir / index_name
    index = _resume_point(index_path, output_dir, settings)
    if index.complete:
        _logger.info("all %d shards in %s are already written", len(index.shards), output_dir)
        reader.close()
        return index
    if index.shards:
        _logger.info("keeping %d finished shards in %s", len(index.shards), output_dir)

    order = np.random.default_rng(seed).permutation(len(reader)) if shuffle else np.arange(len(reader))
    writer = _ShardWriter(reader, output_dir, pattern, max_samples, int(max_size_mb * 1e6))
    position = index.shards[-1].end if index.shards else 0
    try:
        while position < len(order) and (limit is None or index.total_samples < limit):
            remaining = None if limit is None else limit - index.total_samples
            record = writer.write(len(index.shards), order, position, index.total_samples, remaining)
            position = record.end
            if record.samples == 0:
                # Every remaining image was unreadable: count them in the last shard's record.
                if index.shards:
                    index.shards[-1].end = record.end
                    index.shards[-1].skipped += record.skipped
                break
            index.shards.append(record)
            _write_atomically(index_path, index.to_json())
    finally:
        reader.close()

    if not index.shards:
        raise ValueError(f"none of the {len(reader)} images could be read, so no shard was written")
    index.complete = True
    _write_atomically(index_path, index.to_json())
    _logger.info(
        "%s: %d samples in %d shards, %d unreadable images skipped",
        index_path,
        index.total_samples,
        len(index.shards),
        index.skipped,
    )
    return index

