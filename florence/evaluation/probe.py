"""Linear probe, few-shot linear probe and k-NN classification on frozen image features.

Every function takes float32 features ``[N, D]`` and int64 labels ``[N]``, L2-normalises
the feature rows, and returns class scores for the test rows (higher means more likely),
which ``florence.evaluation.stats.classification_metrics`` turns into percentages. The
number of classes is ``max(train_labels.max(), test_labels.max()) + 1``.

The classifier is multinomial logistic regression with an unregularised bias, fitted by
full-batch L-BFGS in torch. It minimises

    mean_i cross_entropy(W x_i + b, y_i) + (l2 / 2) * ||W||_F^2

which equals scikit-learn's ``LogisticRegression(C=1 / (l2 * N))``. CLIP fitted its probes
with scikit-learn's L-BFGS solver (Radford et al. 2021, appendix A.3, the sweep that
clip_benchmark's ``linear_probe.py`` imitates with AdamW). Full-batch L-BFGS from zero
weights, with no data shuffling, makes the result a deterministic function of the inputs,
and it converges in a few hundred iterations on cached features. Torch rather than
scikit-learn keeps the fit on the features' device and avoids a runtime dependency.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from florence.evaluation._common import target_rank
from florence.evaluation.stats import (
    DEFAULT_BOOTSTRAP_SAMPLES,
    bootstrap_ci,
    mean_per_class_recall,
)

logger = logging.getLogger(__name__)

# L2 strengths tried by default: half-decade steps from 1e-6 to 1e2. Above 1e2 the weights of
# unit-norm features are near zero, so every class gets almost the same score.
DEFAULT_L2_GRID: tuple[float, ...] = tuple(10.0 ** (exponent / 2) for exponent in range(-12, 5))

# L-BFGS stopping rule of each fit: at most this many iterations, or a gradient whose largest
# entry falls below the tolerance.
MAX_ITERATIONS = 1000
GRADIENT_TOLERANCE = 1e-6

# Strengths in a row without a better held-out score after which an L2 sweep stops.
SWEEP_PATIENCE = 3

# Cross-validation folds used to choose the L2 strength of a few-shot probe (fewer when k is
# smaller). Fold j holds out the j-th, (j + folds)-th, ... sampled row of every class.
FEW_SHOT_FOLDS = 4

# L2 strength of a 1-shot probe, where no row is left to validate on. A strong penalty keeps
# the weights small, which makes the classifier close to the nearest-class-mean rule (the
# gradient at zero weights is the class means of the centred features).
ONE_SHOT_L2 = 1.0


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    l2_grid: Sequence[float] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Fit a logistic-regression probe on frozen features and score the test rows, as CLIP does.

    The L2 strength is chosen on a validation split carved from the training rows
    (``stratified_split``: ``val_fraction`` of every class, seeded by ``seed``). The probe
    is then refitted on train + validation with that strength and applied once to the test
    rows. Test labels are only checked for range, never used in the fit.

    Args:
        l2_grid: L2 strengths to try, ``DEFAULT_L2_GRID`` when None. The strength with the
            best validation top-1 wins. A tie goes to the lower validation cross-entropy,
            then to the larger strength.

    Returns:
        Test scores (logits) ``[N_test, C]`` and the hyperparameters: ``l2`` (the chosen
        strength), ``val_top1`` (its validation accuracy in percent), ``train_rows`` and
        ``val_rows``.

    Raises:
        ValueError: invalid features, labels, ``val_fraction`` or ``l2_grid``, or training
            rows with no class of two or more rows to validate on.
    """
    num_classes = _check_inputs(train_features, train_labels, test_features, test_labels)
    grid = _check_l2_grid(l2_grid)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"invalid val_fraction {val_fraction!r}; pass a fraction in (0, 1), e.g. 0.2")

    train_features = F.normalize(train_features.float(), dim=-1)
    test_features = F.normalize(test_features.float(), dim=-1)
    fit_rows, val_rows = stratified_split(train_labels, val_fraction, seed)
    if len(val_rows) == 0:
        raise ValueError(
            "no validation rows: every class has a single training row; pass more training rows per class"
        )

    l2, val_top1, weights = _select_l2_on_validation(
        train_features[fit_rows], train_labels[fit_rows], train_features[val_rows], train_labels[val_rows],
        num_classes, grid,
    )
    weights = fit_logistic_regression(train_features, train_labels, num_classes, l2, init=weights)
    logger.info("linear probe: l2 %.3g chosen with validation top-1 %.2f%%", l2, val_top1)

    hyperparameters = {
        "l2": l2,
        "val_top1": val_top1,
        "train_rows": float(len(fit_rows)),
        "val_rows": float(len(val_rows)),
    }
    return _logits(test_features, weights), hyperparameters


