"""Run a benchmark suite for one model: one JSON record per (dataset, task), frozen features cached.

Layout of the output folder::

    records/<model-key>/<dataset>__<task>.json   one record per finished run
    features/<cache-key>.pt                      frozen image features and labels (not videos)
    finetune/<model-key>/<dataset>/              fine-tuned weights
    results.csv, results.md, results.png         reports across every record in the folder

A record stores a ``run_key``: the SHA-256 of the task options, the dataset spec, the data
and model fingerprints and the suite's seed and bootstrap settings. A run whose record has
the same key is skipped, so an interrupted suite resumes where it stopped. A changed key
reruns it, and so does ``rerun=True``. Records and feature files are written to a
temporary file and renamed, so an interrupt never leaves a half-written one behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import platform
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from florence.checkpoint import atomic_write_bytes
from florence.evaluation._common import (
    autocast,
    check_string_list,
    eval_mode,
    prefetch,
    resolve_device,
)
from florence.evaluation.datasets import (
    VIDEO_FORMATS,
    ClassificationSplit,
    DatasetSpec,
    RetrievalSplit,
    build_classification_split,
    build_retrieval_split,
    load_templates,
)
from florence.evaluation.models import EvalModel
from florence.evaluation.retrieval import retrieval_ranks
from florence.evaluation.suite import RunSpec, Suite
from florence.evaluation.video import (
    VideoRetrievalSplit,
    build_video_retrieval_split,
    run_video_retrieval,
    video_tower_model,
)
from florence.evaluation.zeroshot import build_zero_shot_classifier
from florence.version import __version__

logger = logging.getLogger(__name__)

RECORD_VERSION = 1


def run_suite(suite: Suite, model: EvalModel, output_dir: str | Path, rerun: bool = False) -> list[dict[str, Any]]:
    """Run every (dataset, task) of ``suite`` for ``model`` and return their records, skipped ones included."""
    check_model_fits_suite(suite, model)
    output_dir = Path(output_dir)
    runner = SuiteRunner(suite, model, output_dir)
    records = []
    for index, run in enumerate(suite.runs, start=1):
        logger.info("run %d/%d: %s on %s", index, len(suite.runs), run.task, run.dataset)
        records.append(runner.run(run, rerun=rerun))
    return records


def check_model_fits_suite(suite: Suite, model: EvalModel) -> None:
    """Raise ``ValueError`` naming the run when a run needs what ``model`` lacks, before any run starts.

    A ``tower: video`` run needs a florence CoSwin image tower, and a finetune run needs a
    florence checkpoint file. Without this check those runs fail only after the runs
    listed before them have finished.
    """
    for index, run in enumerate(suite.runs):
        where = f"{suite.path}: runs[{index}] ({run.task} on {run.dataset})"
        if run.options.get("tower") == "video":
            try:
                video_tower_model(model)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
        if run.task == "finetune":
            _check_finetune_model(model, run.dataset, where)


def _check_finetune_model(model: EvalModel, dataset: str, where: str = "") -> None:
    if model.checkpoint is None:
        prefix = f"{where}: " if where else ""
        raise ValueError(
            f"{prefix}finetune on {dataset!r} needs a florence checkpoint as --model, got {model.name!r}; "
            "pass a model.safetensors path, or drop the finetune run for this model"
        )


def model_key(model: EvalModel) -> str:
    """Return a folder name for a model's records: a slug of its name and 12 hex digits of its fingerprint."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.name.split(" (")[0]).strip("-") or "model"
    return f"{slug}-{model.fingerprint[:12]}"


