import contextlib
import io

import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from florence.evaluation.probe import (
    few_shot,
    few_shot_scores,
    fit_logistic_regression,
    knn,
    linear_probe,
    sample_few_shot,
    stratified_split,
)
from florence.evaluation.stats import classification_metrics
from tests.evaluation.features import cifar_features

# A short grid keeps the few-shot tests fast; the default grid has 17 strengths.
SHORT_GRID = (1e-1, 1e-2, 1e-3)


@pytest.fixture(scope="module")
def features() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features of 3,000 training and 2,000 test CIFAR-10 photos, and their labels."""
    return (*cifar_features("train", 300), *cifar_features("test", 200))


def whiten(train: torch.Tensor, test: torch.Tensor, dims: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA-whiten both splits with the training rows' statistics, keep ``dims`` components, L2-normalise."""
    mean = train.mean(dim=0)
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov((train - mean).T.double()))
    projection = (eigenvectors[:, -dims:] / eigenvalues[-dims:].sqrt()).float()
    return F.normalize((train - mean) @ projection, dim=-1), F.normalize((test - mean) @ projection, dim=-1)


def clip_benchmark_linear_probe(fit, val, test, tmp_path, monkeypatch) -> dict:
    """Run clip_benchmark 1.6.2's ``linear_probe.evaluate`` on cached (features, labels) splits.

    Two adaptations let its unchanged training code run here, and change no number:
    - it hard-codes CUDA (``.cuda()`` calls and ``assert device == 'cuda'``), so without a
      GPU ``.cuda()`` returns the same CPU object and the device is a "cuda"-equal string
      whose value is "cpu";
    - its ``accuracy`` calls ``float()`` on a one-element array, which NumPy 2.4 rejects
      with a TypeError, so the same formula is swapped in with ``.item()``-style conversion.
    """
    linear_probe_module = pytest.importorskip("clip_benchmark.metrics.linear_probe")

    def accuracy(output, target, topk=(1,)):
        predictions = output.topk(max(topk), 1, True, True)[1].t()
        correct = predictions.eq(target.view(1, -1).expand_as(predictions))
        return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]

    monkeypatch.setattr(linear_probe_module, "accuracy", accuracy)
    device = "cuda"
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
        monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *args, **kwargs: self)
        device = _CpuNamedCuda("cpu")

    feature_dir = tmp_path / "model"
    feature_dir.mkdir()
    for split, (split_features, split_labels) in {"train": fit, "val": val, "test": test}.items():
        torch.save(split_features, feature_dir / f"features_{split}.pt")
        torch.save(split_labels, feature_dir / f"targets_{split}.pt")

    # Its defaults: batch size 64, learning rate 0.1, 10 epochs, seed 0; amp off for float32.
    with contextlib.redirect_stdout(io.StringIO()):
        return linear_probe_module.evaluate(
            torch.nn.Identity(), None, None, -1, 64, 0, 0.1, 10, "model", 0, str(tmp_path), device,
            val_dataloader=True, normalize=True, amp=False,
        )


class _CpuNamedCuda(str):
    """The device string "cpu" that also compares equal to "cuda"."""

    def __eq__(self, other: object) -> bool:
        return other == "cuda" or str.__eq__(self, other)

    __hash__ = str.__hash__


def test_linear_probe_matches_clip_benchmark(features, tmp_path, monkeypatch):
    train_features, train_labels, test_features, test_labels = features
    # Random-init features are nearly rank-deficient, so neither optimiser would converge in a
    # reasonable time on them; whitening makes both solve the same well-conditioned problem.
    train_features, test_features = whiten(train_features, test_features)
    fit_rows, val_rows = stratified_split(train_labels, 0.2, seed=0)

    scores, _ = linear_probe(train_features, train_labels, test_features, test_labels, seed=0)
    reference = clip_benchmark_linear_probe(
        (train_features[fit_rows], train_labels[fit_rows]),
        (train_features[val_rows], train_labels[val_rows]),
        (test_features, test_labels),
        tmp_path,
        monkeypatch,
    )

    top1 = classification_metrics(scores, test_labels, samples=10)["top1"]
    assert top1 == pytest.approx(100 * reference["lp_acc1"], abs=0.5)


def test_linear_probe_repeatable(features):
    first_scores, first_chosen = linear_probe(*features, l2_grid=SHORT_GRID)
    second_scores, second_chosen = linear_probe(*features, l2_grid=SHORT_GRID)

    assert torch.equal(first_scores, second_scores)
    assert first_chosen == second_chosen


def test_linear_probe_beats_chance(features):
    scores, chosen = linear_probe(*features, l2_grid=SHORT_GRID)
    metrics = classification_metrics(scores, features[3], samples=10)

    assert metrics["top1"] > 20.0
    assert chosen["l2"] in SHORT_GRID
    assert chosen["train_rows"] + chosen["val_rows"] == len(features[1])


def test_logistic_regression_matches_sklearn(features):
    train_features, train_labels, test_features, _ = features
    train_features, test_features = whiten(train_features, test_features)
    l2 = 1e-3

    weight, bias = fit_logistic_regression(train_features, train_labels, 10, l2)
    predictions = (test_features @ weight.T + bias).argmax(dim=1)
    reference = LogisticRegression(C=1 / (l2 * len(train_features)), max_iter=1000, tol=1e-8)
    reference.fit(train_features.double().numpy(), train_labels.numpy())

    agreement = (predictions.numpy() == reference.predict(test_features.double().numpy())).mean()
    assert agreement > 0.99


