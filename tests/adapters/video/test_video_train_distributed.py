"""Data-parallel video fine-tuning in 2 real Gloo processes against one process on the same global batch."""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from florence.adapters.video import VideoCoSwin
from florence.adapters.video.classifier import load_video_classifier
from florence.adapters.video.dataset import VideoDataset
from florence.adapters.video.finetune import (
    VideoFinetuneConfig,
    finetune_video_classifier,
)
from florence.training.distributed import destroy_distributed, init_distributed
from tests.adapters.video.video_helpers import CLIPS, VIDEO_CONFIG
from tests.torchrun import torchrun_main

WORLD_SIZE = 2
# Per case: the per-process options of the 2-process run and the batch size of the 1-process run
# that has the same global batch.
CASES = {
    "ddp": ({"batch_size": 1, "clips_per_video": 2}, 2),
    "ddp_accumulation": ({"batch_size": 1, "accum_steps": 2, "clips_per_video": 4}, 4),
}


def _write_csv(video_clips: Path, folder: Path) -> Path:
    path = folder / "labels.csv"
    rows = "".join(f"{video_clips / 'clips' / name},{label}\n" for name, label in CLIPS)
    path.write_text(f"path,label\n{rows}", encoding="utf-8")
    return path


def _train(csv_path: Path, state_dict: dict, output_dir: Path, options: dict) -> dict:
    """Fine-tune the tiny model for one epoch; return its weights, last gradients and the clips of each step."""
    torch.set_num_threads(1)
    train = VideoDataset(csv_path, num_frames=2, size=32, train=True)
    evaluation = VideoDataset(csv_path, num_frames=2, size=32)
    model = VideoCoSwin(**VIDEO_CONFIG, num_classes=2)
    model.load_state_dict(state_dict)
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()) if module.training else None)
    config = VideoFinetuneConfig(output_dir=str(output_dir), epochs=1, stop_at_accuracy=None, lr=1e-3, **options)
    result = finetune_video_classifier(model, train, evaluation, config)
    return {
        "result": result,
        "weights": {name: parameter.detach().clone() for name, parameter in model.named_parameters()},
        "gradients": {name: parameter.grad.clone() for name, parameter in model.named_parameters()},
        "seen": seen,
    }


def _worker(rank: int, port: int, csv_path: Path, state_dict: dict, output_root: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    info = init_distributed(device="cpu", timeout=timedelta(seconds=60))
    results = {"backend": info.backend}
    for case, (options, _) in CASES.items():
        results[case] = _train(csv_path, state_dict, output_root / case, options)
    torch.save(results, output_root / f"rank{rank}.pt")
    destroy_distributed()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(video_clips: Path, tmp_path_factory) -> dict:
    """Run every case in 2 Gloo processes and in 1 process; return the results."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this PyTorch build has no Gloo backend for torch.distributed")
    root = tmp_path_factory.mktemp("video_ddp")
    csv_path = _write_csv(video_clips, root)
    torch.manual_seed(0)
    state_dict = VideoCoSwin(**VIDEO_CONFIG, num_classes=2).state_dict()

    mp.spawn(_worker, args=(_free_port(), csv_path, state_dict, root / "ddp"), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(root / "ddp" / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]
    threads = torch.get_num_threads()
    try:
        single = {
            case: _train(csv_path, state_dict, root / "single" / case, {**options, "batch_size": batch, "accum_steps": 1})
            for case, (options, batch) in CASES.items()
        }
    finally:
        torch.set_num_threads(threads)
    return {"ranks": ranks, "single": single, "root": root}


@pytest.mark.parametrize("case", CASES)
def test_ranks_match_one_process(runs, case):
    expected = runs["single"][case]
    for rank, results in enumerate(runs["ranks"]):
        actual = results[case]
        for name, gradient in expected["gradients"].items():
            torch.testing.assert_close(actual["gradients"][name], gradient, atol=1e-5, rtol=1e-5,
                                       msg=lambda m, rank=rank, name=name: f"rank {rank}, gradient of {name}: {m}")
            torch.testing.assert_close(actual["weights"][name], expected["weights"][name], atol=1e-5, rtol=0,
                                       msg=lambda m, rank=rank, name=name: f"rank {rank}, {name}: {m}")
    assert runs["ranks"][0][case]["result"]["train_loss"] == pytest.approx(expected["result"]["train_loss"], abs=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_ranks_split_each_global_batch(runs, case):
    """Each rank trains on its own clips, and together they are the one-process batch of every step."""
    options, _ = CASES[case]
    per_rank = [results[case]["seen"] for results in runs["ranks"]]
    single = runs["single"][case]["seen"]
    accum = options.get("accum_steps", 1)

    assert len(single) * accum == len(per_rank[0]) == len(per_rank[1])
    for step, clips in enumerate(single):
        parts = [part for rank in range(WORLD_SIZE) for part in per_rank[rank][step * accum : (step + 1) * accum]]
        torch.testing.assert_close(torch.cat(parts), clips, atol=0, rtol=0)
        assert not torch.equal(parts[0], parts[accum]), "both ranks trained on the same clips"


def test_only_rank_zero_writes(runs):
    records = [json.loads(line) for line in (runs["root"] / "ddp" / "ddp" / "metrics.jsonl").read_text().splitlines()]

    assert [record["step"] for record in records] == [1, 2, 2]
    assert [record["epoch"] for record in records if "eval_top1" in record] == [0]
    assert "eval_top1" not in runs["ranks"][1]["ddp"]["result"]
    assert runs["ranks"][0]["backend"] == "gloo"
    model, config = load_video_classifier(runs["root"] / "ddp" / "ddp")
    assert config.classes == ["cricket", "eye makeup"]
    torch.testing.assert_close(model.head.weight, runs["ranks"][0]["ddp"]["weights"]["head.weight"], atol=0, rtol=0)


def test_cli_video_train_under_torchrun(tiny_checkpoint: Path, video_clips: Path, tmp_path: Path) -> None:
    csv_path = _write_csv(video_clips, tmp_path)
    output_dir = tmp_path / "run"

    result = torchrun_main(
        "video", "train", str(csv_path), "--output-dir", str(output_dir), "--checkpoint", str(tiny_checkpoint),
        "--epochs", "1", "--num-frames", "2", "--clips-per-video", "2", "--batch-size", "1", "--device", "cpu",
        timeout=300,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("eval_top1") == 1, result.stdout
    assert (output_dir / "checkpoints" / "step_0000002" / "trainer_state.pt").is_file()
    state = torch.load(output_dir / "checkpoints" / "step_0000002" / "trainer_state.pt", weights_only=False)
    assert state["config"]["world_size"] == 2
