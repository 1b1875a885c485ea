"""Tokenizers: a word-level one built from the data (from-scratch models) through Hugging Face
``tokenizers``, so it saves, loads and pads through the same code path as a pretrained model's.

A piece is a word (a run of letters, combining marks and underscores, in any script), a single
digit, a single other character, or whitespace. A space is written into the piece it precedes as
``▁`` (sentencepiece's convention: "Tom is" is ``▁Tom ▁is``), so decoding is exact: any text
round-trips through the tokenizer, up to a leading space (every text is read as if it began with
one), as long as its pieces are in the vocabulary. A word is never cut into letters, so "fünf"
is one token and decodes as "fünf".

Splitting text is done in Python for ASCII text without special-token strings: on large generated
datasets Hugging Face's pre-tokenizer costs several times more than the rest of the data pipeline.
The Python split gives exactly the pieces the Rust pre-tokenizer gives (a test checks it); any
other text, and every other tokenizer, goes through ``tokenizer.encode``.
"""

from __future__ import annotations

import bisect
import json
import re
from collections import Counter
from typing import Iterable

from slr_zoo.tasks.base import Record

PAD, UNK, SEP, EOS, THINK = "[PAD]", "[UNK]", "[SEP]", "[EOS]", "[THINK]"
# the markers of the chain-of-thought encodings (``tasks/encoding.py``): a latent span opens with
# [BOT] and closes with [EOT], [PAUSE] fills pause slots ([THINK] fills continuous-thought slots),
# and [ANS] comes before the answer that follows written reasoning steps
BOT, EOT, PAUSE, ANS = "[BOT]", "[EOT]", "[PAUSE]", "[ANS]"
MARKERS = [THINK, BOT, EOT, PAUSE, ANS]
SPECIALS = [PAD, UNK, SEP, EOS, *MARKERS]
SPACE = "\u2581"  # ▁, the space written into the piece that follows it
PIECE_PATTERN = (rf"{SPACE}?[\p{{L}}\p{{M}}_]+|{SPACE}?\p{{N}}|{SPACE}?[^\s\p{{L}}\p{{M}}\p{{N}}_{SPACE}]|{SPACE}|\s")
# the same pieces for ASCII text (Python's \s, \w and \d differ from Rust's outside ASCII)
_WS = " \t\n\r\x0b\x0c"
_ASCII_PIECES = re.compile(rf"{SPACE}?[A-Za-z_]+|{SPACE}?[0-9]|{SPACE}?[^{_WS}A-Za-z0-9_{SPACE}]|{SPACE}|[{_WS}]")


def record_text(record: Record) -> Iterable[str]:
    yield record["question"]
    yield from record.get("steps", [])
    yield str(record["answer"])


def _python_splits(text: str) -> bool:
    return text.isascii() and not ("[" in text and any(s in text for s in SPECIALS))


def _ascii_pieces(text: str) -> list[str]:
    if not text:
        return []
    marked = (text if text.startswith(" ") else " " + text).replace(" ", SPACE)
    return _ASCII_PIECES.findall(marked)


def split_words(text: str, pre_tokenizer=None) -> list[str]:
    """The word-level tokenizer's pieces of ``text``."""
    if _python_splits(text) or pre_tokenizer is None:
        return _ascii_pieces(text) if text.isascii() else [p for p, _ in _pre_tokenizer().pre_tokenize_str(text)]
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True),
        pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated"),
    ])


