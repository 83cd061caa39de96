"""Benchmark inputs: dataset formats, prompt files, and errors that name the bad value and the fix."""

import csv
import io
import zipfile

import pytest
import torch
import webdataset
import yaml
from PIL import Image

from florence.evaluation.datasets import (
    DatasetSpec,
    SplitSpec,
    load_classnames,
    load_templates,
    read_prompt_file,
)
from florence.evaluation.models import load_eval_model
from florence.evaluation.runner import run_suite
from florence.evaluation.suite import SuiteError, load_suite
from tests.evaluation.benchmark_helpers import (
    REPO_ROOT,
    cifar_dataset,
    flickr_dataset,
    require_shared,
    write_suite,
    write_tiny_clip_config,
)

CLASSES = ("bird", "cat", "ship")
IMAGES_PER_CLASS = 4


@pytest.fixture
def tiny_model(tmp_path):
    return load_eval_model(f"open_clip:{write_tiny_clip_config(tmp_path)}", seed=0)


@pytest.fixture
def cifar_images():
    """Return real CIFAR-10 test images of three classes as ``[(class name, PNG bytes)]``."""
    folder = require_shared("cifar10")
    with open(folder / "test.csv", newline="") as file:
        rows = list(csv.DictReader(file))

    images = []
    with zipfile.ZipFile(folder / "test.zip") as archive:
        for name in CLASSES:
            for row in [row for row in rows if row["class_name"] == name][:IMAGES_PER_CLASS]:
                buffer = io.BytesIO()
                Image.open(io.BytesIO(archive.read(row["path"]))).convert("RGB").save(buffer, format="PNG")
                images.append((name, buffer.getvalue()))
    return images


def _write_class_folders(root, images):
    for index, (name, data) in enumerate(images):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / f"{index:03d}.png").write_bytes(data)


def _write_shard(path, images):
    with webdataset.TarWriter(str(path)) as sink:
        for index, (name, data) in enumerate(images):
            sink.write({"__key__": f"{index:06d}", "png": data, "cls": CLASSES.index(name)})


def _zeroshot_metrics(tmp_path, model, dataset):
    suite = load_suite(write_suite(tmp_path, {"data": dataset}, [{"task": "zeroshot", "dataset": "data"}]))
    return run_suite(suite, model, tmp_path / "out")[0]["metrics"]


def test_folder_and_webdataset_agree(tmp_path, tiny_model, cifar_images):
    _write_class_folders(tmp_path / "folders", cifar_images)
    _write_shard(tmp_path / "test-000000.tar", cifar_images)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES))

    folder = _zeroshot_metrics(tmp_path / "a", tiny_model, {"format": "folder", "test": str(tmp_path / "folders")})
    shards = _zeroshot_metrics(
        tmp_path / "b",
        tiny_model,
        {"format": "wds", "test": str(tmp_path / "test-{000000..000000}.tar"), "classnames": str(tmp_path / "classes.txt")},
    )

    assert folder["num_samples"] == len(cifar_images)
    assert folder["top1"] == shards["top1"]
    assert folder["mean_per_class_recall"] == shards["mean_per_class_recall"]


def test_webdataset_needs_classnames(tmp_path, tiny_model, cifar_images):
    _write_shard(tmp_path / "test-000000.tar", cifar_images)

    with pytest.raises(ValueError, match="set 'classnames'"):
        _zeroshot_metrics(tmp_path, tiny_model, {"format": "wds", "test": str(tmp_path / "test-000000.tar")})


def test_webdataset_retrieval(tmp_path, tiny_model, cifar_images):
    with webdataset.TarWriter(str(tmp_path / "captions-000000.tar")) as sink:
        for index, (name, data) in enumerate(cifar_images):
            sink.write({"__key__": f"{index:06d}", "png": data, "txt": f"a photo of a {name}.\na small {name}."})
    suite = load_suite(
        write_suite(
            tmp_path,
            {"shards": {"format": "wds", "test": str(tmp_path / "captions-000000.tar")}},
            [{"task": "retrieval", "dataset": "shards"}],
            num_workers=2,
        )
    )

    metrics = run_suite(suite, tiny_model, tmp_path / "out")[0]["metrics"]

    assert metrics["num_images"] == len(cifar_images)
    assert metrics["num_captions"] == 2 * len(cifar_images)


