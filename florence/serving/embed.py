"""Embed images and texts with a trained model, and write collections of embeddings to Parquet.

An embeddings folder contains ``embeddings.json`` (model name, checkpoint and its SHA-256,
embedding size) and ``part-NNNNN.parquet`` files with one row per image or text:

- ``kind``: ``"image"`` or ``"text"``;
- ``source``: the image's source string (see ``florence.serving.collection``) or the text;
- ``embedding``: L2-normalised float32 vector, null when the image could not be read;
- ``error``: why the image could not be read, null otherwise.

Each part is written to a temporary file and renamed into place, so an interrupted run leaves
only whole parts. A rerun reads the sources already in the parts, failed ones included, and
embeds only the rest, so no source gets two rows. Unreadable images are not retried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from florence.data.sources import IMAGE_LOAD_ERRORS
from florence.data.transforms import build_eval_transform
from florence.evaluation.tasks import model_image_size
from florence.evaluation.templates import resolve_templates
from florence.serving._optional import require
from florence.serving.collection import (
    ImageTooLargeError,
    SourceReader,
    decode_image,
    describe_read_error,
)

_logger = logging.getLogger(__name__)

MANIFEST_NAME = "embeddings.json"
PART_PATTERN = "part-{:05d}.parquet"
FORMAT_VERSION = 1

# Largest image the embedder decodes, in pixels: PIL's own decompression-bomb warning threshold.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class Embedder:
    """A model with its evaluation transform and tokenizer, mapping images and texts to vectors.

    Every ``encode_*`` method returns L2-normalised float32 NumPy arrays ``[N, dim]``, so a dot
    product of two embeddings is their cosine similarity.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Callable | None = None, device: str | torch.device = "cpu") -> None:
        from florence.tokenizer import get_tokenizer

        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer if tokenizer is not None else get_tokenizer(model.context_length)
        self.image_size = model_image_size(model)
        self.transform = build_eval_transform(self.image_size)
        self.model_name = getattr(model, "model_name", type(model).__name__)
        self.dim = int(model.embed_dim)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> Embedder:
        from florence.checkpoint import load_model

        return cls(load_model(path), device=device)

    @property
    def logit_scale(self) -> float:
        """Inverse softmax temperature of zero-shot classification, ``exp(logit_scale)`` capped at 100."""
        from florence.models.florence import MAX_LOGIT_SCALE

        return min(float(self.model.logit_scale.detach().exp()), MAX_LOGIT_SCALE)

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = torch.stack([self.transform(image) for image in images]).to(self.device)
        features = self.model.encode_image(batch, normalize=False)
        return F.normalize(features.float(), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokens = self.tokenizer(list(texts)).to(self.device)
        features = self.model.encode_text(tokens, normalize=False)
        return F.normalize(features.float(), dim=-1).cpu().numpy()

    def encode_labels(self, labels: Sequence[str], templates: str | list[str] = "simple") -> np.ndarray:
        """Embed class labels with CLIP prompt ensembling: mean of the normalised prompt embeddings, renormalised."""
        prompts = resolve_templates(templates)
        texts = [template.format(label) for label in labels for template in prompts]
        features = self.encode_texts(texts).reshape(len(labels), len(prompts), self.dim).mean(axis=1)
        return normalize_rows(features)

    def label_probabilities(self, image_embeddings: np.ndarray, label_embeddings: np.ndarray) -> np.ndarray:
        """Return zero-shot probabilities ``softmax(logit_scale * cosine)`` over labels, ``[N, C]``."""
        logits = self.logit_scale * (image_embeddings @ label_embeddings.T)
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        return weights / weights.sum(axis=1, keepdims=True)


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.maximum(norms, 1e-12)).astype(np.float32)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class EmbedSummary:
    """Counts of one embedding run, with readable and unreadable sources counted separately.

    ``embedded`` and ``failed`` are the sources of this run; ``already_embedded`` and
    ``already_failed`` the sources found in the folder's parts, which this run skipped.
    """

    embedded: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    already_embedded: int = 0
    already_failed: int = 0

    @property
    def written(self) -> int:
        """Rows written by this run: embedded and unreadable sources."""
        return self.embedded + len(self.failed)


