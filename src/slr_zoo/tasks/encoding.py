"""Records to token tensors, and the answer-token accuracy that equals greedy exact match."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slr_zoo.tasks.base import Record
from slr_zoo.tasks.tokenizer import special_ids, text_ids, token_words

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]   # labels[i] is the token position i must predict, or IGNORE
    step_targets: list[list[int]] | None = None  # per hop, the answer tokens after that hop
    reach: list[int] | None = None  # per position, the hop that reaches its word, or IGNORE


def prompt_ids(tokenizer, question: str) -> list[int]:
    """What a model answers: the question's tokens, then the separator the answer follows."""
    return text_ids(tokenizer, question) + [special_ids(tokenizer)[0]]


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The tokens of an answer as it follows the separator (a leading space, as in running text)."""
    return text_ids(tokenizer, " " + str(answer).strip())


def answer_budget(record: Record, tokenizer) -> int:
    """New tokens a generated answer to ``record`` may take: its gold answer's length, its EOS, and
    one more. Fixed per record, so the same record gets the same budget in any batch."""
    return len(answer_ids(tokenizer, record["answer"])) + 2


def encode(record: Record, tokenizer, step_answers: list[str] | None = None,
           reach_steps: dict[str, int] | None = None) -> Encoded:
    """``question [SEP] answer [EOS]``, with loss on the answer and the end token.

    Position i predicts token i+1, so the label of the [SEP] position is the first answer token.
    ``step_answers`` (one per hop) become targets for the same positions, so each must tokenize to
    as many tokens as the answer. ``reach_steps`` (word -> hop, ``Task.reach_steps``) label the
    question tokens of those words, for ``loop.reach_supervision``.
    """
    eos = special_ids(tokenizer)[1]
    prompt = prompt_ids(tokenizer, record["question"])
    answer = answer_ids(tokenizer, record["answer"])
    ids = prompt + answer + [eos]
    labels = [IGNORE] * (len(prompt) - 1) + answer + [eos] + [IGNORE]
    targets = None
    if step_answers is not None:
        targets = [answer_ids(tokenizer, a) for a in step_answers]
        if not targets or any(len(t) != len(answer) for t in targets):
            raise ValueError(f"step answers {step_answers!r} must be non-empty and tokenize to as many "
                             f"tokens as the answer {record['answer']!r} ({len(answer)})")
    reach = None
    if reach_steps is not None:
        words = token_words(tokenizer, record["question"])
        if len(words) != len(prompt) - 1:
            raise ValueError("the tokenizer's offsets do not match its tokens; reach supervision needs a fast tokenizer")
        reach = [reach_steps.get(w, IGNORE) if w is not None else IGNORE for w in words]
        reach += [IGNORE] * (len(ids) - len(reach))
        if all(r == IGNORE for r in reach):
            raise ValueError(f"no word of the question is among the reach steps' words {sorted(reach_steps)[:5]}...")
    return Encoded(ids, labels, targets, reach)


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding: with a causal mask no real token ever attends to a pad, so no attention mask
    is needed; ``real_mask`` still tells per-token halting which positions are pads."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(batch):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
    real = torch.arange(width)[None, :] < torch.tensor([len(e.input_ids) for e in batch])[:, None]
    out = {"input_ids": ids, "labels": labels, "real_mask": real}
    if all(e.step_targets is not None for e in batch):
        out["step_labels"] = step_labels(batch, labels)
    if all(e.reach is not None for e in batch):
        reach = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        for row, e in enumerate(batch):
            reach[row, : len(e.reach)] = torch.tensor(e.reach)
        out["reach"] = reach
    return out


def step_labels(batch: list[Encoded], labels: torch.Tensor) -> torch.Tensor:
    """[B, H, S]: for hop h, the labels with the answer tokens replaced by the answer after hop h;
    samples with fewer hops repeat their final answer, so iteration t reads row min(t, H) - 1."""
    hops = max(len(e.step_targets) for e in batch)
    out = labels[:, None, :].repeat(1, hops, 1)
    for row, e in enumerate(batch):
        start = next(i for i, x in enumerate(e.labels) if x != IGNORE)
        for h in range(hops):
            target = e.step_targets[min(h, len(e.step_targets) - 1)]
            out[row, h, start : start + len(target)] = torch.tensor(target)
    return out


def answer_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] bool: every answer token (and the end token) is the argmax under teacher forcing.

    For a causal model this is exactly "greedy decoding after the question returns the answer and
    stops": if every argmax matches, greedy decoding follows the gold tokens step by step; at the
    first mismatch it leaves them. One forward pass instead of one per answer token.
    """
    mask = labels != IGNORE
    hit = (logits.argmax(-1) == labels) | ~mask
    return hit.all(dim=1) & mask.any(dim=1)
