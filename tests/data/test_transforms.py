import open_clip
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from florence.data import build_eval_transform, build_train_transform
from florence.data import transforms as florence_transforms
from florence.data.sources import load_rgb


@pytest.fixture(scope="module")
def photo(flickr_dir):
    """A real 192x256 (width x height) Flickr photo."""
    return load_rgb(flickr_dir / "images" / "1000268201_693b08cb0e.jpg")


def test_clip_mean_std_match_open_clip():
    assert florence_transforms.OPENAI_DATASET_MEAN == OPENAI_DATASET_MEAN
    assert florence_transforms.OPENAI_DATASET_STD == OPENAI_DATASET_STD


def test_eval_transform_matches_open_clip(photo):
    expected = open_clip.image_transform(224, is_train=False)(photo)

    actual = build_eval_transform(224)(photo)

    assert actual.shape == (3, 224, 224)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_eval_transform_crop_pct_and_rectangle(photo):
    square = build_eval_transform(64, crop_pct=0.5)(photo)
    rectangle = build_eval_transform((48, 96))(photo)

    assert square.shape == (3, 64, 64)
    assert rectangle.shape == (3, 48, 96)


def test_train_transform_random_crops(photo):
    transform = build_train_transform((64, 96), scale=(0.2, 0.5))
    torch.manual_seed(0)

    first = transform(photo)
    second = transform(photo)

    assert first.shape == (3, 64, 96)
    assert first.dtype == torch.float32
    assert not torch.equal(first, second)


def test_train_transform_hflip_off_is_reproducible(photo):
    # With scale (1, 1) and a square photo crop, only the flip could differ between calls.
    transform = build_train_transform(64, scale=(1.0, 1.0), hflip=False)
    square = photo.crop((0, 0, 192, 192))

    torch.manual_seed(0)
    outputs = [transform(square) for _ in range(4)]

    assert all(torch.equal(outputs[0], output) for output in outputs[1:])


@pytest.mark.parametrize("image_size", [0, (32,), (32, -1)])
def test_transforms_reject_bad_sizes(image_size):
    with pytest.raises(ValueError, match="image_size"):
        build_eval_transform(image_size)
    with pytest.raises(ValueError, match="image_size"):
        build_train_transform(image_size)


def test_transforms_reject_bad_scale_and_crop_pct():
    with pytest.raises(ValueError, match="scale"):
        build_train_transform(32, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="crop_pct"):
        build_eval_transform(32, crop_pct=1.5)
