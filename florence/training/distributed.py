"""Data-parallel UniCL: process-group setup and a loss over the batch of every rank.

UniCL needs every image compared with every text of the global batch, so each rank gathers
the features of all ranks (with gradient) and computes the loss over the whole global batch.
Launch with ``torchrun``, which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT``; without ``WORLD_SIZE`` (or with 1) everything here is single-process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from florence.training.loss import unicl_loss

_logger = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedInfo:
    """Position of this process in the job and the device and backend it uses."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # None when the job is single-process and no process group exists.
    backend: str | None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0


def _default_device(local_rank: int) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible; "
            f"start at most {torch.cuda.device_count()} processes per node (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


def init_distributed(device: str | torch.device | None = None, timeout: timedelta | None = None) -> DistributedInfo:
    """Join the process group that ``torchrun`` describes in the environment.

    With ``WORLD_SIZE`` unset or 1 this creates no process group and returns rank 0 of 1. The
    backend is NCCL on CUDA devices and Gloo on CPU. ``device`` defaults to ``cuda:LOCAL_RANK``
    when CUDA is available and to the CPU otherwise. Calling it again in an initialised process
    returns the same information without creating a second group.

    Raises:
        ValueError: ``WORLD_SIZE`` > 1 but another torchrun variable is missing or invalid.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        resolved = torch.device(device) if device is not None else _default_device(0)
        return DistributedInfo(rank=0, world_size=1, local_rank=0, device=resolved, backend=None)

    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world_size} but these variables are missing: {', '.join(missing)}. "
            "Launch with torchrun, which sets all of " + ", ".join(TORCHRUN_VARIABLES)
        )
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is invalid for WORLD_SIZE={world_size}: it must be in [0, {world_size})")

    resolved = torch.device(device) if device is not None else _default_device(local_rank)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)

    if not dist.is_initialized():
        options = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size, **options)
        _logger.info(
            "joined process group: rank %d of %d, local rank %d, device %s, backend %s",
            rank,
            world_size,
            local_rank,
            resolved,
            backend,
        )
    return DistributedInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved, backend=dist.get_backend())


def destroy_distributed() -> None:
    """Leave the process group, if this process is in one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Return whether this process is rank 0 or the only process, the one that logs and writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor.contiguous()
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    return padded


def _all_gather_rows(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` in rank order; rank ``r`` contributes ``sizes[r]`` rows."""
    padded = _pad_rows(tensor, max(sizes))
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([part[:size] for part, size in zip(gathered, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather rows whose backward returns each rank the summed gradient of its own rows.

    Every rank computes its own loss from the gathered tensor, so the gradient of the sum of
    those losses with respect to this rank's rows is the sum over ranks of each rank's
    gradient for these rows. The backward computes it with one all-reduce of the whole
    gathered gradient and keeps this rank's slice. That moves about twice the data of a
    reduce-scatter, but works on every backend and with unequal row counts.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        rank = dist.get_rank()
        ctx.start = sum(sizes[:rank])
        ctx.rows = sizes[rank]
        return _all_gather_rows(tensor, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # The incoming gradient may be shared with other nodes of the graph, so reduce a copy.
        summed = grad.contiguous().clone()
        dist.all_reduce(summed)
        return summed[ctx.start : ctx.start + ctx.rows], None


def gather_batch_sizes(rows: int, device: torch.device) -> list[int]:
    """Return every rank's row count, in rank order."""
    local = torch.tensor([rows], dtype=torch.long, device=device)
    sizes = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    return [int(size.item()) for size in sizes]


def gather_features(
    image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate the features and labels of every rank, in rank order.

    Gradients flow back through the gathered features to each rank's own features (see
    :class:`_AllGatherWithGrad`); labels are gathered without gradient. Ranks may hold
    different numbers of samples, for example after skipping unreadable images, but each rank's
    three tensors must have the same number of rows. Without a process group, or with one rank,
    the inputs are returned unchanged.
    """
    if not image_features.shape[0] == text_features.shape[0] == labels.shape[0]:
        raise ValueError(
            f"image features ({image_features.shape[0]}), text features ({text_features.shape[0]}) "
            f"and labels ({labels.shape[0]}) must have the same number of rows"
        )
    if _world_size() == 1:
        return image_features, text_features, labels

    sizes = gather_batch_sizes(image_features.shape[0], image_features.device)
    all_image_features = _AllGatherWithGrad.apply(image_features, sizes)
    all_text_features = _AllGatherWithGrad.apply(text_features, sizes)
    with torch.no_grad():
        all_labels = _all_gather_rows(labels, sizes)
    return all_image_features, all_text_features, all_labels


def global_unicl_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Compute the UniCL loss over the global batch, the concatenation of every rank's batch.

    Every rank returns the same value, the single-process loss over the global batch. Labels
    are text hashes, so equal texts on different ranks are positives of each other.

    Gradient scale: each rank backpropagates its own copy of the loss, and the gather's
    backward sums the gradients of all copies, so a rank's own features receive
    ``world_size`` times the single-process gradient. DistributedDataParallel then averages
    parameter gradients over the ranks, which divides by ``world_size`` again and gives exactly
    the single-process gradient. The logit scale is not gathered, so every rank computes its
    full gradient and the average leaves it unchanged. open_clip's
    ``ClipLoss(local_loss=False, gather_with_grad=True)`` uses the same arrangement. Summing
    parameter gradients over ranks instead of averaging would make them ``world_size`` times
    too large.
    """
    all_image_features, all_text_features, all_labels = gather_features(image_features, text_features, labels)
    return unicl_loss(all_image_features, all_text_features, all_labels, logit_scale)


def average_gradients(model: nn.Module) -> None:
    """Average every parameter gradient over the ranks, as DistributedDataParallel does.

    For training loops that do not wrap the model in DistributedDataParallel, such as the
    gradient cache, which runs several backward passes per step. Every rank must hold a
    gradient for the same parameters. Does nothing without a process group.
    """
    world_size = _world_size()
    if world_size == 1:
        return
    gradients = [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
    handles = [dist.all_reduce(gradient, async_op=True) for gradient in gradients]
    for handle in handles:
        handle.wait()
    for gradient in gradients:
        gradient.div_(world_size)


def broadcast_parameters(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank, as DistributedDataParallel does when created."""
    if _world_size() == 1:
        return
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


def smallest_batch_size(rows: int, device: torch.device) -> int:
    """Return the smallest ``rows`` over all ranks, or ``rows`` itself without a process group."""
    if _world_size() == 1:
        return rows
    smallest = torch.tensor([rows], dtype=torch.long, device=device)
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    return int(smallest.item())


def agree_on_stop(stop: bool, device: torch.device) -> bool:
    """Return rank 0's ``stop`` on every rank, so that all ranks leave a training loop together."""
    if _world_size() == 1:
        return stop
    decision = torch.tensor([int(stop)], dtype=torch.long, device=device)
    dist.broadcast(decision, src=0)
    return bool(decision.item())
