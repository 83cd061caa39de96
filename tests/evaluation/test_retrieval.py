import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from florence.evaluation import encode_images, encode_texts, evaluate_retrieval, retrieval_metrics

R = math.sqrt(0.5)

# Three images on the first three axes of a 4-d space, so the score of image i for a
# caption is the caption's i-th component. Ranks below are 0-based, and on a tie the
# lower index ranks first.
HAND_IMAGES = torch.eye(4)[:3]
HAND_CAPTIONS = torch.tensor(
    [
        [0.6, 0.8, 0.0, 0.0],  # c0, image 0: image 1 scores higher, rank 1
        [0.0, 0.6, 0.8, 0.0],  # c1, image 0: images 2 and 1 score higher, rank 2
        [0.8, 0.6, 0.0, 0.0],  # c2, image 1: image 0 scores higher, rank 1
        [0.6, 0.8, 0.0, 0.0],  # c3, image 1: rank 0
        [0.0, 0.0, 1.0, 0.0],  # c4, image 2: rank 0
        [0.5, 0.5, 0.0, R],  # c5, image 1: tie with image 0, which ranks first, rank 1
        [0.5, 0.5, 0.0, R],  # c6, image 0: tie with image 1, rank 0
        [0.0, 0.0, 1.0, 0.0],  # c7, image 0: image 2 scores higher, image 1 ties but ranks after, rank 1
    ]
)
HAND_CAPTION_TO_IMAGE = [0, 0, 1, 1, 2, 1, 0, 0]
# Image to text, best-ranked own caption:
#   image 0 (c0, c1, c6, c7): scores c2 .8, then c0 and c3 tie at .6 -> c0 at rank 1
#   image 1 (c2, c3, c5): c0 and c3 tie at .8, c0 first -> c3 at rank 1
#   image 2 (c4): c4 and c7 tie at 1.0, c4 first -> rank 0
# Text to image ranks: c0..c7 = 1, 2, 1, 0, 0, 1, 0, 1


def hand_expected(ks: tuple[int, ...], text_to_image_ranks: list[int], image_to_text_ranks: list[int]) -> dict:
    expected = {}
    for k in ks:
        expected[f"image_to_text_R@{k}"] = (
            100.0 * sum(rank < k for rank in image_to_text_ranks) / len(image_to_text_ranks)
        )
    for k in ks:
        expected[f"text_to_image_R@{k}"] = (
            100.0 * sum(rank < k for rank in text_to_image_ranks) / len(text_to_image_ranks)
        )
    expected["mean_recall"] = sum(expected.values()) / len(expected)
    return expected


def test_retrieval_metrics_hand_example():
    metrics = retrieval_metrics(HAND_IMAGES, HAND_CAPTIONS, HAND_CAPTION_TO_IMAGE, ks=(1, 2, 3))

    assert list(metrics) == [
        "image_to_text_R@1",
        "image_to_text_R@2",
        "image_to_text_R@3",
        "text_to_image_R@1",
        "text_to_image_R@2",
        "text_to_image_R@3",
        "mean_recall",
    ]
    assert metrics["image_to_text_R@1"] == 100 * 1 / 3
    assert metrics["image_to_text_R@2"] == 100.0
    assert metrics["image_to_text_R@3"] == 100.0
    assert metrics["text_to_image_R@1"] == 100 * 3 / 8
    assert metrics["text_to_image_R@2"] == 100 * 7 / 8
    assert metrics["text_to_image_R@3"] == 100.0
    assert metrics["mean_recall"] == pytest.approx((100 / 3 + 100 + 100 + 37.5 + 87.5 + 100) / 6, abs=1e-12)


def test_retrieval_metrics_default_ks():
    metrics = retrieval_metrics(HAND_IMAGES, HAND_CAPTIONS, HAND_CAPTION_TO_IMAGE)

    assert metrics == pytest.approx(hand_expected((1, 5, 10), [1, 2, 1, 0, 0, 1, 0, 1], [1, 1, 0]), abs=1e-12)


def test_retrieval_metrics_ignores_feature_scale():
    scales = torch.arange(1, len(HAND_CAPTIONS) + 1, dtype=torch.float32)[:, None]

    scaled = retrieval_metrics(3.0 * HAND_IMAGES, scales * HAND_CAPTIONS, HAND_CAPTION_TO_IMAGE, ks=(1, 2, 3))
    unscaled = retrieval_metrics(HAND_IMAGES, HAND_CAPTIONS, HAND_CAPTION_TO_IMAGE, ks=(1, 2, 3))

    assert scaled == unscaled


