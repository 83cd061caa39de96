from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from florence.data import IMAGENET_TEMPLATES, TRAIN_TEMPLATES


def test_imagenet_templates_match_open_clip():
    expected = [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]
    assert list(IMAGENET_TEMPLATES) == expected


def test_train_templates_add_bare_name():
    assert len(TRAIN_TEMPLATES) == 81
    assert len(set(TRAIN_TEMPLATES)) == 81
    assert TRAIN_TEMPLATES[:80] == IMAGENET_TEMPLATES
    assert TRAIN_TEMPLATES[80] == "{}."


def test_train_templates_format_class_name():
    for template in TRAIN_TEMPLATES:
        assert "golden retriever" in template.format("golden retriever")