def test_stratified_split_per_class(features):
    labels = features[1]
    fit_rows, val_rows = stratified_split(labels, 0.2, seed=0)

    assert len(set(fit_rows.tolist()) & set(val_rows.tolist())) == 0
    assert sorted(fit_rows.tolist() + val_rows.tolist()) == list(range(len(labels)))
    assert torch.bincount(labels[val_rows]).tolist() == [60] * 10


def test_stratified_split_keeps_single_row_class():
    labels = torch.tensor([0, 0, 0, 0, 1])
    fit_rows, val_rows = stratified_split(labels, 0.5, seed=0)

    assert 4 in fit_rows.tolist()
    assert len(val_rows) == 2


def test_sample_few_shot_nested_per_seed(features):
    labels = features[1]
    two_shot = sample_few_shot(labels, 2, seed=5)
    four_shot = sample_few_shot(labels, 4, seed=5)

    assert torch.bincount(labels[four_shot]).tolist() == [4] * 10
    assert set(two_shot.tolist()) <= set(four_shot.tolist())
    assert not torch.equal(four_shot, sample_few_shot(labels, 4, seed=6))


def test_few_shot_ignores_rows_outside_sample(features):
    train_features, train_labels, test_features, test_labels = features
    shots, seeds = (1, 2, 4), (0, 1)
    used = torch.cat([sample_few_shot(train_labels, max(shots), seed) for seed in seeds]).unique()
    unused = torch.ones(len(train_labels), dtype=torch.bool)
    unused[used] = False

    # Every training row outside the k-shot samples (the rows a validation split would come
    # from) gets huge random features. Labels stay, because they decide which rows are drawn.
    poisoned_features = train_features.clone()
    poisoned_features[unused] = torch.randn(int(unused.sum()), train_features.shape[1]) * 100

    arguments = {"shots": shots, "seeds": seeds, "l2_grid": SHORT_GRID, "bootstrap_samples": 50}
    clean = few_shot(train_features, train_labels, test_features, test_labels, **arguments)
    poisoned = few_shot(poisoned_features, train_labels, test_features, test_labels, **arguments)

    assert clean == poisoned


def test_few_shot_fit_ignores_test_rows(features):
    train_features, train_labels, test_features, _ = features
    poisoned_test = test_features.clone()
    poisoned_test[100:] = torch.randn(len(test_features) - 100, test_features.shape[1]) * 100

    clean_scores, clean_chosen = few_shot_scores(train_features, train_labels, test_features, k=4, seed=0, l2_grid=SHORT_GRID)
    poisoned_scores, poisoned_chosen = few_shot_scores(
        train_features, train_labels, poisoned_test, k=4, seed=0, l2_grid=SHORT_GRID
    )

    assert clean_chosen == poisoned_chosen
    assert torch.equal(clean_scores[:100], poisoned_scores[:100])


def test_few_shot_repeatable(features):
    arguments = {"shots": (1, 4), "seeds": (0, 1), "l2_grid": SHORT_GRID, "bootstrap_samples": 50}

    assert few_shot(*features, **arguments) == few_shot(*features, **arguments)


def test_few_shot_keys_and_spread(features):
    metrics = few_shot(*features, shots=(2,), seeds=(0, 1, 2), l2_grid=SHORT_GRID, bootstrap_samples=50)

    for statistic in ("mean", "std", "ci_low", "ci_high", "seed0", "seed1", "seed2"):
        assert f"2shot_top1_{statistic}" in metrics
    assert metrics["2shot_top1_std"] > 0.0
    assert metrics["2shot_top1_ci_low"] <= metrics["2shot_top1_mean"] <= metrics["2shot_top1_ci_high"]


def test_few_shot_leaves_out_large_k():
    features = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0] * 6 + [1] * 6)

    metrics = few_shot(features, labels, features, labels, shots=(2, 8), seeds=(0,), l2_grid=SHORT_GRID)

    assert "2shot_top1_mean" in metrics
    assert not any(key.startswith("8shot") for key in metrics)


def test_few_shot_all_k_too_large_raises():
    features = torch.randn(4, 4)
    labels = torch.tensor([0, 0, 1, 1])

    with pytest.raises(ValueError, match="smallest training class"):
        few_shot(features, labels, features, labels, shots=(4,), seeds=(0,))


def test_knn_one_neighbour_matches_sklearn(features):
    train_features, train_labels, test_features, test_labels = features
    scores = knn(train_features, train_labels, test_features, test_labels, k=1)

    reference = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(train_features.numpy(), train_labels.numpy())
    agreement = (scores.argmax(dim=1).numpy() == reference.predict(test_features.numpy())).mean()
    assert agreement > 0.995


def test_knn_scores_shape_and_votes(features):
    train_features, train_labels, test_features, test_labels = features
    scores = knn(train_features, train_labels, test_features, test_labels, k=20)

    assert scores.shape == (len(test_features), 10)
    assert ((scores > 0).sum(dim=1) <= 20).all()
    assert classification_metrics(scores, test_labels, samples=10)["top1"] > 15.0


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({"val_fraction": 0.0}, ValueError),
        ({"val_fraction": 1.0}, ValueError),
        ({"l2_grid": []}, ValueError),
        ({"l2_grid": [-1.0]}, ValueError),
    ],
)
def test_linear_probe_invalid_arguments_raise(features, arguments, error):
    with pytest.raises(error):
        linear_probe(*features, **arguments)


def test_linear_probe_feature_size_mismatch_raises(features):
    train_features, train_labels, test_features, test_labels = features

    with pytest.raises(ValueError, match="same model"):
        linear_probe(train_features, train_labels, test_features[:, :10], test_labels)
