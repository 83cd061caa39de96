import io
import shutil
from pathlib import Path

import pytest
import torch
import webdataset
from PIL import Image
from torch.utils.data import DataLoader

from florence.data.dataset import ImageLoadError
from florence.data.labels import text_label
from florence.data.shards import write_shards
from florence.data.sources import CaptionSource
from florence.data.streaming import ShardReadError, resolve_shards
from florence.data.templates import TRAIN_TEMPLATES
from tests.shard_data import (
    QUICKSTART,
    flickr_dir,
    open_shards,
    quickstart_source,
    write_quickstart_shards,
)

BATCH = 8


@pytest.fixture(scope="module")
def class_shards(tmp_path_factory) -> Path:
    """200 quickstart images in 5 shards of 40."""
    folder = tmp_path_factory.mktemp("stream_shards")
    write_quickstart_shards(folder, limit=200, max_samples=40)
    return folder


def _batches(data, count: int, *, workers: int = 0, rank: int = 0, world_size: int = 1, epoch: int = 0, batch_in_epoch: int = 0):
    stream = data.stream(
        BATCH, rank=rank, world_size=world_size, num_workers=workers, epoch=epoch, batch_in_epoch=batch_in_epoch, with_keys=True
    )
    batches = []
    if count == 0:
        return stream, batches
    for batch in DataLoader(stream, batch_size=None, num_workers=workers):
        batches.append(batch)
        if len(batches) == count:
            break
    return stream, batches


def test_class_samples_get_class_labels(class_shards):
    classes = quickstart_source().classes
    _, batches = _batches(open_shards(class_shards), 3)

    for images, texts, labels, skipped, _ in batches:
        assert images.shape == (BATCH, 3, 32, 32)
        assert images.dtype == torch.uint8
        assert skipped == 0
        assert set(texts) <= set(classes)
        assert labels.tolist() == [text_label(text) for text in texts]


def test_class_samples_get_templates(class_shards):
    _, batches = _batches(open_shards(class_shards, TRAIN_TEMPLATES), 3)
    classes = quickstart_source().classes

    for _, texts, labels, _, _ in batches:
        for text, label in zip(texts, labels.tolist()):
            matches = [name for name in classes if text in {t.format(name) for t in TRAIN_TEMPLATES}]
            assert matches, text
            assert label == text_label(matches[0]), text


def test_caption_labels_match_caption_source(tmp_path):
    flickr = flickr_dir()
    source = CaptionSource(flickr / "captions.tsv")
    expected = {}
    for index in range(len(source)):
        expected.setdefault(source.texts[index], set()).add(source.label(index))
    write_shards([source], tmp_path, limit=64, max_samples=32)

    _, batches = _batches(open_shards(tmp_path), 4)

    for _, texts, labels, _, _ in batches:
        for text, label in zip(texts, labels.tolist()):
            assert label in expected[text], text


def test_no_repeats_two_ranks_two_workers(class_shards):
    data = open_shards(class_shards)
    keys_by_rank = []
    for rank in range(2):
        stream, _ = _batches(data, 0, world_size=2, workers=2)
        stream, batches = _batches(data, stream.batches_per_epoch, rank=rank, world_size=2, workers=2)
        keys_by_rank.append([key for batch in batches for key in batch[4]])

    all_keys = keys_by_rank[0] + keys_by_rank[1]
    assert stream.batches_per_epoch == 200 // (2 * 2 * BATCH) * 2
    assert len(keys_by_rank[0]) == len(keys_by_rank[1]) == stream.batches_per_epoch * BATCH
    assert len(set(all_keys)) == len(all_keys)
    assert set(all_keys) <= set(range(200))


def test_next_epoch_reshuffles_without_repeats(class_shards):
    data = open_shards(class_shards)
    stream, _ = _batches(data, 0)
    per_epoch = stream.batches_per_epoch
    _, batches = _batches(data, 2 * per_epoch)
    first = [key for batch in batches[:per_epoch] for key in batch[4]]
    second = [key for batch in batches[per_epoch:] for key in batch[4]]

    assert len(set(first)) == len(first) == 200
    assert len(set(second)) == len(second) == 200
    assert first != second


def test_resume_matches_uninterrupted_stream(class_shards):
    data = open_shards(class_shards)
    stream, straight = _batches(data, 34, workers=2)
    # 25 batches per epoch: resuming at batch 21 crosses an epoch boundary with an odd start.
    epoch, batch_in_epoch = stream.position_after(21)
    _, resumed = _batches(data, 13, workers=2, epoch=epoch, batch_in_epoch=batch_in_epoch)

    assert (epoch, batch_in_epoch) == (0, 21)
    for expected, actual in zip(straight[21:], resumed, strict=True):
        assert expected[4] == actual[4]
        assert torch.equal(expected[0], actual[0])
        assert expected[1] == actual[1]
        assert torch.equal(expected[2], actual[2])