def test_retrieval_metrics_uncaptioned_image():
    # Image 3 has no caption: it is no image-to-text query, but as a text-to-image
    # candidate it outranks the true images of c5 (now rank 2) and c6 (now rank 1).
    images = torch.eye(4)

    metrics = retrieval_metrics(images, HAND_CAPTIONS, HAND_CAPTION_TO_IMAGE, ks=(1, 2, 3))

    assert metrics == pytest.approx(hand_expected((1, 2, 3), [1, 2, 1, 0, 0, 2, 1, 1], [1, 1, 0]), abs=1e-12)


def test_retrieval_metrics_accepts_tensor_index():
    as_list = retrieval_metrics(HAND_IMAGES, HAND_CAPTIONS, HAND_CAPTION_TO_IMAGE)
    as_tensor = retrieval_metrics(HAND_IMAGES, HAND_CAPTIONS, torch.tensor(HAND_CAPTION_TO_IMAGE))

    assert as_tensor == as_list


@pytest.mark.parametrize(
    ("images", "captions", "caption_to_image", "message"),
    [
        (
            HAND_IMAGES,
            HAND_CAPTIONS,
            [0, 0, 1, 1, 2, 1, 0, 3],
            r"caption_to_image\[7\] = 3 is out of range for 3 images",
        ),
        (HAND_IMAGES, HAND_CAPTIONS, [0, 0, 1, 1, 2, 1, 0, -1], r"caption_to_image\[7\] = -1 is out of range"),
        (HAND_IMAGES, HAND_CAPTIONS, [0, 0, 1], "caption_to_image has 3 entries but there are 8 captions"),
        (HAND_IMAGES, HAND_CAPTIONS, [0.0] * 8, "integer image indices"),
        (
            HAND_IMAGES,
            HAND_CAPTIONS[:, :3],
            HAND_CAPTION_TO_IMAGE,
            "image_features have size 4 but text_features have size 3",
        ),
        (HAND_IMAGES[:0], HAND_CAPTIONS, HAND_CAPTION_TO_IMAGE, r"image_features must be a tensor \[N, D\] with N > 0"),
        (HAND_IMAGES, HAND_CAPTIONS[0], HAND_CAPTION_TO_IMAGE, r"text_features must be a tensor \[N, D\]"),
        (HAND_IMAGES * float("nan"), HAND_CAPTIONS, HAND_CAPTION_TO_IMAGE, "image_features contain NaN"),
    ],
)
def test_retrieval_metrics_rejects_invalid_input(images, captions, caption_to_image, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(images, captions, caption_to_image)


@pytest.mark.parametrize(
    ("ks", "error"), [((), ValueError), ((1, 0), ValueError), ((1, 2.5), ValueError), (5, TypeError)]
)
def test_retrieval_metrics_rejects_invalid_ks(ks, error):
    with pytest.raises(error, match="ks"):
        retrieval_metrics(HAND_IMAGES, HAND_CAPTIONS, HAND_CAPTION_TO_IMAGE, ks=ks)


def clip_benchmark_recalls(image_features: torch.Tensor, text_features: torch.Tensor, caption_to_image, ks) -> dict:
    """Compute recall@k with clip_benchmark's own functions, renamed to florence's keys."""
    zeroshot_retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    scores = text_features @ image_features.T
    positive_pairs = torch.zeros_like(scores, dtype=torch.bool)
    positive_pairs[torch.arange(len(scores)), caption_to_image] = True

    recalls = {}
    for k in ks:
        # clip_benchmark's "text retrieval" is the image-to-text direction.
        hits = zeroshot_retrieval.batchify(zeroshot_retrieval.recall_at_k, scores.T, positive_pairs.T, 64, "cpu", k=k)
        recalls[f"image_to_text_R@{k}"] = 100.0 * (hits > 0).float().mean().item()
    for k in ks:
        hits = zeroshot_retrieval.batchify(zeroshot_retrieval.recall_at_k, scores, positive_pairs, 64, "cpu", k=k)
        recalls[f"text_to_image_R@{k}"] = 100.0 * (hits > 0).float().mean().item()
    return recalls


def test_recall_matches_clip_benchmark_random():
    generator = torch.Generator().manual_seed(0)
    num_images, captions_per_image = 60, 5
    image_features = torch.randn(num_images, 16, generator=generator)
    caption_to_image = torch.arange(num_images).repeat_interleave(captions_per_image)
    caption_to_image = caption_to_image[torch.randperm(len(caption_to_image), generator=generator)]
    # Captions near their image, with enough noise that many queries miss at k=1.
    text_features = image_features[caption_to_image] + 1.5 * torch.randn(len(caption_to_image), 16, generator=generator)

    ours = retrieval_metrics(image_features, text_features, caption_to_image, ks=(1, 5, 10))
    reference = clip_benchmark_recalls(image_features, text_features, caption_to_image, ks=(1, 5, 10))

    assert 0.0 < ours["text_to_image_R@1"] < 100.0
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, abs=1e-4), key


