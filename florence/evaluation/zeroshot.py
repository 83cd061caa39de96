"""Zero-shot image classification with a dual-encoder (CLIP-style) model.

The model is any ``nn.Module`` with ``encode_image(images, normalize=...)`` and
``encode_text(tokens, normalize=...)``, such as florence's models or an open_clip ``CLIP``.
Class names are turned into prompts with templates, the prompts are encoded, and each
image is assigned to the class whose averaged prompt embedding has the highest cosine
similarity with the image embedding.

Ranking rule used by every metric here: classes are ranked by descending cosine
similarity, and on a tie the lower class index ranks first (the rule of ``torch.argmax``
and of a stable descending sort). A sample is correct at k when its class is among the
first k ranked classes. A k larger than the number of classes therefore counts every
sample as correct, which is the same as clamping k to the number of classes.

Every public function runs under ``torch.inference_mode()``, so returned tensors are
inference tensors. Call ``.clone()`` on one outside inference mode before using it in
autograd, for example to initialise a trainable linear head.
"""

import logging
import string
from collections.abc import Callable, Iterable, Sequence

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
    resolve_device,
    target_rank,
)

logger = logging.getLogger(__name__)

Template = str | Callable[[str], str]

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

# Logit scale (inverse softmax temperature) used by classify() for models without a learned
# logit_scale. It is the cap that CLIP-style training puts on exp(logit_scale).
DEFAULT_LOGIT_SCALE = 100.0


