"""Named prompt-template sets for zero-shot evaluation and classification."""

from __future__ import annotations

from pathlib import Path

# Templates that appear in none of the 81 training templates (CLIP's 80 ImageNet templates plus
# "{}."), so a zero-shot score computed with them measures transfer to unseen prompts.
HELDOUT_TEMPLATES = [
    "a picture of a {}.",
    "an image of a {}.",
    "a snapshot of the {}.",
    "a small image of a {}.",
    "this is a photo of a {}.",
    "a {} in the picture.",
    "a low quality picture of the {}.",
    "there is a {} in this photo.",
]

SIMPLE_TEMPLATES = ["a photo of a {}."]


def resolve_templates(spec: str | list[str]) -> list[str]:
    """Return templates for a set name (heldout, imagenet, simple), a text file, or a list."""
    if isinstance(spec, list):
        return spec
    if spec == "heldout":
        return list(HELDOUT_TEMPLATES)
    if spec == "simple":
        return list(SIMPLE_TEMPLATES)
    if spec == "imagenet":
        from florence.data.templates import IMAGENET_TEMPLATES

        return list(IMAGENET_TEMPLATES)
    path = Path(spec)
    if path.is_file():
        templates = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not templates:
            raise ValueError(f"template file {path} is empty; write one template per line, e.g. 'a photo of a {{}}.'")
        return templates
    raise ValueError(f"templates {spec!r} is neither a set name (heldout, imagenet, simple) nor an existing file")
