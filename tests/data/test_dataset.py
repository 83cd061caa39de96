import csv
import logging
import zipfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from florence.data import (
    CaptionSource,
    ClassificationSource,
    CocoCaptionSource,
    ImageLoadError,
    ImageTextDataset,
    collate_image_text,
    text_label,
)

# Must match the size of the ``transform`` fixture in conftest.py.
IMAGE_SIZE = 32


@pytest.fixture
def bad_files(tmp_path, quickstart_dir) -> dict[str, Path]:
    """One good CIFAR-10 image and three unreadable files made from its JPEG bytes."""
    photo = quickstart_dir / "test" / "cat" / "0000.jpg"
    data = photo.read_bytes()
    paths = {
        "good": photo,
        "truncated": tmp_path / "truncated.jpg",
        "not_image": tmp_path / "notes.jpg",
        "missing": tmp_path / "missing.jpg",
    }
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["not_image"].write_text("this file is a text note, not a JPEG\n")
    return paths


@pytest.fixture
def bad_caption_file(tmp_path, bad_files) -> Path:
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for name, image in bad_files.items():
            writer.writerow([str(image), f"caption of the {name} file"])
    return path


def test_dataset_mixes_sources(flickr_dir, cifar_dir, quickstart_dir, transform):
    captions = CaptionSource(flickr_dir / "captions.tsv")
    cifar = ClassificationSource(cifar_dir / "test.csv", archive=cifar_dir / "test.zip")
    quickstart = ClassificationSource(quickstart_dir / "test")
    dataset = ImageTextDataset([captions, cifar, quickstart], transform)

    assert len(dataset) == 4000 + 10000 + 2000
    assert dataset.locate(3999) == (captions, 3999)
    assert dataset.locate(4000) == (cifar, 0)
    assert dataset.locate(14000) == (quickstart, 0)
    assert dataset.locate(-1) == (quickstart, 1999)

    image, text, label = dataset[0]
    assert image.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert text == "A child in a pink dress is climbing up a set of stairs in an entry way ."
    assert label == text_label(text)

    image, text, label = dataset[4000]
    assert image.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert "airplane" in text
    assert label == text_label("airplane")

    _, _, quickstart_label = dataset[15999]
    _, _, cifar_label = dataset[13999]
    assert quickstart_label == cifar_label == text_label("truck")


def test_dataset_index_out_of_range(quickstart_dir, transform):
    dataset = ImageTextDataset(ClassificationSource(quickstart_dir / "test"), transform)

    with pytest.raises(IndexError, match="index 2000 out of range for 2000 samples"):
        dataset[2000]


def test_dataset_draw_is_deterministic(quickstart_dir, transform):
    source = ClassificationSource(quickstart_dir / "test")
    indices = range(0, 2000, 50)
    first = ImageTextDataset(source, transform, seed=7)
    resumed = ImageTextDataset(source, transform, seed=7)
    first.set_epoch(3)
    resumed.set_epoch(3)

    texts = [first.text(i) for i in indices]

    assert texts == [resumed.text(i) for i in indices]
    assert texts == [first[i][1] for i in indices]
    assert texts == [first.text(i) for i in indices]


def test_dataset_draw_varies_by_seed_epoch(quickstart_dir, transform):
    source = ClassificationSource(quickstart_dir / "test")
    indices = range(0, 2000, 50)
    dataset = ImageTextDataset(source, transform, seed=7)
    other_seed = ImageTextDataset(source, transform, seed=8)

    epoch_0 = [dataset.text(i) for i in indices]
    dataset.set_epoch(1)
    epoch_1 = [dataset.text(i) for i in indices]

    assert epoch_0 != epoch_1
    assert epoch_0 != [other_seed.text(i) for i in indices]
    assert [dataset.label(i) for i in indices] == [source.label(i) for i in indices]


def test_dataset_workers_get_same_texts(cifar_dir, transform):
    source = ClassificationSource(cifar_dir / "test.csv", archive=cifar_dir / "test.zip")
    dataset = ImageTextDataset(source, transform, seed=3)
    dataset.set_epoch(2)
    loader = DataLoader(dataset, batch_size=16, num_workers=2, collate_fn=collate_image_text)

    batches = [batch for _, batch in zip(range(4), loader, strict=False)]

    texts = [text for batch in batches for text in batch[1]]
    assert texts == [dataset.text(i) for i in range(64)]
    assert torch.equal(batches[3][0], torch.stack([dataset[i][0] for i in range(48, 64)]))


def test_dataset_skips_bad_files_and_counts(bad_caption_file, bad_files, transform, caplog):
    dataset = ImageTextDataset(CaptionSource(bad_caption_file), transform)

    with caplog.at_level(logging.WARNING, logger="florence.data.dataset"):
        samples = [dataset[i] for i in range(4)] + [dataset[i] for i in range(4)]

    assert samples[0] is not None
    assert samples[1:4] == [None, None, None]
    assert dataset.num_skipped == 6
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 3
    for name in ("truncated", "not_image", "missing"):
        assert sum(str(bad_files[name]) in message for message in warnings) == 1


def test_dataset_strict_raises_with_path(bad_caption_file, bad_files, transform):
    dataset = ImageTextDataset(CaptionSource(bad_caption_file), transform, strict=True)

    assert dataset[0] is not None
    for index, name in enumerate(("truncated", "not_image", "missing"), start=1):
        with pytest.raises(ImageLoadError) as info:
            dataset[index]
        assert str(bad_files[name]) in str(info.value)
        assert "strict=False" in str(info.value)


def test_dataset_skips_bad_zip_entries(tmp_path, quickstart_dir, transform):
    data = (quickstart_dir / "test" / "cat" / "0000.jpg").read_bytes()
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cat/0000.jpg", data)
        zf.writestr("cat/0001.jpg", data[: len(data) // 2])
    listing = tmp_path / "images.csv"
    listing.write_text("path,class_name\ncat/0000.jpg,cat\ncat/0001.jpg,cat\ncat/0002.jpg,cat\n")
    source = ClassificationSource(listing, archive=archive)

    dataset = ImageTextDataset(source, transform)
    strict = ImageTextDataset(source, transform, strict=True)

    assert dataset[0] is not None
    assert dataset[1] is None
    assert dataset[2] is None
    assert dataset.num_skipped == 2
    with pytest.raises(ImageLoadError, match=f"cat/0002.jpg in {archive}"):
        strict[2]


def test_collate_drops_skipped_samples(bad_caption_file, transform):
    dataset = ImageTextDataset(CaptionSource(bad_caption_file), transform)
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_image_text)

    images, texts, labels, skipped = next(iter(loader))

    assert images.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert texts == ["caption of the good file"]
    assert labels.dtype == torch.long
    assert labels.tolist() == [text_label("caption of the good file")]
    assert skipped == 3


def test_collate_all_skipped_returns_empty_batch():
    images, texts, labels, skipped = collate_image_text([None, None])

    assert images.shape[0] == 0
    assert texts == []
    assert labels.shape == (0,)
    assert skipped == 2


def test_collate_keeps_63_bit_labels(flickr_dir, transform):
    dataset = ImageTextDataset(
        CocoCaptionSource(flickr_dir / "captions_coco_format.json"), transform
    )

    _, texts, labels, _ = collate_image_text([dataset[i] for i in range(10)])

    assert labels.tolist() == [text_label(text) for text in texts]