@torch.inference_mode()
def build_zero_shot_classifier(
    model: nn.Module,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence[Template],
    batch_size: int = 256,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """Build zero-shot classifier weights ``[D, C]`` from class names and prompt templates.

    Each class name is put into every template, each prompt embedding is L2-normalised,
    the embeddings of one class are averaged and the average is L2-normalised again. This
    is CLIP's prompt ensembling, and the result equals
    ``open_clip.zero_shot_classifier.build_zero_shot_classifier`` (open_clip 3.3.0) on the
    same model to within 1e-6.

    Args:
        classnames: one name per class, in class-index order. Duplicates are allowed.
        templates: format strings with one ``{}`` placeholder (``"a photo of a {}."``),
            callables that map a class name to a prompt, or a mix of both.
        batch_size: number of prompts per ``encode_text`` call.
        device: where prompts are encoded and the weights are returned; defaults to the
            device of the model's first parameter.
        autocast_dtype: run the text tower under ``torch.autocast`` with this dtype
            (e.g. ``torch.bfloat16``); normalisation and averaging stay in float32.

    Returns:
        float32 weights ``[D, C]`` with unit-norm columns, on ``device``.

    Raises:
        ValueError: empty ``classnames`` or ``templates``, a template without exactly one
            ``{}`` placeholder, or an invalid ``batch_size``.
        TypeError: a bare string in place of a list, or a template that is neither a
            string nor a callable returning a string.
    """
    check_string_list(classnames, "classnames", "cat")
    _check_templates(templates)
    check_batch_size(batch_size)
    device = resolve_device(model, device)

    prompts = [_format_prompt(template, classname) for classname in classnames for template in templates]

    with eval_mode(model):
        prompt_features = encode_texts_batched(model, tokenizer, prompts, batch_size, device, autocast_dtype)

    class_features = prompt_features.reshape(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(class_features, dim=-1).T.contiguous()


@torch.inference_mode()
def zero_shot_accuracy(
    model: nn.Module,
    classifier: Tensor,
    dataloader: Iterable,
    topk: Sequence[int] = (1, 5),
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Measure zero-shot top-k accuracy and mean per-class recall over ``dataloader``.

    Args:
        classifier: weights ``[D, C]`` from ``build_zero_shot_classifier``.
        dataloader: yields ``(images, class_index)`` batches (extra elements are ignored),
            with ``images`` preprocessed for the model and ``class_index`` in ``[0, C)``.
        topk: the k of each ``top{k}`` key. See the module docstring for ties and for a k
            above the number of classes.
        device: defaults to the device of the model's first parameter.
        autocast_dtype: run the image tower under ``torch.autocast`` with this dtype.

    Returns:
        ``{"top1": %, "top5": %, "mean_per_class_recall": %, "num_samples": n}`` with one
        ``top{k}`` per requested k. Mean per-class recall averages the top-1 recall of the
        classes that occur in the data, like ``sklearn.metrics.balanced_accuracy_score``.

    Raises:
        ValueError: a classifier that is not 2-D, an empty dataloader, a class index out
            of range, or image features whose size differs from the classifier's.
        TypeError: a batch that is not an ``(images, class_index)`` pair.
    """
    ks = check_ks(topk, "topk")
    _check_classifier(classifier)
    device = resolve_device(model, device)
    classifier = classifier.to(device=device, dtype=torch.float32)
    num_classes = classifier.shape[1]
    _warn_about_large_k(ks, num_classes)

    ranks = []
    targets = []
    with eval_mode(model):
        for batch_index, batch in enumerate(dataloader):
            images, batch_targets = _split_labeled_batch(batch, batch_index, num_classes)
            features = encode_image_batch(model, images, device, autocast_dtype)
            logits = features @ _check_feature_size(features, classifier, batch_index)

            batch_targets = batch_targets.to(device)
            ranks.append(target_rank(logits, batch_targets).cpu())
            targets.append(batch_targets.cpu())

    if not ranks:
        raise ValueError("the dataloader yielded no batches; pass a loader over a non-empty dataset")

    metrics = _summarize_target_ranks(torch.cat(ranks), torch.cat(targets), num_classes, ks)
    logger.debug("zero-shot accuracy on %d samples: %s", metrics["num_samples"], metrics)
    return metrics


@torch.inference_mode()
def classification_metrics(logits: Tensor, targets: Tensor, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Compute the metrics of ``zero_shot_accuracy`` from precomputed logits.

    Args:
        logits: scores ``[N, C]``, higher is better.
        targets: class indices ``[N]`` in ``[0, C)``.
        topk: as in ``zero_shot_accuracy``.

    Returns:
        the same keys as ``zero_shot_accuracy``.
    """
    ks = check_ks(topk, "topk")
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must have shape [N, C] with N > 0, got {tuple(logits.shape)}")

    targets = _check_targets(torch.as_tensor(targets, device=logits.device), logits.shape[1], "targets")
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"got {logits.shape[0]} rows of logits but {targets.shape[0]} targets; pass one target per row"
        )

    _warn_about_large_k(ks, logits.shape[1])
    return _summarize_target_ranks(target_rank(logits, targets), targets, logits.shape[1], ks)


@torch.inference_mode()
def classify(
    model: nn.Module,
    tokenizer: Tokenizer,
    images: Tensor,
    labels: Sequence[str],
    templates: Sequence[Template] = DEFAULT_TEMPLATES,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> list[list[tuple[str, float]]]:
    """Rank ``labels`` for each image by zero-shot probability.

    Probabilities are ``softmax(scale * cosine)`` over the labels, where ``scale`` is
    ``model.logit_scale.exp()`` when the model has a ``logit_scale`` attribute (the log
    temperature, as in CLIP) and ``DEFAULT_LOGIT_SCALE`` (100) otherwise.

    Args:
        images: preprocessed images ``[B, 3, H, W]`` or one image ``[3, H, W]``, encoded
            in a single forward pass.
        labels: candidate label names.
        templates: as in ``build_zero_shot_classifier``.

    Returns:
        per image, every ``(label, probability)`` pair sorted by descending probability
        (ties keep label order).
    """
    if images.ndim == 3:
        images = images.unsqueeze(0)

    if images.ndim != 4:
        raise ValueError(f"images must have shape [B, 3, H, W] or [3, H, W], got {tuple(images.shape)}")

    device = resolve_device(model, device)
    classifier = build_zero_shot_classifier(
        model, tokenizer, labels, templates, device=device, autocast_dtype=autocast_dtype
    )

    with eval_mode(model):
        features = encode_image_batch(model, images, device, autocast_dtype)
        logits = _logit_scale_of(model) * (features @ _check_feature_size(features, classifier, 0))
        probabilities = logits.softmax(dim=-1).cpu()

    sorted_probabilities, order = probabilities.sort(dim=1, descending=True, stable=True)
    rankings = []
    for row_order, row_probabilities in zip(order.tolist(), sorted_probabilities.tolist(), strict=True):
        rankings.append(
            [(labels[index], probability) for index, probability in zip(row_order, row_probabilities, strict=True)]
        )

    return rankings


def _check_templates(templates: Sequence[Template]) -> None:
    """Raise unless ``templates`` is a non-empty sequence of valid templates."""
    if isinstance(templates, str):
        raise TypeError(f"templates must be a list, not the single string {templates!r}; pass [{templates!r}]")

    if len(templates) == 0:
        raise ValueError(f"templates is empty; pass at least one, e.g. [{DEFAULT_TEMPLATES[0]!r}]")

    for index, template in enumerate(templates):
        if isinstance(template, str):
            _check_format_template(template)
        elif not callable(template):
            raise TypeError(
                f"templates[{index}] is {template!r} of type {type(template).__name__}; "
                "pass a format string with one '{}' or a callable that maps a class name to a prompt"
            )


def _check_format_template(template: str) -> None:
    """Raise unless ``template.format(name)`` inserts the class name: one ``{}``, or one or more ``{0}``."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as error:
        raise ValueError(
            f"invalid template {template!r}: {error}; escape literal braces as '{{{{' and '}}}}'"
        ) from error

    if fields == [""] or (fields and all(field == "0" for field in fields)):
        return

    raise ValueError(
        f"invalid template {template!r}: it needs exactly one '{{}}' placeholder for the class name, "
        f"found {len(fields)} placeholder(s) {fields}; e.g. {DEFAULT_TEMPLATES[0]!r}"
    )


def _format_prompt(template: Template, classname: str) -> str:
    if isinstance(template, str):
        return template.format(classname)

    prompt = template(classname)
    if not isinstance(prompt, str):
        raise TypeError(
            f"template {template!r} returned {prompt!r} of type {type(prompt).__name__} "
            f"for class {classname!r}; a template callable must return a string"
        )

    return prompt


def _check_classifier(classifier: Tensor) -> None:
    if not isinstance(classifier, Tensor) or classifier.ndim != 2 or classifier.shape[1] == 0:
        shape = tuple(classifier.shape) if isinstance(classifier, Tensor) else type(classifier).__name__
        raise ValueError(
            f"classifier must be a tensor [D, C] with C > 0, got {shape}; build it with build_zero_shot_classifier"
        )


def _check_targets(targets: Tensor, num_classes: int, where: str) -> Tensor:
    """Return ``targets`` as int64 after checking that they are 1-D class indices in ``[0, num_classes)``."""
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"class indices in {where} must be integers, got dtype {targets.dtype}")

    if targets.ndim != 1:
        raise ValueError(f"class indices in {where} must be 1-D, got shape {tuple(targets.shape)}")

    if targets.numel() > 0 and (targets.min() < 0 or targets.max() >= num_classes):
        bad = targets[(targets < 0) | (targets >= num_classes)][0].item()
        raise ValueError(
            f"class index {bad} in {where} is out of range for a classifier with {num_classes} classes "
            f"(valid: 0..{num_classes - 1}); build the classifier from the dataset's full class list"
        )

    return targets.long()


def _split_labeled_batch(batch: object, batch_index: int, num_classes: int) -> tuple[Tensor, Tensor]:
    """Return ``(images, class_index)`` from a loader batch after checking both."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(
            f"batch {batch_index} is a {type(batch).__name__}; the dataloader must yield (images, class_index) pairs"
        )

    images, targets = batch[0], batch[1]
    targets = _check_targets(torch.as_tensor(targets), num_classes, f"batch {batch_index}")
    if len(images) != len(targets):
        raise ValueError(f"batch {batch_index} has {len(images)} images but {len(targets)} class indices")

    return images, targets


def _check_feature_size(features: Tensor, classifier: Tensor, batch_index: int) -> Tensor:
    """Return ``classifier`` after checking that its rows match the feature size of ``features``."""
    if features.shape[1] != classifier.shape[0]:
        raise ValueError(
            f"batch {batch_index}: image features have size {features.shape[1]} but the classifier expects "
            f"{classifier.shape[0]}; build the classifier with the same model"
        )

    return classifier


def _warn_about_large_k(ks: Sequence[int], num_classes: int) -> None:
    large = [k for k in ks if k > num_classes]
    if large:
        logger.warning(
            "top-k with k=%s above the number of classes (%d) counts every sample as correct", large, num_classes
        )


def _summarize_target_ranks(ranks: Tensor, targets: Tensor, num_classes: int, ks: Sequence[int]) -> dict[str, float]:
    """Turn per-sample ranks of the true class into top-k accuracies and mean per-class recall (in %)."""
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"top{k}"] = 100.0 * int((ranks < k).sum()) / len(ranks)

    top1_correct = (ranks == 0).double()
    samples_per_class = torch.bincount(targets, minlength=num_classes)
    correct_per_class = torch.bincount(targets, weights=top1_correct, minlength=num_classes)
    present = samples_per_class > 0
    recall_per_class = correct_per_class[present] / samples_per_class[present]

    metrics["mean_per_class_recall"] = 100.0 * recall_per_class.mean().item()
    metrics["num_samples"] = int(ranks.numel())
    return metrics


def _logit_scale_of(model: nn.Module) -> float:
    logit_scale = getattr(model, "logit_scale", None)
    if logit_scale is None:
        return DEFAULT_LOGIT_SCALE

    return float(torch.as_tensor(logit_scale, dtype=torch.float32).exp())
