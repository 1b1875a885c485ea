"""Answers a researcher can compare: greedy generation from each question, decoded to text and
scored by the task's own extraction and exact match.

This is the one scoring path: training-time validation and ``evaluate`` both call
:func:`score_answers`, so that ``fit``'s ``val_accuracy`` and ``evaluate``'s accuracy on the same
checkpoint and records are the same number. Each record gets the same prompt (``prompt_ids``) and
the same budget of new tokens (``answer_budget``) whatever batch it is in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slr_zoo.inference.generation import generate_ids
from slr_zoo.tasks.encoding import answer_budget, prompt_ids
from slr_zoo.tasks.tokenizer import special_ids


@dataclass
class ScoredAnswers:
    correct: list[bool]
    texts: list[str]            # each answer, decoded without its EOS and special tokens
    steps: list[list[int]]      # loop iterations of every generated token, EOS included

    @property
    def first_token_steps(self) -> list[int]:
        return [row[0] if row else 0 for row in self.steps]


def left_padded(prompts: list[list[int]], pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # every row's next token is at the last position
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def score_answers(model, tokenizer, task, records: list[dict], steps: int | None = None, halting=None,
                  cache_strategy: str = "latest", first_index: int = 0) -> ScoredAnswers:
    """Greedy answers of ``model`` (in eval mode) to ``records``, in one batch, scored by ``task``;
    ``first_index``: the split index of the first record, for the messages."""
    eos = special_ids(tokenizer)[1]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    prompts = [prompt_ids(tokenizer, r["question"]) for r in records]
    budgets = [answer_budget(r, tokenizer) for r in records]
    limit = model.backbone.max_positions
    for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
        if len(prompt) + budget > limit:
            raise ValueError(f"record {first_index + i} needs {len(prompt)} prompt + {budget} answer positions, "
                             f"more than the model's {limit} ({records[i]['question'][:40]!r}...)")
    ids, mask = left_padded(prompts, pad, device)
    out = generate_ids(model, ids, mask, max_new_tokens=max(budgets), steps=steps, halting=halting,
                       eos_token_id=eos, pad_token_id=pad, cache_strategy=cache_strategy)
    new, used = out.per_sample()
    new = [row[:budget] for row, budget in zip(new, budgets)]
    used = [row[:budget] for row, budget in zip(used, budgets)]
    texts = [tokenizer.decode([t for t in row if t != eos], skip_special_tokens=True) for row in new]
    return ScoredAnswers([task.score(text, r) for text, r in zip(texts, records)], texts, used)


class AnswerScorer:
    """:func:`score_answers` bound to a tokenizer and a task: what validation calls on each batch
    of records (a plain class, so that a spawned DDP worker can receive it)."""

    def __init__(self, tokenizer, task):
        self.tokenizer, self.task = tokenizer, task

    def __call__(self, model, records: list[dict], **kwargs) -> ScoredAnswers:
        return score_answers(model, self.tokenizer, self.task, records, **kwargs)
