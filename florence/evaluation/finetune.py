"""Fine-tuning a florence checkpoint on a labelled image set with the UniCL loss.

This is Florence's ImageNet fine-tuning protocol: the whole image encoder (and the text
encoder) keeps training with the UniCL contrastive loss, the texts being the class names,
so the fine-tuned model is still a dual encoder. It is then scored zero-shot with the same
class names, which makes the class-name embeddings act as the classification head.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from florence.checkpoint import WEIGHTS_NAME, read_metadata
from florence.config import (
    PRECISIONS,
    TrainConfig,
    apply_override,
    expand_variables,
    from_dict,
)
from florence.data.sources import class_prompt_name
from florence.training.data import TEMPLATE_SETS, build_source

logger = logging.getLogger(__name__)

# Share of the steps spent warming the learning rate up from zero.
WARMUP_FRACTION = 0.1


def finetune(
    init_from: str | Path,
    classes: Sequence[str],
    train_source: dict,
    output_dir: Path,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    image_size: int,
    seed: int = 0,
    precision: str = "fp32",
    templates: str = "none",
    extra_overrides: Sequence[str] = (),
) -> Path:
    """Fine-tune a florence checkpoint with the UniCL loss and the class names as texts.

    Training runs ``florence.training.trainer.Trainer`` from the weights of ``init_from``
    (relative position bias tables are resized when ``image_size`` needs another window
    size), with AdamW, a cosine schedule whose first ``WARMUP_FRACTION`` of the steps warm
    up, and the trainer's defaults for everything else.

    Args:
        init_from: a florence ``model.safetensors`` or a folder that contains one. Its
            metadata names the model configuration to build.
        classes: class names in class-index order. They must equal the class names of
            ``train_source`` (with underscores read as spaces), because the trainer takes
            each image's text from its source.
        train_source: one ``data.train`` entry of type ``classification``, as in
            ``florence.config.SourceConfig`` (``root`` or ``path``, ``archive``,
            ``classes_file``). Its ``templates`` key is set from ``templates``.
        output_dir: the trainer's output folder: checkpoints, metrics and the final weights.
        steps, batch_size, lr, image_size, seed, precision: the trainer's ``steps``,
            ``data.batch_size``, ``optim.lr``, ``data.image_size``, ``seed`` and
            ``precision`` (fp32, bf16 or fp16).
        templates: ``none`` for the bare class names as texts, ``train`` for CLIP's 80
            ImageNet prompt templates plus "{}.".
        extra_overrides: further ``key=value`` config overrides applied last, such as
            ``data.num_workers=0`` or ``optim.weight_decay=0.05``.

    Returns:
        The path of the fine-tuned ``model.safetensors``.

    Raises:
        FileNotFoundError: ``init_from`` does not exist.
        ValueError: ``init_from`` is not a florence checkpoint (an open_clip or timm file
            has no florence model name in its metadata), an invalid argument, or class
            names that differ from the source's.
    """
    from florence.training.trainer import Trainer

    model_name, model_config = _read_florence_checkpoint(init_from)
    _check_arguments(steps, batch_size, lr, image_size, precision, templates)
    output_dir = Path(output_dir)
    source = {**train_source, "type": "classification", "templates": templates}
    _check_classes(classes, source)

    model_config["vision_cfg"] = {**model_config.get("vision_cfg", {}), "img_size": image_size}
    values: dict[str, Any] = {
        "model": model_name,
        "model_overrides": model_config,
        "init_from": str(init_from),
        "output_dir": str(output_dir),
        "steps": steps,
        "seed": seed,
        "precision": precision,
        "checkpoint_every": steps,
        "data": {"train": [source], "image_size": image_size, "batch_size": batch_size},
        "optim": {"lr": lr, "warmup_steps": max(1, round(WARMUP_FRACTION * steps))},
    }
    for override in extra_overrides:
        apply_override(values, override)

    config: TrainConfig = from_dict(TrainConfig, expand_variables(values))
    config.validate()

    logger.info("fine-tuning %s (%s) for %d steps on %d classes", init_from, model_name, steps, len(classes))
    Trainer(config).fit()
    return output_dir / WEIGHTS_NAME


def _read_florence_checkpoint(init_from: str | Path) -> tuple[str, dict[str, Any]]:
    """Return the model name and configuration stored in a florence checkpoint's metadata."""
    metadata = read_metadata(init_from)
    if "model_name" not in metadata or "model_config" not in metadata:
        raise ValueError(
            f"{init_from} is not a florence checkpoint: its metadata has no model_name and model_config. "
            "Fine-tuning supports florence models only; evaluate other models (open_clip, timm) with the "
            "linear probe, few-shot or k-NN tasks"
        )

    return metadata["model_name"], json.loads(metadata["model_config"])


def _check_arguments(steps: int, batch_size: int, lr: float, image_size: int, precision: str, templates: str) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"invalid steps {steps!r}; pass a positive number of optimizer steps")

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"invalid batch_size {batch_size!r}; the contrastive loss needs at least 2 images per batch")

    if not lr > 0:
        raise ValueError(f"invalid lr {lr!r}; pass a positive learning rate, e.g. 1e-5")

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"invalid image_size {image_size!r}; pass the input side in pixels, e.g. 224")

    if precision not in PRECISIONS:
        raise ValueError(f"invalid precision {precision!r}; use one of {', '.join(PRECISIONS)}")

    if templates not in TEMPLATE_SETS:
        raise ValueError(f"invalid templates {templates!r}; use one of {', '.join(TEMPLATE_SETS)}")


def _check_classes(classes: Sequence[str], source: dict) -> None:
    """Raise unless ``classes`` equals the class names that the training source reads."""
    if isinstance(classes, str) or len(classes) == 0:
        raise ValueError(f"classes must be a non-empty list of class names, got {classes!r}")

    if source.get("root") is None and source.get("path") is None:
        raise ValueError(f"train_source {source!r} has neither root nor path; pass the labelled images' location")

    source_config = from_dict(TrainConfig, expand_variables({"data": {"train": [source]}})).data.train[0]
    source_classes = build_source(source_config).classes
    expected = [class_prompt_name(name) for name in classes]
    if expected != source_classes:
        raise ValueError(
            f"classes {list(classes)} differ from the classes of the training source {source_classes}; "
            "pass the source's class names in its index order (set classes_file to fix the order)"
        )