def build_word_tokenizer(records: Iterable[Record], max_vocab: int | None = None):
    """A WordLevel tokenizer over ``records``: special tokens first, then words by decreasing
    count (ties alphabetically); unseen words at evaluation map to [UNK]."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pre_tokenizer = _pre_tokenizer()
    counts: Counter[str] = Counter()
    for record in records:
        for text in record_text(record):
            counts.update(split_words(text, pre_tokenizer))
    words = sorted((w for w in counts if w not in SPECIALS), key=lambda w: (-counts[w], w))
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    if max_vocab is not None:
        vocab = {token: i for token, i in vocab.items() if i < max(max_vocab, len(SPECIALS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, sep_token=SEP, eos_token=EOS,
        additional_special_tokens=MARKERS, clean_up_tokenization_spaces=False,
    )
    fast.padding_side = "right"
    return fast


def _word_vocab(tokenizer) -> dict[str, int] | None:
    """The vocabulary if ``tokenizer`` is one of our word-level tokenizers, else None (cached)."""
    cached = getattr(tokenizer, "_slr_word_vocab", False)
    if cached is not False:
        return cached
    vocab = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        pre = spec.get("pre_tokenizer") or {}
        steps = pre.get("pretokenizers", [])
        if (spec["model"]["type"] == "WordLevel" and spec.get("normalizer") is None and len(steps) == 2
                and steps[0]["type"] == "Metaspace" and steps[0].get("prepend_scheme") == "always"
                and steps[1].get("pattern") == {"Regex": PIECE_PATTERN}
                and steps[1].get("behavior") == "Isolated" and not steps[1].get("invert")):
            vocab = tokenizer.get_vocab()
    try:
        tokenizer._slr_word_vocab = vocab
    except AttributeError:
        pass
    return vocab


def text_ids(tokenizer, text: str) -> list[int]:
    """``tokenizer.encode(text, add_special_tokens=False)``, fast for word-level tokenizers."""
    vocab = _word_vocab(tokenizer)
    if vocab is None or not _python_splits(text):
        return tokenizer.encode(text, add_special_tokens=False)
    unk = vocab[UNK]
    return [vocab.get(piece, unk) for piece in _ascii_pieces(text)]


def token_words(tokenizer, text: str) -> list[str | None]:
    """For each token of ``text_ids(tokenizer, text)``, the word (a run of letters, digits and
    underscores) it lies in, or None for punctuation: how word-level labels reach the tokens of any
    tokenizer, one word split into several sub-word tokens labelling each of them."""
    vocab = _word_vocab(tokenizer)
    if vocab is not None and _python_splits(text):
        words = (piece.lstrip(SPACE) for piece in _ascii_pieces(text))
        return [word if re.fullmatch(r"\w+", word) else None for word in words]
    spans = [(m.start(), m.end()) for m in re.finditer(r"\w+", text)]
    starts = [s for s, _ in spans]
    out: list[str | None] = []
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    for start, end in encoded["offset_mapping"]:
        last = end - 1  # the token's last character: leading spaces belong to no word
        i = bisect.bisect_right(starts, last) - 1
        out.append(text[spans[i][0]:spans[i][1]] if i >= 0 and end > start and last < spans[i][1] else None)
    return out


def special_ids(tokenizer) -> tuple[int, int]:
    """(separator, end) ids: the separator ends the question, the end token ends the answer.
    Pretrained tokenizers without a separator use their EOS for both."""
    eos = tokenizer.eos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else eos
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one before training")
    return sep, eos


def marker_ids(tokenizer) -> dict[str, int]:
    """The ids of the chain-of-thought markers; a pretrained tokenizer gets them from
    ``Backbone.add_tokens`` first."""
    ids = {}
    for token in MARKERS:
        i = tokenizer.convert_tokens_to_ids(token)
        if i is None or i == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token} token; the chain-of-thought encodings need "
                             f"{', '.join(MARKERS)} (Backbone.add_tokens adds them to a pretrained one)")
        ids[token] = i
    return ids


def unknown_words(tokenizer, text: str) -> list[str]:
    """The words of ``text`` that the tokenizer can only read as its unknown token (a word-level
    vocabulary built from a task's records knows nothing else), in order, once each."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return []
    ids = text_ids(tokenizer, text)
    return list(dict.fromkeys(w or "?" for w, i in zip(token_words(tokenizer, text), ids) if i == unk))