def test_coco_json_matches_caption_table(tmp_path, tiny_model):
    folder = require_shared("flickr8k_800")
    table = flickr_dataset(30)
    coco = {"format": "coco", "test": {"path": str(folder / "captions_coco_format.json"), "max_images": 30}}
    runs = [{"task": "retrieval", "dataset": "data"}]

    from_table = run_suite(load_suite(write_suite(tmp_path, {"data": table}, runs)), tiny_model, tmp_path / "a")[0]
    from_coco = run_suite(load_suite(write_suite(tmp_path, {"data": coco}, runs)), tiny_model, tmp_path / "b")[0]

    assert from_table["metrics"] == from_coco["metrics"]


def test_shipped_cifar10_prompts():
    assert read_prompt_file("cifar10", "classnames", "en")[:2] == ["airplane", "automobile"]
    assert len(read_prompt_file("cifar10", "templates", "en")) == 18


def test_prompt_language_missing():
    with pytest.raises(FileNotFoundError, match=r"language 'de' \(available: en\)"):
        read_prompt_file("cifar10", "templates", "de")


def test_templates_accept_set_names_and_lists():
    spec = DatasetSpec(name="data", format="folder", test=SplitSpec(path="unused"), templates="simple")
    assert load_templates(spec) == ["a photo of a {}."]
    spec.templates = ["itap of a {}."]
    assert load_templates(spec) == ["itap of a {}."]


def test_classnames_count_mismatch():
    spec = DatasetSpec(name="data", format="folder", test=SplitSpec(path="unused"), classnames="cifar10")

    with pytest.raises(ValueError, match="lists 10 classes but the data has 3"):
        load_classnames(spec, list(CLASSES))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": 3}, r"unknown suite key\(s\) \['epochs'\]; valid keys: name, seed"),
        ({"seed": -1}, "invalid seed -1; pass an integer >= 0"),
        ({"runs": [{"task": "zero_shot", "dataset": "cifar10"}]}, "unknown task 'zero_shot'; valid tasks: zeroshot"),
        ({"runs": [{"task": "zeroshot", "dataset": "cifar100"}]}, "unknown dataset 'cifar100'; defined datasets: cifar10"),
        ({"runs": [{"task": "knn", "dataset": "cifar10", "neighbours": 5}]}, r"unknown knn option key\(s\) \['neighbours'\]"),
        ({"runs": [{"task": "retrieval", "dataset": "cifar10"}]}, "retrieval needs captions"),
        ({"runs": [{"task": "zeroshot", "dataset": "cifar10"}] * 2}, "listed twice"),
    ],
)
def test_suite_rejects_bad_keys(tmp_path, change, message):
    path = write_suite(tmp_path, {"cifar10": cifar_dataset(10, None)}, [{"task": "zeroshot", "dataset": "cifar10"}])
    suite = yaml.safe_load(path.read_text())
    suite.update(change)
    path.write_text(yaml.safe_dump(suite))

    with pytest.raises(SuiteError, match=message):
        load_suite(path)


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ({"format": "parquet", "test": "x"}, "invalid format 'parquet'; valid formats: folder, csv, coco, captions, wds"),
        ({"format": "csv"}, "missing 'test' split"),
        ({"format": "csv", "test": {"path": "x", "shuffle": True}}, r"unknown split key\(s\) \['shuffle'\]"),
        ({"format": "csv", "test": {"path": "x", "max_images": 0}}, "invalid max_images 0"),
        ({"format": "csv", "test": "x", "labels": "y"}, r"unknown dataset key\(s\) \['labels'\]"),
    ],
)
def test_suite_rejects_bad_datasets(tmp_path, dataset, message):
    path = write_suite(tmp_path, {"data": dataset}, [{"task": "zeroshot", "dataset": "data"}])

    with pytest.raises(SuiteError, match=message):
        load_suite(path)


def test_suite_probe_needs_train_split(tmp_path):
    path = write_suite(tmp_path, {"cifar10": cifar_dataset(10, None)}, [{"task": "linear_probe", "dataset": "cifar10"}])

    with pytest.raises(SuiteError, match="linear_probe needs a 'train' split"):
        load_suite(path)


def test_suite_unset_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("FLORENCE_TEST_UNSET", raising=False)
    path = write_suite(tmp_path, {"data": {"format": "folder", "test": "${FLORENCE_TEST_UNSET}/x"}}, [{"task": "zeroshot", "dataset": "data"}])

    with pytest.raises(SuiteError, match="environment variable FLORENCE_TEST_UNSET is not set"):
        load_suite(path)


def test_suite_variable_default(tmp_path, monkeypatch):
    monkeypatch.delenv("FLORENCE_TEST_UNSET", raising=False)
    path = write_suite(tmp_path, {"data": {"format": "folder", "test": "${FLORENCE_TEST_UNSET:-/data}/x"}}, [{"task": "zeroshot", "dataset": "data"}])

    assert load_suite(path).datasets["data"].test.path == "/data/x"


