"""Zero-shot classification and image-text retrieval evaluation for dual-encoder models."""

from florence.evaluation.retrieval import encode_images, encode_texts, evaluate_retrieval, retrieval_metrics
from florence.evaluation.zeroshot import (
    build_zero_shot_classifier,
    classification_metrics,
    classify,
    zero_shot_accuracy,
)

__all__ = [
    "build_zero_shot_classifier",
    "classification_metrics",
    "classify",
    "encode_images",
    "encode_texts",
    "evaluate_retrieval",
    "retrieval_metrics",
    "zero_shot_accuracy",
]