def test_recall_matches_clip_benchmark_model(tiny_clip, tokenizer, flickr8k):
    images, captions, caption_to_image = flickr8k
    with torch.no_grad():
        image_features = tiny_clip.encode_image(images)
        text_features = tiny_clip.encode_text(tokenizer(captions))

    ours = retrieval_metrics(image_features, text_features, caption_to_image, ks=(1, 5))
    reference = clip_benchmark_recalls(image_features, text_features, caption_to_image, ks=(1, 5))

    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, abs=1e-4), key


def test_evaluate_retrieval_matches_features(tiny_clip, tokenizer, flickr8k):
    images, captions, caption_to_image = flickr8k
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(0)).tolist()
    captions = [captions[i] for i in order]
    caption_to_image = [caption_to_image[i] for i in order]
    loader = DataLoader(TensorDataset(images), batch_size=3)

    metrics = evaluate_retrieval(tiny_clip, tokenizer, loader, captions, caption_to_image, ks=(1, 5), batch_size=16)

    with torch.no_grad():
        image_features = tiny_clip.encode_image(images)
        text_features = tiny_clip.encode_text(tokenizer(captions))
    assert metrics == pytest.approx(retrieval_metrics(image_features, text_features, caption_to_image, ks=(1, 5)))


def test_evaluate_retrieval_rejects_length_mismatch(tiny_clip, tokenizer, flickr8k):
    images, captions, caption_to_image = flickr8k
    loader = DataLoader(TensorDataset(images), batch_size=4)

    with pytest.raises(ValueError, match=f"got {len(captions)} captions but {len(captions) - 1} entries"):
        evaluate_retrieval(tiny_clip, tokenizer, loader, captions, caption_to_image[:-1])


def test_evaluate_retrieval_rejects_missing_image(tiny_clip, tokenizer, flickr8k):
    images, captions, caption_to_image = flickr8k
    loader = DataLoader(TensorDataset(images[:-1]), batch_size=4)

    with pytest.raises(ValueError, match=f"is out of range for {len(images) - 1} images"):
        evaluate_retrieval(tiny_clip, tokenizer, loader, captions, caption_to_image)


def test_encode_images_matches_model(tiny_clip, flickr8k):
    images, _, _ = flickr8k

    features = encode_images(tiny_clip, DataLoader(TensorDataset(images), batch_size=3))

    with torch.no_grad():
        expected = tiny_clip.encode_image(images, normalize=True)
    assert features.shape == expected.shape
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)


def test_encode_images_accepts_tensor_batches(tiny_clip, flickr8k):
    images, _, _ = flickr8k

    from_tensors = encode_images(tiny_clip, [images[:5], images[5:]])
    from_tuples = encode_images(tiny_clip, [(images[:5], "ignored"), (images[5:], "ignored")])

    assert torch.equal(from_tensors, from_tuples)


def test_encode_images_rejects_empty_loader(tiny_clip):
    with pytest.raises(ValueError, match="no batches"):
        encode_images(tiny_clip, [])


def test_encode_texts_matches_model(tiny_clip, tokenizer, flickr8k):
    _, captions, _ = flickr8k

    features = encode_texts(tiny_clip, tokenizer, captions, batch_size=7)

    with torch.no_grad():
        expected = tiny_clip.encode_text(tokenizer(captions), normalize=True)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("texts", "batch_size", "error", "message"),
    [
        ([], 8, ValueError, "texts is empty"),
        ("a dog", 8, TypeError, "must be a list of strings"),
        (["a dog"], 0, ValueError, "invalid batch_size 0"),
    ],
)
def test_encode_texts_rejects_invalid_input(tiny_clip, tokenizer, texts, batch_size, error, message):
    with pytest.raises(error, match=message):
        encode_texts(tiny_clip, tokenizer, texts, batch_size=batch_size)
