"""FAISS indexes over L2-normalised embeddings, searched by inner product (cosine similarity).

An index folder contains ``index.faiss`` (the FAISS index), ``sources.parquet`` (the source
of each row, in row order) and ``index.json`` (the index kind, its parameters, and the model
of the embeddings, copied from their ``embeddings.json``).

Kinds:

- ``flat``: ``IndexFlatIP``, exact search, cost linear in the collection size;
- ``hnsw``: ``IndexHNSWFlat``, a graph index with no training step, approximate;
- ``ivf``: ``IndexIVFFlat``, k-means cells of which ``nprobe`` are searched, approximate;
- ``auto``: ``flat`` up to ``exact_max`` vectors, ``hnsw`` above, with the choice logged.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from florence.serving._optional import require
from florence.serving.embed import EmbeddingStore

_logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
SOURCES_FILE = "sources.parquet"
META_FILE = "index.json"
KINDS = ("auto", "flat", "hnsw", "ivf")

# NOTE: an estimate, not a measurement: exact search of 100,000 vectors of size 256 reads about
# 100 MB per query, roughly 10 ms on one core, which is still fine for interactive use.
DEFAULT_EXACT_MAX = 100_000

# faiss warns when k-means has fewer than 39 training points per centroid.
_MIN_POINTS_PER_CELL = 39


@dataclass(frozen=True)
class IndexParams:
    """Parameters of the approximate kinds; ``nlist=None`` picks about 4 * sqrt(N) cells."""

    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    nlist: int | None = None
    nprobe: int = 16


def choose_kind(count: int, kind: str = "auto", exact_max: int = DEFAULT_EXACT_MAX) -> str:
    """Return the concrete kind for ``count`` vectors: ``kind`` itself unless it is ``auto``."""
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    return "flat" if count <= exact_max else "hnsw"


def build_faiss_index(vectors: np.ndarray, kind: str, params: IndexParams = IndexParams()):
    """Build a FAISS inner-product index of ``kind`` (not ``auto``) over ``vectors`` [N, D]."""
    faiss = require("faiss")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count, dim = vectors.shape
    if count == 0:
        raise ValueError("no embeddings to index; embed some readable images first")

    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        index.hnsw.efSearch = params.ef_search
    elif kind == "ivf":
        nlist = params.nlist or max(1, min(round(4 * math.sqrt(count)), count // _MIN_POINTS_PER_CELL))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(params.nprobe, nlist)
    else:
        raise ValueError(f"unknown index kind {kind!r}; valid kinds: flat, hnsw, ivf")

    index.add(vectors)
    return index


@dataclass
class SearchHit:
    row: int
    source: str
    score: float


class SearchIndex:
    """A FAISS index with the source of each row and a description of how it was built."""

    def __init__(self, index, sources: list[str], meta: dict) -> None:
        if index.ntotal != len(sources):
            raise ValueError(f"the index has {index.ntotal} vectors but {len(sources)} sources; build it again")
        self.index = index
        self.sources = sources
        self.meta = meta

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def kind(self) -> str:
        return str(self.meta["kind"])

    def search(self, queries: np.ndarray, k: int) -> list[list[SearchHit]]:
        """Return the ``k`` best rows for each query [Q, D], highest cosine similarity first.

        A ``k`` above the index size returns every row. Raises ValueError for ``k < 1``.
        """
        if k < 1:
            raise ValueError(f"k={k} is out of range; pass k >= 1")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have size {queries.shape[1]} but the index contains vectors of size {self.dim}")
        scores, rows = self.index.search(queries, min(k, len(self)))
        results = []
        for query_scores, query_rows in zip(scores, rows):
            hits = [
                SearchHit(int(row), self.sources[row], float(score))
                for score, row in zip(query_scores, query_rows)
                if row >= 0
            ]
            results.append(hits)
        return results

    def save(self, folder: str | Path) -> None:
        faiss = require("faiss")
        pa = require("pyarrow")
        pq = require("pyarrow.parquet")
        from florence.checkpoint import atomic_write_bytes

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / f".{INDEX_FILE}.tmp"
        faiss.write_index(self.index, str(temporary))
        os.replace(temporary, folder / INDEX_FILE)
        temporary = folder / f".{SOURCES_FILE}.tmp"
        pq.write_table(pa.table({"source": pa.array(self.sources, pa.string())}), temporary)
        os.replace(temporary, folder / SOURCES_FILE)
        atomic_write_bytes(folder / META_FILE, json.dumps(self.meta, indent=2).encode())

    @classmethod
    def load(cls, folder: str | Path) -> SearchIndex:
        faiss = require("faiss")
        pq = require("pyarrow.parquet")
        folder = Path(folder)
        if not (folder / INDEX_FILE).is_file():
            raise FileNotFoundError(f"{folder / INDEX_FILE} not found; build it with 'florence index build EMBEDDINGS --out {folder}'")
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        sources = pq.read_table(folder / SOURCES_FILE).column("source").to_pylist()
        index = faiss.read_index(str(folder / INDEX_FILE))
        if meta.get("kind") == "hnsw":
            index.hnsw.efSearch = meta["params"]["ef_search"]
        elif meta.get("kind") == "ivf":
            index.nprobe = meta["params"]["nprobe"]
        return cls(index, sources, meta)


def build_index(
    embeddings: str | Path,
    kind: str = "auto",
    exact_max: int = DEFAULT_EXACT_MAX,
    params: IndexParams = IndexParams(),
) -> SearchIndex:
    """Build a SearchIndex over the image embeddings in the folder ``embeddings``."""
    store = EmbeddingStore(embeddings)
    manifest = store.read_manifest()
    sources, vectors = store.read_embeddings("image")
    chosen = choose_kind(len(sources), kind, exact_max)
    if kind == "auto":
        reason = "at most" if chosen == "flat" else "more than"
        _logger.info("index kind %s: %d vectors, %s the exact-search limit of %d", chosen, len(sources), reason, exact_max)
    else:
        _logger.info("index kind %s (requested) for %d vectors", chosen, len(sources))

    index = build_faiss_index(vectors, chosen, params)
    meta = {
        "kind": chosen,
        "count": len(sources),
        "dim": int(vectors.shape[1]),
        "metric": "inner_product",
        "params": {
            "hnsw_m": params.hnsw_m,
            "ef_construction": params.ef_construction,
            "ef_search": params.ef_search,
            "nlist": getattr(index, "nlist", None),
            "nprobe": params.nprobe if chosen != "ivf" else index.nprobe,
        },
        "embeddings": str(Path(embeddings).resolve()),
        **{key: manifest[key] for key in ("model_name", "checkpoint", "checkpoint_sha256", "image_size") if key in manifest},
    }
    return SearchIndex(index, sources, meta)
