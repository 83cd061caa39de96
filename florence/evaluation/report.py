"""Reports across every benchmark record in an output folder: a CSV, a Markdown table and a PNG bar chart.

The CSV has one row per (model, dataset, task, metric) with the value and its 95% CI. The
Markdown table and the chart show each task's headline metrics: top-1 for the
classification tasks, R@1 both ways for image and video retrieval, and the mean top-1 per
shot count for few-shot.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from pathlib import Path
from typing import Any

from florence.checkpoint import atomic_write_bytes

logger = logging.getLogger(__name__)

REPORT_NAMES = ("results.csv", "results.md", "results.png")


def read_records(output_dir: str | Path) -> list[dict[str, Any]]:
    """Read every record under ``output_dir/records``, sorted by model, dataset and task."""
    records = []
    for path in sorted(Path(output_dir).glob("records/*/*.json")):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError:
            logger.warning("skipping unreadable record %s", path)
    return sorted(records, key=lambda record: (record["model"]["name"], record["dataset"], record["task"]))


def headline_metrics(record: dict[str, Any]) -> list[str]:
    """Return the metric names a report shows for a record's task."""
    metrics = record["metrics"]
    task = record["task"]
    if task in ("retrieval", "video_retrieval"):
        media = "video" if task == "video_retrieval" else "image"
        names = (f"{media}_to_text_R@1", f"text_to_{media}_R@1", f"{media}_to_text_R@5", f"text_to_{media}_R@5")
        return [name for name in names if name in metrics]
    if task == "few_shot":
        return sorted((name for name in metrics if re.fullmatch(r"\d+shot_top1_mean", name)), key=lambda name: int(name.split("shot")[0]))
    if task == "zeroshot":
        return [name for name in ("top1", "top5", "mean_per_class_recall") if name in metrics]
    return [name for name in ("top1",) if name in metrics]


def chart_metrics(record: dict[str, Any]) -> list[str]:
    """Return the metrics a chart shows: R@1 both ways, the largest few-shot k, else top-1."""
    names = headline_metrics(record)
    if record["task"] in ("retrieval", "video_retrieval"):
        return names[:2]
    if record["task"] == "few_shot":
        return names[-1:]
    return names[:1]


def write_reports(output_dir: str | Path) -> list[Path]:
    """Write ``results.csv``, ``results.md`` and ``results.png`` for every record in ``output_dir``; return their paths."""
    output_dir = Path(output_dir)
    records = read_records(output_dir)
    if not records:
        raise ValueError(f"no benchmark records found under {output_dir / 'records'}; run 'florence benchmark' first")

    paths = [output_dir / name for name in REPORT_NAMES]
    atomic_write_bytes(paths[0], records_to_csv(records).encode())
    atomic_write_bytes(paths[1], records_to_markdown(records).encode())
    write_chart(records, paths[2])
    return paths


def records_to_csv(records: list[dict[str, Any]]) -> str:
    """Return a CSV with one row per metric: model, fingerprint, dataset, task, metric, value, ci_low, ci_high, seed, florence_version."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "model_fingerprint", "dataset", "task", "metric", "value", "ci_low", "ci_high", "seed", "florence_version"])
    for record in records:
        metrics = record["metrics"]
        for name, value in metrics.items():
            if name.endswith(("_ci_low", "_ci_high")):
                continue
            low, high = _interval(metrics, name)
            writer.writerow(
                [
                    record["model"]["name"],
                    record["model"]["fingerprint"][:12],
                    record["dataset"],
                    record["task"],
                    name,
                    _number(value),
                    _number(low),
                    _number(high),
                    record["seed"],
                    record["florence_version"],
                ]
            )
    return buffer.getvalue()


def records_to_markdown(records: list[dict[str, Any]]) -> str:
    """Return a Markdown table of the headline metrics, percentages with their 95% CI."""
    lines = ["| model | dataset | task | metric | value (%) | 95% CI |", "|---|---|---|---|---:|---|"]
    for record in records:
        metrics = record["metrics"]
        for name in headline_metrics(record):
            low, high = _interval(metrics, name)
            interval = f"{low:.1f} to {high:.1f}" if low is not None else ""
            value = f"{metrics[name]:.1f}"
            std_name = name.replace("_mean", "_std")
            if std_name != name and std_name in metrics and _seed_count(record) > 1:
                value += f" ± {metrics[std_name]:.1f}"
            lines.append(f"| {record['model']['name']} | {record['dataset']} | {record['task']} | {name} | {value} | {interval} |")
    return "\n".join(lines) + "\n"


def _seed_count(record: dict[str, Any]) -> int:
    """Number of seeds a few-shot record averages over; a standard deviation needs at least two."""
    return len(record.get("config", {}).get("options", {}).get("seeds", ()))


def write_chart(records: list[dict[str, Any]], path: Path) -> None:
    """Draw one bar per (dataset, task, headline metric) and model, with 95% CI error bars, as a PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels: list[str] = []
    models = sorted({record["model"]["name"] for record in records})
    values: dict[str, dict[str, tuple[float, float, float]]] = {model: {} for model in models}
    for record in records:
        for name in chart_metrics(record):
            label = f"{record['dataset']}\n{record['task']}\n{name}"
            if label not in labels:
                labels.append(label)
            low, high = _interval(record["metrics"], name)
            value = record["metrics"][name]
            values[record["model"]["name"]][label] = (value, value - (low if low is not None else value), (high if high is not None else value) - value)

    width = 0.8 / len(models)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 1.5), 4.5))
    for offset, model in enumerate(models):
        positions = [index + (offset - (len(models) - 1) / 2) * width for index in range(len(labels))]
        # A model without a record for a label gets an empty bar labelled "n/a", not a 0.
        entries = [values[model].get(label, (0.0, 0.0, 0.0)) for label in labels]
        texts = [f"{values[model][label][0]:.1f}" if label in values[model] else "n/a" for label in labels]
        bars = axes.bar(
            positions,
            [entry[0] for entry in entries],
            width,
            yerr=[[entry[1] for entry in entries], [entry[2] for entry in entries]],
            capsize=3,
            label=model,
        )
        axes.bar_label(bars, labels=texts, fontsize=7, padding=3)

    axes.set_xticks(range(len(labels)), labels, fontsize=7)
    axes.set_ylabel("percent (95% bootstrap CI)")
    # Headroom above 100 keeps the value labels, drawn above the error bars, inside the plot.
    axes.set_ylim(0, 115)
    axes.set_yticks(range(0, 101, 20))
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def _interval(metrics: dict[str, Any], name: str) -> tuple[float | None, float | None]:
    """Return a metric's CI bounds; a few-shot ``<k>shot_top1_mean`` uses the ``<k>shot_top1`` interval."""
    base = name[: -len("_mean")] if name.endswith("_mean") and f"{name}_ci_low" not in metrics else name
    return metrics.get(f"{base}_ci_low"), metrics.get(f"{base}_ci_high")


def _number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
