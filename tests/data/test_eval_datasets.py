import pytest
import torch

from florence.data import (
    ClassificationDataset,
    ImageLoadError,
    ImageTextDataset,
    RetrievalDataset,
    text_label,
)

# Must match the size of the ``transform`` fixture in conftest.py.
IMAGE_SIZE = 32


def test_classification_dataset_quickstart(quickstart_dir, transform):
    dataset = ClassificationDataset(
        quickstart_dir / "test", transform, classes_file=quickstart_dir / "classes.txt"
    )

    image, class_index = dataset[1999]

    assert len(dataset) == 2000
    assert dataset.classes[class_index] == "truck"
    assert image.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert dataset.targets.count(0) == 200


def test_classification_dataset_cifar_zip(cifar_dir, transform):
    dataset = ClassificationDataset(
        cifar_dir / "test.csv",
        transform,
        archive=cifar_dir / "test.zip",
        classes_file=cifar_dir / "classes.txt",
    )
    csv_labels = [
        int(line.split(",")[1]) for line in (cifar_dir / "test.csv").read_text().splitlines()[1:]
    ]

    assert dataset.targets == csv_labels
    assert dataset[5000][1] == 5
    assert dataset[5000][0].shape == (3, IMAGE_SIZE, IMAGE_SIZE)


def test_classification_dataset_raises_on_bad_image(tmp_path, quickstart_dir, transform):
    (tmp_path / "cat").mkdir()
    data = (quickstart_dir / "test" / "cat" / "0000.jpg").read_bytes()
    (tmp_path / "cat" / "0000.jpg").write_bytes(data[: len(data) // 2])
    dataset = ClassificationDataset(tmp_path, transform)

    with pytest.raises(ImageLoadError, match="cat/0000.jpg"):
        dataset[0]


def test_retrieval_dataset_tsv_and_coco_agree(flickr_dir):
    from_tsv = RetrievalDataset(flickr_dir / "captions.tsv")
    from_coco = RetrievalDataset(flickr_dir / "captions_coco_format.json")

    assert len(from_tsv) == 800
    assert len(from_tsv.captions) == 4000
    assert from_tsv.images == from_coco.images
    assert from_tsv.captions == from_coco.captions
    assert from_tsv.caption_to_image == from_coco.caption_to_image
    assert from_tsv.caption_to_image[:6] == [0, 0, 0, 0, 0, 1]
    assert from_tsv.image_to_captions[1] == [5, 6, 7, 8, 9]
    assert from_tsv.images[0] == flickr_dir / "images" / "1000268201_693b08cb0e.jpg"


def test_retrieval_dataset_returns_images(flickr_dir, transform):
    dataset = RetrievalDataset(flickr_dir / "captions.tsv", transform)
    untransformed = RetrievalDataset(flickr_dir / "captions.tsv")

    assert dataset[3].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert untransformed[0].size == (192, 256)


def test_retrieval_split_is_disjoint_and_complete(flickr_dir):
    dataset = RetrievalDataset(flickr_dir / "captions.tsv")

    train, test = dataset.split_images(600, 200, seed=0)

    assert len(train) == 600
    assert len(test) == 200
    assert set(train.images).isdisjoint(test.images)
    assert set(train.images) | set(test.images) == set(dataset.images)
    assert len(train.captions) == 3000
    assert len(test.captions) == 1000
    assert train.images == sorted(train.images, key=dataset.images.index)


def test_retrieval_split_keeps_captions_with_images(flickr_dir):
    dataset = RetrievalDataset(flickr_dir / "captions.tsv")
    captions_by_image = {
        image: [dataset.captions[c] for c in dataset.image_to_captions[i]]
        for i, image in enumerate(dataset.images)
    }

    _, test = dataset.split_images(600, 200, seed=0)

    for i, image in enumerate(test.images):
        assert [test.captions[c] for c in test.image_to_captions[i]] == captions_by_image[image]
    assert all(
        test.caption_to_image[c] == i for i, cs in enumerate(test.image_to_captions) for c in cs
    )


def test_retrieval_split_depends_on_seed(flickr_dir):
    dataset = RetrievalDataset(flickr_dir / "captions.tsv")

    first, _ = dataset.split_images(600, 200, seed=0)
    again, _ = dataset.split_images(600, 200, seed=0)
    other, _ = dataset.split_images(600, 200, seed=1)

    assert first.images == again.images
    assert first.images != other.images


def test_retrieval_split_rejects_too_many_images(flickr_dir):
    dataset = RetrievalDataset(flickr_dir / "captions.tsv")

    with pytest.raises(ValueError, match="cannot split 800 images into n_train=700 and n_test=200"):
        dataset.split_images(700, 200)


def test_retrieval_select_images_keeps_order(flickr_dir):
    dataset = RetrievalDataset(flickr_dir / "captions.tsv")

    selected = dataset.select_images(range(600, 800))

    assert selected.images == dataset.images[600:]
    assert selected.captions == dataset.captions[3000:]
    assert selected.caption_to_image[:6] == [0, 0, 0, 0, 0, 1]


def test_retrieval_train_split_as_source(flickr_dir, transform):
    train, _ = RetrievalDataset(flickr_dir / "captions.tsv").split_images(600, 200, seed=0)

    dataset = ImageTextDataset(train.to_source(), transform)
    image, text, label = dataset[7]

    assert len(dataset) == 3000
    assert text == train.captions[7]
    assert label == text_label(train.captions[7])
    assert torch.equal(image, transform(train[1]))