class EmbeddingStore:
    """An embeddings folder: its manifest and Parquet parts (see the module docstring)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST_NAME

    def read_manifest(self) -> dict:
        if not self.manifest_path.is_file():
            raise FileNotFoundError(
                f"{self.manifest_path} not found; create the embeddings with 'florence embed PATH... --out {self.folder}'"
            )
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def open_for(self, manifest: dict) -> None:
        """Create the folder for ``manifest``, or check that an existing one was made with the same model.

        Raises ValueError when the folder contains embeddings of another model or checkpoint,
        because mixing them in one index would make scores meaningless.
        """
        from florence.checkpoint import atomic_write_bytes

        if self.manifest_path.is_file():
            existing = self.read_manifest()
            for key in ("model_name", "dim", "checkpoint_sha256"):
                if existing.get(key) != manifest.get(key):
                    raise ValueError(
                        f"{self.folder} contains embeddings with {key}={existing.get(key)!r}, but this run has "
                        f"{key}={manifest.get(key)!r}; use another --out folder or the original checkpoint"
                    )
            return
        atomic_write_bytes(self.manifest_path, json.dumps(manifest, indent=2).encode())

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def read_table(self):
        """Return all parts as one pyarrow Table (empty, with the schema, when there are none)."""
        pa = require("pyarrow")
        pq = require("pyarrow.parquet")
        parts = self.parts()
        if not parts:
            return pa.table({"kind": pa.array([], pa.string()), "source": pa.array([], pa.string())})
        return pa.concat_tables([pq.read_table(part) for part in parts])

    def done_sources(self, kind: str) -> dict[str, bool]:
        """Return every source of ``kind`` in the parts, mapped to whether it has an embedding."""
        table = self.read_table()
        if table.num_rows == 0:
            return {}
        rows = zip(table.column("kind").to_pylist(), table.column("source").to_pylist(), table.column("error").to_pylist())
        return {source: error is None for row_kind, source, error in rows if row_kind == kind}

    def write_part(self, kind: str, sources: list[str], embeddings: list[np.ndarray | None], errors: list[str | None], dim: int) -> Path:
        """Write one part atomically; ``embeddings[i]`` is None exactly when ``errors[i]`` is set."""
        pa = require("pyarrow")
        pq = require("pyarrow.parquet")
        vector_type = pa.list_(pa.float32(), dim)
        values = [None if vector is None else vector.astype(np.float32).tolist() for vector in embeddings]
        table = pa.table(
            {
                "kind": pa.array([kind] * len(sources), pa.string()),
                "source": pa.array(sources, pa.string()),
                "embedding": pa.array(values, vector_type),
                "error": pa.array(errors, pa.string()),
            }
        )
        existing = self.parts()
        number = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        path = self.folder / PART_PATTERN.format(number)
        temporary = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, temporary)
        os.replace(temporary, path)
        return path

    def read_embeddings(self, kind: str = "image") -> tuple[list[str], np.ndarray]:
        """Return the sources and embeddings ``[N, dim]`` of every readable row of ``kind``."""
        manifest = self.read_manifest()
        table = self.read_table()
        sources: list[str] = []
        vectors: list[list[float]] = []
        if table.num_rows:
            rows = zip(table.column("kind").to_pylist(), table.column("source").to_pylist(), table.column("embedding").to_pylist())
            for row_kind, source, vector in rows:
                if row_kind == kind and vector is not None:
                    sources.append(source)
                    vectors.append(vector)
        matrix = np.asarray(vectors, dtype=np.float32).reshape(len(vectors), int(manifest["dim"]))
        return sources, matrix

    def read_failures(self) -> list[tuple[str, str]]:
        table = self.read_table()
        if table.num_rows == 0:
            return []
        return [
            (source, error)
            for source, error in zip(table.column("source").to_pylist(), table.column("error").to_pylist())
            if error is not None
        ]


def build_manifest(embedder: Embedder, checkpoint: str | Path) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "model_name": embedder.model_name,
        "dim": embedder.dim,
        "image_size": embedder.image_size,
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_sha256": file_sha256(checkpoint),
    }


def embed_images(
    embedder: Embedder,
    sources: Sequence[str],
    store: EmbeddingStore,
    batch_size: int = 64,
    rows_per_part: int = 1024,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool | None = None,
) -> EmbedSummary:
    """Embed the images of ``sources`` not yet in ``store``, in parts of exactly ``rows_per_part`` rows.

    Only the last part of a run may be smaller. Unreadable images (missing, truncated, not an
    image, over ``max_pixels``) get a row with the error and no embedding, and are logged.
    ``progress`` shows a tqdm bar: None shows it only on a terminal.
    """
    from tqdm import tqdm

    if rows_per_part < 1:
        raise ValueError(f"rows_per_part={rows_per_part} is out of range; pass at least 1")
    done = store.done_sources("image")
    todo = [source for source in sources if source not in done]
    earlier = [done[source] for source in dict.fromkeys(sources) if source in done]
    summary = EmbedSummary(already_embedded=sum(earlier), already_failed=len(earlier) - sum(earlier))
    if earlier:
        _logger.info(
            "resuming: %d of %d images are already embedded in %s, and %d were unreadable earlier (not retried)",
            summary.already_embedded,
            len(sources),
            store.folder,
            summary.already_failed,
        )

    reader = SourceReader()
    pending: tuple[list, list, list] = ([], [], [])
    try:
        with tqdm(total=len(todo), unit="img", desc="embed", disable=None if progress is None else not progress) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                _embed_batch(embedder, reader, batch, max_pixels, pending, summary)
                bar.update(len(batch))
                while len(pending[0]) >= rows_per_part:
                    _flush(store, "image", pending, embedder.dim, rows_per_part)
            _flush(store, "image", pending, embedder.dim)
    finally:
        reader.close()
    return summary


def _embed_batch(embedder: Embedder, reader: SourceReader, batch: list[str], max_pixels: int, pending: tuple[list, list, list], summary: EmbedSummary) -> None:
    images, readable = [], []
    for source in batch:
        try:
            images.append(decode_image(reader.read_bytes(source), max_pixels))
            readable.append(source)
        except (*IMAGE_LOAD_ERRORS, ImageTooLargeError, KeyError) as error:
            message = describe_read_error(error)
            _logger.warning("skipped unreadable image %s: %s", source, message)
            summary.failed.append((source, message))
            pending[0].append(source)
            pending[1].append(None)
            pending[2].append(message)

    summary.embedded += len(readable)
    for source, vector in zip(readable, embedder.encode_images(images)):
        pending[0].append(source)
        pending[1].append(vector)
        pending[2].append(None)


def _flush(store: EmbeddingStore, kind: str, pending: tuple[list, list, list], dim: int, max_rows: int | None = None) -> int:
    """Write the first ``max_rows`` pending rows (all of them for None) as one part and drop them."""
    rows = len(pending[0]) if max_rows is None else min(max_rows, len(pending[0]))
    if rows:
        path = store.write_part(kind, *(column[:rows] for column in pending), dim=dim)
        _logger.debug("wrote %d rows to %s", rows, path)
        for column in pending:
            del column[:rows]
    return rows


def embed_texts(
    embedder: Embedder,
    texts: Sequence[str],
    store: EmbeddingStore,
    batch_size: int = 256,
    rows_per_part: int = 1024,
) -> EmbedSummary:
    """Embed the distinct texts not yet in ``store``, in parts of exactly ``rows_per_part`` rows (the last may be smaller)."""
    if rows_per_part < 1:
        raise ValueError(f"rows_per_part={rows_per_part} is out of range; pass at least 1")
    done = store.done_sources("text")
    distinct = list(dict.fromkeys(texts))
    todo = [text for text in distinct if text not in done]
    summary = EmbedSummary(already_embedded=len(distinct) - len(todo))
    pending: tuple[list, list, list] = ([], [], [])
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        pending[0].extend(batch)
        pending[1].extend(embedder.encode_texts(batch))
        pending[2].extend([None] * len(batch))
        summary.embedded += len(batch)
        while len(pending[0]) >= rows_per_part:
            _flush(store, "text", pending, embedder.dim, rows_per_part)
    _flush(store, "text", pending, embedder.dim)
    return summary
