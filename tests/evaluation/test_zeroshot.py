import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier as open_clip_build_zero_shot_classifier
from torch.utils.data import DataLoader, TensorDataset

from florence.evaluation import (
    build_zero_shot_classifier,
    classification_metrics,
    classify,
    encode_images,
    encode_texts,
    zero_shot_accuracy,
)

TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}.", "a low resolution photo of the {}."]


def make_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


def training_flags(model: torch.nn.Module) -> list[bool]:
    return [module.training for module in model.modules()]


def test_classifier_matches_open_clip(tiny_clip, tokenizer, cifar10):
    _, _, classnames = cifar10

    ours = build_zero_shot_classifier(tiny_clip, tokenizer, classnames, TEMPLATES, batch_size=7)
    reference = open_clip_build_zero_shot_classifier(
        tiny_clip, tokenizer, classnames, TEMPLATES, num_classes_per_batch=4, device="cpu"
    )

    assert ours.shape == (32, len(classnames))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_classifier_columns_unit_norm(tiny_clip, tokenizer, cifar10):
    _, _, classnames = cifar10

    classifier = build_zero_shot_classifier(tiny_clip, tokenizer, classnames, TEMPLATES)

    torch.testing.assert_close(classifier.norm(dim=0), torch.ones(len(classnames)), atol=1e-6, rtol=0)


def test_classifier_callable_templates(tiny_clip, tokenizer):
    classnames = ["cat", "dog", "ship"]
    callables = [lambda name, template=template: template.format(name) for template in TEMPLATES]
    mixed = [TEMPLATES[0], callables[1], TEMPLATES[2]]

    from_strings = build_zero_shot_classifier(tiny_clip, tokenizer, classnames, TEMPLATES)
    from_callables = build_zero_shot_classifier(tiny_clip, tokenizer, classnames, callables)
    from_mixed = build_zero_shot_classifier(tiny_clip, tokenizer, classnames, mixed)

    assert torch.equal(from_callables, from_strings)
    assert torch.equal(from_mixed, from_strings)


def test_classifier_independent_of_batch_size(tiny_clip, tokenizer, cifar10):
    _, _, classnames = cifar10

    one_batch = build_zero_shot_classifier(tiny_clip, tokenizer, classnames, TEMPLATES, batch_size=256)
    small_batches = build_zero_shot_classifier(tiny_clip, tokenizer, classnames, TEMPLATES, batch_size=4)

    torch.testing.assert_close(small_batches, one_batch, atol=1e-6, rtol=0)


def test_classifier_is_prompt_ensemble(tiny_clip, tokenizer):
    classifier = build_zero_shot_classifier(tiny_clip, tokenizer, ["airplane"], TEMPLATES)

    prompts = [template.format("airplane") for template in TEMPLATES]
    prompt_features = F.normalize(tiny_clip.encode_text(tokenizer(prompts)), dim=-1)
    expected = F.normalize(prompt_features.mean(dim=0), dim=0)

    torch.testing.assert_close(classifier[:, 0], expected, atol=1e-6, rtol=0)


def test_classifier_bfloat16_autocast_close(tiny_clip, tokenizer, cifar10):
    _, _, classnames = cifar10

    full = build_zero_shot_classifier(tiny_clip, tokenizer, classnames, TEMPLATES)
    mixed = build_zero_shot_classifier(tiny_clip, tokenizer, classnames, TEMPLATES, autocast_dtype=torch.bfloat16)

    assert mixed.dtype == torch.float32
    assert (mixed * full).sum(dim=0).min() > 0.99


@pytest.mark.parametrize(
    ("classnames", "templates", "error", "message"),
    [
        ([], TEMPLATES, ValueError, "classnames is empty"),
        (["cat"], [], ValueError, "templates is empty"),
        (["cat"], ["a photo of a cat."], ValueError, "'a photo of a cat.'"),
        (["cat"], ["a {} next to a {}."], ValueError, "'a {} next to a {}.'"),
        (["cat"], ["a photo of a {name}."], ValueError, "'a photo of a {name}.'"),
        (["cat"], "a photo of a {}.", TypeError, "must be a list"),
        ("cat", TEMPLATES, TypeError, "must be a list"),
        (["cat"], [42], TypeError, "templates[0]"),
        (["cat", 7], TEMPLATES, TypeError, "classnames[1]"),
        (["cat"], [lambda name: None], TypeError, "must return a string"),
    ],
)
def test_classifier_rejects_invalid_input(tiny_clip, tokenizer, classnames, templates, error, message):
    with pytest.raises(error, match=message.replace("{", r"\{").replace("[", r"\[")):
        build_zero_shot_classifier(tiny_clip, tokenizer, classnames, templates)


