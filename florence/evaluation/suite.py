"""Benchmark suite files: YAML that lists datasets and the tasks to run on them.

Format (every key other than ``datasets`` and ``runs`` is optional)::

    name: shared_data            # default: the file's stem
    seed: 0                      # subsets, probes, bootstrap resamples, random model init
    batch_size: 256              # images per encode_image call
    num_workers: 0               # DataLoader worker processes
    bootstrap_samples: 1000      # resamples behind every 95% confidence interval
    precision: fp32              # fp32, or bf16 / fp16 autocast for the encoders
    datasets:
      cifar10:
        format: csv              # folder | csv | coco | captions | wds | video_captions
        test: {path: "${FLORENCE_SHARED_DATA:-../shared/data}/cifar10/test.csv", archive: ..., max_images: 2000}
        train: {path: ..., archive: ...}      # needed by linear_probe, few_shot, knn, finetune
        classnames: cifar10      # shipped set or file; default: the data's class names
        templates: cifar10       # shipped set, heldout/imagenet/simple, a file, or a list
        language: en
    runs:
      - {task: zeroshot, dataset: cifar10}
      - {task: few_shot, dataset: cifar10, shots: [1, 4, 16], seeds: [0, 1, 2]}

``${VAR}`` and ``${VAR:-default}`` in any string are replaced by environment variables.
Relative paths start at the current directory.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from florence.evaluation.datasets import (
    CLASSIFICATION_FORMATS,
    FORMATS,
    RETRIEVAL_FORMATS,
    SPLIT_KEYS,
    VIDEO_FORMATS,
    DatasetSpec,
    SplitSpec,
)

SUITE_KEYS = ("name", "seed", "batch_size", "num_workers", "bootstrap_samples", "precision", "datasets", "runs")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DATASET_KEYS = ("format", "test", "train", "classnames", "templates", "language")

# Options each task accepts, with their defaults.
TASK_OPTIONS: dict[str, dict[str, Any]] = {
    "zeroshot": {},
    "retrieval": {"ks": [1, 5, 10]},
    "video_retrieval": {
        "ks": [1, 5, 10], "num_frames": 8, "num_clips": 1, "sampling": "uniform", "frame_interval": 2, "tower": "frames",
    },
    "linear_probe": {"val_fraction": 0.2, "l2_grid": None},
    "few_shot": {"shots": [1, 2, 4, 8, 16], "seeds": [0, 1, 2], "l2_grid": None},
    "knn": {"k": 20, "temperature": 0.07},
    "finetune": {
        "steps": 100,
        "batch_size": 64,
        "lr": 2e-5,
        "image_size": None,
        "precision": "fp32",
        "templates": "none",
    },
}
TRAIN_SPLIT_TASKS = ("linear_probe", "few_shot", "knn", "finetune")
VIDEO_TASKS = ("video_retrieval",)

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class SuiteError(ValueError):
    """A suite file that cannot be run: the message names the file, the key and the fix."""


@dataclass
class RunSpec:
    """One (task, dataset) pair of a suite with the task's options, defaults filled in."""

    task: str
    dataset: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return f"{self.dataset}__{self.task}"


@dataclass
class Suite:
    name: str
    path: Path
    datasets: dict[str, DatasetSpec]
    runs: list[RunSpec]
    seed: int = 0
    batch_size: int = 256
    num_workers: int = 0
    bootstrap_samples: int = 1000
    precision: str = "fp32"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """Return the autocast dtype of ``precision``, None for fp32."""
        return PRECISIONS[self.precision]