class SuiteRunner:
    """Runs single tasks of a suite for one model, with the record and feature caches of ``output_dir``."""

    def __init__(self, suite: Suite, model: EvalModel, output_dir: str | Path) -> None:
        self.suite = suite
        self.model = model
        self.output_dir = Path(output_dir)
        self.record_dir = self.output_dir / "records" / model_key(model)
        self._splits: dict[tuple[str, str], ClassificationSplit | RetrievalSplit | VideoRetrievalSplit] = {}

    def record_path(self, run: RunSpec) -> Path:
        return self.record_dir / f"{run.run_id}.json"

    def run(self, run: RunSpec, rerun: bool = False) -> dict[str, Any]:
        """Run one task, or return its stored record when the run key matches and ``rerun`` is False."""
        dataset = self.suite.datasets[run.dataset]
        data_fingerprints = self._data_fingerprints(run, dataset)
        config = self._config(run, dataset)
        key = _run_key(config, self.model.fingerprint, data_fingerprints)

        path = self.record_path(run)
        existing = _read_record(path)
        if existing is not None and not rerun:
            if existing.get("run_key") == key:
                logger.info("skipping %s: record %s is up to date (pass --rerun to run it again)", run.run_id, path)
                return existing
            logger.info("rerunning %s: its config, data or model changed since %s", run.run_id, path)

        start = time.perf_counter()
        metrics = TASKS[run.task](self, run, dataset)
        record = {
            "record_version": RECORD_VERSION,
            "suite": self.suite.name,
            "dataset": run.dataset,
            "task": run.task,
            "metrics": metrics,
            "config": config,
            "model": self.model.describe(),
            "data": data_fingerprints,
            "seed": self.suite.seed,
            "run_key": key,
            "florence_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "seconds": round(time.perf_counter() - start, 3),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        atomic_write_bytes(path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
        logger.info("%s: %s", run.run_id, _headline(metrics))
        return record

    def _config(self, run: RunSpec, dataset: DatasetSpec) -> dict[str, Any]:
        return {
            "task": run.task,
            "options": run.options,
            "dataset": dataclasses.asdict(dataset),
            "seed": self.suite.seed,
            "bootstrap_samples": self.suite.bootstrap_samples,
            "batch_size": self.suite.batch_size,
            "precision": self.suite.precision,
        }

    def _data_fingerprints(self, run: RunSpec, dataset: DatasetSpec) -> dict[str, str]:
        fingerprints = {"test": self.split(dataset, "test").fingerprint}
        if dataset.train is not None and run.task not in ("zeroshot", "retrieval", "video_retrieval"):
            fingerprints["train"] = self.split(dataset, "train").fingerprint
        return fingerprints

    def split(self, dataset: DatasetSpec, split_name: str) -> ClassificationSplit | RetrievalSplit | VideoRetrievalSplit:
        """Return the ``split_name`` split (test or train) of ``dataset`` read with the model's transform, built once."""
        cache_key = (dataset.name, split_name)
        if cache_key not in self._splits:
            spec = dataset.test if split_name == "test" else dataset.train
            retrieval = any(r.task == "retrieval" and r.dataset == dataset.name for r in self.suite.runs)
            if dataset.format in VIDEO_FORMATS:
                split = build_video_retrieval_split(dataset, spec, self.suite.seed)
            elif dataset.format in ("coco", "captions") or (dataset.format == "wds" and retrieval):
                split = build_retrieval_split(dataset, spec, self.model.transform, self.suite.seed)
            else:
                split = build_classification_split(dataset, spec, self.model.transform, self.suite.seed)
            self._splits[cache_key] = split
        return self._splits[cache_key]

    def image_features(self, split: ClassificationSplit | RetrievalSplit) -> tuple[Tensor, Tensor]:
        """Return unnormalised float32 image features ``[N, D]`` and labels (or image indices) ``[N]``.

        Features are cached in ``features/`` under a key made of the model fingerprint, the
        model's transform and the split's data fingerprint.
        """
        key_text = f"{self.model.fingerprint}|{self.model.transform!r}|{split.fingerprint}|{self.suite.precision}"
        key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
        path = self.output_dir / "features" / f"{key}.pt"
        if path.is_file():
            cached = torch.load(path, weights_only=True)
            if isinstance(split, RetrievalSplit) and "captions" in cached:
                split.captions[:] = cached["captions"]
                split.caption_to_image[:] = cached["caption_to_image"]
            logger.info("loaded cached features %s", path)
            return cached["features"], cached["labels"]

        # NOTE: WebDataset splits are read in this process (no loader workers), because their
        # captions and max_images count would otherwise stay in the worker processes.
        num_workers = 0 if isinstance(split.dataset, IterableDataset) else self.suite.num_workers
        features, labels = encode_image_features(
            self.model, split.dataset, self.suite.batch_size, num_workers, self.suite.autocast_dtype
        )
        payload: dict[str, Any] = {"features": features, "labels": labels}
        if isinstance(split, RetrievalSplit):
            payload["captions"] = list(split.captions)
            payload["caption_to_image"] = list(split.caption_to_image)
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        return features, labels


def encode_image_features(
    model: EvalModel,
    dataset: Any,
    batch_size: int,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Encode every image of ``dataset`` (``(image, label)`` samples) into unnormalised float32 CPU features.

    The forward passes run under ``torch.inference_mode``, which skips the autograd and
    view bookkeeping that ``no_grad`` still does. Without loader workers, the next batch is
    decoded in a background thread while the model encodes the current one (``prefetch``). The returned tensors are concatenated
    outside it, so they are ordinary tensors that the probes can fit on with autograd.
    """
    device = resolve_device(model, None)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    batches = prefetch(loader) if num_workers == 0 else loader
    features, labels = [], []
    with eval_mode(model), torch.inference_mode():
        for images, batch_labels in batches:
            with autocast(device, autocast_dtype):
                batch_features = model.encode_image(images.to(device, non_blocking=True), normalize=False)
            features.append(batch_features.float().cpu())
            labels.append(torch.as_tensor(batch_labels, dtype=torch.long))

    if not features:
        raise ValueError("the dataset yielded no images; check its path and max_images")
    return torch.cat(features), torch.cat(labels)


def encode_texts_by_length(
    model: EvalModel, texts: list[str], batch_size: int, autocast_dtype: torch.dtype | None = None
) -> Tensor:
    """Encode ``texts`` into L2-normalised float32 CPU features ``[N, D]``, in the order given.

    The texts are tokenized once and encoded in batches of similar token length (a stable
    sort by the number of non-padding tokens), then put back in their order. A text tower
    that trims each batch to its longest text, as florence's does, then computes far less
    padding: about half the time on Flickr8k captions. Each text's features do not depend
    on its batch, up to float rounding. The forward passes run under ``torch.inference_mode``
    and the result is an ordinary tensor.
    """
    check_string_list(texts, "texts", "a dog runs on the grass")
    device = resolve_device(model, None)
    tokens = model.tokenizer(list(texts))
    order = (tokens != 0).sum(dim=1).argsort(stable=True)

    batches = []
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            with autocast(device, autocast_dtype):
                batch_features = model.encode_text(tokens[rows].to(device), normalize=False)
            batches.append((rows, F.normalize(batch_features.float(), dim=-1).cpu()))

    features = torch.empty(len(texts), batches[0][1].shape[1])
    for rows, batch_features in batches:
        features[rows] = batch_features
    return features


def zero_shot_scores(
    model: EvalModel,
    features: Tensor,
    classnames: list[str],
    templates: list[str],
    batch_size: int,
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """Return cosine similarities ``[N, C]`` between image features and the prompt-ensemble classifier."""
    classifier = build_zero_shot_classifier(
        model, model.tokenizer, classnames, templates, batch_size=batch_size, autocast_dtype=autocast_dtype
    )
    return F.normalize(features, dim=-1) @ classifier.cpu()


def _run_zero_shot(runner: SuiteRunner, run: RunSpec, dataset: DatasetSpec) -> dict[str, float]:
    from florence.evaluation.stats import classification_metrics

    split = runner.split(dataset, "test")
    features, labels = runner.image_features(split)
    scores = zero_shot_scores(
        runner.model, features, split.classes, load_templates(dataset), runner.suite.batch_size, runner.suite.autocast_dtype
    )
    metrics = classification_metrics(scores, labels, seed=runner.suite.seed, samples=runner.suite.bootstrap_samples)
    metrics["num_samples"] = len(labels)
    metrics["num_templates"] = len(load_templates(dataset))
    return metrics


def _run_retrieval(runner: SuiteRunner, run: RunSpec, dataset: DatasetSpec) -> dict[str, float]:
    split = runner.split(dataset, "test")
    image_features, _ = runner.image_features(split)
    text_features = encode_texts_by_length(
        runner.model, split.captions, runner.suite.batch_size, runner.suite.autocast_dtype
    )
    image_to_text, text_to_image = retrieval_ranks(image_features, text_features, split.caption_to_image)
    metrics = retrieval_metrics_with_ci(
        image_to_text,
        text_to_image,
        torch.as_tensor(split.caption_to_image),
        run.options["ks"],
        seed=runner.suite.seed,
        samples=runner.suite.bootstrap_samples,
    )
    metrics["num_images"] = len(image_features)
    metrics["num_captions"] = len(split.captions)
    return metrics


def retrieval_metrics_with_ci(
    image_to_text: Tensor,
    text_to_image: Tensor,
    caption_to_image: Tensor,
    ks: list[int],
    *,
    seed: int = 0,
    samples: int = 1000,
) -> dict[str, float]:
    """Turn retrieval ranks into recall@k (percent) with 95% bootstrap confidence intervals.

    The bootstrap resamples captioned images with replacement and takes each drawn image's
    captions with it, so the several captions of one image, which are not independent
    queries, stay together. Point estimates equal ``retrieval_metrics``.
    """
    from florence.evaluation.stats import bootstrap_cis

    num_images = len(image_to_text)
    captions_per_image = torch.bincount(caption_to_image, minlength=num_images).double()
    captioned = (captions_per_image > 0).nonzero().squeeze(1)

    statistics = {}
    for k in ks:
        image_hits = (image_to_text[captioned] < k).double()
        caption_hits = torch.bincount(caption_to_image, weights=(text_to_image < k).double(), minlength=num_images)[captioned]
        counts = captions_per_image[captioned]
        statistics[f"image_to_text_R@{k}"] = _mean_statistic(image_hits)
        statistics[f"text_to_image_R@{k}"] = _ratio_statistic(caption_hits, counts)

    recalls = list(statistics.values())

    def mean_recall(rows: Tensor) -> Tensor:
        # Summed one recall at a time, in order, as Python's sum() adds the point estimates.
        total = recalls[0](rows)
        for statistic in recalls[1:]:
            total = total + statistic(rows)
        return total / len(recalls)

    statistics["mean_recall"] = mean_recall

    all_rows = torch.arange(len(captioned))[None, :]
    intervals = bootstrap_cis(statistics, len(captioned), samples=samples, seed=seed)
    metrics: dict[str, float] = {}
    for name, statistic in statistics.items():
        metrics[name] = float(statistic(all_rows)[0])
        metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = intervals[name]
    return metrics


def _mean_statistic(hits: Tensor) -> Callable[[Tensor], Tensor]:
    """Return the recall (percent) of each resample, a row of an index matrix ``[S, n]``."""
    return lambda rows: 100.0 * hits[rows].mean(dim=-1)


def _ratio_statistic(hits: Tensor, counts: Tensor) -> Callable[[Tensor], Tensor]:
    """Return the pooled recall (percent) of each resample: hits over captions of the drawn images."""
    return lambda rows: 100.0 * (hits[rows].sum(dim=-1) / counts[rows].sum(dim=-1))


def _train_test_features(runner: SuiteRunner, dataset: DatasetSpec) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    train_features, train_labels = runner.image_features(runner.split(dataset, "train"))
    test_features, test_labels = runner.image_features(runner.split(dataset, "test"))
    return train_features, train_labels, test_features, test_labels


def _run_linear_probe(runner: SuiteRunner, run: RunSpec, dataset: DatasetSpec) -> dict[str, float]:
    from florence.evaluation.probe import linear_probe
    from florence.evaluation.stats import classification_metrics

    train_features, train_labels, test_features, test_labels = _train_test_features(runner, dataset)
    scores, chosen = linear_probe(
        train_features,
        train_labels,
        test_features,
        test_labels,
        seed=runner.suite.seed,
        val_fraction=run.options["val_fraction"],
        l2_grid=run.options["l2_grid"],
    )
    metrics = classification_metrics(scores, test_labels, seed=runner.suite.seed, samples=runner.suite.bootstrap_samples)
    metrics.update({f"chosen_{name}": value for name, value in chosen.items()})
    metrics["num_train"] = len(train_labels)
    metrics["num_samples"] = len(test_labels)
    return metrics


def _run_knn(runner: SuiteRunner, run: RunSpec, dataset: DatasetSpec) -> dict[str, float]:
    from florence.evaluation.probe import knn
    from florence.evaluation.stats import classification_metrics

    train_features, train_labels, test_features, test_labels = _train_test_features(runner, dataset)
    scores = knn(
        train_features, train_labels, test_features, test_labels, k=run.options["k"], temperature=run.options["temperature"]
    )
    metrics = classification_metrics(scores, test_labels, seed=runner.suite.seed, samples=runner.suite.bootstrap_samples)
    metrics["num_train"] = len(train_labels)
    metrics["num_samples"] = len(test_labels)
    return metrics


def _run_few_shot(runner: SuiteRunner, run: RunSpec, dataset: DatasetSpec) -> dict[str, float]:
    from florence.evaluation.probe import few_shot

    train_features, train_labels, test_features, test_labels = _train_test_features(runner, dataset)
    metrics = few_shot(
        train_features,
        train_labels,
        test_features,
        test_labels,
        shots=run.options["shots"],
        seeds=run.options["seeds"],
        l2_grid=run.options["l2_grid"],
        bootstrap_samples=runner.suite.bootstrap_samples,
    )
    metrics["num_samples"] = len(test_labels)
    return metrics


def _run_finetune(runner: SuiteRunner, run: RunSpec, dataset: DatasetSpec) -> dict[str, float]:
    _check_finetune_model(runner.model, dataset.name)
    checkpoint = runner.model.checkpoint
    if dataset.format == "wds":
        raise ValueError(f"finetune on {dataset.name!r}: WebDataset splits are not supported; use format folder or csv")

    from florence.evaluation.finetune import finetune
    from florence.evaluation.models import florence_model
    from florence.evaluation.stats import classification_metrics
    from florence.evaluation.tasks import model_image_size

    train = runner.split(dataset, "train")
    options = run.options
    source = {"type": "classification", "path" if dataset.train.path.endswith((".csv", ".tsv")) else "root": dataset.train.path}
    if dataset.train.archive:
        source["archive"] = dataset.train.archive
    if dataset.train.classes_file:
        source["classes_file"] = dataset.train.classes_file

    output = runner.output_dir / "finetune" / model_key(runner.model) / dataset.name
    weights = finetune(
        checkpoint,
        train.classes,
        source,
        output,
        steps=options["steps"],
        batch_size=options["batch_size"],
        lr=options["lr"],
        image_size=options["image_size"] or model_image_size(runner.model.model),
        seed=runner.suite.seed,
        precision=options["precision"],
        templates=options["templates"],
        extra_overrides=[f"data.num_workers={runner.suite.num_workers}"],
    )

    tuned = florence_model(str(weights))
    test = build_classification_split(dataset, dataset.test, tuned.transform, runner.suite.seed)
    features, labels = encode_image_features(
        tuned, test.dataset, runner.suite.batch_size, runner.suite.num_workers, runner.suite.autocast_dtype
    )
    scores = zero_shot_scores(
        tuned, features, test.classes, load_templates(dataset), runner.suite.batch_size, runner.suite.autocast_dtype
    )
    metrics = classification_metrics(scores, labels, seed=runner.suite.seed, samples=runner.suite.bootstrap_samples)
    metrics["num_samples"] = len(labels)
    return metrics


TASKS = {
    "zeroshot": _run_zero_shot,
    "retrieval": _run_retrieval,
    "video_retrieval": run_video_retrieval,
    "linear_probe": _run_linear_probe,
    "few_shot": _run_few_shot,
    "knn": _run_knn,
    "finetune": _run_finetune,
}


def _run_key(config: dict[str, Any], model_fingerprint: str, data_fingerprints: dict[str, str]) -> str:
    payload = {"config": config, "model": model_fingerprint, "data": data_fingerprints, "version": RECORD_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _read_record(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        logger.warning("ignoring unreadable record %s; the run will be repeated", path)
        return None


def _headline(metrics: dict[str, float]) -> str:
    shown = {key: value for key, value in metrics.items() if "_ci_" not in key and isinstance(value, float)}
    return ", ".join(f"{key} {value:.4g}" for key, value in list(shown.items())[:6])