def test_worker_process_matches_main_process(class_shards):
    data = open_shards(class_shards)
    _, in_main = _batches(data, 5, workers=0, epoch=1, batch_in_epoch=3)
    _, in_worker = _batches(data, 5, workers=1, epoch=1, batch_in_epoch=3)

    assert [batch[4] for batch in in_main] == [batch[4] for batch in in_worker]
    for main_batch, worker_batch in zip(in_main, in_worker):
        assert torch.equal(main_batch[0], worker_batch[0])


def _shard_with_bad_samples(folder: Path) -> tuple[Path, int]:
    """Write one shard of 14 quickstart images plus a truncated JPEG and a sample without text."""
    folder.mkdir()
    images = sorted((QUICKSTART / "train" / "cat").glob("*.jpg"))[:14]
    path = folder / "bad-000000.tar"
    with webdataset.TarWriter(str(path), encoder=False) as tar:
        for number, image in enumerate(images):
            tar.write({"__key__": f"{number:04d}", "jpg": image.read_bytes(), "txt": b"a cat"})
        tar.write({"__key__": "truncated", "jpg": images[0].read_bytes()[:200], "txt": b"a cat"})
        tar.write({"__key__": "notext", "jpg": images[1].read_bytes()})
    return path, 16


def test_corrupt_samples_skipped_and_counted(tmp_path, caplog):
    path, total = _shard_with_bad_samples(tmp_path / "bad")
    data = open_shards(str(path), shuffle_buffer=1)

    _, batches = _batches(data, total // BATCH)

    assert sum(batch[3] for batch in batches) == 2
    assert sum(batch[0].shape[0] for batch in batches) == 14
    assert f"{path} sample truncated" in caplog.text
    assert f"{path} sample notext" in caplog.text


def test_corrupt_sample_strict_names_it(tmp_path):
    path, total = _shard_with_bad_samples(tmp_path / "bad")
    data = open_shards(str(path), shuffle_buffer=1, strict=True)

    with pytest.raises(ImageLoadError, match="sample truncated"):
        _batches(data, total // BATCH)


def test_truncated_shard_counts_missing_samples(tmp_path, class_shards, caplog):
    shutil.copytree(class_shards, tmp_path / "shards")
    shard = tmp_path / "shards" / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[: 30 * 1024])
    data = open_shards(tmp_path / "shards")
    stream, _ = _batches(data, 0)

    _, batches = _batches(data, stream.batches_per_epoch)

    assert sum(batch[3] for batch in batches) >= 30
    assert len({key for batch in batches for key in batch[4]}) == 200
    assert "ended after" in caplog.text


def test_truncated_shard_strict_fails(tmp_path, class_shards):
    shutil.copytree(class_shards, tmp_path / "shards")
    shard = tmp_path / "shards" / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[: 30 * 1024])
    data = open_shards(tmp_path / "shards", strict=True)
    stream, _ = _batches(data, 0)

    with pytest.raises(ShardReadError, match="train-000000.tar"):
        _batches(data, stream.batches_per_epoch)


def test_brace_pattern_reads_counts_from_index(class_shards):
    found = resolve_shards(str(class_shards / "train-{000001..000003}.tar"))

    assert [Path(url).name for url, _ in found] == ["train-000001.tar", "train-000002.tar", "train-000003.tar"]
    assert [count for _, count in found] == [40, 40, 40]


def test_pipe_urls_match_local_stream(class_shards):
    pattern = str(class_shards / "train-{000000..000004}.tar")
    local = open_shards(pattern)
    piped = open_shards(f"pipe:cat {pattern}", index=str(class_shards / "index.json"))

    _, expected = _batches(local, 3)
    _, actual = _batches(piped, 3)

    assert [batch[4] for batch in expected] == [batch[4] for batch in actual]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(expected, actual))


def test_shards_without_index_are_counted(tmp_path, class_shards):
    for shard in class_shards.glob("*.tar"):
        shutil.copy(shard, tmp_path / shard.name)

    found = resolve_shards([str(tmp_path / "train-000000.tar"), str(tmp_path / "train-000004.tar")])

    assert [count for _, count in found] == [40, 40]


def test_url_not_in_index_rejected(class_shards):
    with pytest.raises(ValueError, match="not listed in the shard index"):
        resolve_shards(str(class_shards / "train-000009.tar"))


def test_too_few_samples_rejected(class_shards):
    data = open_shards(class_shards)

    with pytest.raises(ValueError, match="fewer than one batch"):
        data.stream(64, world_size=2, num_workers=2)


def test_shards_open_with_plain_webdataset(class_shards):
    first = min(class_shards.glob("*.tar"))
    sample = next(iter(webdataset.WebDataset(str(first), shardshuffle=False)))

    assert {"jpg", "txt", "json"} <= set(sample)
    assert Image.open(io.BytesIO(sample["jpg"])).size == (32, 32)
