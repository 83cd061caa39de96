import pytest
import torch

from florence.adapters.detection.data import (
    CocoDetection,
    collate_detection,
    horizontal_flip,
    resize_longer_side,
    resolve_split,
)
from tests.adapters.detection.helpers import shared_data


def test_resize_keeps_aspect_and_scales_boxes():
    image = torch.rand(3, 480, 640)
    boxes = torch.tensor([[64.0, 48.0, 320.0, 240.0]])

    resized, scaled, scale = resize_longer_side(image, boxes, 320)

    assert resized.shape == (3, 240, 320)
    assert scale == 0.5
    torch.testing.assert_close(scaled, torch.tensor([[32.0, 24.0, 160.0, 120.0]]))


def test_flip_mirrors_boxes():
    image = torch.zeros(3, 10, 100)
    image[:, :, :10] = 1.0

    flipped, boxes = horizontal_flip(image, torch.tensor([[0.0, 0.0, 10.0, 10.0]]))

    assert flipped[:, :, 90:].min() == 1.0
    torch.testing.assert_close(boxes, torch.tensor([[90.0, 0.0, 100.0, 10.0]]))


def test_collate_pads_to_multiple_of_32():
    batch = [(torch.rand(3, 40, 50), {}), (torch.rand(3, 70, 20), {})]

    images, _ = collate_detection(batch)

    assert images.shape == (2, 3, 96, 64)
    assert images[1, :, 70:].abs().sum() == 0


def test_coco128_item_matches_annotations(coco128):
    dataset = CocoDetection(resolve_split(coco128), max_size=320, image_range="0:4")

    image, target = dataset[0]

    assert len(dataset) == 4
    assert max(image.shape[-2:]) == 320
    assert target["size"] == tuple(image.shape[-2:])
    assert len(target["boxes"]) == len(target["labels"]) > 0
    assert target["boxes"][:, 2].max() <= image.shape[-1] + 1e-3
    assert dataset.class_names[0] == "person"


def test_odinw_split_layout():
    root = shared_data() / "odinw_packages"
    if not root.is_dir():
        pytest.skip(f"{root} not found; set FLORENCE_SHARED_DATA to the shared data folder")

    split = resolve_split(root, "valid")

    assert split.annotation_file.name == "instances_valid.json"
    assert split.image_dir == root / "images" / "valid"
    assert resolve_split(root, "val,valid").image_dir == root / "images" / "valid"
    with pytest.raises(FileNotFoundError, match="splits there"):
        resolve_split(root, "val")


def test_empty_image_range_rejected(coco128):
    with pytest.raises(ValueError, match="selects none"):
        CocoDetection(resolve_split(coco128), image_range="500:")
