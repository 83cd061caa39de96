"""Classification metrics with 95% percentile-bootstrap confidence intervals.

Every metric is a percentage (0-100). Confidence intervals resample the test rows with
replacement, so they measure how much a score would move on another test set of the same
size drawn from the same distribution. They do not cover the variance of training, which the
few-shot task reports as a standard deviation over seeds.

Ranking rule: classes are ranked by descending score, and on a tie the lower class index
ranks first (the rule of ``torch.argmax``), as in ``florence.evaluation.zeroshot``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from florence.evaluation._common import target_rank

DEFAULT_BOOTSTRAP_SAMPLES = 1000

# Max number of resample indices held at once: 2**22 int64 values, 32 MiB.
RESAMPLE_CHUNK_ELEMENTS = 1 << 22


def bootstrap_resamples(n: int, samples: int, seed: int, max_elements: int = RESAMPLE_CHUNK_ELEMENTS) -> Iterator[Tensor]:
    """Yield the bootstrap resamples of ``n`` rows as int64 index matrices ``[chunk, n]``, in order.

    Resample ``i`` is the ``i``-th draw of ``torch.randint(n, (n,))`` from a ``torch.Generator``
    seeded with ``seed``. Drawing a ``[chunk, n]`` matrix consumes the generator as ``chunk``
    such draws in a row, so the chunking (at most ``max_elements`` indices, one row at least)
    bounds memory without changing any resample.
    """
    generator = torch.Generator().manual_seed(seed)
    rows_per_chunk = max(1, max_elements // n)
    for start in range(0, samples, rows_per_chunk):
        yield torch.randint(n, (min(rows_per_chunk, samples - start), n), generator=generator)


def bootstrap_ci(
    statistic: Callable[[Tensor], float],
    n: int,
    *,
    samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Compute a percentile-bootstrap confidence interval of ``statistic`` over ``n`` rows.

    Each of the ``samples`` resamples is ``n`` row indices drawn with replacement from
    ``range(n)`` (see ``bootstrap_resamples``), passed to ``statistic`` as an int64 tensor
    ``[n]``. The interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the
    resampled statistics (linear interpolation, as ``numpy.quantile``). The same ``seed`` and
    ``n`` give the same resamples, so metrics bootstrapped with one seed are resampled
    jointly. ``bootstrap_cis`` computes the same intervals for statistics that take every
    resample at once, which is much faster.

    Returns:
        ``(low, high)`` in the unit of ``statistic``.

    Raises:
        ValueError: ``n`` or ``samples`` below 1, or ``level`` outside (0, 1).
    """
    _check_bootstrap_arguments(n, samples, level)
    values = torch.empty(samples, dtype=torch.float64)
    sample = 0
    for chunk in bootstrap_resamples(n, samples, seed):
        for indices in chunk:
            values[sample] = float(statistic(indices))
            sample += 1

    return _percentile_interval(values, level)


