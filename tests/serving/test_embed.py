import csv
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.serving.conftest import flickr_photos

pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install 'florence-vision[serve]')")

from florence.serving.collection import (
    SourceReader,
    decode_image,
    describe_read_error,
    list_images,
)
from florence.serving.embed import EmbeddingStore, build_manifest, embed_images


def _store(tmp_path, embedder, checkpoint) -> EmbeddingStore:
    store = EmbeddingStore(tmp_path / "embeddings")
    store.open_for(build_manifest(embedder, checkpoint))
    return store


def test_embed_folder_writes_unit_vectors(tmp_path, photo_folder, embedder, checkpoint):
    store = _store(tmp_path, embedder, checkpoint)
    sources = list_images([str(photo_folder)])

    summary = embed_images(embedder, sources, store, batch_size=3, rows_per_part=4, progress=False)
    read_sources, vectors = store.read_embeddings()

    assert summary.written == len(sources)
    assert read_sources == sources
    assert vectors.shape == (len(sources), embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert len(store.parts()) == 2


def test_embed_parts_have_exact_row_count(tmp_path, photo_folder, embedder, checkpoint):
    pq = pytest.importorskip("pyarrow.parquet")
    store = _store(tmp_path, embedder, checkpoint)
    sources = list_images([str(photo_folder)])

    embed_images(embedder, sources, store, batch_size=3, rows_per_part=3, progress=False)
    rows = [pq.read_metadata(part).num_rows for part in store.parts()]

    assert len(sources) == 8
    assert rows == [3, 3, 2]


def test_embed_parts_exact_across_batches(tmp_path, photo_folder, embedder, checkpoint):
    pq = pytest.importorskip("pyarrow.parquet")
    store = _store(tmp_path, embedder, checkpoint)
    sources = list_images([str(photo_folder)])

    embed_images(embedder, sources, store, batch_size=3, rows_per_part=4, progress=False)
    rows = [pq.read_metadata(part).num_rows for part in store.parts()]

    assert rows == [4, 4]


def test_embed_counts_unreadable_separately(tmp_path, photo_folder, embedder, checkpoint):
    for name in ("notes.jpg", "empty.jpg"):
        (photo_folder / name).write_text("not an image" if name == "notes.jpg" else "")
    store = _store(tmp_path, embedder, checkpoint)
    sources = list_images([str(photo_folder)])

    first = embed_images(embedder, sources, store, progress=False)
    rerun = embed_images(embedder, sources, store, progress=False)

    assert (first.embedded, len(first.failed)) == (len(sources) - 2, 2)
    assert (first.already_embedded, first.already_failed) == (0, 0)
    assert (rerun.embedded, len(rerun.failed)) == (0, 0)
    assert (rerun.already_embedded, rerun.already_failed) == (len(sources) - 2, 2)


def test_embed_matches_direct_encoding(tmp_path, photo_folder, embedder, checkpoint):
    store = _store(tmp_path, embedder, checkpoint)
    sources = list_images([str(photo_folder)])
    embed_images(embedder, sources, store, progress=False)

    _, vectors = store.read_embeddings()
    direct = embedder.encode_images([decode_image(Path(sources[0]).read_bytes())])

    np.testing.assert_allclose(vectors[0], direct[0], atol=1e-5)


def test_embed_resume_adds_no_duplicates(tmp_path, photo_folder, embedder, checkpoint):
    store = _store(tmp_path, embedder, checkpoint)
    sources = list_images([str(photo_folder)])
    # An interrupted run: two whole parts written, and the temporary file of a third left behind.
    embed_images(embedder, sources[:4], store, batch_size=2, rows_per_part=2, progress=False)
    (store.folder / ".part-00002.parquet.tmp").write_bytes(b"half-written part")

    summary = embed_images(embedder, sources, store, batch_size=2, rows_per_part=2, progress=False)
    read_sources, _ = store.read_embeddings()

    assert summary.already_embedded == 4
    assert summary.written == len(sources) - 4
    assert sorted(read_sources) == sorted(sources)
    assert len(read_sources) == len(set(read_sources))


def test_embed_rerun_writes_nothing(tmp_path, photo_folder, embedder, checkpoint):
    store = _store(tmp_path, embedder, checkpoint)
    sources = list_images([str(photo_folder)])
    embed_images(embedder, sources, store, progress=False)
    parts = store.parts()

    summary = embed_images(embedder, sources, store, progress=False)

    assert summary.written == 0
    assert store.parts() == parts


def test_embed_lists_unreadable_images(tmp_path, photo_folder, embedder, checkpoint):
    (photo_folder / "notes.jpg").write_text("this is text, not a JPEG")
    photo = sorted(photo_folder.glob("*.jpg"))[1].read_bytes()
    (photo_folder / "truncated.jpg").write_bytes(photo[: len(photo) // 3])
    store = _store(tmp_path, embedder, checkpoint)
    sources = list_images([str(photo_folder)])

    summary = embed_images(embedder, sources, store, progress=False)
    read_sources, _ = store.read_embeddings()
    failed = {source.rsplit("/", 1)[1] for source, _ in store.read_failures()}

    assert {source.rsplit("/", 1)[1] for source, _ in summary.failed} == {"notes.jpg", "truncated.jpg"}
    assert failed == {"notes.jpg", "truncated.jpg"}
    assert len(read_sources) == len(sources) - 2
    assert all("BytesIO" not in message for _, message in summary.failed)
    assert all("not a readable image" in message for _, message in summary.failed)


@pytest.mark.parametrize("data", [b"plain text", b"GIF89a"])
def test_decode_error_message_has_no_repr(data):
    with pytest.raises(OSError) as caught:
        decode_image(data)

    assert "BytesIO" not in describe_read_error(caught.value)
    assert "not a readable image" in describe_read_error(caught.value)


def test_missing_file_error_message(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        SourceReader().read_bytes(str(tmp_path / "missing.jpg"))

    assert describe_read_error(caught.value) == "No such file or directory"


def test_embed_skips_images_over_pixel_limit(tmp_path, photo_folder, embedder, checkpoint):
    store = _store(tmp_path, embedder, checkpoint)
    sources = list_images([str(photo_folder)])

    summary = embed_images(embedder, sources, store, max_pixels=100, progress=False)

    assert len(summary.failed) == len(sources)
    assert "above the limit of 100" in summary.failed[0][1]


def test_embed_store_rejects_other_checkpoint(tmp_path, embedder, checkpoint):
    store = _store(tmp_path, embedder, checkpoint)
    other = build_manifest(embedder, checkpoint) | {"checkpoint_sha256": "0" * 64}

    with pytest.raises(ValueError, match="checkpoint_sha256"):
        store.open_for(other)


def test_list_images_reads_csv_glob_and_tar(tmp_path, photo_folder):
    photos = sorted(photo_folder.glob("*.jpg"))
    table = tmp_path / "list.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows([[f"photos/{photo.name}", "x"] for photo in photos[:3]])
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as archive:
        for photo in photos[:2]:
            archive.add(photo, arcname=f"{photo.stem}.jpg")

    from_csv = list_images([str(table)])
    from_glob = list_images([str(photo_folder / "*.jpg")])
    from_tar = list_images([str(shard)])

    assert from_csv == [str(photo.resolve()) for photo in photos[:3]]
    assert len(from_glob) == len(photos)
    assert from_tar == [f"{shard.resolve()}#{photo.stem}.jpg" for photo in photos[:2]]
    assert SourceReader().read_bytes(from_tar[1]) == photos[1].read_bytes()


def test_list_images_deduplicates_inputs(photo_folder):
    photo = str(min(photo_folder.glob("*.jpg")))

    sources = list_images([photo, str(photo_folder), photo])

    assert len(sources) == len(set(sources)) == len(flickr_photos())


def test_list_images_missing_input_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        list_images([str(tmp_path / "missing")])
