"""The zero-shot detection table in the layout of the Florence paper's ODinW table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Florence zero-shot mAP@[.5:.95] on the test splits, from Table 7 of Yuan et al. 2021
# (arXiv 2111.11432). Raccoon is not among that table's 11 datasets.
FLORENCE_ZERO_SHOT = {"Aquarium": 43.1, "BCCD": 15.3, "Chess Pieces": 13.4, "Packages": 79.6}


def format_zero_shot_table(rows: Sequence[dict[str, Any]], model_label: str) -> str:
    """Return a Markdown table: dataset, images, categories, split, this model's AP and Florence's.

    Each row has ``dataset``, ``images``, ``categories``, ``split`` and ``AP`` (a fraction).
    """
    lines = [
        f"| dataset | #imgs evaluated | #cats | split | {model_label} mAP | Florence ZS (paper) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        paper = FLORENCE_ZERO_SHOT.get(row["dataset"])
        paper_text = f"{paper:.1f}" if paper is not None else "–"
        lines.append(
            f"| {row['dataset']} | {row['images']} | {row['categories']} | {row['split']} | {100 * row['AP']:.1f} | {paper_text} |"
        )
    return "\n".join(lines) + "\n"


# Display names of the ODinW folders under the shared data root, as the Florence paper spells them.
DATASET_NAMES = {
    "odinw_aquarium": "Aquarium",
    "odinw_bccd": "BCCD",
    "odinw_chess_pieces": "Chess Pieces",
    "odinw_packages": "Packages",
    "odinw_raccoon": "Raccoon",
}


def dataset_name(folder: str) -> str:
    """Return the table name of a dataset folder, e.g. ``odinw_chess_pieces`` -> ``Chess Pieces``."""
    return DATASET_NAMES.get(folder, folder.removeprefix("odinw_").replace("_", " ").title())