def test_classifier_accepts_repeated_positional_placeholder(tiny_clip, tokenizer):
    classifier = build_zero_shot_classifier(tiny_clip, tokenizer, ["cat"], ["a {0}, a small {0}."])

    assert classifier.shape == (32, 1)


def test_accuracy_matches_direct_argmax(tiny_clip, tokenizer, cifar10):
    images, labels, classnames = cifar10
    classifier = build_zero_shot_classifier(tiny_clip, tokenizer, classnames, TEMPLATES)
    loader = make_loader(images, labels)

    metrics = zero_shot_accuracy(tiny_clip, classifier, loader)

    with torch.no_grad():
        logits = torch.cat([tiny_clip.encode_image(batch, normalize=True) @ classifier for batch, _ in loader])
    predictions = logits.argmax(dim=1)
    top5 = logits.topk(5, dim=1).indices
    top5_hits = (top5 == labels[:, None]).any(dim=1)
    per_class = [(predictions[labels == c] == c).double().mean().item() for c in range(len(classnames))]

    assert metrics["num_samples"] == len(labels)
    assert metrics["top1"] == pytest.approx(100 * int((predictions == labels).sum()) / len(labels), abs=1e-9)
    assert metrics["top5"] == pytest.approx(100 * int(top5_hits.sum()) / len(labels), abs=1e-9)
    assert metrics["top5"] >= metrics["top1"]
    assert metrics["mean_per_class_recall"] == pytest.approx(100 * sum(per_class) / len(per_class), abs=1e-9)


def test_accuracy_known_confusion(tiny_clip, cifar10):
    """Class c's weight is image c's own feature, so each image is predicted as the class of its own image."""
    images, _, _ = cifar10
    prototypes = images[[0, 4, 8]]
    with torch.no_grad():
        classifier = F.normalize(tiny_clip.encode_image(prototypes), dim=-1).T
    similarities = classifier.T @ classifier
    assert similarities.fill_diagonal_(0).max() < 0.999, "prototype images are too similar for this test"

    # Image 0 appears twice, once labelled as class 2: predictions 0, 1, 2, 0 for labels 0, 1, 2, 2.
    loader = make_loader(images[[0, 4, 8, 0]], torch.tensor([0, 1, 2, 2]), batch_size=3)
    metrics = zero_shot_accuracy(tiny_clip, classifier, loader, topk=(1, 2))

    assert metrics["top1"] == 75.0
    assert metrics["mean_per_class_recall"] == pytest.approx(100 * (1 + 1 + 0.5) / 3, abs=1e-9)
    assert metrics["num_samples"] == 4


def test_accuracy_top_k_above_class_count(tiny_clip, tokenizer, cifar10):
    images, labels, classnames = cifar10
    keep = labels < 3
    classifier = build_zero_shot_classifier(tiny_clip, tokenizer, classnames[:3], TEMPLATES)

    metrics = zero_shot_accuracy(tiny_clip, classifier, make_loader(images[keep], labels[keep]), topk=(1, 3, 5))

    assert metrics["top3"] == 100.0
    assert metrics["top5"] == 100.0


def test_accuracy_bfloat16_autocast_runs(tiny_clip, tokenizer, cifar10):
    images, labels, classnames = cifar10
    classifier = build_zero_shot_classifier(tiny_clip, tokenizer, classnames, TEMPLATES)

    metrics = zero_shot_accuracy(tiny_clip, classifier, make_loader(images, labels), autocast_dtype=torch.bfloat16)

    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 100.0
    assert metrics["num_samples"] == len(labels)


def test_accuracy_rejects_out_of_range_label(tiny_clip, tokenizer, cifar10):
    images, labels, classnames = cifar10
    classifier = build_zero_shot_classifier(tiny_clip, tokenizer, classnames[:5], TEMPLATES)

    with pytest.raises(ValueError, match="class index 5 in batch 0 is out of range"):
        zero_shot_accuracy(tiny_clip, classifier, make_loader(images[16:24], labels[16:24]))


def test_accuracy_rejects_feature_size_mismatch(tiny_clip, cifar10):
    images, labels, _ = cifar10
    classifier = F.normalize(torch.randn(16, 10), dim=0)

    with pytest.raises(ValueError, match="image features have size 32 but the classifier expects 16"):
        zero_shot_accuracy(tiny_clip, classifier, make_loader(images, labels))


def test_accuracy_rejects_empty_loader(tiny_clip):
    classifier = F.normalize(torch.randn(32, 10), dim=0)

    with pytest.raises(ValueError, match="no batches"):
        zero_shot_accuracy(tiny_clip, classifier, [])