def test_suite_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="suite file .*missing.yaml not found"):
        load_suite(tmp_path / "missing.yaml")


def test_missing_data_file_named(tmp_path, tiny_model):
    path = write_suite(tmp_path, {"data": {"format": "csv", "test": str(tmp_path / "absent.csv")}}, [{"task": "zeroshot", "dataset": "data"}])

    with pytest.raises(FileNotFoundError, match=r"dataset 'data': .*absent.csv not found"):
        run_suite(load_suite(path), tiny_model, tmp_path / "out")


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("florence-huge", ValueError, r"unknown model 'florence-huge'.*florence model name \(.*florence-tiny"),
        ("open_clip:ViT-Q-99", ValueError, "unknown open_clip architecture 'ViT-Q-99'"),
        ("open_clip:", ValueError, "the open_clip architecture is missing"),
        ("open_clip:RN50:/nonexistent/weights.pt", FileNotFoundError, "open_clip weights /nonexistent/weights.pt not found"),
        ("", ValueError, "invalid model ''"),
    ],
)
def test_unknown_models_rejected(spec, error, message):
    with pytest.raises(error, match=message):
        load_eval_model(spec)


def test_finetune_needs_checkpoint(tmp_path, tiny_model):
    path = write_suite(tmp_path, {"cifar10": cifar_dataset(10, 20)}, [{"task": "finetune", "dataset": "cifar10", "steps": 1}])

    with pytest.raises(ValueError, match="finetune on 'cifar10' needs a florence checkpoint"):
        run_suite(load_suite(path), tiny_model, tmp_path / "out")


def test_florence_name_random_init_repeatable():
    first = load_eval_model("florence-tiny", seed=3)
    second = load_eval_model("florence-tiny", seed=3)

    assert first.fingerprint == second.fingerprint
    images = torch.zeros(1, 3, 32, 32)
    assert torch.equal(first.encode_image(images), second.encode_image(images))


@pytest.mark.parametrize(("name", "runs"), [("shared_data", 6), ("florence_paper", 23)])
def test_shipped_suites_load(name, runs):
    suite = load_suite(REPO_ROOT / "suites" / f"{name}.yaml")

    assert len(suite.runs) == runs
    for dataset in suite.datasets.values():
        assert load_templates(dataset)


OPTION_DATASETS = {
    "images": {"format": "csv", "test": "test.csv", "train": "train.csv"},
    "captions": {"format": "captions", "test": "captions.tsv"},
    "clips": {"format": "video_captions", "test": "clips.tsv"},
}


@pytest.mark.parametrize(
    ("run", "message"),
    [
        ({"task": "knn", "k": 0}, r"runs\[0\]: invalid k 0; pass an integer >= 1"),
        ({"task": "knn", "k": 2.5}, "invalid k 2.5"),
        ({"task": "knn", "temperature": 0}, "invalid temperature 0; pass a positive number"),
        ({"task": "knn", "temperature": "warm"}, "invalid temperature 'warm'"),
        ({"task": "linear_probe", "val_fraction": 1.0}, "invalid val_fraction 1.0; pass a fraction between 0 and 1"),
        ({"task": "linear_probe", "l2_grid": []}, r"invalid l2_grid \[\]; pass a non-empty list"),
        ({"task": "linear_probe", "l2_grid": 0.01}, "invalid l2_grid 0.01"),
        ({"task": "linear_probe", "l2_grid": [0.1, -1]}, r"invalid value -1 in l2_grid \[0.1, -1\]"),
        ({"task": "few_shot", "shots": 4}, r"invalid shots 4: shots takes a list; write shots: \[4\]"),
        ({"task": "few_shot", "shots": [1, 0]}, r"invalid value 0 in shots \[1, 0\]; pass a list of positive integers"),
        ({"task": "few_shot", "shots": []}, r"invalid shots \[\]"),
        ({"task": "few_shot", "seeds": [0, "1"]}, r"invalid value '1' in seeds"),
        ({"task": "few_shot", "seeds": 3}, r"write seeds: \[3\]"),
        ({"task": "finetune", "steps": 0}, "invalid steps 0"),
        ({"task": "finetune", "batch_size": 1}, "invalid batch_size 1; pass an integer >= 2"),
        ({"task": "finetune", "lr": 0}, "invalid lr 0; pass a positive learning rate"),
        ({"task": "finetune", "lr": "fast"}, "invalid lr 'fast'"),
        ({"task": "finetune", "image_size": 0}, "invalid image_size 0"),
        ({"task": "finetune", "precision": "fp8"}, "invalid precision 'fp8'; valid values: fp32, bf16, fp16"),
        ({"task": "finetune", "templates": "imagenet"}, "invalid templates 'imagenet'; valid values: train, none"),
        ({"task": "retrieval", "dataset": "captions", "ks": 5}, r"write ks: \[5\]"),
        ({"task": "retrieval", "dataset": "captions", "ks": [1, 0]}, r"invalid value 0 in ks"),
        ({"task": "video_retrieval", "dataset": "clips", "ks": [True]}, r"invalid value True in ks"),
    ],
)
def test_suite_rejects_bad_task_options(tmp_path, run, message):
    path = write_suite(tmp_path, OPTION_DATASETS, [{"dataset": "images", **run}])

    with pytest.raises(SuiteError, match=message) as error:
        load_suite(path)
    assert str(path) in str(error.value)


