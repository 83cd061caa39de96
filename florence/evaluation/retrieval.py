"""Image-text retrieval evaluation (recall@k) for a dual-encoder (CLIP-style) model.

The model is any ``nn.Module`` with ``encode_image(images, normalize=...)`` and
``encode_text(tokens, normalize=...)``. Every image may have several captions, and
``caption_to_image[j]`` is the index of the image that caption ``j`` describes.

Recall@k follows the CLIP papers (and ``clip_benchmark``'s ``zeroshot_retrieval``):

- image to text: an image query is correct at k when any of its captions is among its k
  most similar captions.
- text to image: a caption query is correct at k when its image is among its k most
  similar images.

Candidates are ranked by descending cosine similarity, and on a tie the candidate with the
lower index ranks first (a stable descending sort). A k larger than the number of
candidates counts every query as correct.

Every public function runs under ``torch.inference_mode()``, so returned tensors are
inference tensors.
"""

import logging
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from florence.evaluation._common import (
    Tokenizer,
    check_batch_size,
    check_ks,
    check_string_list,
    encode_image_batch,
    encode_texts_batched,
    eval_mode,
    first_positive_rank,
    resolve_device,
    target_rank,
)

logger = logging.getLogger(__name__)

# Queries scored per matrix product in retrieval_metrics. Each chunk allocates a few
# [chunk, candidates] tensors (scores, sorted scores and indices, masks), which we estimate
# at about 150 MB for 25,000 candidates.
QUERY_CHUNK_SIZE = 256


