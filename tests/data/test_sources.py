import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from florence.data import (
    TRAIN_TEMPLATES,
    CaptionSource,
    ClassificationSource,
    CocoCaptionSource,
    text_label,
)

CIFAR_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def write_csv(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_caption_source_flickr_tsv(flickr_dir):
    source = CaptionSource(flickr_dir / "captions.tsv")

    assert len(source) == 4000
    assert source.image_path(0) == str(flickr_dir / "images" / "1000268201_693b08cb0e.jpg")
    assert source.text(0, rng()) == (
        "A child in a pink dress is climbing up a set of stairs in an entry way ."
    )
    assert source.label(0) == text_label(source.text(0, rng()))
    assert source.load_image(0).mode == "RGB"
    assert source.load_image(0).size == (192, 256)


def test_caption_source_reads_quoted_tsv_caption(flickr_dir):
    # This caption is stored with CSV quoting: "Young boy with a black "" ADHD "" t-shirt ...".
    source = CaptionSource(flickr_dir / "captions.tsv")

    quoted = [text for text in source.texts if '"' in text]

    assert 'Young boy with a black " ADHD " t-shirt nodding off' in quoted
    assert all(not text.startswith('"') for text in quoted)


def test_caption_source_identical_captions_share_label(flickr_dir):
    # Two different photos in this subset carry the caption "A dog in a field .".
    source = CaptionSource(flickr_dir / "captions.tsv")

    matches = [i for i, text in enumerate(source.texts) if text == "A dog in a field ."]

    assert len(matches) == 2
    assert source.image_path(matches[0]) != source.image_path(matches[1])
    assert source.label(matches[0]) == source.label(matches[1])
    assert len(set(source.labels)) == len(set(source.texts))


def test_coco_caption_source_matches_tsv(flickr_dir):
    coco = CocoCaptionSource(flickr_dir / "captions_coco_format.json")
    table = CaptionSource(flickr_dir / "captions.tsv")

    assert len(coco) == 4000
    assert coco.texts == table.texts
    assert coco.image_paths == table.image_paths
    assert coco.labels == table.labels
    assert coco.load_image(4).size == (192, 256)


def test_caption_source_label_column_groups_rows(tmp_path, flickr_dir):
    images = sorted((flickr_dir / "images").glob("*.jpg"))[:4]
    rows = [
        [str(images[0]), "a dog runs on grass", "dog"],
        [str(images[1]), "a brown dog in the snow", "dog"],
        [str(images[2]), "two children on a bench", ""],
        [str(images[3]), "two children on a bench", ""],
    ]
    path = write_csv(tmp_path / "pairs.csv", ["image", "caption", "label"], rows)

    source = CaptionSource(path)

    assert source.label(0) == source.label(1)
    assert source.label(0) == text_label("label:dog")
    assert source.label(2) == text_label("two children on a bench")
    assert source.label(2) == source.label(3)
    assert source.label(0) != source.label(2)
    assert source.text(1, rng()) == "a brown dog in the snow"


def test_caption_source_jsonl_int_labels(tmp_path, flickr_dir):
    image_dir = tmp_path / "photos"
    image_dir.mkdir()
    names = sorted(p.name for p in (flickr_dir / "images").glob("*.jpg"))[:3]
    for name in names:
        shutil.copy(flickr_dir / "images" / name, image_dir / name)
    lines = [
        {"file": f"photos/{names[0]}", "text": "a girl on stairs", "class": 3},
        {"file": f"photos/{names[1]}", "text": "two dogs", "class": "3"},
        {"file": f"photos/{names[2]}", "text": "two dogs"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")

    source = CaptionSource(path, image_key="file", caption_key="text", label_key="class")

    assert len(source) == 3
    assert source.image_path(0) == str(image_dir / names[0])
    assert source.load_image(0).mode == "RGB"
    assert source.label(0) == source.label(1)
    assert source.label(2) == text_label("two dogs")
    assert source.label(1) != source.label(2)


def test_caption_source_label_key_none(tmp_path, flickr_dir):
    image = str(next((flickr_dir / "images").glob("*.jpg")))
    path = write_csv(tmp_path / "pairs.csv", ["image", "caption", "label"], [[image, "a cat", "x"]])

    source = CaptionSource(path, label_key=None)

    assert source.label(0) == text_label("a cat")


@pytest.mark.parametrize("caption", ["", "   "])
def test_caption_source_empty_caption_error(tmp_path, flickr_dir, caption):
    image = str(next((flickr_dir / "images").glob("*.jpg")))
    rows = [[image, "a dog"], [image, "a cat"], [image, caption]]
    path = write_csv(tmp_path / "pairs.tsv", ["image", "caption"], rows, delimiter="\t")

    with pytest.raises(ValueError, match=r"pairs\.tsv, line 4: empty caption in column 'caption'"):
        CaptionSource(path)


def test_caption_source_missing_column_lists_columns(tmp_path):
    path = write_csv(tmp_path / "pairs.csv", ["path", "caption"], [["a.jpg", "a dog"]])

    with pytest.raises(
        ValueError, match=r"missing column 'image'\. Columns: \['caption', 'path'\]"
    ):
        CaptionSource(path)


def test_caption_source_rejects_unknown_suffix(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("image,caption\na.jpg,a dog\n")

    with pytest.raises(ValueError, match=r"expected a \.csv, \.tsv or \.jsonl suffix"):
        CaptionSource(path)


def test_coco_source_empty_caption_error(tmp_path, flickr_dir):
    coco = json.loads((flickr_dir / "captions_coco_format.json").read_text())
    coco["annotations"][7]["caption"] = " "
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))

    with pytest.raises(ValueError, match=r"annotation 7 \(id 7\): empty caption"):
        CocoCaptionSource(path, image_root=flickr_dir)


def test_classification_source_cifar_zip_csv(cifar_dir):
    source = ClassificationSource(
        cifar_dir / "test.csv",
        archive=cifar_dir / "test.zip",
        classes_file=cifar_dir / "classes.txt",
    )

    assert len(source) == 10000
    assert source.classes == CIFAR_CLASSES
    assert source.targets[:2] == [0, 0]
    assert source.targets[-1] == 9
    assert source.image_path(0) == f"test/airplane/0000.jpg in {cifar_dir / 'test.zip'}"
    image = source.load_image(9999)
    assert image.mode == "RGB"
    assert image.size == (32, 32)


def test_classification_source_zip_folder_prefix(cifar_dir):
    by_folder = ClassificationSource("test", archive=cifar_dir / "test.zip")
    by_csv = ClassificationSource(cifar_dir / "test.csv", archive=cifar_dir / "test.zip")

    assert by_folder.classes == CIFAR_CLASSES
    assert by_folder.targets == by_csv.targets
    assert [by_folder.image_path(i) for i in range(0, 10000, 997)] == [
        by_csv.image_path(i) for i in range(0, 10000, 997)
    ]


def test_classification_source_quickstart_folders(quickstart_dir):
    source = ClassificationSource(
        quickstart_dir / "test", classes_file=quickstart_dir / "classes.txt"
    )

    assert len(source) == 2000
    assert source.classes == CIFAR_CLASSES
    assert source.targets.count(3) == 200
    assert source.image_path(600) == str(quickstart_dir / "test" / "cat" / "0000.jpg")
    assert source.load_image(600).size == (32, 32)


def test_classification_source_label_ignores_template(quickstart_dir):
    source = ClassificationSource(quickstart_dir / "test", templates=TRAIN_TEMPLATES)
    cats = [i for i, target in enumerate(source.targets) if target == 3]
    generator = rng(0)

    texts = {source.text(i, generator) for i in cats}
    labels = {source.label(i) for i in cats}

    assert len(texts) > 50
    assert all("cat" in text for text in texts)
    assert labels == {text_label("cat")}
    assert source.label(0) == text_label("airplane")
    assert source.label(0) != source.label(cats[0])


def test_classification_source_bare_names(quickstart_dir):
    source = ClassificationSource(quickstart_dir / "test", templates=None)

    assert source.text(0, rng()) == "airplane"
    assert source.text(1999, rng()) == "truck"


def test_classification_source_underscores_become_spaces(tmp_path, quickstart_dir):
    for folder, name in [("golden_retriever", "dog"), ("tabby_cat", "cat")]:
        shutil.copytree(quickstart_dir / "test" / name, tmp_path / folder)

    source = ClassificationSource(tmp_path, templates=["a photo of a {}."])

    assert source.classes == ["golden retriever", "tabby cat"]
    assert source.text(0, rng()) == "a photo of a golden retriever."
    assert source.label(0) == text_label("golden retriever")


def test_class_label_matches_caption(tmp_path, quickstart_dir, flickr_dir):
    # UniCL: an image labelled "dog" and a caption that reads exactly "dog" are positives.
    shutil.copytree(quickstart_dir / "test" / "dog", tmp_path / "classes" / "dog")
    image = str(next((flickr_dir / "images").glob("*.jpg")))
    path = write_csv(tmp_path / "pairs.csv", ["image", "caption"], [[image, "dog"]])

    classes = ClassificationSource(tmp_path / "classes")
    captions = CaptionSource(path)

    assert classes.label(0) == captions.label(0)


def test_classification_source_unlisted_class_raises(tmp_path, quickstart_dir):
    for name in ("cat", "dog"):
        shutil.copytree(quickstart_dir / "test" / name, tmp_path / "images" / name)
    (tmp_path / "classes.txt").write_text("cat\nbird\n")

    with pytest.raises(ValueError, match=r"classes \['dog'\] .* are not listed in"):
        ClassificationSource(tmp_path / "images", classes_file=tmp_path / "classes.txt")


def test_classification_source_missing_root_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="class folder root not found"):
        ClassificationSource(tmp_path / "absent")


@pytest.mark.parametrize("templates", [["a photo of a dog."], ["{} and {}"], ["{name}"], []])
def test_classification_source_rejects_bad_templates(quickstart_dir, templates):
    with pytest.raises(ValueError, match="template"):
        ClassificationSource(quickstart_dir / "test", templates=templates)
