"""Data-parallel UniCL: process-group setup, a loss over the batch of every rank, and FSDP.

UniCL needs every image compared with every text of the global batch, so each rank gathers
the features of all ranks (with gradient) and computes the loss over the whole global batch.
Launch with ``torchrun``, which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT``; without ``WORLD_SIZE`` (or with 1) everything here is single-process.

With the ``fsdp`` strategy, ``shard_model`` applies PyTorch's FSDP2 (``fully_shard``), and
``gather_full_state_dicts`` and ``load_full_state_dicts`` convert between the sharded model and
the full state dicts that single-process checkpoints contain.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

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


def leave_process_group(info: DistributedInfo) -> None:
    """Wait for every rank, then leave the process group; does nothing in a single-process run."""
    if not info.is_distributed or not dist.is_initialized():
        return
    dist.barrier()
    destroy_distributed()


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
    gradient for the same parameters. Gradients of FSDP-sharded parameters (DTensors) are
    skipped, because FSDP's reduce-scatter has already averaged them, so under FSDP this
    averages only the replicated logit scale. Does nothing without a process group.
    """
    world_size = _world_size()
    if world_size == 1:
        return
    gradients = [
        parameter.grad
        for parameter in model.parameters()
        if parameter.grad is not None and not isinstance(parameter.grad, DTensor)
    ]
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


def pad_to_largest(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Append zero rows to each tensor so that it has as many rows as its largest counterpart on any rank.

    Under FSDP every forward pass gathers parameters from all ranks, so all ranks must run the
    same number of gradient-cache chunks. Padding every rank's images and tokens to the
    largest count gives them that. The caller drops the padded rows' features before the loss,
    so those rows receive zero gradient. Without a process group the tensors are returned unchanged.
    """
    if _world_size() == 1:
        return tensors
    largest = torch.tensor([tensor.shape[0] for tensor in tensors], dtype=torch.long, device=tensors[0].device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return tuple(_pad_rows(tensor, int(rows)) for tensor, rows in zip(tensors, largest.tolist()))


def agree_on_stop(stop: bool, device: torch.device) -> bool:
    """Return rank 0's ``stop`` on every rank, so that all ranks leave a training loop together."""
    if _world_size() == 1:
        return stop
    decision = torch.tensor([int(stop)], dtype=torch.long, device=device)
    dist.broadcast(decision, src=0)
    return bool(decision.item())


def is_sharded(model: nn.Module) -> bool:
    """Return whether ``fully_shard`` (FSDP2) has been applied to ``model``."""
    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard a Florence model in place with FSDP2 over all ranks (ZeRO-3), and return it.

    Each CoSwin block and each text Transformer block becomes one FSDP unit, whose parameters
    are all-gathered just before the block runs and freed after it. The root unit contains
    everything else: the patch and stage embeddings, the token and positional embeddings, the
    final norms and both projections. Gradients are reduce-scattered and averaged over the ranks,
    so every rank keeps only its shard of each parameter, gradient and optimizer state.

    ``encode_image`` and ``encode_text`` are registered as forward methods, so calling them
    gathers the root's parameters as ``forward`` does. ``fully_shard`` rejects 0-dim
    parameters, so the logit scale (one float) stays a plain parameter replicated on every
    rank. Its gradient is the same on every rank, because every rank computes the same global
    loss, and ``average_gradients`` keeps the copies identical. Every rank starts from rank
    0's weights. The model must already be on ``device``.
    """
    broadcast_parameters(model)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for stage in model.visual.layers:
        for block in stage.blocks:
            fully_shard(block, mesh=mesh)
    for block in model.text.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params={model.logit_scale})

    register_fsdp_forward_method(model, "encode_image")
    register_fsdp_forward_method(model, "encode_text")
    return model


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale gradients so that their total L2 norm is at most ``max_norm``; return the norm before clipping.

    Equals ``torch.nn.utils.clip_grad_norm_`` without FSDP. With FSDP-sharded gradients
    (DTensors) next to replicated ones (the logit scale), each kind is summed on its own: the
    squared norm of the sharded gradients is reduced over the ranks, and the replicated ones
    count once. The result is the norm of the full gradient, the same plain tensor on every rank.
    """
    with_grad = [parameter for parameter in parameters if parameter.grad is not None]
    sharded = [parameter for parameter in with_grad if isinstance(parameter.grad, DTensor)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(with_grad, max_norm)

    replicated = [parameter for parameter in with_grad if not isinstance(parameter.grad, DTensor)]
    squared_norm = torch.nn.utils.get_total_norm([parameter.grad for parameter in sharded]).full_tensor().square()
    if replicated:
        squared_norm = squared_norm + torch.nn.utils.get_total_norm([parameter.grad for parameter in replicated]).square()
    total_norm = squared_norm.sqrt()

    torch.nn.utils.clip_grads_with_norm_(sharded, max_norm, total_norm)
    if replicated:
        torch.nn.utils.clip_grads_with_norm_(replicated, max_norm, total_norm)
    return total_norm


def _full_state_dict_options(**options: bool) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, **options)


def gather_full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Gather the full (unsharded) model and optimizer state dicts of an FSDP model onto rank 0's CPU.

    Every rank must call this, because each parameter is all-gathered from all ranks. Rank 0
    returns the model state dict with the names and shapes of an unsharded model, and the
    optimizer state dict in ``optimizer.state_dict()`` form (parameters numbered in
    ``param_groups`` order), so both load into a single-process model and optimizer. The other
    ranks return empty dicts. Without ``optimizer`` the second value is None. Entries of
    parameters that are not sharded (the logit scale) and of buffers may be the model's own CPU
    tensors, so copy them if the model changes before they are used.
    """
    options = _full_state_dict_options(cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    if optimizer is None:
        return model_state, None
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if not optimizer_state:
        return model_state, {}
    return model_state, _number_parameters(optimizer_state)


def load_full_state_dicts(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
) -> None:
    """Load full state dicts, as a single-process run saves them, into an FSDP model and its optimizer.

    Every rank must call this with the full dicts; each keeps its own shard. ``optimizer_state``
    has the ``optimizer.state_dict()`` form, with parameters numbered in ``param_groups`` order.

    Raises:
        RuntimeError: a parameter is missing from ``model_state`` or not in the model.
        ValueError: ``optimizer_state`` has a different number of parameters than ``optimizer``.
    """
    options = _full_state_dict_options()
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, _name_parameters(optimizer_state, model, optimizer), options=options)


def _number_parameters(optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """Key an optimizer state dict by parameter number instead of parameter name, as ``Optimizer.state_dict`` does."""
    numbers: dict[str, int] = {}
    groups = []
    for group in optimizer_state["param_groups"]:
        group_numbers = [numbers.setdefault(name, len(numbers)) for name in group["params"]]
        groups.append({**group, "params": group_numbers})
    state = {numbers[name]: value for name, value in optimizer_state["state"].items()}
    return {"state": state, "param_groups": groups}


def _name_parameters(
    optimizer_state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Key an ``Optimizer.state_dict``-form dict by parameter name, in the order of ``optimizer``'s groups."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    ordered = [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]
    expected = len(ordered)
    found = sum(len(group["params"]) for group in optimizer_state["param_groups"])
    if found != expected:
        raise ValueError(
            f"the optimizer state has {found} parameters but the optimizer has {expected}; "
            "resume with the model and config that wrote the checkpoint"
        )
    groups = [
        {**group, "params": [ordered[number] for number in group["params"]]} for group in optimizer_state["param_groups"]
    ]
    state = {ordered[number]: value for number, value in optimizer_state["state"].items()}
    return {"state": state, "param_groups": groups}
