"""The video_retrieval task and the video_captions format of benchmark suites, on the shared clips."""

import json

import pytest
import torch
import yaml

from florence.cli.main import main
from florence.evaluation.datasets import DatasetSpec, SplitSpec
from florence.evaluation.suite import SuiteError, load_suite
from florence.evaluation.video import build_video_retrieval_split, read_video_captions
from tests.evaluation.benchmark_helpers import (
    REPO_ROOT,
    flickr_dataset,
    require_shared,
    write_suite,
)


def _video_dataset() -> dict:
    folder = require_shared("video_clips")
    second = require_shared("video_clips2")
    return {"format": "video_captions", "test": {"path": [str(folder / "captions.tsv"), str(second / "captions.tsv")]}}


def test_video_captions_combine_tables() -> None:
    tables = [str(path) for path in _video_dataset()["test"]["path"]]

    videos, captions, caption_to_video = read_video_captions(tables)

    assert [video.name for video in videos] == ["cleaning_pool.mp4", "internvid_example1_dog_snow.mp4"]
    assert all(video.is_file() for video in videos)
    assert captions[0] == "A person is cleaning a swimming pool"
    assert caption_to_video == [0, 0, 1]


def test_video_split_subset_keeps_captions() -> None:
    tables = _video_dataset()["test"]["path"]
    spec = DatasetSpec(name="clips", format="video_captions", test=SplitSpec(path=tables, max_images=1))

    split = build_video_retrieval_split(spec, spec.test, seed=0)
    full = build_video_retrieval_split(spec, SplitSpec(path=tables), seed=0)

    assert len(split.videos) == 1
    assert len(split.captions) == (2 if split.videos[0].name == "cleaning_pool.mp4" else 1)
    assert set(split.caption_to_video) == {0}
    assert split.fingerprint != full.fingerprint


def test_shared_suite_runs_video_retrieval(tmp_path, capsys) -> None:
    require_shared("video_clips")
    require_shared("video_clips2")
    shared = load_suite(REPO_ROOT / "suites" / "shared_data.yaml")
    video_runs = [run for run in shared.runs if run.task == "video_retrieval"]
    assert [run.dataset for run in video_runs] == ["video_clips"]
    dataset = shared.datasets["video_clips"]
    raw = yaml.safe_load((REPO_ROOT / "suites" / "shared_data.yaml").read_text(encoding="utf-8"))
    suite_path = write_suite(
        tmp_path, {"video_clips": raw["datasets"]["video_clips"]},
        [{"task": "video_retrieval", "dataset": "video_clips", "num_frames": 2, "num_clips": 2}],
    )
    assert [path.rsplit("/", 2)[-2] for path in dataset.test.path] == ["video_clips", "video_clips2"]

    code = main(["benchmark", "--suite", str(suite_path), "--model", "florence-tiny", "--output", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    [record_path] = (tmp_path / "out" / "records").glob("*/video_clips__video_retrieval.json")
    record = json.loads(record_path.read_text(encoding="utf-8"))
    metrics = record["metrics"]

    assert code == 0
    assert "| video_clips | video_retrieval | video_to_text_R@1 |" in printed
    assert record["task"] == "video_retrieval"
    assert record["config"]["options"]["num_clips"] == 2
    assert metrics["num_videos"] == 2
    assert metrics["num_captions"] == 3
    assert metrics["num_unreadable_videos"] == 0
    for name in ("video_to_text_R@1", "text_to_video_R@1", "video_to_text_R@10", "text_to_video_R@10", "mean_recall"):
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"], name
    assert metrics["video_to_text_R@10"] == 100.0
    assert metrics["text_to_video_R@10"] == 100.0


def test_video_retrieval_matches_adapter_metrics(tmp_path) -> None:
    from florence.adapters.video.retrieval import (
        encode_captions,
        encode_videos,
        video_text_retrieval,
    )
    from florence.evaluation.models import load_eval_model
    from florence.evaluation.runner import run_suite

    suite_path = write_suite(tmp_path, {"clips": _video_dataset()},
                             [{"task": "video_retrieval", "dataset": "clips", "num_frames": 2, "ks": [1, 2]}])
    model = load_eval_model("florence-tiny", seed=0)
    [record] = run_suite(load_suite(suite_path), model, tmp_path / "out")
    videos, captions, caption_to_video = read_video_captions(_video_dataset()["test"]["path"])

    with torch.inference_mode():
        video_features = encode_videos(model.model, videos, num_frames=2)
        text_features = encode_captions(model.model, model.tokenizer, captions)
    expected = video_text_retrieval(video_features, text_features, caption_to_video, ks=(1, 2))

    for name, value in expected.items():
        assert record["metrics"][name] == pytest.approx(value), name


def test_video_tower_matches_adapter_metrics(tmp_path) -> None:
    from florence.adapters.video.retrieval import (
        encode_captions,
        encode_videos,
        video_text_retrieval,
    )
    from florence.evaluation.models import load_eval_model
    from florence.evaluation.runner import run_suite

    suite_path = write_suite(tmp_path, {"clips": _video_dataset()},
                             [{"task": "video_retrieval", "dataset": "clips", "num_frames": 4, "ks": [1, 2], "tower": "video"}])
    model = load_eval_model("florence-tiny", seed=0)
    [record] = run_suite(load_suite(suite_path), model, tmp_path / "out")
    videos, captions, caption_to_video = read_video_captions(_video_dataset()["test"]["path"])

    with torch.inference_mode():
        video_features = encode_videos(model.model, videos, num_frames=4, tower="video")
        frame_features = encode_videos(model.model, videos, num_frames=4, tower="frames")
        text_features = encode_captions(model.model, model.tokenizer, captions)
    expected = video_text_retrieval(video_features, text_features, caption_to_video, ks=(1, 2))

    assert record["config"]["options"]["tower"] == "video"
    assert not torch.allclose(video_features, frame_features, atol=1e-4)
    for name, value in expected.items():
        assert record["metrics"][name] == pytest.approx(value), name


def test_video_tower_needs_a_florence_model(tmp_path) -> None:
    from florence.evaluation.video import video_tower_model

    with pytest.raises(ValueError, match="use tower: frames"):
        video_tower_model(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("datasets", "runs", "message"),
    [
        ("flickr", [{"task": "video_retrieval", "dataset": "flickr"}], "video_retrieval does not fit dataset 'flickr'"),
        ("video", [{"task": "retrieval", "dataset": "video"}], "dataset 'video' has format 'video_captions', which contains videos; use task video_retrieval"),
        ("video", [{"task": "video_retrieval", "dataset": "video", "sampling": "random"}], "invalid sampling 'random'"),
        ("video", [{"task": "video_retrieval", "dataset": "video", "num_frames": 0}], "invalid num_frames 0"),
        ("video", [{"task": "video_retrieval", "dataset": "video", "tower": "clip"}], "invalid tower 'clip'"),
        ("flickr_list", [{"task": "retrieval", "dataset": "flickr"}], "only video_captions takes several"),
    ],
)
def test_video_suite_mistakes_rejected(tmp_path, datasets, runs, message) -> None:
    if datasets == "video":
        specs = {"video": _video_dataset()}
    else:
        flickr = flickr_dataset(4)
        if datasets == "flickr_list":
            flickr["test"]["path"] = [flickr["test"]["path"]]
        specs = {"flickr": flickr}
    suite_path = write_suite(tmp_path, specs, runs)

    with pytest.raises(SuiteError, match=message):
        load_suite(suite_path)