def load_suite(path: str | Path) -> Suite:
    """Read and check a suite file; raise ``SuiteError`` naming the bad key and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"suite file {path} not found; pass a YAML file such as suites/shared_data.yaml")

    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        hint = ""
        if "${" in text:
            hint = "; an unquoted ${VAR} inside {...} or [...] is invalid YAML, so quote that value or use a block mapping"
        raise SuiteError(f"{path}: invalid YAML: {error}{hint}") from error

    if not isinstance(raw, dict):
        raise SuiteError(f"{path}: expected a mapping with 'datasets' and 'runs', got {type(raw).__name__}")

    raw = _expand_variables(raw, path)
    _check_keys(raw, SUITE_KEYS, f"{path}", "suite")
    for required in ("datasets", "runs"):
        if required not in raw:
            raise SuiteError(f"{path}: missing key {required!r}; see the format in docs/evaluation.md")

    precision = raw.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise SuiteError(f"{path}: invalid precision {precision!r}; valid values: {', '.join(PRECISIONS)}")

    datasets = _parse_datasets(raw["datasets"], path)
    runs = _parse_runs(raw["runs"], datasets, path)
    return Suite(
        name=str(raw.get("name", path.stem)),
        path=path,
        datasets=datasets,
        runs=runs,
        seed=_int_option(raw, "seed", 0, path, minimum=0),
        batch_size=_int_option(raw, "batch_size", 256, path, minimum=1),
        num_workers=_int_option(raw, "num_workers", 0, path, minimum=0),
        bootstrap_samples=_int_option(raw, "bootstrap_samples", 1000, path, minimum=1),
        precision=precision,
    )


def _expand_variables(value: Any, path: Path) -> Any:
    if isinstance(value, dict):
        return {key: _expand_variables(item, path) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand_variables(item, path) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise SuiteError(f"{path}: environment variable {name} is not set; export it or write ${{{name}:-default}}")

    return _VARIABLE.sub(substitute, value)


def _check_keys(mapping: dict, valid: tuple[str, ...] | list[str], where: str, what: str) -> None:
    unknown = sorted(set(mapping) - set(valid))
    if unknown:
        raise SuiteError(f"{where}: unknown {what} key(s) {unknown}; valid keys: {', '.join(valid)}")


def _int_option(raw: dict, key: str, default: int, path: Path, minimum: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SuiteError(f"{path}: invalid {key} {value!r}; pass an integer >= {minimum}")
    return value


def _parse_datasets(raw: Any, path: Path) -> dict[str, DatasetSpec]:
    if not isinstance(raw, dict) or not raw:
        raise SuiteError(f"{path}: 'datasets' must map dataset names to specs, e.g. cifar10: {{format: csv, test: ...}}")

    datasets = {}
    for name, entry in raw.items():
        where = f"{path}: dataset {name!r}"
        if not isinstance(entry, dict):
            raise SuiteError(f"{where}: expected a mapping with 'format' and 'test', got {entry!r}")

        _check_keys(entry, DATASET_KEYS, where, "dataset")
        data_format = entry.get("format")
        if data_format not in FORMATS:
            raise SuiteError(f"{where}: invalid format {data_format!r}; valid formats: {', '.join(FORMATS)}")

        if "test" not in entry:
            raise SuiteError(f"{where}: missing 'test' split, e.g. test: {{path: data/test.csv}}")

        templates = entry.get("templates", "simple")
        if not isinstance(templates, (str, list)):
            raise SuiteError(f"{where}: templates must be a set name, a file or a list, got {templates!r}")

        datasets[name] = DatasetSpec(
            name=name,
            format=data_format,
            test=_parse_split(entry["test"], f"{where}, split 'test'", data_format),
            train=_parse_split(entry["train"], f"{where}, split 'train'", data_format) if "train" in entry else None,
            classnames=entry.get("classnames"),
            templates=templates,
            language=str(entry.get("language", "en")),
        )
    return datasets


def _parse_split(raw: Any, where: str, data_format: str) -> SplitSpec:
    if isinstance(raw, (str, list)):
        raw = {"path": raw}
    if not isinstance(raw, dict) or "path" not in raw:
        raise SuiteError(f"{where}: expected a path or a mapping with 'path', got {raw!r}")

    _check_keys(raw, SPLIT_KEYS, where, "split")
    path = raw["path"]
    if isinstance(path, list) and data_format not in VIDEO_FORMATS:
        raise SuiteError(f"{where}: format {data_format!r} takes one path, got a list; only video_captions takes several")
    if isinstance(path, list) and (not path or not all(isinstance(item, str) for item in path)):
        raise SuiteError(f"{where}: path must be a file or a non-empty list of files, got {path!r}")
    max_images = raw.get("max_images")
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise SuiteError(f"{where}: invalid max_images {max_images!r}; pass a positive integer or leave it out")
    return SplitSpec(**{key: raw.get(key) for key in SPLIT_KEYS})


def _parse_runs(raw: Any, datasets: dict[str, DatasetSpec], path: Path) -> list[RunSpec]:
    if not isinstance(raw, list) or not raw:
        raise SuiteError(f"{path}: 'runs' must be a list such as [{{task: zeroshot, dataset: cifar10}}]")

    runs = []
    seen = set()
    for index, entry in enumerate(raw):
        where = f"{path}: runs[{index}]"
        if not isinstance(entry, dict) or "task" not in entry or "dataset" not in entry:
            raise SuiteError(f"{where}: expected a mapping with 'task' and 'dataset', got {entry!r}")

        task, dataset = entry["task"], entry["dataset"]
        if task not in TASK_OPTIONS:
            raise SuiteError(f"{where}: unknown task {task!r}; valid tasks: {', '.join(TASK_OPTIONS)}")
        if dataset not in datasets:
            raise SuiteError(f"{where}: unknown dataset {dataset!r}; defined datasets: {', '.join(datasets)}")

        options = {key: value for key, value in entry.items() if key not in ("task", "dataset")}
        if options and not TASK_OPTIONS[task]:
            raise SuiteError(f"{where}: {task} takes no options, got {sorted(options)}; remove them")
        _check_keys(options, list(TASK_OPTIONS[task]), where, f"{task} option")
        _check_task_fits_dataset(task, datasets[dataset], where)
        options = {**TASK_OPTIONS[task], **options}
        if task in VIDEO_TASKS:
            _check_video_options(options, where)
        else:
            options = check_task_options(task, options, where)

        run = RunSpec(task, dataset, options)
        if run.run_id in seen:
            raise SuiteError(f"{where}: task {task!r} on dataset {dataset!r} is listed twice; keep one")
        seen.add(run.run_id)
        runs.append(run)
    return runs


def _check_task_fits_dataset(task: str, dataset: DatasetSpec, where: str) -> None:
    if task == "retrieval" and dataset.format in VIDEO_FORMATS:
        raise SuiteError(
            f"{where}: dataset {dataset.name!r} has format {dataset.format!r}, which contains videos; "
            "use task video_retrieval for it, or a dataset of format "
            f"{', '.join(RETRIEVAL_FORMATS)} for task retrieval"
        )
    if (task in VIDEO_TASKS) != (dataset.format in VIDEO_FORMATS):
        raise SuiteError(
            f"{where}: {task} does not fit dataset {dataset.name!r} of format {dataset.format!r}; "
            f"video_retrieval runs on, and only on, the formats {', '.join(VIDEO_FORMATS)}"
        )
    if task in VIDEO_TASKS:
        return
    if task == "retrieval" and dataset.format not in RETRIEVAL_FORMATS:
        raise SuiteError(
            f"{where}: retrieval needs captions, but dataset {dataset.name!r} has format {dataset.format!r}; "
            f"use one of {', '.join(RETRIEVAL_FORMATS)}"
        )
    if task != "retrieval" and dataset.format not in CLASSIFICATION_FORMATS:
        raise SuiteError(
            f"{where}: {task} needs class labels, but dataset {dataset.name!r} has format {dataset.format!r}; "
            f"use one of {', '.join(CLASSIFICATION_FORMATS)}"
        )
    if task == "finetune" and dataset.format == "wds":
        raise SuiteError(f"{where}: finetune cannot read WebDataset splits of dataset {dataset.name!r}; use format folder or csv")
    if task in TRAIN_SPLIT_TASKS and dataset.train is None:
        raise SuiteError(f"{where}: {task} needs a 'train' split, but dataset {dataset.name!r} has none; add train: {{path: ...}}")


def _check_video_options(options: dict[str, Any], where: str) -> None:
    from florence.adapters.video.sampling import SAMPLING_MODES

    for key in ("num_frames", "num_clips", "frame_interval"):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SuiteError(f"{where}: invalid {key} {value!r}; pass a positive integer")
    if options["sampling"] not in SAMPLING_MODES:
        raise SuiteError(f"{where}: invalid sampling {options['sampling']!r}; valid values: {', '.join(SAMPLING_MODES)}")
    if options["tower"] not in ("frames", "video"):
        raise SuiteError(f"{where}: invalid tower {options['tower']!r}; valid values: frames, video")
    options["ks"] = check_int_list(options["ks"], "ks", where, minimum=1, example="[1, 5, 10]")


def check_task_options(task: str, options: dict[str, Any], where: str) -> dict[str, Any]:
    """Check the options of an image task against the rules its task function applies at run time.

    Returns the options with numbers written as text converted to floats: PyYAML reads
    ``2e-5`` (no dot) as the string ``'2e-5'``.
    """
    options = dict(options)
    if task == "retrieval":
        options["ks"] = check_int_list(options["ks"], "ks", where, minimum=1, example="[1, 5, 10]")
    elif task == "knn":
        options["k"] = _check_int(options["k"], "k", where, minimum=1, example="20")
        options["temperature"] = _check_number(options["temperature"], "temperature", where, "a positive number such as 0.07")
    elif task == "linear_probe":
        options["val_fraction"] = _check_fraction(options["val_fraction"], where)
        options["l2_grid"] = _check_l2_grid(options["l2_grid"], where)
    elif task == "few_shot":
        options["shots"] = check_int_list(options["shots"], "shots", where, minimum=1, example="[1, 4, 16]")
        options["seeds"] = check_int_list(options["seeds"], "seeds", where, minimum=None, example="[0, 1, 2]")
        options["l2_grid"] = _check_l2_grid(options["l2_grid"], where)
    elif task == "finetune":
        _check_finetune_options(options, where)
    return options


def check_int_list(value: Any, key: str, where: str, minimum: int | None, example: str) -> list[int]:
    """Return ``value`` if it is a non-empty list of integers (each >= ``minimum`` when given)."""
    if minimum is None:
        bound = ""
    elif minimum == 1:
        bound = " positive"
    else:
        bound = f" >= {minimum}"
    if _is_int(value):
        raise SuiteError(f"{where}: invalid {key} {value!r}: {key} takes a list; write {key}: [{value}]")
    if not isinstance(value, list) or not value:
        raise SuiteError(f"{where}: invalid {key} {value!r}; pass a non-empty list of{bound} integers such as {example}")
    for item in value:
        if not _is_int(item) or (minimum is not None and item < minimum):
            raise SuiteError(
                f"{where}: invalid value {item!r} in {key} {value!r}; pass a list of{bound} integers such as {example}"
            )
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(value: Any, key: str, where: str, minimum: int, example: str) -> int:
    if not _is_int(value) or value < minimum:
        raise SuiteError(f"{where}: invalid {key} {value!r}; pass an integer >= {minimum}, e.g. {example}")
    return value


def _to_number(value: Any) -> float | None:
    """Return ``value`` as a finite float (ints, floats and numbers written as text), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _check_number(value: Any, key: str, where: str, expected: str) -> float:
    """Return ``value`` as a positive finite number, or raise naming ``key`` and ``expected``."""
    number = _to_number(value)
    if number is None or number <= 0:
        raise SuiteError(f"{where}: invalid {key} {value!r}; pass {expected}")
    return number


