import subprocess
import sys
from pathlib import Path

import florence.data.labels
from florence.data import text_label


def test_text_label_known_values():
    assert text_label("a photo of a dog.") == 617193563329675631
    assert text_label("dog") == 4144657192359730335
    assert text_label("") == 7252660547403494068


def test_text_label_same_in_new_process():
    # Python's built-in hash() of a str changes with PYTHONHASHSEED, but text_label must not.
    # The module is run by path so the child process skips importing torch.
    module_path = Path(florence.data.labels.__file__)
    code = (
        f"import runpy; module = runpy.run_path({str(module_path)!r}); "
        f"print(module['text_label']('a photo of a dog.'))"
    )
    for hash_seed in ("1", "2"):
        output = subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": hash_seed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert int(output) == text_label("a photo of a dog.")


def test_text_label_only_byte_identical_texts_match():
    assert text_label("dog") == text_label("dog")
    assert text_label("dog") != text_label("Dog")
    assert text_label("dog") != text_label("dog ")
    assert text_label("dog") != text_label("label:dog")


def test_text_label_range_fits_int64(flickr_dir):
    captions = (flickr_dir / "captions.tsv").read_text(encoding="utf-8").splitlines()[1:]
    labels = [text_label(line.split("\t")[2]) for line in captions]
    assert min(labels) >= 0
    assert max(labels) < 2**63
    assert len(set(labels)) == len(set(line.split("\t")[2] for line in captions))