def few_shot(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    seeds: Sequence[int] = (0, 1, 2),
    l2_grid: Sequence[float] | None = None,
    bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
) -> dict[str, float]:
    """Run a k-shot linear probe for every k in ``shots`` and seed in ``seeds``, and summarise.

    For each seed, ``sample_few_shot`` draws k training rows per class. Only those rows
    are used, both to choose the L2 strength (cross-validation within the sample) and to
    fit the probe (see ``few_shot_scores``). The test rows are scored once per fit.

    Returns:
        For each k and each metric ``top1``, ``top5`` and ``mean_per_class_recall``, in
        percent: ``{k}shot_{metric}_mean`` and ``_std`` (sample standard deviation over
        seeds, 0 with one seed), ``_ci_low`` and ``_ci_high`` (95% bootstrap over test rows
        of the mean over seeds), and ``{k}shot_{metric}_seed{seed}`` per seed. A k above
        the size of the smallest training class is left out with a warning.

    Raises:
        ValueError: invalid inputs, empty or invalid ``shots`` or ``seeds``, or no k that
            every class has enough training rows for.
    """
    num_classes = _check_inputs(train_features, train_labels, test_features, test_labels)
    shots = _check_int_sequence(shots, "shots", minimum=1)
    seeds = _check_int_sequence(seeds, "seeds", minimum=None)
    test_labels = test_labels.long().cpu()

    smallest_class = int(torch.bincount(train_labels)[torch.bincount(train_labels) > 0].min())
    feasible = [k for k in shots if k <= smallest_class]
    if len(feasible) < len(shots):
        logger.warning(
            "few-shot: leaving out k=%s because the smallest training class has %d rows",
            [k for k in shots if k > smallest_class],
            smallest_class,
        )
    if not feasible:
        raise ValueError(
            f"every k in shots={list(shots)} exceeds the {smallest_class} rows of the smallest training class; "
            f"pass shots up to {smallest_class}"
        )

    metrics: dict[str, float] = {}
    for k in feasible:
        correct_per_seed = []
        for seed in seeds:
            scores, _ = few_shot_scores(
                train_features, train_labels, test_features, k=k, seed=seed, num_classes=num_classes, l2_grid=l2_grid
            )
            correct_per_seed.append(_correct_at(scores.cpu(), test_labels))

        metrics.update(_summarise_seeds(f"{k}shot", correct_per_seed, seeds, test_labels, num_classes, bootstrap_samples))

    return metrics


