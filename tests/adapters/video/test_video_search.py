"""Tests of `florence video search`: text-to-video search over an index, and candidate caption ranking."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from florence.adapters.video.retrieval import read_caption_candidates
from florence.cli.main import main

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def video_index(tiny_checkpoint: Path, video_clips: Path, video_clips2: Path, tmp_path_factory) -> tuple[Path, list[Path]]:
    """An index of three shared clips built with `florence video embed` and `florence index build`."""
    folder = tmp_path_factory.mktemp("video_index")
    clips = [video_clips / "clips" / "yoga.mp4", video_clips / "clips" / "cleaning_pool.mp4",
             video_clips2 / "clips" / "internvid_example1_dog_snow.mp4"]
    assert main(["video", "embed", *map(str, clips), "--out", str(folder / "embeddings"), "--checkpoint",
                 str(tiny_checkpoint), "--num-frames", "2"]) == 0
    assert main(["index", "build", str(folder / "embeddings"), "--out", str(folder / "index")]) == 0
    return folder / "index", clips


def test_cli_video_search_ranks_index(video_index, capsys) -> None:
    index, clips = video_index
    capsys.readouterr()

    code = main(["video", "search", "a dog playing in the snow", "--index", str(index), "--top", "3"])
    lines = capsys.readouterr().out.splitlines()

    assert code == 0
    assert [line.split()[0] for line in lines] == ["1", "2", "3"]
    assert sorted(line.split()[2] for line in lines) == sorted(str(clip.resolve()) for clip in clips)
    scores = [float(line.split()[1]) for line in lines]
    assert scores == sorted(scores, reverse=True)


def test_cli_video_search_json(video_index, capsys) -> None:
    index, _ = video_index
    capsys.readouterr()

    code = main(["video", "search", "a person cleaning a pool", "--index", str(index), "--top", "1", "--json"])
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    assert code == 0
    assert len(hits) == 1
    assert set(hits[0]) == {"rank", "score", "source"}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["a dog", "--top", "4"], "--top 4 is out of range; pass 1 <= --top <= 3"),
        (["--top", "2"], "give a text query and --index DIR"),
    ],
)
def test_cli_video_search_bad_arguments(video_index, capsys, arguments, message) -> None:
    index, _ = video_index

    code = main(["video", "search", *arguments, "--index", str(index)])

    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_video_search_missing_index(tmp_path: Path, capsys) -> None:
    code = main(["video", "search", "a dog", "--index", str(tmp_path / "none")])

    assert code == 2
    assert "index.faiss not found" in capsys.readouterr().err


def test_cli_video_search_rejects_image_index(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    root = Path(os.environ.get("FLORENCE_SHARED_DATA", Path(__file__).resolve().parents[4] / "shared" / "data"))
    images = sorted((root / "flickr8k_800" / "images").glob("*.jpg"))[:2]
    if len(images) < 2:
        pytest.skip(f"test images not found in {root / 'flickr8k_800'}; set FLORENCE_SHARED_DATA")
    assert main(["embed", *map(str, images), "--out", str(tmp_path / "embeddings"), "--checkpoint", str(tiny_checkpoint)]) == 0
    assert main(["index", "build", str(tmp_path / "embeddings"), "--out", str(tmp_path / "index")]) == 0
    capsys.readouterr()

    code = main(["video", "search", "a dog", "--index", str(tmp_path / "index")])

    assert code == 2
    assert "is not a video index: 2 of its 2 sources are not videos" in capsys.readouterr().err


def test_cli_video_search_ranks_candidates(tiny_checkpoint: Path, video_clips2: Path, capsys) -> None:
    candidates = video_clips2 / "retrieval_candidates.json"

    code = main(["video", "search", "--captions-json", str(candidates), "--checkpoint", str(tiny_checkpoint),
                 "--num-frames", "2"])
    lines = capsys.readouterr().out.splitlines()

    assert code == 0
    assert lines[0].endswith("internvid_example1_dog_snow.mp4")
    assert len(lines) == 12
    assert sum("(intended)" in line for line in lines) == 1
    assert lines[-1].startswith("intended caption [0] ranks ")
    assert lines[-1].endswith(" of 10")


def test_cli_video_search_candidates_json(tiny_checkpoint: Path, video_clips2: Path, capsys) -> None:
    candidates = video_clips2 / "retrieval_candidates.json"

    code = main(["video", "search", "--captions-json", str(candidates), "--checkpoint", str(tiny_checkpoint),
                 "--num-frames", "2", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    assert code == 0
    assert [row["rank"] for row in rows] == list(range(1, 11))
    assert sorted(row["candidate"] for row in rows) == list(range(10))
    assert [row["intended"] for row in rows].count(True) == 1


def test_caption_candidates_relative_video(video_clips2: Path) -> None:
    entries = read_caption_candidates(video_clips2 / "retrieval_candidates.json")

    assert len(entries) == 1
    assert entries[0][0] == video_clips2 / "clips" / "internvid_example1_dog_snow.mp4"
    assert len(entries[0][1]) == 10
    assert entries[0][2] == 0


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"video": "a.mp4", "candidates": []}, "non-empty list"),
        ({"candidates": ["a"]}, "expected an object with 'video'"),
        ({"video": "a.mp4", "candidates": ["a", "b"], "intended_match_index": 2}, "is not an index into the 2"),
    ],
)
def test_caption_candidates_rejected(tmp_path: Path, payload, message) -> None:
    path = tmp_path / "candidates.json"
    path.write_text(json.dumps(payload), encoding="utf-8")

    with pytest.raises(ValueError, match=message):
        read_caption_candidates(path)


def test_cli_captions_json_with_query_rejected(video_clips2: Path, capsys) -> None:
    code = main(["video", "search", "a dog", "--captions-json", str(video_clips2 / "retrieval_candidates.json")])

    assert code == 2
    assert "drop QUERY and --index" in capsys.readouterr().err