def bootstrap_cis(
    statistics: dict[str, Callable[[Tensor], Tensor]],
    n: int,
    *,
    samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Compute ``bootstrap_ci`` for several statistics over the same resamples, a chunk of resamples at a time.

    Each statistic maps an index matrix ``[S, n]`` (one resample per row) to its ``S`` float64
    values. For statistics that compute each row as ``bootstrap_ci``'s statistic computes one
    resample, the intervals are identical to ``bootstrap_ci``'s.

    Returns:
        ``{name: (low, high)}`` in the unit of each statistic.

    Raises:
        ValueError: ``n`` or ``samples`` below 1, or ``level`` outside (0, 1).
    """
    _check_bootstrap_arguments(n, samples, level)
    values = {name: [] for name in statistics}
    for chunk in bootstrap_resamples(n, samples, seed):
        for name, statistic in statistics.items():
            values[name].append(statistic(chunk).to(torch.float64))

    return {name: _percentile_interval(torch.cat(chunks), level) for name, chunks in values.items()}


def _check_bootstrap_arguments(n: int, samples: int, level: float) -> None:
    _check_positive_int(n, "n")
    _check_positive_int(samples, "samples")
    if not 0.0 < level < 1.0:
        raise ValueError(f"invalid level {level!r}; pass a confidence level in (0, 1), e.g. 0.95")


def _percentile_interval(values: Tensor, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    low, high = torch.quantile(values, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return low, high


def classification_metrics(
    scores: Tensor,
    labels: Tensor,
    *,
    seed: int = 0,
    samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
) -> dict[str, float]:
    """Compute top-1, top-5 and mean per-class recall with 95% bootstrap confidence intervals.

    Args:
        scores: ``[N, C]``, higher means more likely (logits, probabilities or cosines).
        labels: class indices ``[N]`` in ``[0, C)``.
        seed: seed of the bootstrap resamples.
        samples: number of bootstrap resamples.

    Returns:
        ``top1``, ``top5`` and ``mean_per_class_recall`` in percent, each with
        ``<name>_ci_low`` and ``<name>_ci_high``. ``top5`` is top-``min(5, C)`` accuracy,
        so with fewer than 5 classes it is 100. Mean per-class recall averages the top-1
        recall of the classes present in ``labels`` (in each resample, of the classes
        present in that resample), as ``sklearn.metrics.balanced_accuracy_score`` does.

    Raises:
        ValueError: ``scores`` not 2-D or empty, non-finite scores, or labels of the wrong
            length or out of range.
        TypeError: labels that are not integers.
    """
    labels = _check_scores_and_labels(scores, labels)
    num_classes = scores.shape[1]
    ranks = target_rank(scores.detach().float().cpu(), labels)
    top1_correct = (ranks == 0).double()
    top5_correct = (ranks < min(5, num_classes)).double()

    statistics: dict[str, Callable[[Tensor], Tensor]] = {
        "top1": lambda rows: 100.0 * top1_correct[rows].mean(dim=-1),
        "top5": lambda rows: 100.0 * top5_correct[rows].mean(dim=-1),
        "mean_per_class_recall": lambda rows: _resampled_mean_per_class_recall(top1_correct, labels, rows, num_classes),
    }

    all_rows = torch.arange(len(labels))[None, :]
    intervals = bootstrap_cis(statistics, len(labels), samples=samples, seed=seed)
    metrics: dict[str, float] = {}
    for name, statistic in statistics.items():
        metrics[name] = float(statistic(all_rows)[0])
        metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = intervals[name]

    return metrics


def mean_per_class_recall(correct: Tensor, labels: Tensor, num_classes: int) -> float:
    """Average, over the classes present in ``labels``, the fraction of ``correct`` rows, in percent.

    ``correct`` is 1.0 for a correctly classified row and 0.0 otherwise.
    """
    rows_per_class = torch.bincount(labels, minlength=num_classes)
    correct_per_class = torch.bincount(labels, weights=correct.double(), minlength=num_classes)
    present = rows_per_class > 0
    return 100.0 * float((correct_per_class[present] / rows_per_class[present]).mean())


def _resampled_mean_per_class_recall(correct: Tensor, labels: Tensor, rows: Tensor, num_classes: int) -> Tensor:
    """Return ``mean_per_class_recall`` of each resample (row of ``rows``, an index matrix ``[S, n]``) as ``[S]``.

    Per-class counts come from one ``bincount`` over all resamples (class ``c`` of resample
    ``s`` is bin ``s * num_classes + c``). They are sums of 0s and 1s, so they are exact. The
    final mean over the present classes runs per resample on the same 1-D tensor that
    ``mean_per_class_recall`` averages, so each value is bit-identical to it.
    """
    num_resamples = rows.shape[0]
    bins = (labels[rows] + num_classes * torch.arange(num_resamples)[:, None]).reshape(-1)
    rows_per_class = torch.bincount(bins, minlength=num_resamples * num_classes).view(num_resamples, num_classes)
    correct_per_class = torch.bincount(
        bins, weights=correct[rows].reshape(-1), minlength=num_resamples * num_classes
    ).view(num_resamples, num_classes)

    present = rows_per_class > 0
    ratios = correct_per_class / rows_per_class.clamp(min=1)
    means = torch.stack([ratios[index][present[index]].mean() for index in range(num_resamples)])
    return 100.0 * means


def _check_scores_and_labels(scores: Tensor, labels: Tensor) -> Tensor:
    """Return ``labels`` as a CPU int64 tensor after checking them against ``scores``."""
    if not isinstance(scores, Tensor) or scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a tensor [N, C] with N > 0 and C > 0, got {shape}")

    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values; check the classifier's outputs")

    labels = torch.as_tensor(labels).cpu()
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")

    if labels.ndim != 1 or len(labels) != len(scores):
        raise ValueError(
            f"labels must have shape [{len(scores)}] to match scores {tuple(scores.shape)}, "
            f"got {tuple(labels.shape)}"
        )

    num_classes = scores.shape[1]
    out_of_range = (labels < 0) | (labels >= num_classes)
    if out_of_range.any():
        raise ValueError(
            f"label {int(labels[out_of_range][0])} is out of range for scores with {num_classes} classes "
            f"(valid: 0..{num_classes - 1})"
        )

    return labels.long()


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"invalid {name} {value!r}; pass a positive integer")