def test_suite_reads_numbers_written_as_text(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text(
        "datasets:\n  images: {format: csv, test: test.csv, train: train.csv}\n"
        "runs:\n  - {task: finetune, dataset: images, lr: 2e-5}\n  - {task: linear_probe, dataset: images, l2_grid: [1e-4]}\n"
    )

    runs = load_suite(path).runs

    assert runs[0].options["lr"] == 2e-5
    assert runs[1].options["l2_grid"] == [1e-4]


def test_suite_zeroshot_takes_no_options(tmp_path):
    path = write_suite(tmp_path, OPTION_DATASETS, [{"task": "zeroshot", "dataset": "images", "shots": [1]}])

    with pytest.raises(SuiteError, match=r"runs\[0\]: zeroshot takes no options, got \['shots'\]; remove them"):
        load_suite(path)


def test_suite_retrieval_on_videos(tmp_path):
    path = write_suite(tmp_path, OPTION_DATASETS, [{"task": "retrieval", "dataset": "clips"}])

    with pytest.raises(SuiteError, match="use task video_retrieval"):
        load_suite(path)


def test_suite_default_options_valid(tmp_path):
    runs = [{"task": task, "dataset": "images"} for task in ("zeroshot", "linear_probe", "few_shot", "knn", "finetune")]
    runs += [{"task": "retrieval", "dataset": "captions"}, {"task": "video_retrieval", "dataset": "clips"}]

    suite = load_suite(write_suite(tmp_path, OPTION_DATASETS, runs))

    assert [run.task for run in suite.runs] == [run["task"] for run in runs]


def test_video_tower_checked_before_runs(tmp_path, tiny_model):
    runs = [{"task": "zeroshot", "dataset": "images"}, {"task": "video_retrieval", "dataset": "clips", "tower": "video"}]
    path = write_suite(tmp_path, OPTION_DATASETS, runs)

    # test.csv does not exist, so the zeroshot run would fail with FileNotFoundError if it started.
    with pytest.raises(ValueError, match=r"runs\[1\] \(video_retrieval on clips\): tower: video .*use tower: frames"):
        run_suite(load_suite(path), tiny_model, tmp_path / "out")


def test_finetune_model_checked_before_runs(tmp_path, tiny_model):
    runs = [{"task": "zeroshot", "dataset": "images"}, {"task": "finetune", "dataset": "images"}]
    path = write_suite(tmp_path, OPTION_DATASETS, runs)

    with pytest.raises(ValueError, match=r"runs\[1\] \(finetune on images\): finetune on 'images' needs a florence checkpoint"):
        run_suite(load_suite(path), tiny_model, tmp_path / "out")


def test_non_safetensors_model_file(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("not a checkpoint")

    with pytest.raises(ValueError, match=r"cannot read .*weights.txt as a florence checkpoint .*open_clip:ARCH"):
        load_eval_model(str(path))


@pytest.mark.parametrize(("device", "message"), [("gpu", "invalid device 'gpu'; pass cpu, cuda or cuda:N"), ("cuda:99", "device 'cuda:99' is not usable")])
def test_check_device_rejects(device, message):
    from florence.evaluation.models import check_device

    with pytest.raises(ValueError, match=message):
        check_device(device)


def test_check_device_cpu():
    from florence.evaluation.models import check_device

    assert check_device("cpu") == torch.device("cpu")


def test_suite_variable_in_flow_mapping(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text("datasets:\n  data: {format: csv, test: ${DATA}/test.csv}\nruns: [{task: zeroshot, dataset: data}]\n")

    with pytest.raises(SuiteError, match=r"(?s)invalid YAML: .*quote that value or use a block mapping"):
        load_suite(path)
