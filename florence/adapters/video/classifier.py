"""Store and load the Video CoSwin classifiers that ``florence video train`` writes.

``VideoCoSwin`` is not in the model registry, and its safetensors metadata has the architecture
but not the class names or the clip sampling. Fine-tuning therefore writes
``output_dir/video_classifier.json`` with the constructor arguments, the class names in head
order and the clip sampling, and :func:`load_video_classifier` rebuilds the model from that
file and a checkpoint's weights.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from florence.adapters.video.dataset import VideoDataset
from florence.adapters.video.model import VideoCoSwin

_logger = logging.getLogger(__name__)

CONFIG_NAME = "video_classifier.json"
CONFIG_VERSION = 1


@dataclass(frozen=True)
class VideoClassifierConfig:
    """Constructor arguments, class names (head order) and clip sampling of a fine-tuned classifier."""

    model: dict[str, Any]
    classes: list[str]
    num_frames: int
    image_size: int
    sampling: str
    frame_interval: int


def video_coswin_config(model: VideoCoSwin) -> dict[str, Any]:
    """Return constructor arguments that rebuild ``model``'s architecture, with dropout and drop path off."""
    config = dict(model.model_config)
    for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
        if name in config:
            config[name] = 0.0
    return config


def classifier_config(model: VideoCoSwin, dataset: VideoDataset) -> VideoClassifierConfig:
    """Describe ``model`` trained on ``dataset``: its architecture, the dataset's classes and clip sampling."""
    return VideoClassifierConfig(
        model=video_coswin_config(model),
        classes=list(dataset.classes),
        num_frames=dataset.num_frames,
        image_size=dataset.size,
        sampling=dataset.mode,
        frame_interval=dataset.frame_interval,
    )


def check_classifier_config(output_dir: str | Path, config: VideoClassifierConfig) -> None:
    """Check an existing ``output_dir/video_classifier.json`` against ``config``; do nothing if there is none.

    Raises:
        ValueError: the folder already contains a classifier with other classes or another
            architecture, whose checkpoints a resumed run could not load.
    """
    path = Path(output_dir) / CONFIG_NAME
    if not path.is_file():
        return
    existing = read_classifier_config(path)
    for field in ("classes", "model"):
        if getattr(existing, field) != getattr(config, field):
            raise ValueError(
                f"{path} was written for another {field} ({_short(getattr(existing, field))}) than this run's "
                f"({_short(getattr(config, field))}); use another --output-dir or the original data and checkpoint"
            )


def write_classifier_config(output_dir: str | Path, config: VideoClassifierConfig) -> Path:
    """Write ``output_dir/video_classifier.json`` atomically, or check an existing one against ``config``.

    Raises:
        ValueError: as :func:`check_classifier_config`.
    """
    from florence.checkpoint import atomic_write_bytes

    path = Path(output_dir) / CONFIG_NAME
    check_classifier_config(output_dir, config)
    if path.is_file():
        return path
    payload = {"config_version": CONFIG_VERSION, **asdict(config)}
    atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode())
    return path


def read_classifier_config(path: str | Path) -> VideoClassifierConfig:
    """Read a ``video_classifier.json`` file."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        payload.pop("config_version", None)
        return VideoClassifierConfig(**payload)
    except (json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"{path} is not a valid {CONFIG_NAME}: {error}; train the classifier again") from error


def find_classifier_files(path: str | Path) -> tuple[Path, Path]:
    """Return ``(video_classifier.json, model.safetensors)`` for a training output folder or one of its checkpoints.

    ``path`` is the ``--output-dir`` of ``florence video train`` (its newest checkpoint is
    used), its ``checkpoints`` folder, a ``step_*`` folder or a ``model.safetensors`` in one.
    """
    from florence.checkpoint import WEIGHTS_NAME
    from florence.training.checkpointing import latest_checkpoint

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"classifier {path} not found; pass the --output-dir of 'florence video train'")
    weights = path
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        step = latest_checkpoint(folder) if (folder / "latest").is_file() else folder
        weights = step / WEIGHTS_NAME if step is not None else folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(
            f"no classifier weights in {path} ({weights} not found); pass the --output-dir of 'florence video train' "
            "or one of its checkpoints/step_* folders"
        )

    for folder in weights.parents[:3]:
        if (folder / CONFIG_NAME).is_file():
            return folder / CONFIG_NAME, weights
    raise FileNotFoundError(
        f"no {CONFIG_NAME} found in the 3 folders above {weights}; 'florence video train' writes it "
        "into --output-dir, so train the classifier again or copy that file back"
    )


def load_video_classifier(path: str | Path) -> tuple[VideoCoSwin, VideoClassifierConfig]:
    """Build the classifier of a training output folder or checkpoint (see :func:`find_classifier_files`), in eval mode."""
    from florence.checkpoint import load_weights

    config_path, weights = find_classifier_files(path)
    config = read_classifier_config(config_path)
    model = VideoCoSwin(**config.model)
    if model.num_classes != len(config.classes):
        raise ValueError(f"{config_path}: the head has {model.num_classes} outputs but {len(config.classes)} classes are listed")
    try:
        load_weights(model, weights, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{weights} does not match the architecture in {config_path}: {error}") from error
    _logger.info("loaded a video classifier with %d classes from %s", len(config.classes), weights)
    return model.eval(), config


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else f"{text[:77]}..."

