"""The benchmark suite: repeatable numbers, resume and rerun, records, reports and the CLI command."""

import json

import pytest
import torch

from florence.cli.main import main
from florence.evaluation.models import load_eval_model
from florence.evaluation.report import write_reports
from florence.evaluation.runner import SuiteRunner, run_suite
from florence.evaluation.suite import load_suite
from tests.evaluation.benchmark_helpers import (
    cifar_dataset,
    flickr_dataset,
    write_suite,
    write_tiny_clip_config,
)

RUNS = [{"task": "zeroshot", "dataset": "cifar10"}, {"task": "retrieval", "dataset": "flickr"}]


@pytest.fixture
def model_spec(tmp_path):
    return f"open_clip:{write_tiny_clip_config(tmp_path)}"


@pytest.fixture
def suite_path(tmp_path):
    datasets = {"cifar10": cifar_dataset(120, None), "flickr": flickr_dataset(20)}
    return write_suite(tmp_path, datasets, RUNS)


def _metrics(records):
    return {(record["dataset"], record["task"]): record["metrics"] for record in records}


def test_suite_repeatable_across_runs(tmp_path, suite_path, model_spec):
    suite = load_suite(suite_path)
    first = run_suite(suite, load_eval_model(model_spec, seed=0), tmp_path / "first")
    second = run_suite(suite, load_eval_model(model_spec, seed=0), tmp_path / "second")

    assert _metrics(first) == _metrics(second)
    assert [record["run_key"] for record in first] == [record["run_key"] for record in second]


def test_model_seed_changes_fingerprint(model_spec):
    assert load_eval_model(model_spec, seed=0).fingerprint == load_eval_model(model_spec, seed=0).fingerprint
    assert load_eval_model(model_spec, seed=0).fingerprint != load_eval_model(model_spec, seed=1).fingerprint


def test_suite_skips_finished_runs(tmp_path, suite_path, model_spec):
    suite = load_suite(suite_path)
    model = load_eval_model(model_spec)
    first = run_suite(suite, model, tmp_path / "out")
    again = run_suite(suite, model, tmp_path / "out")

    assert [record["finished_at"] for record in again] == [record["finished_at"] for record in first]
    assert [record["seconds"] for record in again] == [record["seconds"] for record in first]


def test_suite_resumes_after_interrupt(tmp_path, suite_path, model_spec):
    suite = load_suite(suite_path)
    model = load_eval_model(model_spec)
    runner = SuiteRunner(suite, model, tmp_path / "out")
    first = run_suite(suite, model, tmp_path / "out")
    zeroshot_path, retrieval_path = (runner.record_path(run) for run in suite.runs)
    retrieval_path.unlink()
    kept = zeroshot_path.read_text()

    resumed = run_suite(suite, model, tmp_path / "out")

    assert zeroshot_path.read_text() == kept
    assert retrieval_path.is_file()
    assert resumed[1]["metrics"] == first[1]["metrics"]


def test_suite_rerun_flag_repeats_runs(tmp_path, suite_path, model_spec):
    suite = load_suite(suite_path)
    model = load_eval_model(model_spec)
    run_suite(suite, model, tmp_path / "out")
    path = SuiteRunner(suite, model, tmp_path / "out").record_path(suite.runs[0])
    path.write_text(path.read_text().replace('"finished_at": "', '"finished_at": "old '))

    run_suite(suite, model, tmp_path / "out", rerun=True)

    assert "old " not in json.loads(path.read_text())["finished_at"]


def test_suite_reruns_changed_config(tmp_path, model_spec):
    datasets = {"flickr": flickr_dataset(20)}
    model = load_eval_model(model_spec)
    before = run_suite(load_suite(write_suite(tmp_path, datasets, [RUNS[1]])), model, tmp_path / "out")[0]
    changed = [{**RUNS[1], "ks": [1, 2]}]
    after = run_suite(load_suite(write_suite(tmp_path, datasets, changed)), model, tmp_path / "out")[0]

    assert after["run_key"] != before["run_key"]
    assert "image_to_text_R@2" in after["metrics"]


def test_record_contents(tmp_path, suite_path, model_spec):
    record = run_suite(load_suite(suite_path), load_eval_model(model_spec), tmp_path / "out")[0]

    assert record["config"]["dataset"]["test"]["max_images"] == 120
    assert record["config"]["seed"] == 0
    assert len(record["model"]["fingerprint"]) == 64
    assert len(record["data"]["test"]) == 64
    assert record["florence_version"]
    assert record["metrics"]["top1_ci_low"] <= record["metrics"]["top1"] <= record["metrics"]["top1_ci_high"]
    assert record["metrics"]["num_samples"] == 120


