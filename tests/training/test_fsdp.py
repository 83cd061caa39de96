import json
import os
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

import florence
from florence.checkpoint import load_model, read_weights
from florence.config import load_config
from florence.tokenizer import get_tokenizer
from florence.training.distributed import (
    average_gradients,
    clip_grad_norm,
    destroy_distributed,
    gather_full_state_dicts,
    global_unicl_loss,
    init_distributed,
    is_sharded,
    load_full_state_dicts,
    pad_to_largest,
    shard_model,
)
from florence.training.grad_cache import backward_with_grad_cache
from florence.training.loss import unicl_loss
from florence.training.optim import param_groups
from florence.training.trainer import Trainer
from tests.torchrun import torchrun_train
from tests.training.test_distributed import SMALL, WORLD_SIZE, _free_port, _load_batch
from tests.training.test_distributed_train import QUICKSTART, TINY_OVERRIDES

# Rows per rank, gradient cache chunk size (0: off) and activation checkpointing, per case.
CASES = {
    "equal": ([4, 4], 0, False),
    "unequal": ([5, 3], 0, False),
    "grad_cache": ([5, 3], 2, False),
    "grad_checkpointing": ([4, 4], 0, True),
    "grad_cache_checkpointing": ([4, 4], 3, True),
}
# Low enough that the test batch's gradient is clipped.
MAX_NORM = 0.5


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach().clone()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)


def _sharded_model(state_dict: dict, grad_checkpointing: bool) -> torch.nn.Module:
    model = florence.create_model("florence-tiny", **SMALL)
    model.load_state_dict(state_dict)
    model.set_grad_checkpointing(grad_checkpointing)
    return shard_model(model, torch.device("cpu"))


def _run_case(model, images, tokens, labels, chunk: int) -> torch.Tensor:
    """Accumulate the global loss's gradient into the sharded ``model``; return the loss."""
    if chunk > 0:
        num_images, num_texts = images.shape[0], tokens.shape[0]

        def compute_loss(image_features, text_features, logit_scale):
            return global_unicl_loss(image_features[:num_images], text_features[:num_texts], labels, logit_scale)

        loss = backward_with_grad_cache(model, *pad_to_largest(images, tokens), compute_loss, chunk)
    else:
        image_features, text_features, logit_scale = model(images, tokens)
        loss = global_unicl_loss(image_features, text_features, labels, logit_scale)
        loss.backward()
    average_gradients(model)
    return loss.detach()


