"""Suite runs of the feature tasks (linear probe, few-shot, k-NN) and of fine-tuning, on real CIFAR-10 images."""

import pytest
import torch

from florence.checkpoint import save_weights
from florence.evaluation.models import load_eval_model
from florence.evaluation.report import write_reports
from florence.evaluation.runner import SuiteRunner, run_suite
from florence.evaluation.suite import load_suite
from florence.models import create_model
from tests.evaluation.benchmark_helpers import (
    cifar_dataset,
    write_suite,
    write_tiny_clip_config,
)

FEATURE_RUNS = [
    {"task": "linear_probe", "dataset": "cifar10"},
    {"task": "knn", "dataset": "cifar10", "k": 10},
    {"task": "few_shot", "dataset": "cifar10", "shots": [1, 4], "seeds": [0, 1]},
]


@pytest.fixture
def feature_records(tmp_path):
    suite = load_suite(write_suite(tmp_path, {"cifar10": cifar_dataset(100, 200)}, FEATURE_RUNS))
    model = load_eval_model(f"open_clip:{write_tiny_clip_config(tmp_path)}")
    return suite, model, run_suite(suite, model, tmp_path / "out")


def test_feature_tasks_report_ci(feature_records):
    _, _, records = feature_records
    linear_probe, knn, few_shot = (record["metrics"] for record in records)

    assert linear_probe["top1_ci_low"] <= linear_probe["top1"] <= linear_probe["top1_ci_high"]
    assert linear_probe["chosen_l2"] > 0
    assert knn["top1_ci_low"] <= knn["top1"] <= knn["top1_ci_high"]
    assert few_shot["4shot_top1_ci_low"] <= few_shot["4shot_top1_mean"] <= few_shot["4shot_top1_ci_high"]
    assert "1shot_top1_std" in few_shot


def test_feature_tasks_share_cached_features(tmp_path, feature_records):
    suite, model, _ = feature_records
    runner = SuiteRunner(suite, model, tmp_path / "out")
    train_features, train_labels = runner.image_features(runner.split(suite.datasets["cifar10"], "train"))

    assert len(list((tmp_path / "out" / "features").glob("*.pt"))) == 2
    assert train_features.shape == (200, 32)
    assert train_labels.dtype == torch.long


def test_feature_tasks_repeatable(tmp_path, feature_records):
    suite, model, records = feature_records
    again = run_suite(suite, model, tmp_path / "again")

    assert [record["metrics"] for record in again] == [record["metrics"] for record in records]


def test_few_shot_report_rows(tmp_path, feature_records):
    write_reports(tmp_path / "out")
    markdown = (tmp_path / "out" / "results.md").read_text()

    assert "| cifar10 | few_shot | 1shot_top1_mean |" in markdown
    assert "| cifar10 | few_shot | 4shot_top1_mean |" in markdown


def test_finetune_run_scores_tuned_model(tmp_path):
    torch.manual_seed(0)
    save_weights(create_model("florence-tiny"), tmp_path / "start" / "model.safetensors")
    runs = [{"task": "finetune", "dataset": "cifar10", "steps": 2, "batch_size": 16}]
    suite = load_suite(write_suite(tmp_path, {"cifar10": cifar_dataset(40, 80)}, runs))

    record = run_suite(suite, load_eval_model(str(tmp_path / "start")), tmp_path / "out")[0]

    assert record["metrics"]["num_samples"] == 40
    assert (tmp_path / "out" / "finetune").is_dir()
    assert list((tmp_path / "out" / "finetune").rglob("model.safetensors"))