def test_features_cached_to_disk(tmp_path, suite_path, model_spec):
    suite = load_suite(suite_path)
    run_suite(suite, load_eval_model(model_spec), tmp_path / "out")

    assert len(list((tmp_path / "out" / "features").glob("*.pt"))) == 2


def test_reports_written(tmp_path, suite_path, model_spec):
    run_suite(load_suite(suite_path), load_eval_model(model_spec), tmp_path / "out")
    csv_path, markdown_path, chart_path = write_reports(tmp_path / "out")

    assert "cifar10,zeroshot,top1," in csv_path.read_text()
    assert "| cifar10 | zeroshot | top1 |" in markdown_path.read_text()
    assert "| flickr | retrieval | text_to_image_R@1 |" in markdown_path.read_text()
    assert chart_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_benchmark_writes_reports(tmp_path, suite_path, model_spec, capsys):
    status = main(["benchmark", "--suite", str(suite_path), "--model", model_spec, "--output", str(tmp_path / "out")])

    assert status == 0
    assert "| cifar10 | zeroshot | top1 |" in capsys.readouterr().out
    assert (tmp_path / "out" / "results.png").is_file()


def test_cli_benchmark_unknown_model(tmp_path, suite_path, capsys):
    status = main(["benchmark", "--suite", str(suite_path), "--model", "florence-huge", "--output", str(tmp_path / "out")])

    assert status == 2
    message = capsys.readouterr().err
    assert "unknown model 'florence-huge'" in message
    assert "florence-tiny" in message



@pytest.fixture
def offline_suite(tmp_path):
    """Return a suite whose data files do not exist, for errors that must come before any data is read."""
    return write_suite(tmp_path, {"images": {"format": "csv", "test": "absent.csv"}}, [{"task": "zeroshot", "dataset": "images"}])


def _benchmark_error(capsys, *arguments):
    status = main(["benchmark", *arguments])
    return status, capsys.readouterr().err


def test_cli_benchmark_non_checkpoint_file(tmp_path, offline_suite, capsys):
    (tmp_path / "notes.txt").write_text("not weights")

    status, message = _benchmark_error(capsys, "--suite", str(offline_suite), "--model", str(tmp_path / "notes.txt"))

    assert status == 2
    assert "cannot read" in message
    assert "notes.txt as a florence checkpoint" in message
    assert "open_clip:ARCH" in message
    assert "Traceback" not in message


@pytest.mark.parametrize(("device", "message"), [("gpu", "invalid device 'gpu'"), ("cuda:99", "device 'cuda:99' is not usable")])
def test_cli_benchmark_bad_device(offline_suite, model_spec, capsys, device, message):
    status, error = _benchmark_error(capsys, "--suite", str(offline_suite), "--model", model_spec, "--device", device)

    assert status == 2
    assert message in error


def test_cli_benchmark_shots_not_list(tmp_path, model_spec, capsys):
    datasets = {"images": {"format": "csv", "test": "absent.csv", "train": "absent.csv"}}
    suite = write_suite(tmp_path, datasets, [{"task": "few_shot", "dataset": "images", "shots": 4}])

    status, message = _benchmark_error(capsys, "--suite", str(suite), "--model", model_spec)

    assert status == 2
    assert "runs[0]: invalid shots 4: shots takes a list; write shots: [4]" in message

def test_length_sorted_text_encoding_matches(tmp_path):
    from florence.evaluation.retrieval import encode_texts
    from florence.evaluation.runner import encode_texts_by_length

    suite = load_suite(write_suite(tmp_path, {"flickr": flickr_dataset(40)}, [RUNS[1]]))
    model = load_eval_model("florence-tiny", seed=0)
    captions = SuiteRunner(suite, model, tmp_path / "out").split(suite.datasets["flickr"], "test").captions

    sorted_features = encode_texts_by_length(model, captions, batch_size=32)
    plain_features = encode_texts(model, model.tokenizer, captions, batch_size=32)

    assert sorted_features.shape == (200, 256)
    torch.testing.assert_close(sorted_features, plain_features, rtol=0, atol=1e-5)
