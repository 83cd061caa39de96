"""The model behind the HTTP API: batched embedding, zero-shot classification, search and thumbnails."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from florence.evaluation.templates import resolve_templates
from florence.serving.batching import MicroBatcher
from florence.serving.collection import SourceReader, decode_image
from florence.serving.embed import Embedder, normalize_rows
from florence.serving.index import SearchHit, SearchIndex

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """Request limits of the HTTP API; requests over a limit get 413 (sizes) or 422 (counts)."""

    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_labels: int = 100
    max_label_chars: int = 200
    max_texts: int = 64
    max_text_chars: int = 1000
    max_k: int = 100


@dataclass(frozen=True)
class BatchingSettings:
    max_batch_size: int = 32
    max_wait_ms: float = 5.0


class LruCache:
    """A small thread-safe least-recently-used cache of ``max_entries`` values."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._values: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key not in self._values:
                return None
            self._values.move_to_end(key)
            return self._values[key]

    def put(self, key, value) -> None:
        with self._lock:
            self._values[key] = value
            self._values.move_to_end(key)
            while len(self._values) > self.max_entries:
                self._values.popitem(last=False)


class ModelService:
    """Embedder, optional SearchIndex, and the two micro-batchers (images, texts) that feed the model.

    All model calls run on one worker thread, so the batchers never run the model concurrently.
    Label embeddings and thumbnails are cached (least recently used first out).
    """

    def __init__(
        self,
        embedder: Embedder,
        index: SearchIndex | None = None,
        templates: str | list[str] = "simple",
        batching: BatchingSettings = BatchingSettings(),
        thumbnail_size: int = 256,
    ) -> None:
        if index is not None and index.dim != embedder.dim:
            raise ValueError(f"the index contains vectors of size {index.dim} but the model embeds to {embedder.dim}; use the index built with this model")
        self.embedder = embedder
        self.index = index
        self.templates = resolve_templates(templates)
        self.thumbnail_size = thumbnail_size
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="florence-model")
        self.image_batcher = MicroBatcher("image", embedder.encode_images, self._executor, batching.max_batch_size, batching.max_wait_ms)
        self.text_batcher = MicroBatcher("text", embedder.encode_texts, self._executor, batching.max_batch_size, batching.max_wait_ms)
        self._labels = LruCache(4096)
        self._thumbnails = LruCache(1024)
        self._thumbnail_lock = threading.Lock()
        self._reader = SourceReader()
        self.ready = False

    async def start(self) -> None:
        await self.image_batcher.start()
        await self.text_batcher.start()
        # One forward pass of each tower, so the first request does not pay for lazy initialisation.
        await self.embed_image(Image.new("RGB", (self.embedder.image_size,) * 2))
        await self.embed_texts(["warm-up"])
        self.image_batcher.reset_stats()
        self.text_batcher.reset_stats()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.image_batcher.stop()
        await self.text_batcher.stop()
        self._executor.shutdown(wait=True)
        self._reader.close()

    async def embed_image(self, image: Image.Image) -> np.ndarray:
        return await self.image_batcher.submit(image)

    async def embed_texts(self, texts: list[str]) -> np.ndarray:
        vectors = await asyncio.gather(*(self.text_batcher.submit(text) for text in texts))
        return np.stack(vectors)

    async def embed_labels(self, labels: list[str]) -> np.ndarray:
        """Embed labels with prompt ensembling over ``self.templates``, caching each label."""
        cached = {label: self._labels.get(label) for label in labels}
        missing = [label for label, vector in cached.items() if vector is None]
        if missing:
            prompts = [template.format(label) for label in missing for template in self.templates]
            vectors = (await self.embed_texts(prompts)).reshape(len(missing), len(self.templates), -1).mean(axis=1)
            for label, vector in zip(missing, normalize_rows(vectors)):
                self._labels.put(label, vector)
                cached[label] = vector
        return np.stack([cached[label] for label in labels])

    async def classify(self, image: Image.Image, labels: list[str]) -> list[tuple[str, float]]:
        """Rank ``labels`` for ``image`` by zero-shot probability, highest first (ties keep label order)."""
        image_vector, label_vectors = await asyncio.gather(self.embed_image(image), self.embed_labels(labels))
        probabilities = self.embedder.label_probabilities(image_vector[None], label_vectors)[0]
        order = np.argsort(-probabilities, kind="stable")
        return [(labels[i], float(probabilities[i])) for i in order]

    def search(self, query: np.ndarray, k: int) -> list[SearchHit]:
        if self.index is None:
            raise LookupError("no index")
        return self.index.search(query[None], k)[0]

    def thumbnail(self, row: int, max_pixels: int) -> bytes:
        """Return a JPEG thumbnail of indexed row ``row``; raises IndexError for a row not in the index."""
        if self.index is None or not 0 <= row < len(self.index):
            raise IndexError(row)
        cached = self._thumbnails.get(row)
        if cached is not None:
            return cached

        with self._thumbnail_lock:
            data = self._reader.read_bytes(self.index.sources[row])
        image = decode_image(data, max_pixels)
        image.thumbnail((self.thumbnail_size, self.thumbnail_size), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        thumbnail = buffer.getvalue()
        self._thumbnails.put(row, thumbnail)
        return thumbnail
