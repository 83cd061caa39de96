import json
import shutil
import tarfile
from pathlib import Path

import pytest

from florence.data.shards import read_shard_index, write_shards
from florence.data.sources import CaptionSource, ClassificationSource, CocoCaptionSource
from tests.shard_data import (
    QUICKSTART,
    flickr_dir,
    quickstart_source,
    write_quickstart_shards,
)


def _samples(path: Path) -> dict[str, dict[str, bytes]]:
    """Read a shard into {key: {extension: bytes}}."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, extension = member.name.split(".", 1)
            samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def class_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("class_shards")
    write_quickstart_shards(folder, limit=250, max_samples=100)
    return folder


def test_class_shards_index_counts(class_shards):
    index = read_shard_index(class_shards / "index.json")

    assert [shard.name for shard in index.shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [shard.samples for shard in index.shards] == [100, 100, 50]
    assert index.total_samples == 250
    assert index.complete
    assert index.skipped == 0


def test_class_shards_round_trip(class_shards):
    classes = quickstart_source().classes
    keys = []
    for shard in sorted(class_shards.glob("*.tar")):
        for key, members in _samples(shard).items():
            keys.append(key)
            assert set(members) == {"jpg", "txt", "json"}, key
            meta = json.loads(members["json"])
            image_path = Path(meta["path"])
            assert members["jpg"] == image_path.read_bytes(), key
            assert members["txt"].decode() == meta["class"], key
            assert meta["class"] == image_path.parent.name, key
            assert classes[meta["class_index"]] == meta["class"], key

    assert keys == [f"{n:09d}" for n in range(250)]


def test_class_shards_are_shuffled(class_shards):
    first = _samples(class_shards / "train-000000.tar")
    classes = {json.loads(members["json"])["class"] for members in first.values()}

    assert len(classes) == 10


def test_caption_shards_round_trip(tmp_path):
    flickr = flickr_dir()
    source = CaptionSource(flickr / "captions.tsv")
    captions = {}
    for index in range(len(source)):
        captions.setdefault(source.image_path(index), set()).add(source.texts[index])

    index = write_shards([source], tmp_path, max_samples=64, limit=150)

    assert [shard.samples for shard in index.shards] == [64, 64, 22]
    for shard in tmp_path.glob("*.tar"):
        for key, members in _samples(shard).items():
            meta = json.loads(members["json"])
            assert members["jpg"] == Path(meta["path"]).read_bytes(), key
            assert members["txt"].decode() in captions[meta["path"]], key
            assert "label" not in meta, key


def test_caption_label_column_is_kept(tmp_path):
    flickr = flickr_dir()
    table = tmp_path / "labelled.csv"
    images = sorted((flickr / "images").glob("*.jpg"))[:6]
    rows = ["image,caption,label"] + [f"{path},photo {i},group{i % 2}" for i, path in enumerate(images)]
    table.write_text("\n".join(rows) + "\n")

    write_shards([CaptionSource(table)], tmp_path / "shards", shuffle=False)
    samples = _samples(tmp_path / "shards" / "train-000000.tar")

    labels = [json.loads(members["json"])["label"] for members in samples.values()]
    assert labels == ["group0", "group1"] * 3


def test_coco_shards_count(tmp_path):
    flickr = flickr_dir()
    source = CocoCaptionSource(flickr / "captions_coco_format.json")

    index = write_shards([source], tmp_path, max_samples=40, limit=100)

    assert index.total_samples == 100
    assert len(index.shards) == 3


def test_zip_archive_source_keeps_bytes(tmp_path):
    cifar = Path(flickr_dir()).parent / "cifar10"
    if not (cifar / "train.zip").is_file():
        pytest.skip(f"{cifar / 'train.zip'} not found")
    source = ClassificationSource(cifar / "train.csv", archive=cifar / "train.zip", classes_file=cifar / "classes.txt")

    write_shards([source], tmp_path, limit=20)
    samples = _samples(tmp_path / "train-000000.tar")

    assert len(samples) == 20
    for key, members in samples.items():
        assert members["jpg"][:2] == b"\xff\xd8", key
        assert json.loads(members["json"])["path"].endswith(f"in {cifar / 'train.zip'}"), key


def test_max_size_closes_shards(tmp_path):
    index = write_shards([quickstart_source()], tmp_path, max_size_mb=0.05, limit=60)

    sample_bytes = index.shards[0].bytes / index.shards[0].samples
    assert len(index.shards) > 1
    for shard in index.shards:
        assert shard.bytes <= 0.05e6 + 2 * sample_bytes + 10240, shard.name
    assert index.total_samples == 60


def test_rerun_skips_finished_shards(tmp_path):
    write_quickstart_shards(tmp_path, limit=90, max_samples=30)
    kept = tmp_path / "train-000000.tar"
    kept_mtime = kept.stat().st_mtime_ns
    rewritten = tmp_path / "train-000002.tar"
    expected = rewritten.read_bytes()
    rewritten.unlink()

    index = write_quickstart_shards(tmp_path, limit=90, max_samples=30)

    assert kept.stat().st_mtime_ns == kept_mtime
    assert rewritten.read_bytes() == expected
    assert index.total_samples == 90
    assert not list(tmp_path.glob(".*.tmp"))


def test_rerun_with_other_settings_fails(tmp_path):
    write_quickstart_shards(tmp_path, limit=20, max_samples=10)

    with pytest.raises(ValueError, match="other settings.*max_samples"):
        write_quickstart_shards(tmp_path, limit=20, max_samples=5)


def test_unreadable_images_skipped_counted_logged(tmp_path, caplog):
    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for path in sorted((QUICKSTART / "train" / name).glob("*.jpg"))[:5]:
            shutil.copy(path, root / name / path.name)
    truncated = root / "cat" / "truncated.jpg"
    truncated.write_bytes((root / "cat" / "0000.jpg").read_bytes()[:300])
    not_an_image = root / "dog" / "notes.jpg"
    not_an_image.write_text("not an image")

    index = write_shards([ClassificationSource(root, templates=None)], tmp_path / "shards")

    assert index.total_samples == 10
    assert index.skipped == 2
    assert str(truncated) in caplog.text
    assert str(not_an_image) in caplog.text


def test_invalid_pattern_rejected(tmp_path):
    with pytest.raises(ValueError, match="one %d field"):
        write_shards([quickstart_source()], tmp_path, pattern="train.tar")
