"""Recall of approximate FAISS indexes against exact search, on real image embeddings.

Embeds the 800 Flickr8k photos and, with ``--cifar``, the 10,000 CIFAR-10 test images with a
checkpoint, then searches each collection with the text embeddings of the 4,000 Flickr8k
captions as queries. Recall@10 is the fraction of the exact top 10 (``IndexFlatIP``) that an
approximate index (HNSW, IVF) returns in its top 10. Also reports text-to-image R@10 on
Flickr8k (is a caption's own photo in the exact top 10), which measures the model, not the
index. Writes the "Search index recall" section of docs/benchmarks.md.

    python -m benchmarks.search --checkpoint runs/quickstart/model.safetensors [--cifar] [--no-docs]
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import time
import zipfile
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks._report import environment_rows, update_section
from florence.serving.embed import Embedder
from florence.serving.index import IndexParams, build_faiss_index

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTION_TITLE = "Search index recall"
K = 10


def _shared_data() -> Path:
    return Path(os.environ.get("FLORENCE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _encode_in_batches(embedder: Embedder, images: list[Image.Image], batch_size: int = 256) -> np.ndarray:
    return np.concatenate([embedder.encode_images(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def embed_flickr(embedder: Embedder, folder: Path) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Return photo embeddings, caption embeddings and the photo index of each caption."""
    with open(folder / "captions.tsv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    photos = sorted({row["image"] for row in rows})
    position = {photo: index for index, photo in enumerate(photos)}
    images = [Image.open(folder / photo).convert("RGB") for photo in photos]
    captions = [row["caption"] for row in rows]
    text = np.concatenate([embedder.encode_texts(captions[i : i + 512]) for i in range(0, len(captions), 512)])
    return _encode_in_batches(embedder, images), text, [position[row["image"]] for row in rows]


def embed_cifar(embedder: Embedder, folder: Path) -> np.ndarray:
    with zipfile.ZipFile(folder / "test.zip") as archive:
        names = sorted(name for name in archive.namelist() if name.endswith(".jpg"))
        images = [Image.open(io.BytesIO(archive.read(name))).convert("RGB") for name in names]
    return _encode_in_batches(embedder, images)


def recall_at_k(approximate: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) / exact.shape[1] for a, e in zip(approximate, exact)]))


def measure(collection: np.ndarray, queries: np.ndarray, params: IndexParams) -> list[tuple[str, str, float, float, float]]:
    """Return (kind, parameters, recall@10, build seconds, milliseconds per query) per index kind."""
    rows = []
    exact = None
    for kind in ("flat", "hnsw", "ivf"):
        start = time.perf_counter()
        index = build_faiss_index(collection, kind, params)
        built = time.perf_counter() - start
        start = time.perf_counter()
        _, found = index.search(queries, K)
        per_query = (time.perf_counter() - start) * 1000 / len(queries)
        if kind == "flat":
            exact = found
        settings = {
            "flat": "exact",
            "hnsw": f"M={params.hnsw_m}, efSearch={params.ef_search}",
            "ivf": f"nlist={getattr(index, 'nlist', 0)}, nprobe={getattr(index, 'nprobe', 0)}",
        }[kind]
        rows.append((kind, settings, recall_at_k(found, exact), built, per_query))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/quickstart/model.safetensors")
    parser.add_argument("--cifar", action="store_true", help="also measure on Flickr8k + CIFAR-10 test (10,800 images)")
    parser.add_argument("--docs", default=str(REPO_ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()

    data = _shared_data()
    embedder = Embedder.from_checkpoint(args.checkpoint)
    start = time.perf_counter()
    photos, captions, caption_to_photo = embed_flickr(embedder, data / "flickr8k_800")
    collections = {"Flickr8k, 800 photos": photos}
    if args.cifar:
        collections["Flickr8k + CIFAR-10 test, 10,800 images"] = np.concatenate([photos, embed_cifar(embedder, data / "cifar10")])
    embed_seconds = time.perf_counter() - start

    params = IndexParams(hnsw_m=32, ef_search=64, nprobe=8)
    lines = [
        f"`python -m benchmarks.search --checkpoint {args.checkpoint}{' --cifar' if args.cifar else ''}`, {date.today()}.",
        f"Model: {embedder.model_name} (embedding size {embedder.dim}, {embedder.image_size}x{embedder.image_size} input).",
        f"Queries: the {len(captions)} Flickr8k captions as text embeddings; recall@{K} is the share of the exact",
        f"top {K} that the index returns in its top {K}. Embedding took {embed_seconds:.0f} s.",
        "",
        f"| collection | index | parameters | recall@{K} | build (s) | ms per query (one batched call) |",
        "|---|---|---|---|---|---|",
    ]
    for name, collection in collections.items():
        for kind, settings, recall, built, per_query in measure(collection, captions, params):
            lines.append(f"| {name} | {kind} | {settings} | {recall:.3f} | {built:.2f} | {per_query:.3f} |")

    _, exact = build_faiss_index(photos, "flat").search(captions, K)
    model_recall = float(np.mean([target in row for target, row in zip(caption_to_photo, exact)]))
    lines += [
        "",
        (f"Text-to-image R@{K} of the model on Flickr8k (a caption's own photo among the {K} best of 800): "
        f"{100 * model_recall:.1f}% (chance: {100 * K / len(photos):.1f}%). This measures the model, not the index."),
        "",
        "Environment: " + "; ".join(f"{name} {value}" for name, value in environment_rows())
        + f"; load average before the run {os.getloadavg()[0]:.1f} (other jobs shared the CPU, so times are noisy).",
    ]
    report = "\n".join(lines)
    print(report)
    if not args.no_docs:
        update_section(Path(args.docs), SECTION_TITLE, report)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
