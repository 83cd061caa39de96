"""Image-text-label data for UniCL training and datasets for evaluation."""

from florence.data.dataset import (
    ClassificationDataset,
    ImageLoadError,
    ImageTextDataset,
    RetrievalDataset,
    collate_image_text,
)
from florence.data.labels import text_label
from florence.data.shards import ShardIndex, read_shard_index, write_shards
from florence.data.sources import (
    CaptionSource,
    ClassificationSource,
    CocoCaptionSource,
    ImageTextPairSource,
    ImageTextSource,
    class_prompt_name,
)
from florence.data.streaming import Shard, ShardedImageText, ShardStream, resolve_shards
from florence.data.templates import IMAGENET_TEMPLATES, TRAIN_TEMPLATES
from florence.data.transforms import (
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    build_eval_transform,
    build_train_transform,
)

__all__ = [
    "IMAGENET_TEMPLATES",
    "OPENAI_DATASET_MEAN",
    "OPENAI_DATASET_STD",
    "TRAIN_TEMPLATES",
    "CaptionSource",
    "ClassificationDataset",
    "ClassificationSource",
    "CocoCaptionSource",
    "ImageLoadError",
    "ImageTextDataset",
    "ImageTextPairSource",
    "ImageTextSource",
    "RetrievalDataset",
    "Shard",
    "ShardIndex",
    "ShardStream",
    "ShardedImageText",
    "build_eval_transform",
    "build_train_transform",
    "class_prompt_name",
    "collate_image_text",
    "read_shard_index",
    "resolve_shards",
    "text_label",
    "write_shards",
]
