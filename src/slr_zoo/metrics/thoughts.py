"""What continuous thoughts decode to (RQ3 for ``loop.mode: thoughts``).

A thought is the state fed back as the next input, so the head can read it as it reads any
state: thought t decoded is the distribution the head puts on the next token at the position
where thought t is made. Coconut read its ProsQA thoughts this way and found them holding the
search's frontier, several concepts at once, weighted by how likely each leads to the answer.
Here the question's words are grouped by the task's reach step (ProsQA: a concept's distance
from the root), so a thought that keeps the frontier puts its weight at distance t.
"""

from __future__ import annotations

from collections import Counter

import torch


@torch.no_grad()
def decoded_thoughts(model, ids: torch.Tensor, mask: torch.Tensor, query: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n, V]: the head's next-token probabilities at each of ``n`` thoughts, made greedily
    after left-padded prompts ``ids`` that end where the first thought is made ([BOT])."""
    batch, length = ids.shape
    # slot ids are never read: each slot's input is the thought before it
    full = torch.cat([ids, ids[:, -1:].expand(batch, n)], dim=1)
    ones = torch.ones((batch, n), dtype=mask.dtype, device=mask.device)
    slot_mask = torch.zeros(full.shape, dtype=torch.bool, device=ids.device)
    slot_mask[:, length:] = True
    out = model.thoughts(full, torch.cat([mask, ones], dim=1), slot_mask,
                         query_mask=torch.cat([query, torch.zeros_like(slot_mask[:, length:])], dim=1))
    made_at = torch.arange(length - 1, length - 1 + n, device=ids.device)  # [BOT], then slots 1 .. n - 1
    return out.logits[:, made_at].float().softmax(-1)


def first_tokens(words: list[str | None], ids: list[int]) -> dict[str, int]:
    """Each word's first token id in a text (``words``: the word each token of ``ids`` lies in,
    as ``tasks.tokenizer.token_words`` gives them): how a decoded distribution is read by word.
    Words whose first piece another word of the text shares are left out: a sub-word tokenizer's
    probability on that piece cannot be told apart between them."""
    tokens: dict[str, int] = {}
    for i, word in enumerate(words):
        if word is not None and (i == 0 or words[i - 1] != word):
            tokens.setdefault(word, ids[i])
    shared = {token for token, n in Counter(tokens.values()).items() if n > 1}
    return {word: token for word, token in tokens.items() if token not in shared}


def reach_shares(probs: torch.Tensor, tokens: dict[int, int]) -> tuple[list[float], list[dict[int, float]]]:
    """For each thought's distribution in ``probs`` [n, V]: the probability on the question's
    labelled words (``tokens``: token id -> reach step), and how that probability splits by
    reach step (shares summing to 1)."""
    ids = torch.tensor(list(tokens), dtype=torch.long)
    steps = torch.tensor(list(tokens.values()))
    on_words = probs[:, ids]  # [n, words]
    totals = on_words.sum(-1)
    shares = []
    for row, total in zip(on_words, totals):
        by_step: dict[int, float] = {}
        for step in sorted(set(steps.tolist())):
            by_step[step] = float(row[steps == step].sum() / total) if total > 0 else 0.0
        shares.append(by_step)
    return totals.tolist(), shares


def summarise_shares(per_record: list[tuple[list[float], list[dict[int, float]]]], unreached: int) -> dict:
    """Means over records of :func:`reach_shares`: per thought, the mass on the question's words
    and the share at each reach step, over the records whose thought puts any probability on
    them (a record without a word at some step counts 0 there; the step ``unreached``, a word
    the reasoning never reaches, is named "never")."""
    n = len(per_record[0][0])
    steps = sorted({s for _, shares in per_record for by_step in shares for s in by_step})
    rows = []
    for t in range(n):
        mass = sum(totals[t] for totals, _ in per_record) / len(per_record)
        # a thought with no probability on the question's words has no split to average
        split = [shares[t] for totals, shares in per_record if totals[t] > 0]
        share = {("never" if s == unreached else str(s)): round(sum(sh.get(s, 0.0) for sh in split) / len(split), 4)
                 if split else None for s in steps}
        rows.append({"thought": t + 1, "mass_on_question_words": round(mass, 4), "share_by_reach_step": share,
                     "records_with_mass": len(split)})
    return {"records": len(per_record), "rows": rows}
