import logging

import numpy as np
import pytest

pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install 'florence-vision[serve]')")

from florence.serving.index import (
    IndexParams,
    SearchIndex,
    build_faiss_index,
    build_index,
    choose_kind,
)


def test_choose_kind_auto_switches_at_limit():
    assert choose_kind(1000, "auto", exact_max=1000) == "flat"
    assert choose_kind(1001, "auto", exact_max=1000) == "hnsw"
    assert choose_kind(10, "ivf", exact_max=1000) == "ivf"


def test_choose_kind_unknown_raises():
    with pytest.raises(ValueError, match="valid kinds"):
        choose_kind(10, "lsh")


def test_build_index_logs_choice(search_index, caplog):
    folder = search_index.meta["embeddings"]

    with caplog.at_level(logging.INFO, logger="florence.serving.index"):
        small = build_index(folder, exact_max=100)
        large = build_index(folder, exact_max=4)

    assert small.kind == "flat"
    assert large.kind == "hnsw"
    assert "index kind flat" in caplog.text
    assert "index kind hnsw" in caplog.text


def test_image_query_finds_itself(search_index):
    vector = search_index.index.reconstruct(3)

    hits = search_index.search(vector, k=3)[0]

    assert hits[0].row == 3
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)


def test_index_save_load_roundtrip(search_index, tmp_path):
    search_index.save(tmp_path / "index")
    loaded = SearchIndex.load(tmp_path / "index")
    query = search_index.index.reconstruct(0)

    assert loaded.sources == search_index.sources
    assert loaded.meta == search_index.meta
    assert loaded.search(query, 5)[0] == search_index.search(query, 5)[0]


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_recall_on_clustered_vectors(kind):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, 32))
    vectors = centers[rng.integers(0, 20, size=2000)] + 0.3 * rng.normal(size=(2000, 32))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    queries = vectors[:100]

    exact = build_faiss_index(vectors, "flat").search(queries, 10)[1]
    approximate = build_faiss_index(vectors, kind, IndexParams(nprobe=8)).search(queries, 10)[1]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate, exact)])

    assert recall >= 0.9


def test_load_missing_index_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="florence index build"):
        SearchIndex.load(tmp_path)


@pytest.mark.parametrize("k", [0, -1])
def test_search_k_below_one_raises(search_index, k):
    query = search_index.index.reconstruct(0)

    with pytest.raises(ValueError, match=f"k={k} is out of range"):
        search_index.search(query, k)
