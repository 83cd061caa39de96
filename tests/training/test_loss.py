import math

import pytest
import torch
import torch.nn.functional as F

from florence.training.loss import unicl_loss


def _features(batch: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    return images, texts


def test_distinct_labels_equal_open_clip_clip_loss():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    images, texts = _features(16, 32, seed=0)
    labels = torch.arange(16)
    scale = torch.tensor(14.3, dtype=torch.float64)

    expected = open_clip_loss.ClipLoss()(images, texts, scale)
    actual = unicl_loss(images, texts, labels, scale)

    assert actual.item() == pytest.approx(expected.item(), abs=1e-6)


def test_duplicate_labels_match_hand_computation():
    # Two images share label 7, so each of them has two positive texts and vice versa.
    images = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    texts = torch.tensor([[0.8, 0.6], [1.0, 0.0], [-0.6, 0.8]], dtype=torch.float64)
    labels = torch.tensor([7, 7, 3])
    scale = 2.0

    logits = [[scale * sum(a * b for a, b in zip(u, v)) for v in texts.tolist()] for u in images.tolist()]
    positives = [[labels[i] == labels[k] for k in range(3)] for i in range(3)]

    def row_loss(scores: list[float], mask: list[bool]) -> float:
        log_normaliser = math.log(sum(math.exp(s) for s in scores))
        picked = [s - log_normaliser for s, m in zip(scores, mask) if m]
        return -sum(picked) / len(picked)

    image_to_text = sum(row_loss(logits[i], positives[i]) for i in range(3)) / 3
    columns = [[logits[i][j] for i in range(3)] for j in range(3)]
    text_to_image = sum(row_loss(columns[j], [positives[i][j] for i in range(3)]) for j in range(3)) / 3
    expected = (image_to_text + text_to_image) / 2

    actual = unicl_loss(images, texts, labels, scale)

    assert actual.item() == pytest.approx(expected, abs=1e-6)


def test_duplicate_labels_differ_from_infonce():
    images, texts = _features(8, 16, seed=1)
    unique = unicl_loss(images, texts, torch.arange(8), 10.0)
    shared = unicl_loss(images, texts, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 10.0)

    assert not torch.isclose(unique, shared)


def test_loss_runs_in_float32_for_bf16_features():
    images, texts = _features(8, 16, seed=2)
    loss = unicl_loss(images.bfloat16(), texts.bfloat16(), torch.arange(8), 10.0)

    assert loss.dtype == torch.float32


def test_mismatched_shapes_rejected():
    images, texts = _features(8, 16, seed=3)
    with pytest.raises(ValueError, match="same shape"):
        unicl_loss(images, texts[:4], torch.arange(8), 10.0)
    with pytest.raises(ValueError, match="one label per sample"):
        unicl_loss(images, texts, torch.arange(4), 10.0)
