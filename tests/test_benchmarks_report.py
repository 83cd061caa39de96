"""Tests for benchmarks._report.update_section, which rewrites one section of docs/benchmarks.md."""

from benchmarks._report import update_section


def test_update_section_creates_file(tmp_path):
    path = tmp_path / "docs" / "benchmarks.md"
    update_section(path, "Tokenizer", "| a | b |")
    text = path.read_text()

    assert text.startswith("# Benchmarks\n")
    assert "## Tokenizer\n\n| a | b |\n" in text
    assert list(path.parent.iterdir()) == [path]


def test_update_section_replaces_only_its_section(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\nintro\n\n## Model\n\nmodel numbers\n\n## Tokenizer\n\nold\n")
    update_section(path, "Tokenizer", "new 1\nnew 2")
    text = path.read_text()

    assert "intro" in text
    assert "## Model\n\nmodel numbers\n" in text
    assert "old" not in text
    assert text.endswith("## Tokenizer\n\nnew 1\nnew 2\n")


def test_update_section_keeps_later_sections(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\n## Tokenizer\n\nold\n\n## Model\n\nmodel numbers\n")
    update_section(path, "Tokenizer", "new")

    assert path.read_text() == "# Benchmarks\n\n## Tokenizer\n\nnew\n\n## Model\n\nmodel numbers\n"


def test_update_section_appends_missing_section(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\n## Model\n\nmodel numbers\n")
    update_section(path, "Tokenizer", "new")

    assert path.read_text() == "# Benchmarks\n\n## Model\n\nmodel numbers\n\n## Tokenizer\n\nnew\n"


def test_update_section_ignores_fenced_headings(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("## Tokenizer\n\n```\n## Model\n```\nold\n\n## Model\n\nmodel numbers\n")
    update_section(path, "Tokenizer", "new")

    assert path.read_text() == "## Tokenizer\n\nnew\n\n## Model\n\nmodel numbers\n"