def test_accuracy_rejects_unlabeled_batches(tiny_clip, cifar10):
    images, _, _ = cifar10
    classifier = F.normalize(torch.randn(32, 10), dim=0)

    with pytest.raises(TypeError, match="must yield \\(images, class_index\\) pairs"):
        zero_shot_accuracy(tiny_clip, classifier, [images[:4]])


def test_classification_metrics_confusion():
    # Rows: confident hit, confident miss, tie between classes 0 and 1 for a class-1 sample
    # (the lower index ranks first, so it misses at top-1 and hits at top-2), and a hit.
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0],
            [0.2, 0.7, 0.1],
            [0.5, 0.5, 0.0],
            [0.1, 0.2, 0.7],
        ]
    )
    targets = torch.tensor([0, 0, 1, 2])

    metrics = classification_metrics(logits, targets, topk=(1, 2))

    assert metrics["top1"] == 50.0
    assert metrics["top2"] == 100.0
    assert metrics["mean_per_class_recall"] == pytest.approx(100 * (0.5 + 0.0 + 1.0) / 3, abs=1e-9)
    assert metrics["num_samples"] == 4


def test_classification_metrics_tie_rule():
    metrics = classification_metrics(torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([0]), topk=(1,))

    assert metrics["top1"] == 100.0


def test_classification_metrics_skips_absent_classes():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.1, 0.9]])

    metrics = classification_metrics(logits, torch.tensor([0, 0]), topk=(1,))

    assert metrics["mean_per_class_recall"] == 50.0


def test_classify_probabilities_sorted_normalised(tiny_clip, tokenizer, cifar10):
    images, _, classnames = cifar10

    ranked = classify(tiny_clip, tokenizer, images[:6], classnames)

    assert len(ranked) == 6
    for row in ranked:
        probabilities = [probability for _, probability in row]
        assert sorted(label for label, _ in row) == sorted(classnames)
        assert math.isclose(sum(probabilities), 1.0, abs_tol=1e-5)
        assert probabilities == sorted(probabilities, reverse=True)


def test_classify_uses_logit_scale(tiny_clip, tokenizer, cifar10):
    images, _, classnames = cifar10
    with torch.no_grad():
        tiny_clip.logit_scale.fill_(math.log(20.0))

    ranked = classify(tiny_clip, tokenizer, images[0], classnames, templates=TEMPLATES)

    classifier = build_zero_shot_classifier(tiny_clip, tokenizer, classnames, TEMPLATES)
    with torch.no_grad():
        cosine = F.normalize(tiny_clip.encode_image(images[:1]), dim=-1) @ classifier
    expected = (20.0 * cosine).softmax(dim=-1)[0]
    assert len(ranked) == 1
    for label, probability in ranked[0]:
        assert probability == pytest.approx(expected[classnames.index(label)].item(), abs=1e-6)


def test_classify_default_logit_scale(mean_pool_model, tokenizer, cifar10):
    images, _, classnames = cifar10
    model = mean_pool_model

    ranked = classify(model, tokenizer, images[:1], classnames)

    classifier = build_zero_shot_classifier(model, tokenizer, classnames, ["a photo of a {}."])
    with torch.no_grad():
        cosine = F.normalize(model.encode_image(images[:1]), dim=-1) @ classifier
    expected = (100.0 * cosine).softmax(dim=-1)[0]
    for label, probability in ranked[0]:
        assert probability == pytest.approx(expected[classnames.index(label)].item(), abs=1e-6)


def test_evaluation_restores_training_flags(tiny_clip, tokenizer, cifar10):
    images, labels, classnames = cifar10
    model = tiny_clip.train()
    model.visual.eval()
    before = training_flags(model)
    loader = make_loader(images, labels)

    classifier = build_zero_shot_classifier(model, tokenizer, classnames, TEMPLATES)
    assert training_flags(model) == before
    zero_shot_accuracy(model, classifier, loader)
    assert training_flags(model) == before
    classify(model, tokenizer, images[:2], classnames)
    assert training_flags(model) == before
    encode_images(model, loader)
    assert training_flags(model) == before
    encode_texts(model, tokenizer, classnames)
    assert training_flags(model) == before
    assert model.training


def test_evaluation_runs_in_eval_mode(tiny_clip, tokenizer, cifar10):
    """Dropout in the towers would make repeated evaluations differ if they ran in training mode."""
    _, _, classnames = cifar10
    model = tiny_clip
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    model.transformer.resblocks[0].mlp.add_module("dropout", torch.nn.Dropout(0.5))
    model.train()

    first = build_zero_shot_classifier(model, tokenizer, classnames, TEMPLATES)
    second = build_zero_shot_classifier(model, tokenizer, classnames, TEMPLATES)

    assert torch.equal(first, second)
