"""Stream (image, text, label) batches from tar shards for UniCL training.

Shards are in the img2dataset layout that ``florence.data.shards`` writes: ``<key>.jpg`` (or
``.jpeg``, ``.png``, ``.webp``), a ``<key>.txt`` caption and an optional ``<key>.json``.
webdataset opens each shard (a local path or any URL that ``webdataset.gopen`` supports, such
as ``pipe:curl -s https://host/train-000000.tar``) and iterates over its tar members.

The data is read in epoch-equivalents of whole global batches, planned from the sample counts
in the shard index:

1. The shards are put in a random order drawn from ``(seed, epoch)``.
2. The samples of that order are cut into ``world_size * workers`` equal, contiguous slots of
   whole batches, one per (rank, DataLoader worker). The last incomplete global batch is
   dropped, so no sample is read twice within an epoch-equivalent and every rank gets the same
   number of batches.
3. Each slot passes its samples through a shuffle buffer seeded from ``(seed, epoch, slot)``,
   decodes them and yields whole batches. The DataLoader takes batches from its workers in
   turn, so the batch order of a rank is fixed by the seed, the world size and the number of
   workers.

A stream started at ``(epoch, batch_in_epoch)`` reproduces the batches of an uninterrupted
stream from that point. Workers skip earlier epochs without reading them and replay the
current one up to the start position through the shuffle buffer without decoding images.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from florence.data.dataset import ImageLoadError, collate_image_text
from florence.data.labels import text_label
from florence.data.shards import DEFAULT_INDEX_NAME, read_shard_index
from florence.data.sources import IMAGE_LOAD_ERRORS, load_rgb

__all__ = [
    "IMAGE_MEMBERS",
    "Shard",
    "ShardReadError",
    "ShardStream",
    "ShardedImageText",
    "epoch_slots",
    "resolve_shards",
    "shards_from_urls",
]

_logger = logging.getLogger(__name__)

# Tar member extensions read as the image, in order of preference.
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")

# Tags that keep the random streams of the shard order and the shuffle buffer apart.
_SHARD_ORDER_STREAM = 1
_SHUFFLE_STREAM = 2

Batch = tuple[torch.Tensor, list[str], torch.Tensor, int]


# Warnings per process about skipped samples; the rest go to the debug log.
MAX_SKIP_WARNINGS = 20


class ShardReadError(RuntimeError):
    """A shard cannot be opened or its tar stream is corrupt."""


@dataclass(frozen=True)
class Shard:
    """One tar shard: where to open it, its sample count from the index and how to read it.

    ``offset`` is the sample id of the shard's first sample: sample ids number the samples
    of all shards in listed order, and they seed each sample's augmentation and template.
    ``templates`` are the prompt templates for class-labelled samples (None: the bare name).
    """

    url: str
    samples: int
    offset: int
    templates: tuple[str, ...] | None = None


def _expand(urls: str | Sequence[str]) -> list[str]:
    if isinstance(urls, str):
        return expand_urls(urls)
    expanded = []
    for url in urls:
        if not isinstance(url, str):
            raise TypeError(f"shard urls must be strings, got {url!r}")
        expanded.extend(expand_urls(url))
    return expanded


def _local_index_next_to(url: str) -> Path | None:
    """Return the default index file in the folder of a local shard path, if there is one."""
    if ":" in url.split("/", 1)[0]:
        return None
    candidate = Path(url).parent / DEFAULT_INDEX_NAME
    return candidate if candidate.is_file() else None


def _matching_name(url: str, names: Sequence[str], index: str) -> str:
    """Return the index entry that names the shard of ``url``, e.g. train-000001.tar in a pipe."""
    found = [
        name for name in names if re.search(r"(^|[/\s:=])" + re.escape(name) + r"($|[\s?#])", url)
    ]
    if not found:
        raise ValueError(
            f"shard {url!r} is not listed in the shard index {index}. List only shards of that "
            f"index in urls, or set index to the index file that lists them"
        )
    return max(found, key=len)


def count_samples(url: str) -> int:
    """Count the samples of one shard by reading it through."""
    return sum(1 for _ in webdataset.tarfile_samples([{"url": url}]))


def resolve_shards(urls: str | os.PathLike[str] | Sequence[str], index: str | None = None) -> list[tuple[str, int]]:
    """Return (url, sample count) for every shard that ``urls`` names.

    ``urls`` is a folder or index file written by ``florence data shards``, a brace pattern such
    as ``shards/train-{000000..000009}.tar`` (``::`` separates several), a list of them, or
    URLs that ``webdataset.gopen`` opens (``pipe:...``, ``https://...``). Sample counts come
    from ``index`` (a path or URL), else from the index file next to local shards. Without an
    index every shard is read once to count its samples, which is slow for remote shards.
    """
    if isinstance(urls, os.PathLike):
        urls = os.fspath(urls)
    if isinstance(urls, str) and index is None:
        local = Path(urls)
        if local.is_dir() or (local.is_file() and local.suffix == ".json"):
            index_path = local / DEFAULT_INDEX_NAME if local.is_dir() else local
            if not index_path.is_file():
                raise FileNotFoundError(
                    f"shard folder {local} has no {DEFAULT_INDEX_NAME}. Write the shards with "
                    f"`florence data shards`, or list them in urls with a brace pattern"
                )
            found = read_shard_index(index_path)
            if not found.complete:
                _logger.warning("shard index %s is incomplete; using its %d finished shards", index_path, len(found.shards))
            return [(str(index_path.parent / shard.name), shard.samples) for shard in found.shards]

    url_list = _expand(urls)
    if not url_list:
        raise ValueError(f"urls={urls!r} names no shards")
    index_location = index if index is not None else _local_index_next_to(url_list[0])
    if index_location is None:
        _logger.warning(
            "no shard index for %s; reading all %d shards once to count their samples. Set index "
            "to the index file written by `florence data shards` to skip this",
            url_list[0],
            len(url_list),
        )
        return [(url, count_samples(url)) for url in url_list]

    found = read_shard_index(index_location)
    counts = {shard.name: shard.samples for shard in found.shards}
    names = list(counts)
    return [(url, counts[_matching_name(url, names, str(index_location))]) for url in url_list]


def shards_from_urls(
    urls: str | os.PathLike[str] | Sequence[str],
    index: str | None = None,
    templates: Sequence[str] | None = None,
    first_id: int = 0,
) -> list[Shard]:
    """Return the shards that ``urls`` names (see ``resolve_shards``), numbering samples from ``first_id``."""
    shards = []
    offset = first_id
    for url, samples in resolve_shards(urls, index):
        shards.append(Shard(url, samples, offset, None if templates is None else tuple(templates)))
        offset += samples
    return shards


def epoch_slots(
    counts: Sequence[int], epoch: int, seed: int, num_slots: int, samples_per_slot: int
) -> list[list[tuple[int, int, int]]]:
    """Split one epoch-equivalent into ``num_slots`` lists of (shard, start, stop) segments.

    Slot ``s`` contains samples ``s * samples_per_slot`` up to ``(s + 1) * samples_per_slot``
    of the shards taken in an order drawn from ``(seed, epoch)``. Samples after the last slot
    are not used in this epoch-equivalent.
    """
    order = np.random.default_rng([seed, epoch, _SHARD_ORDER_STREAM]).permutation(len(counts))
    slots: list[list[tuple[int, int, int]]] = [[] for _ in range(num_slots)]
    slot, filled = 0, 0
    for shard in order.tolist():
        start = 0
        while start < counts[shard] and slot < num_slots:
            take = min(counts[shard] - start, samples_per_slot - filled)
            slots[slot].append((shard, start, start + take))
            start += take
            filled += take
            if filled == samples_per_slot:
                slot, filled = slot + 1, 0
        if slot == num_slots:
            break
    return slots


def _shuffled(samples: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Yield ``samples`` in the order of a shuffle buffer of ``size`` entries."""
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        position = int(rng.integers(size))
        yield buffer[position]
        buffer[position] = sample
    for position in rng.permutation(len(buffer)).tolist():
        yield buffer[position]


class ShardedImageText:
    """Training data streamed from tar shards: the shard list and how to decode a sample.

    ``len()`` is the number of samples in the shards. ``stream`` returns the iterable of
    batches for one rank, for a DataLoader with ``batch_size=None``.

    Labels follow ``florence.data.sources``: a ``class`` entry in the ``.json`` gives the label
    ``text_label(class)`` and a text from the shard's templates, a ``label`` entry gives
    ``text_label("label:" + str(label))``, and otherwise the label is ``text_label(text)``.
    With ``strict=False`` an unreadable sample is skipped, logged with its shard and key and
    counted in the batch's ``skipped``, and with ``strict=True`` it raises ``ImageLoadError``.
    A shard that cannot be opened or ends early is logged and its missing samples are counted
    as skipped, or with ``strict=True`` it raises ``ShardReadError``.
    """

    def __init__(
        self,
        shards: Sequence[Shard],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        strict: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 1000,
    ):
        if not shards:
            raise ValueError("ShardedImageText needs at least one shard")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer={shuffle_buffer} must be at least 1 (1: no shuffling)")
        self.shards = list(shards)
        self.transform = transform
        self.strict = strict
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer

    def __len__(self) -> int:
        return sum(shard.samples for shard in self.shards)

    def stream(
        self,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        epoch: int = 0,
        batch_in_epoch: int = 0,
        with_keys: bool = False,
    ) -> ShardStream:
        return ShardStream(self, batch_size, rank, world_size, num_workers, epoch, batch_in_epoch, with_keys)


class ShardStream(IterableDataset):
    """Endless batches of one rank from ``ShardedImageText``, starting at a data position.

    Use it with ``DataLoader(stream, batch_size=None, num_workers=num_workers)``. Each batch is
    ``collate_image_text``'s ``(images, texts, labels, skipped)``, followed by the list of
    sample ids when ``with_keys`` is set. ``batches_per_epoch`` and ``position_after`` work as
    in ``ResumableBatchSampler``.

    NOTE: the batches depend on the world size, the batch size and the number of workers, so a
    run resumes exactly only with the same three values.
    """

    def __init__(
        self,
        data: ShardedImageText,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        epoch: int = 0,
        batch_in_epoch: int = 0,
        with_keys: bool = False,
    ):
        self.data = data
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.workers = max(num_workers, 1)
        self.epoch = epoch
        self.batch_in_epoch = batch_in_epoch
        self.with_keys = with_keys
        self._warned: set[str] = set()
        self.num_skipped = 0

        self.samples_per_slot = len(data) // (world_size * self.workers * batch_size) * batch_size
        if self.samples_per_slot == 0:
            raise ValueError(
                f"the shards hold {len(data)} samples, fewer than one batch for each rank and "
                f"DataLoader worker ({batch_size} x {world_size} ranks x {self.workers} workers). "
                f"Lower data.batch_size or data.num_workers, or add data"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.workers * self.samples_per_slot // self.batch_size

    def position_after(self, batches: int) -> tuple[int, int]:
        """Return (epoch, batch_in_epoch) after ``batches`` more batches from the start position."""
        absolute = self.epoch * self.batches_per_epoch + self.batch_in_epoch + batches
        return divmod(absolute, self.batches_per_epoch)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != self.workers:
            raise RuntimeError(
                f"the stream was planned for {self.workers} DataLoader workers but runs in "
                f"{workers}. Pass the same num_workers to stream() and to the DataLoader"
            )

        # The DataLoader requests the first batch from worker 0, so the worker roles rotate to make worker 0
        # produce the batch at the start position.
        role = (worker + self.batch_in_epoch) % workers
        slot = self.rank * workers + role
        epoch, first = self.epoch, self.batch_in_epoch
        while True:
            skipped_batches = max(0, -(-(first - role) // workers))
            yield from self._slot_batches(epoch, slot, skipped_batches)
            epoch, first = epoch + 1, 0

    def _slot_batches(self, epoch: int, slot: int, skipped_batches: int) -> Iterator[Batch]:
        counts = [shard.samples for shard in self.data.shards]
        slots = epoch_slots(counts, epoch, self.data.seed, self.world_size * self.workers, self.samples_per_slot)
        raw = itertools.chain.from_iterable(self._read_segment(*segment) for segment in slots[slot])
        rng = np.random.default_rng([self.data.seed, epoch, slot, _SHUFFLE_STREAM])
        samples = _shuffled(raw, self.data.shuffle_buffer, rng)

        for _ in range(skipped_batches * self.batch_size):
            next(samples)
        while chunk := list(itertools.islice(samples, self.batch_size)):
            batch = collate_image_text([self._decode(sample, epoch) for sample in chunk])
            if self.with_keys:
                yield (*batch, [sample["__id__"] for sample in chunk])
            else:
                yield batch

    def _read_segment(self, shard_index: int, start: int, stop: int) -> Iterator[dict[str, Any]]:
        """Yield the raw samples ``start`` to ``stop - 1`` of a shard, padding missing ones."""
        shard = self.data.shards[shard_index]
        errors: list[Exception] = []

        def keep_error(error: Exception) -> bool:
            errors.append(error)
            return False

        handler = webdataset.reraise_exception if self.data.strict else keep_error
        position = 0
        try:
            for opened in url_opener([{"url": shard.url}], handler=handler):
                try:
                    files = tar_file_expander([opened], handler=handler)
                    for sample in group_by_keys(files, handler=handler):
                        if position >= stop:
                            break
                        if position >= start:
                            yield {**sample, "__id__": shard.offset + position, "__shard__": shard_index}
                        position += 1
                finally:
                    opened["stream"].close()
        except (OSError, EOFError, ValueError, tarfile.TarError) as error:
            raise ShardReadError(
                f"failed to read shard {shard.url}: {error}. Fix or remove the shard, or set "
                f"data.strict=false to skip the rest of it"
            ) from error

        if position < stop:
            reason = f": {errors[0]}" if errors else ""
            if self.data.strict:
                raise ShardReadError(
                    f"shard {shard.url} ended after {position} samples but its index lists "
                    f"{shard.samples}. Write the shard and its index again, or set data.strict=false"
                )
            _logger.warning(
                "shard %s ended after %d samples but its index lists %d%s; counting the rest as skipped",
                shard.url,
                position,
                shard.samples,
                reason,
            )
            for missing in range(max(position, start), stop):
                yield {
                    "__key__": f"#{missing}",
                    "__url__": shard.url,
                    "__id__": shard.offset + missing,
                    "__shard__": shard_index,
                    "__missing__": True,
                }

    def _decode(self, sample: dict[str, Any], epoch: int) -> tuple[torch.Tensor, str, int] | None:
        where = f"{sample['__url__']} sample {sample['__key__']}"
        if sample.get("__missing__"):
            self._skip(where, "the sample is missing from the shard")
            return None

        try:
            text, label = self._text_and_label(sample, epoch)
            image = load_rgb(io.BytesIO(self._image_bytes(sample)))
        except IMAGE_LOAD_ERRORS as error:
            if self.data.strict:
                raise ImageLoadError(
                    f"failed to load {where}: {error}. Fix or remove the shard, or set "
                    f"data.strict=false to skip unreadable samples"
                ) from error
            self._skip(where, str(error))
            return None

        # As in SeededSampleDataset: the augmentation draws from torch's global generator,
        # seeded per sample and restored afterwards.
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(hash((self.data.seed, epoch, sample["__id__"])) & 0x7FFF_FFFF_FFFF_FFFF)
        try:
            return self.data.transform(image), text, label
        finally:
            generator.set_state(saved)

    @staticmethod
    def _image_bytes(sample: dict[str, Any]) -> bytes:
        for extension in IMAGE_MEMBERS:
            if extension in sample:
                return sample[extension]
        raise ValueError(f"no image member (one of {', '.join(IMAGE_MEMBERS)}); members: {_members(sample)}")

    def _text_and_label(self, sample: dict[str, Any], epoch: int) -> tuple[str, int]:
        meta = json.loads(sample["json"]) if "json" in sample else {}
        if not isinstance(meta, dict):
            raise ValueError(f".json must hold an object, got {meta!r}")  # noqa: TRY004 (bad data, not a bad call)

        if meta.get("class") is not None:
            name = str(meta["class"])
            templates = self.data.shards[sample["__shard__"]].templates
            if templates is None:
                return name, text_label(name)
            rng = np.random.default_rng([self.data.seed, epoch, sample["__id__"]])
            return templates[int(rng.integers(len(templates)))].format(name), text_label(name)

        if "txt" not in sample:
            raise ValueError(f"no .txt caption and no class in .json; members: {_members(sample)}")
        text = sample["txt"].decode("utf-8")
        if not text.strip():
            raise ValueError("empty caption")
        if meta.get("label") is not None:
            return text, text_label("label:" + str(meta["label"]))
        return text, text_label(text)

    def _skip(self, where: str, reason: str) -> None:
        self.num_skipped += 1
        if where in self._warned:
            return
        self._warned.add(where)
        if len(self._warned) == MAX_SKIP_WARNINGS + 1:
            _logger.warning("more than %d unreadable samples; logging the rest at debug level", MAX_SKIP_WARNINGS)
        level = logging.WARNING if len(self._warned) <= MAX_SKIP_WARNINGS else logging.DEBUG
        _logger.log(
            level,
            "skipped unreadable %s: %s (%d skipped so far in process %d)",
            where,
            reason,
            self.num_skipped,
            os.getpid(),
        )


def _members(sample: dict[str, Any]) -> str:
    return ", ".join(sorted(key for key in sample if not key.startswith("__"))) or "none"