def few_shot_scores(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    *,
    k: int,
    seed: int,
    num_classes: int | None = None,
    l2_grid: Sequence[float] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Fit one k-shot probe on the rows ``sample_few_shot(train_labels, k, seed)`` and score ``test_features``.

    The L2 strength is chosen by cross-validation within the k-shot sample:
    ``min(k, FEW_SHOT_FOLDS)`` folds, each holding out the same number of rows of every
    class, ranked by pooled held-out top-1 and then cross-entropy, as in ``linear_probe``.
    With k = 1 no row is left to validate on, so the strength is ``ONE_SHOT_L2``. Rows
    outside the sample are never read, and each test row is scored on its own.

    Args:
        num_classes: defaults to ``train_labels.max() + 1``.

    Returns:
        Test scores ``[N_test, C]`` and ``{"l2": strength, "rows": rows in the sample}``.
    """
    grid = _check_l2_grid(l2_grid)
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    rows = sample_few_shot(train_labels, k, seed)
    features = F.normalize(train_features[rows].float(), dim=-1)
    labels = train_labels[rows].long()

    if k == 1:
        l2 = ONE_SHOT_L2
    else:
        l2 = _select_l2_by_cross_validation(features, labels, k, num_classes, grid)

    weights = fit_logistic_regression(features, labels, num_classes, l2)
    test_features = F.normalize(test_features.float(), dim=-1)
    return _logits(test_features, weights), {"l2": l2, "rows": float(len(rows))}


def sample_few_shot(labels: Tensor, k: int, seed: int) -> Tensor:
    """Return the sorted row indices of ``k`` rows drawn per class present in ``labels``.

    A ``torch.Generator`` seeded with ``seed`` shuffles the rows of each class, in class
    order, and the first ``k`` are kept. Samples of one seed are therefore nested: the
    2-shot rows contain the 1-shot rows.

    Raises:
        ValueError: a class with fewer than ``k`` rows.
    """
    labels = labels.cpu()
    generator = torch.Generator().manual_seed(seed)
    selected = []
    for label in torch.unique(labels).tolist():
        class_rows = (labels == label).nonzero().flatten()
        if len(class_rows) < k:
            raise ValueError(f"class {label} has {len(class_rows)} training rows, fewer than k={k}; pass a smaller k")

        order = torch.randperm(len(class_rows), generator=generator)
        selected.append(class_rows[order[:k]])

    return torch.cat(selected).sort().values


def stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split row indices into (fit, validation), taking ``val_fraction`` of every class.

    A ``torch.Generator`` seeded with ``seed`` shuffles the rows of each class, in class
    order. A class of n rows gives ``round(val_fraction * n)`` rows to validation, at least
    one and at most n - 1, so a class with one row stays entirely in the fit split.

    Returns:
        Two sorted int64 index tensors.
    """
    labels = labels.cpu()
    generator = torch.Generator().manual_seed(seed)
    fit_rows, val_rows = [], []
    for label in torch.unique(labels).tolist():
        class_rows = (labels == label).nonzero().flatten()
        class_rows = class_rows[torch.randperm(len(class_rows), generator=generator)]
        count = len(class_rows)
        val_count = min(max(round(val_fraction * count), 1), count - 1)
        val_rows.append(class_rows[:val_count])
        fit_rows.append(class_rows[val_count:])

    return torch.cat(fit_rows).sort().values, torch.cat(val_rows).sort().values


def knn(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> Tensor:
    """Score test rows by a weighted vote of their k nearest training rows (cosine similarity).

    Each of the k neighbours votes for its class with weight ``exp(cosine / temperature)``,
    the rule of Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance
    Discrimination"). The defaults k = 20 and temperature 0.07 are common choices for this
    rule in self-supervised evaluation, not tuned here. A k above the number of training
    rows uses every row. Neighbours with equal similarity are taken in ``torch.topk`` order.

    Returns:
        Summed vote weights ``[N_test, C]``; a class with no neighbour scores 0.
    """
    num_classes = _check_inputs(train_features, train_labels, test_features, test_labels)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"invalid k {k!r}; pass a positive number of neighbours, e.g. 20")

    if not temperature > 0:
        raise ValueError(f"invalid temperature {temperature!r}; pass a positive value, e.g. 0.07")

    train_features = F.normalize(train_features.float(), dim=-1)
    test_features = F.normalize(test_features.float(), dim=-1)
    train_labels = train_labels.to(train_features.device).long()
    k = min(k, len(train_features))

    chunks = []
    for start in range(0, len(test_features), _KNN_CHUNK_ROWS):
        similarity = test_features[start : start + _KNN_CHUNK_ROWS] @ train_features.T
        top_similarity, top_rows = similarity.topk(k, dim=1)
        votes = torch.zeros(len(top_rows), num_classes, device=similarity.device)
        votes.scatter_add_(1, train_labels[top_rows], (top_similarity / temperature).exp())
        chunks.append(votes)

    return torch.cat(chunks)


# Test rows per similarity matrix in knn; each chunk allocates [chunk, N_train] floats.
_KNN_CHUNK_ROWS = 1024


def fit_logistic_regression(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    l2: float,
    *,
    init: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Minimise mean cross-entropy + ``l2 / 2 * ||W||^2`` by full-batch L-BFGS.

    Args:
        features: ``[N, D]``, used as given (callers normalise them).
        init: ``(weight, bias)`` to start from, zeros when None. Warm starts along an L2
            sweep save iterations and keep the result deterministic.

    Returns:
        ``(weight [C, D], bias [C])``, detached.

    NOTE: the fit is full-batch in float64, so a float64 copy of ``features`` must fit in
    the memory of their device (about 10 GB for 1.28M rows of 1024 features).
    """
    labels = labels.to(features.device).long()
    features = features.double()
    # The bias is free, so centring the features is an exact reparametrisation: it leaves
    # the minimiser's predictions unchanged but conditions the problem much better.
    mean = features.mean(dim=0)
    features = features - mean
    if init is None:
        weight = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=features.device)
        bias = torch.zeros(num_classes, dtype=torch.float64, device=features.device)
    else:
        weight = init[0].detach().double().clone()
        bias = init[1].detach().double() + weight @ mean

    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=MAX_ITERATIONS,
        tolerance_grad=GRADIENT_TOLERANCE,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)

    weight = weight.detach()
    bias = bias.detach() - weight @ mean
    return weight.float(), bias.float()


def _logits(features: Tensor, weights: tuple[Tensor, Tensor]) -> Tensor:
    weight, bias = weights
    return features @ weight.T + bias


def _select_l2_on_validation(
    fit_features: Tensor,
    fit_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    num_classes: int,
    grid: Sequence[float],
) -> tuple[float, float, tuple[Tensor, Tensor]]:
    """Return the best L2 strength, its validation top-1 in percent and its weights fitted on the fit rows."""
    val_labels = val_labels.to(val_features.device).long()
    fitted: dict[float, tuple[Tensor, Tensor]] = {}
    previous = None

    def score(l2: float) -> tuple[int, float]:
        nonlocal previous
        previous = fit_logistic_regression(fit_features, fit_labels, num_classes, l2, init=previous)
        fitted[l2] = previous
        logits = _logits(val_features, previous)
        correct = int((logits.argmax(dim=1) == val_labels).sum())
        return correct, float(F.cross_entropy(logits, val_labels, reduction="sum"))

    l2, correct = _sweep_l2(grid, score)
    return l2, 100.0 * correct / len(val_labels), fitted[l2]


def _select_l2_by_cross_validation(
    features: Tensor, labels: Tensor, k: int, num_classes: int, grid: Sequence[float]
) -> float:
    """Return the L2 strength with the best pooled held-out top-1 (then cross-entropy) over the folds."""
    folds = min(k, FEW_SHOT_FOLDS)
    fold_of_row = _fold_per_row(labels, folds)
    previous: list[tuple[Tensor, Tensor] | None] = [None] * folds

    def score(l2: float) -> tuple[int, float]:
        correct, loss = 0, 0.0
        for fold in range(folds):
            held_out = fold_of_row == fold
            previous[fold] = fit_logistic_regression(
                features[~held_out], labels[~held_out], num_classes, l2, init=previous[fold]
            )
            logits = _logits(features[held_out], previous[fold])
            correct += int((logits.argmax(dim=1) == labels[held_out]).sum())
            loss += float(F.cross_entropy(logits, labels[held_out], reduction="sum"))
        return correct, loss

    l2, _ = _sweep_l2(grid, score)
    return l2


def _sweep_l2(grid: Sequence[float], score: Callable[[float], tuple[int, float]]) -> tuple[float, int]:
    """Return the L2 strength with the most correct held-out rows, and that count.

    ``score(l2)`` returns (correct rows, summed cross-entropy) on the held-out rows. The
    grid is swept from the strongest to the weakest penalty, so that each fit can start
    from the previous one. A tie in correct rows goes to the lower cross-entropy, then to
    the stronger penalty. The sweep stops after ``SWEEP_PATIENCE`` strengths in a row that
    do not beat the best, because held-out accuracy and loss are close to unimodal in the
    strength, and the weak-penalty end costs the most L-BFGS iterations.
    """
    best_l2, best_key = None, None
    without_improvement = 0
    for l2 in sorted(grid, reverse=True):
        correct, loss = score(l2)
        key = (correct, -loss)
        logger.debug("L2 sweep: l2 %.3g, %d correct held-out rows, cross-entropy %.4f", l2, correct, loss)
        if best_key is None or key > best_key:
            best_l2, best_key = l2, key
            without_improvement = 0
            continue

        without_improvement += 1
        if without_improvement >= SWEEP_PATIENCE:
            break

    return best_l2, best_key[0]


def _fold_per_row(labels: Tensor, folds: int) -> Tensor:
    """Assign the j-th row of each class (in row order) to fold ``j % folds``."""
    fold_of_row = torch.empty_like(labels)
    for label in torch.unique(labels).tolist():
        class_rows = (labels == label).nonzero().flatten()
        fold_of_row[class_rows] = torch.arange(len(class_rows), device=labels.device) % folds

    return fold_of_row


def _correct_at(scores: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Return per-row top-1 and top-min(5, C) correctness as float64 tensors of 0 and 1."""
    ranks = target_rank(scores.float(), labels)
    return {"top1": (ranks == 0).double(), "top5": (ranks < min(5, scores.shape[1])).double()}


def _summarise_seeds(
    prefix: str,
    correct_per_seed: list[dict[str, Tensor]],
    seeds: Sequence[int],
    labels: Tensor,
    num_classes: int,
    bootstrap_samples: int,
) -> dict[str, float]:
    """Return mean, std, bootstrap CI and per-seed values of each metric for one k."""
    per_row_metrics = {
        "top1": lambda correct, rows: 100.0 * float(correct["top1"][rows].mean()),
        "top5": lambda correct, rows: 100.0 * float(correct["top5"][rows].mean()),
        "mean_per_class_recall": lambda correct, rows: mean_per_class_recall(
            correct["top1"][rows], labels[rows], num_classes
        ),
    }

    all_rows = torch.arange(len(labels))
    summary: dict[str, float] = {}
    for name, metric in per_row_metrics.items():
        per_seed = [metric(correct, all_rows) for correct in correct_per_seed]
        summary[f"{prefix}_{name}_mean"] = statistics.fmean(per_seed)
        summary[f"{prefix}_{name}_std"] = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0

        def mean_over_seeds(rows: Tensor, metric=metric) -> float:
            return statistics.fmean(metric(correct, rows) for correct in correct_per_seed)

        low, high = bootstrap_ci(mean_over_seeds, len(labels), samples=bootstrap_samples)
        summary[f"{prefix}_{name}_ci_low"] = low
        summary[f"{prefix}_{name}_ci_high"] = high
        for seed, value in zip(seeds, per_seed, strict=True):
            summary[f"{prefix}_{name}_seed{seed}"] = value

    return summary


def _check_inputs(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor) -> int:
    """Check features and labels of both splits and return the number of classes."""
    _check_features(train_features, "train_features")
    _check_features(test_features, "test_features")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train_features have size {train_features.shape[1]} but test_features have size "
            f"{test_features.shape[1]}; encode both splits with the same model"
        )

    _check_labels(train_labels, len(train_features), "train")
    _check_labels(test_labels, len(test_features), "test")
    return int(max(train_labels.max(), test_labels.max())) + 1


def _check_features(features: Tensor, name: str) -> None:
    if not isinstance(features, Tensor) or features.ndim != 2 or features.shape[0] == 0:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"{name} must be a tensor [N, D] with N > 0, got {shape}")

    if not features.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {features.dtype}")

    if not torch.isfinite(features).all():
        raise ValueError(f"{name} contain NaN or infinite values; check the model's outputs (e.g. fp16 overflow)")


