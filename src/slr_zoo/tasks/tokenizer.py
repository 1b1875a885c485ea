"""Tokenizers: a word-level one built from the data (from-scratch models) through Hugging Face
``tokenizers``, so it saves, loads and pads through the same code path as a pretrained model's."""

from __future__ import annotations

from typing import Iterable

from slr_zoo.tasks.base import Record

PAD, UNK, SEP, EOS, THINK = "[PAD]", "[UNK]", "[SEP]", "[EOS]", "[THINK]"
SPECIALS = [PAD, UNK, SEP, EOS, THINK]
WORD_PATTERN = r"[A-Za-z_]+|\d|[^\sA-Za-z_\d]"  # words, single digits, single punctuation marks


def record_text(record: Record) -> Iterable[str]:
    yield record["question"]
    yield from record.get("steps", [])
    yield str(record["answer"])


def build_word_tokenizer(records: Iterable[Record], max_vocab: int | None = None):
    """A WordLevel tokenizer over ``records``; unseen words at evaluation map to [UNK]."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated")]
    )
    trainer = trainers.WordLevelTrainer(vocab_size=max_vocab or 1 << 30, special_tokens=SPECIALS, min_frequency=1)
    tok.train_from_iterator((text for r in records for text in record_text(r)), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, sep_token=SEP, eos_token=EOS,
        additional_special_tokens=[THINK],
    )
    fast.padding_side = "right"
    return fast


def special_ids(tokenizer) -> tuple[int, int]:
    """(separator, end) ids: the separator ends the question, the end token ends the answer.
    Pretrained tokenizers without a separator use their EOS for both."""
    eos = tokenizer.eos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else eos
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one before training")
    return sep, eos
