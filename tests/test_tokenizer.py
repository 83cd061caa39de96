"""Tests for florence.tokenizer against open_clip's SimpleTokenizer on real and hand-made text."""

import html
import json
import os
import random
from pathlib import Path

import ftfy
import numpy as np
import open_clip
import pytest
import torch

from florence.tokenizer import Tokenizer, _can_skip_ftfy, clean_text, get_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
COCO_CAPTIONS = Path("coco_captions_val2017_textonly") / "captions_val2017.json"

HAND_CASES = {
    "plain": "a photo of a cat",
    "mixed_case": "A PHOTO of a Cat On a MaTtReSs",
    "extra_whitespace": "  a \t dog\n\n runs   on the\r\nbeach  ",
    "vertical_tab": "a\x0bdog",
    "nbsp_and_ideographic_space": "a\u00a0dog\u3000runs",
    "control_chars": "a\x00dog\x07 \x1b[31mred\x1b[0m \x7fcat",
    "html_amp": "salt &amp; pepper",
    "html_double_escaped": "fish &amp;amp; chips &lt;b&gt;",
    "bare_ampersand": "black & white",
    "html_numeric": "it&#x2019;s &#233;t&#233;",
    "accents": "Café crème brûlée, naïve résumé",
    "german": "Straße und Fußgänger",
    "cjk": "日本語のテキストと漢字",
    "dotted_capital_i": "İstanbul İİ",
    "greek_final_sigma": "ΟΔΥΣΣΕΥΣ ΣΑΣ",
    "emoji": "a dog 🐶 with a rainbow flag 🏳️‍🌈 👍🏽",
    "mojibake": "âœ” No problems",
    "curly_quotes": "“Hello,” she said, ‘don’t’",
    "fullwidth": "ＬＯＵＤ　ＮＯＩＳＥＳ",
    "ligature": "ﬂuﬀy waﬄes",
    "contractions": "it's IT'S we'll they're I'm I'd you've can't",
    "digits": "1234567 3.14 x2 2nd",
    "punctuation": "...!!! ??? ---- (a) [b] {c} ~@#$%^*",
    "special_tokens_in_text": "<start_of_text>hi<end_of_text>.",
    "special_tokens_upper": "<START_OF_TEXT> <End_Of_Text>",
    "special_token_long_s": "<ſtart_of_text>",
    "kelvin_sign": "\u212aelvin",
    "combining_marks": "e\u0301 a\u0308 n\u0303",
    "surrogate_escape_free_astral": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
    "rtl": "مرحبا بالعالم שלום",
    "only_whitespace": " \t\n ",
    "empty": "",
}

LONG_TEXT = " ".join(f"word{i} and a comma," for i in range(60))


def _data_dir() -> Path:
    return Path(os.environ.get("FLORENCE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def coco_captions() -> list[str]:
    path = _data_dir() / COCO_CAPTIONS
    if not path.is_file():
        pytest.skip(f"COCO val2017 captions not found at {path}; set FLORENCE_SHARED_DATA")
    with path.open(encoding="utf-8") as file:
        return [annotation["caption"] for annotation in json.load(file)["annotations"]]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def reference():
    return open_clip.get_tokenizer("ViT-B-32")


def _first_mismatch(texts: list[str], actual: torch.Tensor, expected: torch.Tensor) -> str:
    rows = (actual != expected).any(dim=1).nonzero().flatten().tolist()
    if not rows:
        return ""
    row = rows[0]
    return (
        f"{len(rows)} rows differ; first: text {row} {texts[row]!r}\n"
        f"florence:  {actual[row].tolist()}\nopen_clip: {expected[row].tolist()}"
    )


def test_special_ids_match_open_clip(tokenizer, reference):
    assert tokenizer.vocab_size == 49408
    assert tokenizer.vocab_size == reference.vocab_size
    assert tokenizer.sot_token_id == reference.sot_token_id
    assert tokenizer.eot_token_id == reference.eot_token_id
    assert tokenizer.context_length == 77


def test_coco_captions_match_open_clip(coco_captions, reference):
    tokens = Tokenizer()(coco_captions)
    expected = reference(coco_captions)

    assert tokens.shape == (25014, 77)
    assert tokens.dtype == torch.long
    assert torch.equal(tokens, expected), _first_mismatch(coco_captions, tokens, expected)


def test_coco_captions_skip_ftfy_only_when_identity(coco_captions):
    fast = [caption for caption in coco_captions if _can_skip_ftfy(caption)]

    assert len(fast) > 0.99 * len(coco_captions)
    for caption in fast:
        assert ftfy.fix_text(caption) == caption, repr(caption)
        assert html.unescape(caption) == caption, repr(caption)


def test_random_ascii_skip_ftfy_only_when_identity():
    rng = random.Random(0)
    alphabet = [chr(code) for code in range(128)]
    for _ in range(3000):
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 40)))
        if _can_skip_ftfy(text):
            assert ftfy.fix_text(text) == text, repr(text)
            assert html.unescape(text) == text, repr(text)


@pytest.mark.parametrize("text", ["a&b", "a&amp;b", "a\rb", "a\x0bb", "a\x1bb", "café", "\x7f"])
def test_skip_ftfy_rejects_unsafe_text(text):
    assert not _can_skip_ftfy(text)


@pytest.mark.parametrize("name", sorted(HAND_CASES))
def test_hand_case_matches_open_clip(name, tokenizer, reference):
    text = HAND_CASES[name]

    assert tokenizer.encode(text) == reference.encode(text)
    assert torch.equal(tokenizer(text), reference(text))
    assert torch.equal(tokenizer(text, context_length=5), reference(text, context_length=5))


