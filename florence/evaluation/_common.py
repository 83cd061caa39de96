"""Helpers shared by the zero-shot and retrieval evaluators."""

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Tokenizer = Callable[[list[str]], Tensor]

T = TypeVar("T")


def resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """Return ``device``, or the device of the model's first parameter or buffer when it is None.

    A model with neither parameters nor buffers runs on the CPU.
    """
    if device is not None:
        return torch.device(device)

    first_tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if first_tensor is None else first_tensor.device


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own training flag on exit.

    Restoring per submodule keeps a frozen tower that was in eval mode inside a training
    model in eval mode, which ``model.train(previous_mode)`` would not.
    """
    training_flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in training_flags:
            module.training = training


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Return an autocast context for ``dtype`` on ``device``, or a no-op one when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()

    return torch.autocast(device_type=device.type, dtype=dtype)


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"invalid batch_size {batch_size!r}; pass a positive integer such as 256")


def check_string_list(values: Sequence[str], name: str, example: str) -> None:
    """Raise unless ``values`` is a non-empty sequence of strings (a bare string is rejected)."""
    if isinstance(values, str):
        raise TypeError(f"{name} must be a list of strings, not the single string {values!r}; pass [{values!r}]")

    if len(values) == 0:
        raise ValueError(f"{name} is empty; pass at least one, e.g. [{example!r}]")

    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{name}[{index}] is {value!r} of type {type(value).__name__}; expected a string")


def encode_texts_batched(
    model: nn.Module,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> Tensor:
    """Tokenize and encode ``texts`` in chunks of ``batch_size``.

    Returns L2-normalised float32 features ``[len(texts), D]`` on ``device``. Normalisation
    runs here in float32, after autocast, so bf16 outputs are normalised at full precision.
    The caller sets eval and inference mode.
    """
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start : start + batch_size])).to(device)
        with autocast(device, autocast_dtype):
            features = model.encode_text(tokens, normalize=False)

        chunks.append(F.normalize(features.float(), dim=-1))

    return torch.cat(chunks)


def encode_image_batch(
    model: nn.Module,
    images: Tensor,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> Tensor:
    """Encode one image batch into L2-normalised float32 features ``[B, D]`` on ``device``."""
    images = images.to(device, non_blocking=True)
    with autocast(device, autocast_dtype):
        features = model.encode_image(images, normalize=False)

    return F.normalize(features.float(), dim=-1)


def check_ks(ks: Sequence[int], name: str) -> tuple[int, ...]:
    """Return ``ks`` as a tuple after checking that it is a non-empty sequence of positive integers."""
    if isinstance(ks, int):
        raise TypeError(f"{name} must be a sequence of integers, not the integer {ks}; pass ({ks},)")

    values = tuple(ks)
    if not values:
        raise ValueError(f"{name} is empty; pass at least one k, e.g. (1, 5)")

    for k in values:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"invalid k {k!r} in {name}={values}; every k must be a positive integer")

    return values


def target_rank(scores: Tensor, targets: Tensor) -> Tensor:
    """Return the 0-based rank of column ``targets[i]`` in row ``i`` of ``scores``, by descending score.

    On a tie the lower column index ranks first, as in ``first_positive_rank``.
    """
    target_scores = scores.gather(1, targets[:, None])
    columns = torch.arange(scores.shape[1], device=scores.device)
    higher = scores > target_scores
    tied_before = (scores == target_scores) & (columns[None, :] < targets[:, None])
    return (higher | tied_before).sum(dim=1)


def first_positive_rank(scores: Tensor, positives: Tensor) -> Tensor:
    """Return, per row, the 0-based rank of the best-ranked positive column.

    Columns are ranked by descending score. Equal scores keep column order, so on a tie the
    lower column index ranks first (``torch.sort(stable=True)``, the same rule as
    ``torch.argmax``). A row without positives gets rank ``scores.shape[1]``, which no
    recall@k counts as correct.

    The best-ranked positive is the positive with the highest score, the lowest column index
    among equal ones, so its rank is ``target_rank`` of that column. Finding it takes one
    max per row instead of a full sort, with the same integer result. ``scores`` must not
    contain NaN, which has no place in this order.
    """
    positive_scores = scores.masked_fill(~positives, float("-inf"))
    best_positive = positive_scores.argmax(dim=1)
    ranks = target_rank(scores, best_positive)
    return torch.where(positives.any(dim=1), ranks, scores.shape[1])


def prefetch(batches: Iterable[T]) -> Iterator[T]:
    """Yield the items of ``batches`` while a background thread already reads the next one.

    With ``num_workers=0`` a ``DataLoader`` decodes and transforms a batch only when it is
    asked for, so the model waits for the decoder and the decoder for the model. Reading one
    batch ahead in a thread overlaps the two: image decoding and most tensor operations
    release the GIL. The order is unchanged, and an exception raised while reading a batch
    is raised here when that batch is due.

    NOTE: only one batch is read ahead, and on a machine whose cores are all busy with the
    forward pass the thread gains nothing. With loader worker processes, use the
    ``DataLoader``'s own ``prefetch_factor`` instead.
    """
    iterator = iter(batches)
    sentinel = object()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="florence-prefetch") as executor:
        pending = executor.submit(next, iterator, sentinel)
        while True:
            batch = pending.result()
            if batch is sentinel:
                return
            pending = executor.submit(next, iterator, sentinel)
            yield batch
