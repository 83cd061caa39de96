"""The suite's zero-shot and retrieval numbers equal clip_benchmark's metric functions on the same model and data."""

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score
from torch.utils.data import DataLoader

from florence.evaluation.datasets import load_templates
from florence.evaluation.models import load_eval_model
from florence.evaluation.runner import run_suite
from florence.evaluation.suite import load_suite
from tests.evaluation.benchmark_helpers import (
    cifar_dataset,
    flickr_dataset,
    write_suite,
    write_tiny_clip_config,
)

zeroshot_classification = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
zeroshot_retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")


@pytest.fixture
def tiny_model(tmp_path):
    return load_eval_model(f"open_clip:{write_tiny_clip_config(tmp_path)}", seed=0)


class _CaptionedImages(torch.utils.data.Dataset):
    """clip_benchmark's retrieval input: ``(image, [captions of that image])`` per image."""

    def __init__(self, images, captions, caption_to_image):
        self.images = images
        self.captions = [[] for _ in range(len(images))]
        for caption, image in zip(captions, caption_to_image, strict=True):
            self.captions[image].append(caption)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index][0], self.captions[index]


def _collate_captioned(batch):
    return torch.stack([image for image, _ in batch]), [captions for _, captions in batch]


def test_zeroshot_matches_clip_benchmark(tmp_path, tiny_model):
    suite = load_suite(write_suite(tmp_path, {"cifar10": cifar_dataset(300, None)}, [{"task": "zeroshot", "dataset": "cifar10"}]))
    record = run_suite(suite, tiny_model, tmp_path / "out")[0]

    from florence.evaluation.runner import SuiteRunner

    split = SuiteRunner(suite, tiny_model, tmp_path / "out").split(suite.datasets["cifar10"], "test")
    templates = [template.replace("{}", "{c}") for template in load_templates(suite.datasets["cifar10"])]
    classifier = zeroshot_classification.zero_shot_classifier(
        tiny_model, tiny_model.tokenizer, split.classes, templates, "cpu", amp=False
    )
    logits, target = zeroshot_classification.run_classification(
        tiny_model, classifier, DataLoader(split.dataset, batch_size=64), "cpu", amp=False
    )

    # clip_benchmark 1.6.2's accuracy() raises under NumPy 2 (float() of a 1-element array),
    # so its top-k rule (torch.topk, then a hit among the first k) is applied here directly.
    top5 = logits.topk(5, dim=1).indices
    assert record["metrics"]["top1"] == pytest.approx(100 * (top5[:, 0] == target).double().mean().item(), abs=1e-9)
    assert record["metrics"]["top5"] == pytest.approx(100 * (top5 == target[:, None]).any(1).double().mean().item(), abs=1e-9)
    assert record["metrics"]["mean_per_class_recall"] == pytest.approx(
        100 * balanced_accuracy_score(target, logits.argmax(1)), abs=1e-9
    )


def test_retrieval_matches_clip_benchmark(tmp_path, tiny_model):
    suite = load_suite(write_suite(tmp_path, {"flickr": flickr_dataset(60)}, [{"task": "retrieval", "dataset": "flickr"}]))
    record = run_suite(suite, tiny_model, tmp_path / "out")[0]

    from florence.evaluation.runner import SuiteRunner

    split = SuiteRunner(suite, tiny_model, tmp_path / "out").split(suite.datasets["flickr"], "test")
    loader = DataLoader(
        _CaptionedImages(split.dataset, split.captions, split.caption_to_image), batch_size=16, collate_fn=_collate_captioned
    )
    reference = zeroshot_retrieval.evaluate(tiny_model, loader, tiny_model.tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])

    # clip_benchmark's "image retrieval" is text-to-image and its "text retrieval" is image-to-text.
    for k in (1, 5, 10):
        assert record["metrics"][f"text_to_image_R@{k}"] == pytest.approx(100 * reference[f"image_retrieval_recall@{k}"], abs=1e-4)
        assert record["metrics"][f"image_to_text_R@{k}"] == pytest.approx(100 * reference[f"text_retrieval_recall@{k}"], abs=1e-4)


def test_retrieval_record_counts(tmp_path, tiny_model):
    suite = load_suite(write_suite(tmp_path, {"flickr": flickr_dataset(20)}, [{"task": "retrieval", "dataset": "flickr"}]))
    metrics = run_suite(suite, tiny_model, tmp_path / "out")[0]["metrics"]

    assert metrics["num_images"] == 20
    assert metrics["num_captions"] == 100
    assert metrics["image_to_text_R@1_ci_low"] <= metrics["image_to_text_R@1"] <= metrics["image_to_text_R@1_ci_high"]