def _check_labels(labels: Tensor, rows: int, split: str) -> None:
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        dtype = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"{split}_labels must be an integer tensor of class indices, got {dtype}")

    if labels.ndim != 1 or len(labels) != rows:
        raise ValueError(f"{split}_labels must have shape [{rows}] to match {split}_features, got {tuple(labels.shape)}")

    if labels.min() < 0:
        raise ValueError(f"{split}_labels contain the negative class index {int(labels.min())}; class indices start at 0")


def _check_l2_grid(l2_grid: Sequence[float] | None) -> tuple[float, ...]:
    if l2_grid is None:
        return DEFAULT_L2_GRID

    grid = tuple(float(l2) for l2 in l2_grid)
    if not grid:
        raise ValueError("l2_grid is empty; pass at least one L2 strength, e.g. [1e-4, 1e-3]")

    for l2 in grid:
        if not (math.isfinite(l2) and l2 >= 0):
            raise ValueError(f"invalid L2 strength {l2!r} in l2_grid; every strength must be finite and >= 0")

    return grid


def _check_int_sequence(values: Sequence[int], name: str, minimum: int | None) -> tuple[int, ...]:
    if isinstance(values, int):
        raise TypeError(f"{name} must be a sequence of integers, not the integer {values}; pass ({values},)")

    values = tuple(values)
    if not values:
        raise ValueError(f"{name} is empty; pass at least one value")

    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            bound = f" >= {minimum}" if minimum is not None else ""
            raise ValueError(f"invalid value {value!r} in {name}={values}; every value must be an integer{bound}")

    return values
