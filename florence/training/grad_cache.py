"""Gradient cache: the exact gradient of a contrastive loss over a batch too large for memory.

A contrastive loss couples every sample of the batch, so the batch cannot be split into
independent micro-batches with gradient accumulation. The gradient cache (Gao et al. 2021,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup") splits the work
instead:

1. embed all images and texts chunk by chunk without gradient;
2. compute the loss over the whole batch from those embeddings, and its gradient with respect
   to the embeddings;
3. run each chunk again with gradient and backpropagate the cached embedding gradient into
   the towers.

Activation memory is that of one chunk; the cost is a second forward pass of both towers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from florence.models.florence import MAX_LOGIT_SCALE, Florence

LossFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RandomState:
    """The CPU generator state, and the CUDA one of ``device``, captured when created.

    A chunk's second forward pass must draw the same drop-path and dropout masks as its
    no-gradient pass, or the cached gradients would belong to a different function.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def restore(self) -> Iterator[None]:
        """Run the block from the captured state, then put the generators back where they were."""
        cuda_devices = [self.device] if self.cuda_state is not None else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.set_rng_state(self.cpu_state)
            if self.cuda_state is not None:
                torch.cuda.set_rng_state(self.cuda_state, self.device)
            yield


def _embed_without_grad(
    encode: Callable[[torch.Tensor], torch.Tensor],
    chunks: Sequence[torch.Tensor],
    autocast: Callable[[], AbstractContextManager],
) -> tuple[torch.Tensor, list[RandomState]]:
    """Embed every chunk without gradient and return the embeddings with each chunk's RNG state."""
    features, states = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RandomState(chunk.device))
            with autocast():
                features.append(encode(chunk))
    return torch.cat(features), states


def _backward_chunks(
    encode: Callable[[torch.Tensor], torch.Tensor],
    chunks: Sequence[torch.Tensor],
    states: Sequence[RandomState],
    cached_gradients: Sequence[torch.Tensor],
    autocast: Callable[[], AbstractContextManager],
) -> None:
    """Run each chunk again with gradient, from its saved RNG state, and backpropagate its cached gradient."""
    for chunk, state, gradient in zip(chunks, states, cached_gradients):
        with state.restore(), autocast():
            features = encode(chunk)
        torch.autograd.backward(features, gradient)


def backward_with_grad_cache(
    model: Florence,
    images: torch.Tensor,
    tokens: torch.Tensor,
    compute_loss: LossFunction,
    chunk_size: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> torch.Tensor:
    """Accumulate into ``model``'s ``.grad`` the gradient of the loss over the whole batch.

    ``compute_loss(image_features, text_features, logit_scale)`` receives the embeddings of all
    ``images`` [B, 3, H, W] and all ``tokens`` [T, L] in input order, and the capped logit
    scale. It may index the text rows (to undo text deduplication) or gather features across
    ranks. Both towers run on at most ``chunk_size`` rows at a time. The gradients equal those
    of one backward pass over the unchunked batch, up to float rounding, as long as the towers
    draw their random masks in the same order. The logit scale gets its gradient directly from
    the loss, since it is used in the loss and in neither tower.

    The global RNG ends in the state that the no-gradient pass leaves, so the second pass
    consumes no random numbers. ``autocast`` returns the mixed-precision context of the
    forward passes. Existing ``.grad`` values are added to, as in ``loss.backward()``.

    Returns:
        The loss, detached.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be positive")

    image_chunks = images.split(chunk_size)
    token_chunks = tokens.split(chunk_size)
    image_features, image_states = _embed_without_grad(model.encode_image, image_chunks, autocast)
    text_features, text_states = _embed_without_grad(model.encode_text, token_chunks, autocast)

    image_features.requires_grad_(True)
    text_features.requires_grad_(True)
    logit_scale = model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
    loss = compute_loss(image_features, text_features, logit_scale)
    loss.backward()
    if image_features.grad is None or text_features.grad is None:
        raise ValueError("compute_loss must use both the image and the text features it receives")

    _backward_chunks(model.encode_image, image_chunks, image_states, image_features.grad.split(chunk_size), autocast)
    _backward_chunks(model.encode_text, token_chunks, text_states, text_features.grad.split(chunk_size), autocast)
    return loss.detach()
