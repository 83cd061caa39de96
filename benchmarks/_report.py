"""Helpers shared by the benchmark scripts: machine description and docs/benchmarks.md updates."""

from __future__ import annotations

import os
import platform
import re
import tempfile
from datetime import date
from pathlib import Path

import torch

DOCS_HEADER = (
    "# Benchmarks\n\nMeasured numbers, one section per benchmark script in `benchmarks/`.\n"
)

_FENCE = re.compile(r"^\s*(```|~~~)")


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or platform.processor() elsewhere."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def environment_rows() -> list[tuple[str, str]]:
    """Return (name, value) rows that describe where a benchmark ran."""
    return [
        ("CPU", f"{cpu_model()} ({os.cpu_count()} logical cores visible)"),
        ("Python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch threads", str(torch.get_num_threads())),
    ]


def environment_table(command: str) -> list[str]:
    """Return the Markdown lines of the table that ends each benchmark section: machine, load, date, command."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        "| setting | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in environment_rows()),
        f"| load average (1, 5, 15 min) at the end | {load} |",
        f"| date | {date.today().isoformat()} |",
        f"| command | `{command}` |",
    ]


def _section_span(lines: list[str], heading: str) -> tuple[int, int] | None:
    """Return the [start, end) line range of the level-2 section ``heading``, if present.

    A section ends at the next level-1 or level-2 heading. Headings inside fenced code blocks
    are ignored.
    """
    start = None
    in_fence = False
    for index, line in enumerate(lines):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue

        if start is None and line.rstrip() == heading:
            start = index
        elif start is not None and re.match(r"#{1,2} ", line):
            return start, index

    return (start, len(lines)) if start is not None else None


def update_section(path: Path, title: str, body: str, header: str = DOCS_HEADER) -> None:
    """Write ``body`` under the heading ``## {title}`` in the Markdown file ``path``.

    An existing section of that title is replaced and every other part of the file is kept.
    A missing section is appended, and a missing file is created with ``header``. The new
    file is written to a temporary file and moved into place with ``os.replace``, so readers
    never see a half-written file.

    NOTE: two scripts updating the same file at the same moment can still lose one update,
    because the read and the replace are not locked together.
    """
    heading = f"## {title}"
    section = [heading, "", *body.strip("\n").split("\n"), ""]

    text = path.read_text(encoding="utf-8") if path.is_file() else header
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()

    span = _section_span(lines, heading)
    if span is None:
        lines += ["", *section]
    else:
        start, end = span
        lines[start:end] = section

    new_text = "\n".join(lines).rstrip("\n") + "\n"
    _write_atomic(path, new_text)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file with mode 0600, so keep the old file's mode or use 0644.
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    descriptor, temp_name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temp_name, mode)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