@torch.inference_mode()
def encode_images(
    model: nn.Module,
    dataloader: Iterable,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """Encode every image that ``dataloader`` yields, in loader order.

    Args:
        dataloader: yields image tensors ``[B, 3, H, W]``, or tuples and lists whose first
            element is the image tensor (labels or captions after it are ignored).
        device: where images are encoded and features returned; defaults to the device of
            the model's first parameter.
        autocast_dtype: run the image tower under ``torch.autocast`` with this dtype.

    Returns:
        L2-normalised float32 features ``[N, D]`` on ``device``.
    """
    device = resolve_device(model, device)

    chunks = []
    with eval_mode(model):
        for batch_index, batch in enumerate(dataloader):
            images = _images_from_batch(batch, batch_index)
            chunks.append(encode_image_batch(model, images, device, autocast_dtype))

    if not chunks:
        raise ValueError("the dataloader yielded no batches; pass a loader over a non-empty image dataset")

    return torch.cat(chunks)


@torch.inference_mode()
def encode_texts(
    model: nn.Module,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    batch_size: int = 256,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """Tokenize and encode ``texts`` in batches of ``batch_size``.

    Returns:
        L2-normalised float32 features ``[len(texts), D]`` on ``device``, which defaults
        to the device of the model's first parameter.
    """
    check_string_list(texts, "texts", "a dog runs on the grass")
    check_batch_size(batch_size)
    device = resolve_device(model, device)

    with eval_mode(model):
        return encode_texts_batched(model, tokenizer, texts, batch_size, device, autocast_dtype)


@torch.inference_mode()
def retrieval_metrics(
    image_features: Tensor,
    text_features: Tensor,
    caption_to_image: Sequence[int] | Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Compute image-to-text and text-to-image recall@k from precomputed features.

    Features are L2-normalised here, so scores are cosine similarities whatever the input
    scale. Images without any caption are left out of the image-to-text queries, because
    no retrieved caption could be correct for them. They stay candidates for text-to-image
    retrieval, and a warning logs their count.

    Args:
        image_features: ``[N_images, D]``.
        text_features: ``[N_captions, D]``.
        caption_to_image: for each caption, the index of its image in ``[0, N_images)``.
        ks: the k of each recall@k.

    Returns:
        ``image_to_text_R@{k}`` and ``text_to_image_R@{k}`` for each k, then
        ``mean_recall`` (the mean of all of them), every value in percent.

    Raises:
        ValueError: features that are not 2-D, empty or non-finite, or have different
            sizes D, a ``caption_to_image`` of the wrong length, or an image index out of
            range.
    """
    ks = check_ks(ks, "ks")
    _check_features(image_features, "image_features")
    _check_features(text_features, "text_features")
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"image_features have size {image_features.shape[1]} but text_features have size "
            f"{text_features.shape[1]}; encode both with the same model"
        )

    device = image_features.device
    caption_to_image = _check_caption_to_image(caption_to_image, len(text_features), len(image_features)).to(device)
    image_features = F.normalize(image_features.float(), dim=-1)
    text_features = F.normalize(text_features.to(device).float(), dim=-1)

    text_to_image_ranks = _text_to_image_ranks(image_features, text_features, caption_to_image)
    image_to_text_ranks = _image_to_text_ranks(image_features, text_features, caption_to_image)

    captioned = torch.bincount(caption_to_image, minlength=len(image_features)) > 0
    if not captioned.all():
        logger.warning(
            "%d of %d images have no caption; they are left out of the image-to-text queries",
            int((~captioned).sum()),
            len(image_features),
        )
    image_to_text_ranks = image_to_text_ranks[captioned]

    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"image_to_text_R@{k}"] = _percent_below(image_to_text_ranks, k)
    for k in ks:
        metrics[f"text_to_image_R@{k}"] = _percent_below(text_to_image_ranks, k)
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics


@torch.inference_mode()
def retrieval_ranks(
    image_features: Tensor, text_features: Tensor, caption_to_image: Sequence[int] | Tensor
) -> tuple[Tensor, Tensor]:
    """Return the 0-based ranks behind ``retrieval_metrics``: per image, then per caption.

    ``image_to_text[i]`` is the rank of image ``i``'s best-ranked caption among all captions
    (``N_captions`` for an image without captions). ``text_to_image[j]`` is the rank of
    caption ``j``'s image among all images. Ties follow the module's ranking rule, so
    ``rank < k`` is a hit at k exactly as ``retrieval_metrics`` counts it.
    """
    _check_features(image_features, "image_features")
    _check_features(text_features, "text_features")
    device = image_features.device
    caption_to_image = _check_caption_to_image(caption_to_image, len(text_features), len(image_features)).to(device)
    image_features = F.normalize(image_features.float(), dim=-1)
    text_features = F.normalize(text_features.to(device).float(), dim=-1)
    image_to_text = _image_to_text_ranks(image_features, text_features, caption_to_image)
    text_to_image = _text_to_image_ranks(image_features, text_features, caption_to_image)
    return image_to_text, text_to_image


@torch.inference_mode()
def evaluate_retrieval(
    model: nn.Module,
    tokenizer: Tokenizer,
    image_loader: Iterable,
    captions: Sequence[str],
    caption_to_image: Sequence[int] | Tensor,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 256,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Encode the images of ``image_loader`` and the ``captions``, then return ``retrieval_metrics``.

    Args:
        image_loader: as in ``encode_images``; image ``i`` is the i-th image it yields.
        captions: every caption, in any order.
        caption_to_image: for each caption, the index of its image in loader order.
        batch_size: captions per ``encode_text`` call.
    """
    check_string_list(captions, "captions", "a dog runs on the grass")
    check_ks(ks, "ks")
    check_batch_size(batch_size)
    if len(caption_to_image) != len(captions):
        raise ValueError(
            f"got {len(captions)} captions but {len(caption_to_image)} entries in caption_to_image; "
            "pass one image index per caption"
        )

    image_features = encode_images(model, image_loader, device=device, autocast_dtype=autocast_dtype)
    _check_caption_to_image(caption_to_image, len(captions), len(image_features))
    text_features = encode_texts(
        model, tokenizer, captions, batch_size=batch_size, device=device, autocast_dtype=autocast_dtype
    )

    metrics = retrieval_metrics(image_features, text_features, caption_to_image, ks=ks)
    logger.debug("retrieval on %d images and %d captions: %s", len(image_features), len(captions), metrics)
    return metrics


def _percent_below(ranks: Tensor, k: int) -> float:
    return 100.0 * int((ranks < k).sum()) / len(ranks)


def _images_from_batch(batch: object, batch_index: int) -> Tensor:
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]

    if not isinstance(batch, Tensor):
        raise TypeError(
            f"batch {batch_index} is a {type(batch).__name__}, not an image tensor; "
            "the dataloader must yield image tensors or (images, ...) tuples"
        )

    return batch


def _check_features(features: Tensor, name: str) -> None:
    if not isinstance(features, Tensor) or features.ndim != 2 or features.shape[0] == 0:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"{name} must be a tensor [N, D] with N > 0, got {shape}")

    if not torch.isfinite(features).all():
        raise ValueError(f"{name} contain NaN or infinite values; check the model's outputs (e.g. fp16 overflow)")


def _check_caption_to_image(caption_to_image: Sequence[int] | Tensor, num_captions: int, num_images: int) -> Tensor:
    """Return ``caption_to_image`` as an int64 tensor after checking its length and range."""
    indices = torch.as_tensor(caption_to_image)
    if indices.ndim != 1 or indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(
            f"caption_to_image must be a 1-D sequence of integer image indices, got dtype {indices.dtype} "
            f"and shape {tuple(indices.shape)}"
        )

    if len(indices) != num_captions:
        raise ValueError(
            f"caption_to_image has {len(indices)} entries but there are {num_captions} captions; "
            "pass one image index per caption"
        )

    out_of_range = (indices < 0) | (indices >= num_images)
    if out_of_range.any():
        caption = int(out_of_range.nonzero()[0])
        raise ValueError(
            f"caption_to_image[{caption}] = {int(indices[caption])} is out of range for {num_images} images "
            f"(valid: 0..{num_images - 1}); image indices must follow the order of the image features"
        )

    return indices.long()


def _text_to_image_ranks(image_features: Tensor, text_features: Tensor, caption_to_image: Tensor) -> Tensor:
    """Return, per caption, the rank of its image among all images."""
    ranks = []
    for start in range(0, len(text_features), QUERY_CHUNK_SIZE):
        end = start + QUERY_CHUNK_SIZE
        scores = text_features[start:end] @ image_features.T
        ranks.append(target_rank(scores, caption_to_image[start:end]))

    return torch.cat(ranks)


def _image_to_text_ranks(image_features: Tensor, text_features: Tensor, caption_to_image: Tensor) -> Tensor:
    """Return, per image, the rank of its best-ranked caption among all captions (``N_captions`` if it has none)."""
    ranks = []
    for start in range(0, len(image_features), QUERY_CHUNK_SIZE):
        end = min(start + QUERY_CHUNK_SIZE, len(image_features))
        scores = image_features[start:end] @ text_features.T
        image_indices = torch.arange(start, end, device=scores.device)
        positives = caption_to_image[None, :] == image_indices[:, None]
        ranks.append(first_positive_rank(scores, positives))

    return torch.cat(ranks)
