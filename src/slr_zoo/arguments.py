"""argparse types shared by the command-line programs: a bad count is refused with the
option's name (exit status 2) before anything loads."""

from __future__ import annotations

import argparse


def positive_int(text: str, least: int = 1) -> int:
    """argparse type of a count or a size (records, a batch, rounds, threads, tokens): 0 or a
    negative number is refused with the option's name (exit status 2) before anything loads, not
    met later as a division by zero, a loop that never runs, or a slice from the end."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type of a count that may be zero (continuous thoughts)."""
    return positive_int(text, least=0)
