"""Answer extraction: the canonical form a predicted and a gold answer are compared in.

Each function maps free text (a decoded generation, a gold answer) to a string that exact match
compares. Decoded word-level text has spaces around punctuation ("Tom is a wumpus ."), a
pretrained tokenizer's does not ("Tom is a wumpus."); both normalise to the same string.
"""

from __future__ import annotations

import re

_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?)\]])")
_SPACE_AFTER_OPEN = re.compile(r"([(\[])\s+")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_BOOLEAN = re.compile(r"\b(true|false)\b", re.IGNORECASE)


def normalize_text(text: str) -> str:
    """Lower case, single spaces, no space before punctuation, no final full stop."""
    text = re.sub(r"\s+", " ", str(text)).strip()
    text = _SPACE_AFTER_OPEN.sub(r"\1", _SPACE_BEFORE_PUNCT.sub(r"\1", text))
    return text.rstrip(".").rstrip().lower()


def extract_number(text: str) -> str:
    """GSM8k style: the number after the last "####" if there is one, else the last number.

    Thousands separators and a trailing ".0" are dropped, so "1,000", "1000.0" and "$1000" agree.
    Returns "" when the text holds no number.
    """
    text = str(text)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    numbers = _NUMBER.findall(text)
    if not numbers:
        return ""
    number = numbers[-1].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number if number not in ("-0", "") else "0"


def extract_boolean(text: str) -> str:
    """ProntoQA style: the last "true"/"false" in the text, lower case; "" if there is none."""
    found = _BOOLEAN.findall(str(text))
    return found[-1].lower() if found else ""


def extract_digits(text: str) -> str:
    """Multiplication: the digits after the last "####" (if any), spaces removed."""
    text = str(text)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return "".join(re.findall(r"\d", text))


EXTRACTORS = {
    "text": normalize_text,
    "number": extract_number,
    "boolean": extract_boolean,
    "digits": extract_digits,
}


def guess_format(gold: str) -> str:
    """The answer format a gold answer is written in: boolean, digits (space-separated single
    digits, as in the multiplication task), number, else free text."""
    gold = str(gold).strip()
    if re.fullmatch(r"(?i)true|false", gold):
        return "boolean"
    if re.fullmatch(r"\d( \d)+", gold):
        return "digits"
    if re.fullmatch(r"(?:####\s*)?\$?-?\d[\d,]*(?:\.\d+)?", gold):
        return "number"
    return "text"
