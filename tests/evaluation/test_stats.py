import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

from florence.evaluation.probe import knn
from florence.evaluation.stats import bootstrap_ci, classification_metrics
from tests.evaluation.features import cifar_features


@pytest.fixture(scope="module")
def knn_scores() -> tuple[torch.Tensor, torch.Tensor]:
    """k-NN scores of 2,000 real CIFAR-10 test photos, with their labels.

    Every training row votes, so that no two classes tie and sklearn's tie rule does not matter.
    """
    train_features, train_labels = cifar_features("train", 300)
    test_features, test_labels = cifar_features("test", 200)
    scores = knn(train_features, train_labels, test_features, test_labels, k=len(train_features))
    return scores, test_labels


def test_metrics_match_sklearn(knn_scores):
    scores, labels = knn_scores
    metrics = classification_metrics(scores, labels, samples=100)

    assert metrics["top1"] == pytest.approx(100 * top_k_accuracy_score(labels, scores, k=1))
    assert metrics["top5"] == pytest.approx(100 * top_k_accuracy_score(labels, scores, k=5))
    assert metrics["mean_per_class_recall"] == pytest.approx(100 * balanced_accuracy_score(labels, scores.argmax(1)))


def test_ci_contains_point_estimate(knn_scores):
    scores, labels = knn_scores
    metrics = classification_metrics(scores, labels)

    for name in ("top1", "top5", "mean_per_class_recall"):
        assert metrics[f"{name}_ci_low"] < metrics[name] < metrics[f"{name}_ci_high"]


def test_ci_narrows_with_more_rows(knn_scores):
    scores, labels = knn_scores
    few_rows = torch.arange(0, len(labels), 10)
    small = classification_metrics(scores[few_rows], labels[few_rows])
    large = classification_metrics(scores, labels)

    small_width = small["top1_ci_high"] - small["top1_ci_low"]
    large_width = large["top1_ci_high"] - large["top1_ci_low"]
    # The width of a proportion's interval scales as 1 / sqrt(rows): 10x the rows, about a third.
    assert large_width < 0.5 * small_width


def test_ci_deterministic_by_seed(knn_scores):
    scores, labels = knn_scores

    first = classification_metrics(scores, labels, seed=3, samples=200)
    second = classification_metrics(scores, labels, seed=3, samples=200)
    other_seed = classification_metrics(scores, labels, seed=4, samples=200)

    assert first == second
    assert first["top1_ci_low"] != other_seed["top1_ci_low"] or first["top1_ci_high"] != other_seed["top1_ci_high"]


def test_bootstrap_ci_of_constant():
    low, high = bootstrap_ci(lambda rows: 7.0, 50, samples=20)

    assert low == 7.0
    assert high == 7.0


def test_bootstrap_ci_resamples_with_replacement():
    draws = []
    bootstrap_ci(lambda rows: draws.append(rows) or 0.0, 100, samples=5, seed=1)

    assert len(draws) == 5
    assert all(len(rows) == 100 for rows in draws)
    assert any(len(rows.unique()) < 100 for rows in draws)


def test_top5_with_fewer_classes_is_top_c():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    metrics = classification_metrics(scores, torch.tensor([2, 0]), samples=10)

    assert metrics["top1"] == 50.0
    assert metrics["top5"] == 100.0


@pytest.mark.parametrize(
    ("scores", "labels", "error"),
    [
        (torch.zeros(3), torch.zeros(3, dtype=torch.long), ValueError),
        (torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), ValueError),
        (torch.zeros(3, 2), torch.tensor([0, 1, 2]), ValueError),
        (torch.zeros(3, 2), torch.zeros(3), TypeError),
        (torch.tensor([[0.0, float("nan")]]), torch.tensor([0]), ValueError),
    ],
)
def test_metrics_invalid_inputs_raise(scores, labels, error):
    with pytest.raises(error):
        classification_metrics(scores, labels, samples=10)


@pytest.mark.parametrize(("n", "samples", "level"), [(0, 10, 0.95), (10, 0, 0.95), (10, 10, 1.0), (10, 10, 0.0)])
def test_bootstrap_invalid_arguments_raise(n, samples, level):
    with pytest.raises(ValueError):
        bootstrap_ci(lambda rows: 0.0, n, samples=samples, level=level)
