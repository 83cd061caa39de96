"""The vectorised bootstrap and ranking give bit-identical numbers to one-resample-at-a-time loops.

Each reference below is the straightforward loop: one ``torch.randint`` draw per resample
from a generator seeded with the seed, and a full stable sort per query for ranks. The fast
code must reproduce it exactly, not approximately, so that records stay comparable across
versions.
"""

import pytest
import torch

from florence.evaluation._common import first_positive_rank, target_rank
from florence.evaluation.runner import retrieval_metrics_with_ci
from florence.evaluation.stats import (
    bootstrap_cis,
    bootstrap_resamples,
    classification_metrics,
)
from tests.evaluation.features import cifar_features


def loop_interval(statistic, n: int, samples: int, seed: int) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor(
        [float(statistic(torch.randint(n, (n,), generator=generator))) for _ in range(samples)], dtype=torch.float64
    )
    tail = (1.0 - 0.95) / 2.0  # as stats computes it: 0.025 plus float rounding
    low, high = torch.quantile(values, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return low, high


def loop_classification_metrics(scores: torch.Tensor, labels: torch.Tensor, seed: int, samples: int) -> dict:
    num_classes = scores.shape[1]
    ranks = target_rank(scores.float(), labels)
    top1 = (ranks == 0).double()
    top5 = (ranks < min(5, num_classes)).double()

    def recall(rows: torch.Tensor) -> float:
        rows_per_class = torch.bincount(labels[rows], minlength=num_classes)
        correct_per_class = torch.bincount(labels[rows], weights=top1[rows], minlength=num_classes)
        present = rows_per_class > 0
        return 100.0 * float((correct_per_class[present] / rows_per_class[present]).mean())

    statistics = {
        "top1": lambda rows: 100.0 * float(top1[rows].mean()),
        "top5": lambda rows: 100.0 * float(top5[rows].mean()),
        "mean_per_class_recall": recall,
    }
    metrics = {}
    for name, statistic in statistics.items():
        metrics[name] = statistic(torch.arange(len(labels)))
        metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = loop_interval(statistic, len(labels), samples, seed)
    return metrics


def loop_retrieval_metrics(image_to_text, text_to_image, caption_to_image, ks, seed: int, samples: int) -> dict:
    num_images = len(image_to_text)
    per_image = torch.bincount(caption_to_image, minlength=num_images).double()
    statistics = {}
    for k in ks:
        image_hits = (image_to_text < k).double()
        caption_hits = torch.bincount(caption_to_image, weights=(text_to_image < k).double(), minlength=num_images)
        statistics[f"image_to_text_R@{k}"] = lambda rows, hits=image_hits: 100.0 * float(hits[rows].mean())
        statistics[f"text_to_image_R@{k}"] = lambda rows, hits=caption_hits: 100.0 * float(
            hits[rows].sum() / per_image[rows].sum()
        )
    recalls = list(statistics.values())
    statistics["mean_recall"] = lambda rows: sum(statistic(rows) for statistic in recalls) / len(recalls)

    metrics = {}
    for name, statistic in statistics.items():
        metrics[name] = statistic(torch.arange(num_images))
        metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = loop_interval(statistic, num_images, samples, seed)
    return metrics


def sorted_first_positive_rank(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    order = scores.sort(dim=1, descending=True, stable=True).indices
    hits = positives.gather(1, order)
    return torch.where(hits.any(dim=1), hits.int().argmax(dim=1), scores.shape[1])


def test_resamples_match_one_draw_each():
    generator = torch.Generator().manual_seed(5)
    expected = torch.stack([torch.randint(37, (37,), generator=generator) for _ in range(10)])

    chunks = list(bootstrap_resamples(37, 10, seed=5, max_elements=37 * 3))

    assert [len(chunk) for chunk in chunks] == [3, 3, 3, 1]
    assert torch.equal(torch.cat(chunks), expected)


@pytest.mark.parametrize("rows, classes", [(50, 3), (997, 10), (3000, 100)])
def test_classification_metrics_match_loop(rows, classes):
    generator = torch.Generator().manual_seed(rows)
    scores = torch.randn(rows, classes, generator=generator)
    scores[: rows // 4] = scores[: rows // 4].round()  # ties between classes
    labels = torch.randint(classes, (rows,), generator=generator)

    assert classification_metrics(scores, labels, seed=3, samples=300) == loop_classification_metrics(
        scores, labels, seed=3, samples=300
    )


def test_classification_metrics_match_loop_cifar():
    features, labels = cifar_features("test", 200)
    scores = features @ features[:: len(features) // 10][:10].T

    assert classification_metrics(scores, labels, seed=0, samples=1000) == loop_classification_metrics(
        scores, labels, seed=0, samples=1000
    )


def test_classification_metrics_chunked_resamples():
    scores = torch.randn(300, 7, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(300) % 7

    chunked = bootstrap_cis(
        {"top1": lambda rows: (target_rank(scores, labels)[rows] == 0).double().mean(dim=-1)},
        300,
        samples=50,
        seed=1,
    )
    reference = loop_interval(lambda rows: (target_rank(scores, labels)[rows] == 0).double().mean(), 300, 50, 1)

    assert chunked["top1"] == reference


def test_retrieval_metrics_match_loop():
    generator = torch.Generator().manual_seed(0)
    image_to_text = torch.randint(60, (40,), generator=generator)
    text_to_image = torch.randint(40, (190,), generator=generator)
    caption_to_image = torch.arange(40).repeat_interleave(5)[:190]  # the last two images have no caption
    captioned = torch.arange(38)

    fast = retrieval_metrics_with_ci(image_to_text, text_to_image, caption_to_image, [1, 5, 10], seed=2, samples=300)
    reference = loop_retrieval_metrics(
        image_to_text[captioned], text_to_image, caption_to_image, [1, 5, 10], seed=2, samples=300
    )

    assert fast == reference


def test_first_positive_rank_matches_sort():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(5, (64, 300), generator=generator).float()  # many ties
    positives = torch.rand(64, 300, generator=generator) < 0.02
    positives[0] = False
    positives[1] = True

    assert torch.equal(first_positive_rank(scores, positives), sorted_first_positive_rank(scores, positives))