def _worker(rank: int, port: int, state_dict: dict, output_dir: Path) -> None:
    """Run one FSDP step per case on this rank's rows and save the loss, gradients and state dicts."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    init_distributed(device="cpu", timeout=timedelta(seconds=60))
    images, texts, labels = _load_batch()
    tokenizer = get_tokenizer()

    results: dict = {}
    for case, (sizes, chunk, grad_checkpointing) in CASES.items():
        start = sum(sizes[:rank])
        rows = slice(start, start + sizes[rank])
        model = _sharded_model(state_dict, grad_checkpointing)
        optimizer = _optimizer(model)

        loss = _run_case(model, images[rows], tokenizer(texts[rows]), labels[rows], chunk)
        gradients = {name: _full(parameter.grad) for name, parameter in model.named_parameters()}
        grad_norm = clip_grad_norm(model.parameters(), MAX_NORM)
        clipped = {name: _full(parameter.grad) for name, parameter in model.named_parameters()}
        model_state, _ = gather_full_state_dicts(model)
        # The logit scale's entry is the CPU parameter itself, which the step changes.
        model_state = {name: tensor.clone() for name, tensor in model_state.items()}
        optimizer.step()
        _, optimizer_state = gather_full_state_dicts(model, optimizer)
        results[case] = {
            "is_sharded": is_sharded(model),
            "fsdp_units": sum(is_sharded(module) for module in model.modules()),
            "replicated_parameters": [name for name, parameter in model.named_parameters() if not isinstance(parameter, DTensor)],
            "local_numel": sum(_local(parameter).numel() for parameter in model.parameters()),
            "local_exp_avg_numel": sum(_local(state["exp_avg"]).numel() for state in optimizer.state.values()),
            "local_grad_numel": sum(_local(parameter.grad).numel() for parameter in model.parameters()),
            "loss": loss,
            "gradients": gradients,
            "grad_norm": grad_norm,
            "clipped": clipped,
            "model_state": model_state,
            "optimizer_state": optimizer_state,
        }

    # Load rank 0's gathered state into a fresh sharded model and gather it again.
    model = _sharded_model(state_dict, False)
    optimizer = _optimizer(model)
    load_full_state_dicts(model, optimizer, *torch.load(output_dir / "reference_state.pt", weights_only=False))
    results["reloaded"] = gather_full_state_dicts(model, optimizer)

    torch.save(results, output_dir / f"rank{rank}.pt")
    destroy_distributed()


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """Return the initial weights, and one process's step over the global batch.

    The weights after the AdamW step are not compared with FSDP's. AdamW divides each
    gradient by its own magnitude, so a rounding-level gradient becomes a step of about ``lr``
    in a random direction. The attention key bias has such a gradient, exactly zero in theory.
    """
    torch.manual_seed(0)
    model = florence.create_model("florence-tiny", **SMALL)
    state_dict = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    optimizer = _optimizer(model)
    images, texts, labels = _load_batch()

    image_features, text_features, logit_scale = model(images, get_tokenizer()(texts))
    loss = unicl_loss(image_features, text_features, labels, logit_scale)
    loss.backward()
    gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    clipped = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    optimizer.step()

    return {
        "initial_state": state_dict,
        "loss": loss.detach(),
        "gradients": gradients,
        "grad_norm": grad_norm,
        "clipped": clipped,
        "stepped_model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
    }


@pytest.fixture(scope="module")
def ranks(single_process, tmp_path_factory) -> list[dict]:
    """Run two real Gloo processes on loopback with FSDP and return each rank's saved results."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this PyTorch build has no Gloo backend for torch.distributed")
    output_dir = tmp_path_factory.mktemp("fsdp_ranks")
    reference_state = (single_process["stepped_model_state"], single_process["optimizer_state"])
    torch.save(reference_state, output_dir / "reference_state.pt")
    mp.spawn(_worker, args=(_free_port(), single_process["initial_state"], output_dir), nprocs=WORLD_SIZE, join=True)
    return [torch.load(output_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def _assert_tensors_close(actual: dict, expected: dict, where: str, atol: float = 1e-5) -> None:
    # rtol 1e-4: the gradient of a frequent token's embedding row sums hundreds of terms, and with
    # the gradient cache and checkpointing the order differs. On an AVX2-only CPU one such
    # element of magnitude 0.26 differed by 1.6e-5 (relative 6e-5).
    assert actual.keys() == expected.keys(), where
    for name, tensor in expected.items():
        torch.testing.assert_close(
            actual[name], tensor, atol=atol, rtol=1e-4, msg=lambda m, name=name: f"{where}, {name}: {m}"
        )


def _param_groups(optimizer_state: dict) -> list[dict]:
    # set_optimizer_state_dict turns the betas tuple into a list, which AdamW accepts as well.
    return [{**group, "betas": tuple(group["betas"])} for group in optimizer_state["param_groups"]]


def _assert_optimizer_states_close(actual: dict, expected: dict, where: str) -> None:
    assert _param_groups(actual) == _param_groups(expected), where
    assert actual["state"].keys() == expected["state"].keys(), where
    for number, state in expected["state"].items():
        _assert_tensors_close(actual["state"][number], state, f"{where}, parameter {number}")


def test_fsdp_shards_all_training_state(ranks, single_process):
    total = sum(tensor.numel() for tensor in single_process["gradients"].values())
    for rank, results in enumerate(ranks):
        step = results["equal"]
        # One unit per CoSwin block (2), per text block (2), and the root.
        assert step["fsdp_units"] == 5, f"rank {rank}"
        assert step["replicated_parameters"] == ["logit_scale"], f"rank {rank}"
        # Each rank stores about half of every tensor, because dim 0 is split into equal padded shards.
        assert step["local_numel"] < 0.6 * total, f"rank {rank}"
        assert step["local_grad_numel"] == step["local_numel"], f"rank {rank}"
        assert step["local_exp_avg_numel"] == step["local_numel"], f"rank {rank}"


@pytest.mark.parametrize("case", CASES)
def test_fsdp_loss_matches_single_process(ranks, single_process, case):
    expected = single_process["loss"].item()
    for rank, results in enumerate(ranks):
        assert results[case]["is_sharded"]
        actual = results[case]["loss"].item()
        assert abs(actual - expected) < 1e-5, f"rank {rank}: {actual} != {expected}"


@pytest.mark.parametrize("case", CASES)
def test_fsdp_gradients_match_single_process(ranks, single_process, case):
    for rank, results in enumerate(ranks):
        _assert_tensors_close(results[case]["gradients"], single_process["gradients"], f"rank {rank}")


@pytest.mark.parametrize("case", CASES)
def test_fsdp_clip_grad_norm_matches_single_process(ranks, single_process, case):
    expected = single_process["grad_norm"].item()
    for rank, results in enumerate(ranks):
        assert not isinstance(results[case]["grad_norm"], DTensor)
        assert results[case]["grad_norm"].item() == pytest.approx(expected, rel=1e-5), f"rank {rank}"
        _assert_tensors_close(results[case]["clipped"], single_process["clipped"], f"rank {rank}")


@pytest.mark.parametrize("case", CASES)
def test_gathered_state_dicts_match_single_process(ranks, single_process, case):
    results = ranks[0][case]
    _assert_tensors_close(results["model_state"], single_process["initial_state"], "model", atol=0.0)
    _assert_optimizer_states_close(results["optimizer_state"], single_process["optimizer_state"], "optimizer")


def test_gathered_state_dicts_empty_off_rank_zero(ranks):
    for case in CASES:
        assert ranks[1][case]["model_state"] == {}
        assert ranks[1][case]["optimizer_state"] == {}


def test_loaded_full_state_dicts_round_trip(ranks, single_process):
    model_state, optimizer_state = ranks[0]["reloaded"]

    _assert_tensors_close(model_state, single_process["stepped_model_state"], "model", atol=0.0)
    _assert_optimizer_states_close(optimizer_state, single_process["optimizer_state"], "optimizer")


# A short warmup makes the steps large, so that a wrong optimizer state after resume shows in the loss.
RUN_OVERRIDES = [*TINY_OVERRIDES, "log_every=1", "checkpoint_every=3", "optim.warmup_steps=2"]


def _step_losses(output_dir: Path, after: int = 0) -> list[float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if "loss" in record and record["step"] > after]


def _train_one_process(output_dir: Path, steps: int, *extra: str) -> None:
    config = load_config(QUICKSTART, [*RUN_OVERRIDES, f"output_dir={output_dir}", f"steps={steps}", "data.batch_size=16", *extra])
    Trainer(config).fit()


def _train_fsdp(output_dir: Path, steps: int, *extra: str) -> None:
    """Run ``florence train --strategy fsdp`` in 2 Gloo processes, each with half of a global batch of 16."""
    result = torchrun_train(
        "--strategy",
        "fsdp",
        "--config",
        str(QUICKSTART),
        *RUN_OVERRIDES,
        f"output_dir={output_dir}",
        f"steps={steps}",
        "data.batch_size=8",
        *extra,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory) -> dict:
    """Train one process for 3 steps, resume a copy of its checkpoint to step 5, and return both runs."""
    root = tmp_path_factory.mktemp("single_process_run")
    _train_one_process(root / "run", 3)
    shutil.copytree(root / "run", root / "resumed")
    _train_one_process(root / "resumed", 5, "resume=true")
    return {
        "run": root / "run",
        "losses": _step_losses(root / "run"),
        "resumed_losses": _step_losses(root / "resumed", after=3),
    }


def test_torchrun_fsdp_checkpoint_loads_in_one_process(tmp_path, single_process_run):
    output_dir = tmp_path / "fsdp"

    _train_fsdp(output_dir, 3)

    assert _step_losses(output_dir) == pytest.approx(single_process_run["losses"], rel=1e-4)
    assert (output_dir / "checkpoints" / "latest").read_text() == "step_0000003"
    model = load_model(output_dir / "model.safetensors")
    checkpoint = read_weights(output_dir / "checkpoints" / "step_0000003")
    assert model.state_dict().keys() == checkpoint.keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, checkpoint[name]), f"{name} differs between model.safetensors and the checkpoint"

    _train_one_process(output_dir, 5, "resume=true")

    assert _step_losses(output_dir, after=3) == pytest.approx(single_process_run["resumed_losses"], rel=1e-4)


def test_single_process_checkpoint_resumes_under_fsdp(tmp_path, single_process_run):
    output_dir = tmp_path / "resumed"
    shutil.copytree(single_process_run["run"], output_dir)

    _train_fsdp(output_dir, 5, "--resume")

    assert (output_dir / "checkpoints" / "latest").read_text() == "step_0000005"
    assert _step_losses(output_dir, after=3) == pytest.approx(single_process_run["resumed_losses"], rel=1e-4)
