import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms.v2.functional import pil_to_tensor

import florence
from florence.data.labels import text_label
from florence.data.transforms import normalize_batch
from florence.tokenizer import get_tokenizer
from florence.training.distributed import (
    destroy_distributed,
    gather_features,
    global_unicl_loss,
    init_distributed,
    is_main_process,
)
from florence.training.loss import unicl_loss

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "cifar10_quickstart" / "train"

# Drop path stays off (florence-tiny's default), so every process runs the same deterministic model.
SMALL = {
    "embed_dim": 16,
    "vision_cfg": {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4, "drop_path_rate": 0.0},
    "text_cfg": {"width": 32, "layers": 2, "heads": 2},
}

# A global batch of 8 real images. "cat" and "dog" texts occur on both ranks in every split,
# so their labels must match across ranks.
SAMPLES = [
    ("cat/0000.jpg", "a photo of a cat."),
    ("dog/0000.jpg", "a photo of a dog."),
    ("cat/0001.jpg", "a photo of a cat."),
    ("ship/0000.jpg", "a photo of a ship."),
    ("dog/0001.jpg", "a photo of a dog."),
    ("cat/0002.jpg", "a photo of a cat."),
    ("frog/0000.jpg", "a photo of a frog."),
    ("ship/0001.jpg", "a blurry photo of a ship."),
]

# Rows per rank for each case.
SPLITS = {"equal": [4, 4], "unequal": [5, 3]}
WORLD_SIZE = 2


def _load_batch() -> tuple[torch.Tensor, list[str], torch.Tensor]:
    images = torch.stack([pil_to_tensor(Image.open(DATA / path).convert("RGB")) for path, _ in SAMPLES])
    texts = [text for _, text in SAMPLES]
    labels = torch.tensor([text_label(text) for text in texts], dtype=torch.long)
    return normalize_batch(images), texts, labels


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, state_dict: dict, output_dir: Path) -> None:
    """Run one DDP step per split on this rank's rows and save the loss and gradients."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    info = init_distributed(device="cpu", timeout=timedelta(seconds=60))

    model = florence.create_model("florence-tiny", **SMALL)
    model.load_state_dict(state_dict)
    ddp = DistributedDataParallel(model)
    images, texts, labels = _load_batch()
    tokenizer = get_tokenizer()

    results = {"info": info, "is_main_process": is_main_process()}
    for case, sizes in SPLITS.items():
        start = sum(sizes[:rank])
        rows = slice(start, start + sizes[rank])
        ddp.zero_grad(set_to_none=True)

        image_features, text_features, logit_scale = ddp(images[rows], tokenizer(texts[rows]))
        loss = global_unicl_loss(image_features, text_features, labels[rows], logit_scale)
        loss.backward()

        gathered = gather_features(image_features.detach(), text_features.detach(), labels[rows])
        results[case] = {
            "loss": loss.detach(),
            "gathered_labels": gathered[2],
            "gradients": {name: parameter.grad.clone() for name, parameter in model.named_parameters()},
        }
    torch.save(results, output_dir / f"rank{rank}.pt")
    destroy_distributed()


@pytest.fixture(scope="module")
def single_process():
    """Return the initial weights, and the loss and gradients of one process over the global batch."""
    torch.manual_seed(0)
    model = florence.create_model("florence-tiny", **SMALL)
    state_dict = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    images, texts, labels = _load_batch()

    image_features, text_features, logit_scale = model(images, get_tokenizer()(texts))
    loss = unicl_loss(image_features, text_features, labels, logit_scale)
    loss.backward()

    gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    return state_dict, loss.detach(), gradients


@pytest.fixture(scope="module")
def ranks(single_process, tmp_path_factory) -> list[dict]:
    """Run two real Gloo processes on loopback and return each rank's saved results."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this PyTorch build has no Gloo backend for torch.distributed")
    state_dict, _, _ = single_process
    output_dir = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(_free_port(), state_dict, output_dir), nprocs=WORLD_SIZE, join=True)
    return [torch.load(output_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def test_init_distributed_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    info = init_distributed(device="cpu")

    assert info.world_size == 1
    assert info.rank == 0
    assert info.backend is None
    assert info.is_main_process
    assert not info.is_distributed
    assert not torch.distributed.is_initialized()


def test_init_distributed_missing_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)

    with pytest.raises(ValueError, match="missing: RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. Launch with torchrun"):
        init_distributed(device="cpu")


def test_gather_features_single_process_is_identity():
    images, texts = torch.randn(3, 4), torch.randn(3, 4)
    labels = torch.arange(3)

    gathered = gather_features(images, texts, labels)

    assert gathered[0] is images
    assert gathered[1] is texts
    assert gathered[2] is labels


def test_gather_features_rejects_row_mismatch():
    with pytest.raises(ValueError, match=r"image features \(3\), text features \(2\) and labels \(3\)"):
        gather_features(torch.randn(3, 4), torch.randn(2, 4), torch.arange(3))


def test_ranks_report_gloo_and_main_process(ranks):
    for rank, results in enumerate(ranks):
        assert results["info"].rank == rank
        assert results["info"].world_size == WORLD_SIZE
        assert results["info"].backend == "gloo"
        assert results["is_main_process"] == (rank == 0)


@pytest.mark.parametrize("case", SPLITS)
def test_gathered_labels_are_the_global_batch(ranks, case):
    expected = torch.tensor([text_label(text) for _, text in SAMPLES])
    for results in ranks:
        assert torch.equal(results[case]["gathered_labels"], expected)


@pytest.mark.parametrize("case", SPLITS)
def test_global_loss_matches_single_process(ranks, single_process, case):
    _, expected, _ = single_process
    for rank, results in enumerate(ranks):
        actual = results[case]["loss"]
        assert abs(actual.item() - expected.item()) < 1e-5, f"rank {rank}: {actual.item()} != {expected.item()}"


@pytest.mark.parametrize("case", SPLITS)
def test_ddp_gradients_match_single_process(ranks, single_process, case):
    _, _, expected = single_process
    for rank, results in enumerate(ranks):
        actual = results[case]["gradients"]
        assert actual.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(
                actual[name], expected[name], atol=1e-5, rtol=1e-5, msg=lambda m, rank=rank, name=name: f"rank {rank}, {name}: {m}"
            )
