"""Tests of video fine-tuning (precision, accumulation, resume, skipped steps, saved classes) and of video retrieval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from florence.adapters.video import VideoCoSwin
from florence.adapters.video.classifier import load_video_classifier
from florence.adapters.video.dataset import VideoDataset
from florence.adapters.video.finetune import (
    VideoFinetuneConfig,
    finetune_video_classifier,
)
from florence.adapters.video.retrieval import (
    encode_captions,
    encode_videos,
    rank_captions,
    video_text_retrieval,
)
from florence.checkpoint import load_weights, read_metadata
from florence.cli.main import main
from florence.models import create_model
from florence.precision import has_fast_bf16
from florence.serving.embed import EmbeddingStore
from florence.tokenizer import get_tokenizer
from florence.training.checkpointing import STATE_NAME, latest_checkpoint
from tests.adapters.video.video_helpers import CLIPS, VIDEO_CONFIG


def _two_clip_csv(video_clips: Path, folder: Path) -> Path:
    path = folder / "labels.csv"
    rows = "".join(f"{video_clips / 'clips' / name},{label}\n" for name, label in CLIPS)
    path.write_text(f"path,label\n{rows}", encoding="utf-8")
    return path


def _records(output_dir: Path) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _epoch_records(output_dir: Path) -> list[dict]:
    return [record for record in _records(output_dir) if "eval_top1" in record]


@pytest.fixture(scope="module")
def datasets(video_clips: Path, tmp_path_factory) -> tuple[VideoDataset, VideoDataset]:
    csv_path = _two_clip_csv(video_clips, tmp_path_factory.mktemp("csv"))
    return VideoDataset(csv_path, num_frames=2, size=32, train=True), VideoDataset(csv_path, num_frames=2, size=32)


@pytest.fixture(scope="module")
def initial_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return VideoCoSwin(**VIDEO_CONFIG, num_classes=2).state_dict()


def _model(initial_state: dict[str, torch.Tensor]) -> VideoCoSwin:
    model = VideoCoSwin(**VIDEO_CONFIG, num_classes=2)
    model.load_state_dict(initial_state)
    return model


def _run(datasets, initial_state, output_dir: Path, stop_after: int | None = None, **options):
    """Fine-tune the seeded tiny model; return it and the result record."""
    settings = {"epochs": 2, "batch_size": 2, "clips_per_video": 2, "stop_at_accuracy": None, "lr": 1e-3, **options}
    config = VideoFinetuneConfig(output_dir=str(output_dir), **settings)
    model = _model(initial_state)
    result = finetune_video_classifier(model, *datasets, config, stop_after=stop_after)
    return model, result


def _assert_same_weights(actual: torch.nn.Module, expected: torch.nn.Module, atol: float = 1e-5) -> None:
    reference = dict(expected.named_parameters())
    for name, parameter in actual.named_parameters():
        torch.testing.assert_close(parameter, reference[name], atol=atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_finetune_resumes_from_checkpoint(datasets, initial_state, tmp_path: Path) -> None:
    output_dir = tmp_path / "run"

    _, first = _run(datasets, initial_state, output_dir, epochs=1)
    _, second = _run(datasets, initial_state, output_dir, epochs=2)
    records = _epoch_records(output_dir)

    assert first["epoch"] == 0
    assert second["epoch"] == 1
    assert [record["epoch"] for record in records] == [0, 1]
    assert [record["step"] for record in records] == [2, 4]
    assert (output_dir / "checkpoints" / "step_0000004" / "model.safetensors").is_file()


def test_resume_mid_epoch_equals_straight_run(datasets, initial_state, tmp_path: Path) -> None:
    straight, _ = _run(datasets, initial_state, tmp_path / "straight")
    _, interrupted = _run(datasets, initial_state, tmp_path / "resumed", stop_after=3)
    resumed, result = _run(datasets, initial_state, tmp_path / "resumed")

    assert interrupted["step"] == 3
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step_0000004"
    assert result["step"] == 4
    # The same batches, augmentation seeds, optimizer state and schedule: the same arithmetic.
    _assert_same_weights(resumed, straight, atol=0)


def test_accumulation_equals_bigger_batch(datasets, initial_state, tmp_path: Path) -> None:
    big, big_result = _run(datasets, initial_state, tmp_path / "big", epochs=1, batch_size=2)
    accumulated, accumulated_result = _run(datasets, initial_state, tmp_path / "accumulated", epochs=1, batch_size=1,
                                           accum_steps=2)

    assert accumulated_result["train_loss"] == pytest.approx(big_result["train_loss"], abs=1e-5)
    gradients = dict(big.named_parameters())
    for name, parameter in accumulated.named_parameters():
        torch.testing.assert_close(parameter.grad, gradients[name].grad, atol=1e-5, rtol=1e-5)
    _assert_same_weights(accumulated, big)


def test_bf16_training_tracks_fp32(datasets, initial_state, tmp_path: Path) -> None:
    full, full_result = _run(datasets, initial_state, tmp_path / "fp32", epochs=1)
    half, half_result = _run(datasets, initial_state, tmp_path / "bf16", epochs=1, precision="bf16")
    steps = [record for record in _records(tmp_path / "bf16") if "loss" in record]

    assert [record["nonfinite"] for record in steps] == [0.0, 0.0]
    assert half_result["train_loss"] == pytest.approx(full_result["train_loss"], abs=0.05)
    assert half_result["train_loss"] != full_result["train_loss"]
    assert not torch.equal(half.head.weight, _model(initial_state).head.weight)
    assert all(parameter.dtype == torch.float32 for parameter in half.parameters())


def test_fp16_saves_loss_scale(datasets, initial_state, tmp_path: Path) -> None:
    _run(datasets, initial_state, tmp_path / "run", epochs=1, precision="fp16")
    state = torch.load(latest_checkpoint(tmp_path / "run" / "checkpoints") / STATE_NAME, weights_only=False)
    steps = [record for record in _records(tmp_path / "run") if "loss" in record]

    assert state["grad_scaler"]["scale"] == steps[-1]["loss_scale"]
    assert state["config"]["precision"] == "fp16"
    assert state["config"]["resolved_precision"] == "fp16"


def test_auto_precision_resolves_for_device(datasets, initial_state, tmp_path: Path) -> None:
    _run(datasets, initial_state, tmp_path / "run", epochs=1, precision="auto")
    state = torch.load(latest_checkpoint(tmp_path / "run" / "checkpoints") / STATE_NAME, weights_only=False)

    assert state["config"]["precision"] == "auto"
    assert state["config"]["resolved_precision"] == ("bf16" if has_fast_bf16("cpu") else "fp32")


def test_nonfinite_step_is_skipped_and_counted(datasets, initial_state, tmp_path: Path) -> None:
    model = _model(initial_state)
    calls = []

    def poison_first_step(module, inputs, output):
        calls.append(1)
        return output * float("nan") if len(calls) == 1 else output

    model.head.register_forward_hook(poison_first_step)
    config = VideoFinetuneConfig(output_dir=str(tmp_path / "run"), epochs=1, batch_size=2, clips_per_video=2,
                                 stop_at_accuracy=None)
    result = finetune_video_classifier(model, *datasets, config)
    steps = [record for record in _records(tmp_path / "run") if "loss" in record]

    assert [record["nonfinite"] for record in steps] == [1.0, 0.0]
    assert result["nonfinite_steps"] == 1
    assert steps[0]["loss"] != steps[0]["loss"]


def test_nonfinite_limit_stops_with_checkpoint(datasets, initial_state, tmp_path: Path) -> None:
    model = _model(initial_state)
    model.head.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    config = VideoFinetuneConfig(output_dir=str(tmp_path / "run"), epochs=1, batch_size=2, clips_per_video=2,
                                 stop_at_accuracy=None, max_nonfinite_steps=1)

    with pytest.raises(FloatingPointError, match="1 steps in a row, up to step 1"):
        finetune_video_classifier(model, *datasets, config)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_0000001"
    torch.testing.assert_close(model.head.weight, initial_state["head.weight"], atol=0, rtol=0)


def test_saved_classes_and_config_rebuild_the_model(datasets, initial_state, tmp_path: Path) -> None:
    model, _ = _run(datasets, initial_state, tmp_path / "run", epochs=1)
    clips = torch.stack([datasets[1][index][0] for index in range(2)])
    newest = latest_checkpoint(tmp_path / "run" / "checkpoints")

    rebuilt, config = load_video_classifier(tmp_path / "run")
    metadata = read_metadata(tmp_path / "run" / "model.safetensors")
    from_metadata = VideoCoSwin(**json.loads(metadata["model_config"]))
    load_weights(from_metadata, tmp_path / "run" / "model.safetensors", strict=True)
    state = torch.load(newest / STATE_NAME, weights_only=False)

    assert (tmp_path / "run" / "classes.txt").read_text(encoding="utf-8") == "cricket\neye makeup\n"
    assert config.classes == ["cricket", "eye makeup"]
    assert metadata["model_name"] == "video-coswin"
    assert json.loads(read_metadata(newest)["model_config"]) == model.model_config
    with torch.inference_mode():
        expected = model.eval()(clips)
        torch.testing.assert_close(rebuilt(clips), expected, atol=0, rtol=0)
        torch.testing.assert_close(from_metadata.eval()(clips), expected, atol=0, rtol=0)
    assert state["config"]["classes"] == config.classes
    assert state["config"]["model_config"] == model.model_config


def test_resume_with_other_classes_rejected(video_clips: Path, datasets, initial_state, tmp_path: Path) -> None:
    _run(datasets, initial_state, tmp_path / "run", epochs=1)
    csv_path = _two_clip_csv(video_clips, tmp_path)
    classes = ["cricket", "eye makeup", "yoga"]
    train = VideoDataset(csv_path, num_frames=2, size=32, train=True, classes=classes)
    evaluation = VideoDataset(csv_path, num_frames=2, size=32, classes=classes)
    config = VideoFinetuneConfig(output_dir=str(tmp_path / "run"), epochs=1, batch_size=2, clips_per_video=2)

    with pytest.raises(ValueError, match="was written for another classes"):
        finetune_video_classifier(VideoCoSwin(**VIDEO_CONFIG, num_classes=3), train, evaluation, config)


def test_finetune_rejects_wrong_head(datasets, tmp_path: Path) -> None:
    config = VideoFinetuneConfig(output_dir=str(tmp_path / "run"))

    with pytest.raises(ValueError, match=r"reset_classifier\(len\(dataset.classes\)\)"):
        finetune_video_classifier(VideoCoSwin(**VIDEO_CONFIG, num_classes=5), *datasets, config)


def test_finetune_rejects_batch_larger_than_epoch(datasets, initial_state, tmp_path: Path) -> None:
    config = VideoFinetuneConfig(output_dir=str(tmp_path / "run"), batch_size=2, accum_steps=2, clips_per_video=1)

    with pytest.raises(ValueError, match=r"an epoch has 2 clips .* fewer than one global batch \(2 x 2"):
        finetune_video_classifier(_model(initial_state), *datasets, config)


def test_config_rejects_unknown_precision(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="precision='fp8' is not supported; use one of fp32, bf16, fp16, auto"):
        VideoFinetuneConfig(output_dir=str(tmp_path), precision="fp8")


def test_rank_captions_stable_order() -> None:
    video = torch.tensor([1.0, 0.0])
    captions = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.5, 0.5]])

    assert rank_captions(video, captions) == [1, 2, 3, 0]


def test_video_text_retrieval_real_clips(video_clips: Path, video_clips2: Path) -> None:
    torch.manual_seed(0)
    model = create_model("florence-tiny").eval()
    paths = [video_clips / "clips" / "cleaning_pool.mp4", video_clips2 / "clips" / "internvid_example1_dog_snow.mp4"]
    captions = ["A person is cleaning a swimming pool", "A playful dog and its owner wrestle in the snowy yard."]

    videos = encode_videos(model, paths, num_frames=2)
    texts = encode_captions(model, get_tokenizer(), captions)
    metrics = video_text_retrieval(videos, texts, [0, 1], ks=(1, 2))

    assert videos.shape == (2, 256)
    assert torch.allclose(videos.norm(dim=-1), torch.ones(2))
    assert set(metrics) == {"video_to_text_R@1", "video_to_text_R@2", "text_to_video_R@1", "text_to_video_R@2",
                            "mean_recall"}
    assert metrics["video_to_text_R@2"] == 100.0


def test_cli_video_train_writes_checkpoint(tiny_checkpoint: Path, video_clips: Path, tmp_path: Path, capsys) -> None:
    csv_path = _two_clip_csv(video_clips, tmp_path)
    output_dir = tmp_path / "run"
    code = main(
        ["video", "train", str(csv_path), "--output-dir", str(output_dir), "--checkpoint", str(tiny_checkpoint),
         "--epochs", "1", "--num-frames", "2", "--clips-per-video", "2", "--batch-size", "1", "--accum-steps", "2",
         "--precision", "bf16", "--device", "cpu"]
    )
    output = capsys.readouterr().out

    assert code == 0
    assert "eval_top1" in output
    assert f"classes: {output_dir / 'classes.txt'}" in output
    assert (output_dir / "checkpoints" / "latest").is_file()
    assert [record["epoch"] for record in _epoch_records(output_dir)] == [0]
    model, classifier = load_video_classifier(output_dir)
    assert classifier.classes == ["cricket", "eye makeup"]
    assert model.num_classes == 2


def test_cli_video_embed_then_search(tiny_checkpoint: Path, video_clips: Path, tmp_path: Path, capsys) -> None:
    clips = [video_clips / "clips" / "yoga.mp4", video_clips / "clips" / "ucf101_v_CricketShot_g04_c01.gif"]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 2048)
    out = tmp_path / "embeddings"
    arguments = ["video", "embed", *map(str, clips), str(broken), "--out", str(out), "--checkpoint", str(tiny_checkpoint),
                 "--num-frames", "2"]

    first_code = main(arguments)
    first_output = capsys.readouterr().out
    second_code = main(arguments)
    second_output = capsys.readouterr().out
    sources, vectors = EmbeddingStore(out).read_embeddings("image")
    index_code = main(["index", "build", str(out), "--out", str(tmp_path / "index")])
    search_code = main(["search", "a person doing yoga", "--index", str(tmp_path / "index"), "-k", "2"])
    search_output = capsys.readouterr().out

    assert first_code == 0
    assert "2 embedded now, 0 already" in first_output
    assert "1 unreadable" in first_output
    assert second_code == 0
    assert "0 embedded now, 3 already" in second_output
    assert sorted(sources) == sorted(str(clip.resolve()) for clip in clips)
    assert vectors.shape == (2, 256)
    assert index_code == 0
    assert search_code == 0
    assert "yoga.mp4" in search_output