def _check_fraction(value: Any, where: str) -> float:
    number = _to_number(value)
    if number is None or not 0 < number < 1:
        raise SuiteError(f"{where}: invalid val_fraction {value!r}; pass a fraction between 0 and 1 (exclusive), e.g. 0.2")
    return number


def _check_l2_grid(value: Any, where: str) -> list[float] | None:
    fix = "pass a non-empty list of L2 strengths >= 0 such as [1.0e-4, 1.0e-3, 1.0e-2], or null for the default grid"
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise SuiteError(f"{where}: invalid l2_grid {value!r}; {fix}")
    grid = []
    for item in value:
        number = _to_number(item)
        if number is None or number < 0:
            raise SuiteError(f"{where}: invalid value {item!r} in l2_grid {value!r}; {fix}")
        grid.append(number)
    return grid


def _check_finetune_options(options: dict[str, Any], where: str) -> None:
    """Check finetune options in place, with the rules of ``florence.evaluation.finetune``."""
    from florence.config import PRECISIONS as TRAIN_PRECISIONS
    from florence.training.data import TEMPLATE_SETS

    options["steps"] = _check_int(options["steps"], "steps", where, minimum=1, example="100")
    if not _is_int(options["batch_size"]) or options["batch_size"] < 2:
        raise SuiteError(
            f"{where}: invalid batch_size {options['batch_size']!r}; pass an integer >= 2, "
            "because the contrastive loss needs at least 2 images per batch"
        )
    options["lr"] = _check_number(options["lr"], "lr", where, "a positive learning rate such as 2.0e-5")
    if options["image_size"] is not None:
        options["image_size"] = _check_int(options["image_size"], "image_size", where, minimum=1, example="224")
    if options["precision"] not in TRAIN_PRECISIONS:
        raise SuiteError(
            f"{where}: invalid precision {options['precision']!r}; valid values: {', '.join(TRAIN_PRECISIONS)}"
        )
    if options["templates"] not in TEMPLATE_SETS:
        raise SuiteError(f"{where}: invalid templates {options['templates']!r}; valid values: {', '.join(TEMPLATE_SETS)}")
