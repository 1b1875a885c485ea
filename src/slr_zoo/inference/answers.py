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
from slr_zoo.tasks.encoding import Encoding, prompt_ids
from slr_zoo.tasks.tokenizer import special_ids


@dataclass
class ScoredAnswers:
    correct: list[bool]
    texts: list[str]            # each answer, decoded without its EOS and special tokens
    steps: list[list[int]]      # loop iterations of every generated token, EOS included
    passes: list[int] = None    # sequential model calls per answer: prefill once, each thought, each later token
    thoughts: int = 0           # continuous thoughts made before each answer

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
                  cache_strategy: str = "latest", first_index: int = 0, encoding: Encoding | None = None
                  ) -> ScoredAnswers:
    """Greedy answers of ``model`` (in eval mode) to ``records``, in one batch, scored by ``task``;
    ``first_index``: the split index of the first record, for the messages. ``encoding``: how the
    model was trained to answer (default: answer only): its prompt at the final stage, its
    continuous thoughts, its budget of new tokens, and where the answer starts in the text."""
    encoding = encoding or Encoding()
    eos = special_ids(tokenizer)[1]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    prompts = [encoding.prompt(r, tokenizer) for r in records]
    budgets = [encoding.budget(r, tokenizer) for r in records]
    thoughts, after = encoding.thoughts(), encoding.after_thoughts(tokenizer)
    if steps is None and encoding.depth(encoding.final_stage) is not None:
        steps = encoding.depth(encoding.final_stage)
    limit = model.backbone.max_positions
    for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
        if len(prompt) + thoughts + len(after) + budget > limit:
            raise ValueError(f"record {first_index + i} needs {len(prompt)} prompt + {budget} answer positions, "
                             f"more than the model's {limit} ({records[i]['question'][:40]!r}...)")
    ids, mask = left_padded(prompts, pad, device)
    # the question alone (up to its [SEP]), which a prompt ending in markers extends
    questions = [len(prompt_ids(tokenizer, r["question"])) for r in records]
    query = torch.zeros_like(mask, dtype=torch.bool)
    for row, (prompt, n) in enumerate(zip(prompts, questions)):
        query[row, ids.size(1) - len(prompt): ids.size(1) - len(prompt) + n] = True
    out = generate_ids(model, ids, mask, max_new_tokens=max(budgets), steps=steps, halting=halting,
                       eos_token_id=eos, pad_token_id=pad, cache_strategy=cache_strategy,
                       thoughts=thoughts, after_thoughts=after, query_mask=query)
    new, used = out.per_sample()
    new = [row[:budget] for row, budget in zip(new, budgets)]
    used = [row[:budget] for row, budget in zip(used, budgets)]
    texts = [encoding.answer_text(row, tokenizer) for row in new]
    # the calls one after another: the prefill, one per thought (the last one also reads [EOT]),
    # [EOT] alone when there is no thought, then one per generated token after the first
    extra = thoughts + (1 if after and not thoughts else 0)
    passes = [1 + extra + max(0, len(row) - 1) for row in new]
    return ScoredAnswers([task.score(text, r) for text, r in zip(texts, records)], texts, used, passes, thoughts)


def flops_per_answer(scorer, model, records: list[dict]) -> float:
    """Floating-point operations of answering ``records`` (``torch.utils.flop_counter``: every
    matrix product and attention of the whole generation, thoughts included), per record."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        scorer(model, records)
    return counter.get_total_flops() / max(1, len(records))


class AnswerScorer:
    """:func:`score_answers` bound to a tokenizer and a task: what validation calls on each batch
    of records (a plain class, so that a spawned DDP worker can receive it)."""

    def __init__(self, tokenizer, task, encoding: Encoding | None = None):
        self.tokenizer, self.task, self.encoding = tokenizer, task, encoding

    @property
    def thoughts(self) -> int:
        return self.encoding.thoughts() if self.encoding is not None else 0

    def __call__(self, model, records: list[dict], **kwargs) -> ScoredAnswers:
        return score_answers(model, self.tokenizer, self.task, records, encoding=self.encoding, **kwargs)