def test_clean_text_matches_open_clip():
    for text in HAND_CASES.values():
        assert clean_text(text) == open_clip.tokenizer._clean_lower(text), repr(text)


def test_hand_cases_batch_matches_open_clip(tokenizer, reference):
    texts = list(HAND_CASES.values()) + [LONG_TEXT]
    tokens = tokenizer(texts)
    expected = reference(texts)

    assert torch.equal(tokens, expected), _first_mismatch(texts, tokens, expected)


def test_random_unicode_matches_open_clip(tokenizer, reference):
    rng = random.Random(1)
    pieces = list("aZ &;#'-. \t\n") + ["&amp;", "&lt;", "é", "ß", "İ", "Σ", "🐶", "\u200d", "日"]
    texts = ["".join(rng.choices(pieces, k=rng.randint(0, 30))) for _ in range(500)]
    tokens = tokenizer(texts)
    expected = reference(texts)

    assert torch.equal(tokens, expected), _first_mismatch(texts, tokens, expected)


def test_long_text_truncates_to_eot(tokenizer, reference):
    tokens = tokenizer(LONG_TEXT)

    assert len(tokenizer.encode(LONG_TEXT)) > 75
    assert tokens.shape == (1, 77)
    assert tokens[0, 0].item() == tokenizer.sot_token_id
    assert tokens[0, -1].item() == tokenizer.eot_token_id
    assert tokens[0, 1:-1].tolist() == tokenizer.encode(LONG_TEXT)[:75]
    assert torch.equal(tokens, reference(LONG_TEXT))


def test_exact_fit_keeps_all_ids(tokenizer, reference):
    text = " ".join(["cat"] * 75)
    tokens = tokenizer(text)

    assert (tokens[0, 1:-1] != tokenizer.eot_token_id).all()
    assert tokens[0, -1].item() == tokenizer.eot_token_id
    assert torch.equal(tokens, reference(text))


def test_empty_string_is_sot_eot(tokenizer, reference):
    tokens = tokenizer("")

    assert tokenizer.encode("") == []
    assert tokens[0, :2].tolist() == [tokenizer.sot_token_id, tokenizer.eot_token_id]
    assert (tokens[0, 2:] == 0).all()
    assert torch.equal(tokens, reference(""))


def test_context_length_two_is_sot_eot(tokenizer, reference):
    texts = ["a photo of a dog", ""]
    tokens = tokenizer(texts, context_length=2)

    assert tokens.tolist() == [[tokenizer.sot_token_id, tokenizer.eot_token_id]] * 2
    assert torch.equal(tokens, reference(texts, context_length=2))


@pytest.mark.parametrize("context_length", [1, 0, -5])
def test_context_length_below_two_raises(tokenizer, context_length):
    with pytest.raises(ValueError, match="context_length must be at least 2"):
        tokenizer("a dog", context_length=context_length)
    with pytest.raises(ValueError, match="context_length must be at least 2"):
        Tokenizer(context_length=context_length)


def test_context_length_float_raises(tokenizer):
    with pytest.raises(TypeError, match="context_length must be an int"):
        tokenizer("a dog", context_length=7.0)


def test_numpy_context_length_accepted(tokenizer):
    assert tokenizer("a dog", context_length=np.int64(16)).shape == (1, 16)


def test_custom_context_length(reference):
    tokenizer = Tokenizer(context_length=32)
    texts = ["a photo of a cat", LONG_TEXT]

    assert tokenizer.context_length == 32
    assert torch.equal(tokenizer(texts), reference(texts, context_length=32))


def test_call_shapes(tokenizer):
    assert tokenizer("a dog").shape == (1, 77)
    assert tokenizer(["a dog", "a cat", ""]).shape == (3, 77)
    assert tokenizer(("a dog",)).shape == (1, 77)
    assert tokenizer([]).shape == (0, 77)
    assert tokenizer([]).dtype == torch.long


def test_non_string_text_raises(tokenizer):
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str, got int"):
        tokenizer(["a dog", 3])


def test_decode_matches_open_clip(tokenizer, reference):
    for text in HAND_CASES.values():
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == reference.decode(ids), repr(text)


def test_decode_round_trip(tokenizer):
    assert tokenizer.decode(tokenizer.encode("A Photo of a CAT!")) == "a photo of a cat ! "
    assert tokenizer.decode(torch.tensor(tokenizer.encode("two dogs"))) == "two dogs "
    assert tokenizer.decode([]) == ""


def test_decode_invalid_id_raises(tokenizer):
    with pytest.raises(ValueError, match="token id 49408 is outside"):
        tokenizer.decode([320, 49408])


def test_small_cache_gives_same_ids(coco_captions, tokenizer):
    small_cache = Tokenizer(max_cache_entries=50)
    captions = coco_captions[:2000]

    assert torch.equal(small_cache(captions), tokenizer(captions))
    assert len(small_cache._chunk_ids) <= 50


def test_missing_bpe_file_raises(tmp_path):
    path = tmp_path / "missing_vocab.txt.gz"
    with pytest.raises(FileNotFoundError, match="missing_vocab.txt.gz"):
        Tokenizer(bpe_path=str(path))


def test_get_tokenizer_is_cached():
    assert get_tokenizer() is get_tokenizer()
    assert get_tokenizer(32) is not get_tokenizer()
    assert get_tokenizer(32).context_length == 32
