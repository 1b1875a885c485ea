"""Records to token tensors, and the answer-token accuracy that equals greedy exact match.

A record is encoded in one of four ways (``training.encoding``), each with its labels:

- ``answer``: ``question [SEP] answer [EOS]``;
- ``cot``: ``question [SEP] steps [ANS] answer [EOS]``, the steps written out;
- ``latent``: ``question [SEP] [BOT] slots [EOT] remaining steps [ANS] answer [EOS]``, where stage
  k of the curriculum replaces the first k steps with k·c slots (``[THINK]``) that the model fills
  with its own continuous thoughts (``loop.mode: thoughts``); in depth mode there are no slots,
  the loop runs k·c more iterations instead (stepwise internalisation);
- ``pause``: the same with a learned ``[PAUSE]`` token in every slot, in one ordinary pass.

As in Coconut's code, [EOT] closes the latent span before any remaining written step, so the model
always reads where continuous input ends; it is fed, never predicted. Question, markers and slots
carry no label; the written steps are ``text_labels`` (the language-model objective), and [ANS],
the answer and [EOS] are ``labels`` (the answer objective).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slr_zoo.tasks.base import Record
from slr_zoo.tasks.tokenizer import (
    ANS,
    BOT,
    EOT,
    PAUSE,
    THINK,
    marker_ids,
    special_ids,
    text_ids,
    token_words,
)

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]   # labels[i] is the token position i must predict, or IGNORE
    step_targets: list[list[int]] | None = None  # per hop, the answer tokens after that hop
    reach: list[int] | None = None  # per position, the hop that reaches its word, or IGNORE
    text_labels: list[int] | None = None  # the written reasoning steps' labels (cot, latent, pause)
    prompt_length: int | None = None  # positions of the question up to its [SEP] (default: before the first label)
    slots: int = 0                    # continuous-thought slots, right after the prompt and [BOT]
    teacher_ids: list[int] | None = None     # distillation: the record's CoT encoding
    teacher_step_ends: list[int] | None = None  # and the position of each step's last token in it


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
        reach = question_reach(record, tokenizer, reach_steps)
        reach += [IGNORE] * (len(ids) - len(reach))
    return Encoded(ids, labels, targets, reach)


def question_reach(record: Record, tokenizer, reach_steps: dict[str, int]) -> list[int]:
    """The reach step of every question token whose word ``reach_steps`` labels, else IGNORE; one
    per question token (the separator after it not included)."""
    words = token_words(tokenizer, record["question"])
    if len(words) != len(text_ids(tokenizer, record["question"])):
        raise ValueError("the tokenizer's offsets do not match its tokens; reach supervision needs a fast tokenizer")
    reach = [reach_steps.get(w, IGNORE) if w is not None else IGNORE for w in words]
    if all(r == IGNORE for r in reach):
        raise ValueError(f"no word of the question is among the reach steps' words {sorted(reach_steps)[:5]}...")
    return reach


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding: with a causal mask no real token ever attends to a pad, so no attention mask
    is needed; ``real_mask`` still tells per-token halting which positions are pads.

    A batch with continuous-thought slots is left-padded instead, so that every row's slots sit
    in the same columns: a thoughts pass then runs over one column for the whole batch. It comes
    with an ``attention_mask`` and ``slot_mask`` [B, S]."""
    width = max(len(e.input_ids) for e in batch)
    shift = [0] * len(batch)
    if any(e.slots for e in batch):
        if len({e.slots for e in batch}) != 1:
            raise ValueError("every example of a thoughts batch needs the same number of slots (one stage per batch)")
        starts = [e.prompt_length + 1 for e in batch]  # the first slot follows the prompt and [BOT]
        shift = [max(starts) - s for s in starts]
        width = max(len(e.input_ids) + d for e, d in zip(batch, shift))
    ids = padded([e.input_ids for e in batch], width, pad_id, shift)
    labels = padded([e.labels for e in batch], width, IGNORE, shift)
    column = torch.arange(width)
    start = torch.tensor(shift)[:, None]
    real = (column >= start) & (column < start + torch.tensor([len(e.input_ids) for e in batch])[:, None])
    out = {"input_ids": ids, "labels": labels, "real_mask": real}
    if all(e.prompt_length is not None for e in batch):
        out["query_mask"] = (column >= start) & (column < start + torch.tensor([e.prompt_length for e in batch])[:, None])
    if any(shift) or any(e.slots for e in batch):
        out["attention_mask"] = real.long()
    if any(e.slots for e in batch):
        first = batch[0].prompt_length + 1 + shift[0]
        slot_mask = torch.zeros((len(batch), width), dtype=torch.bool)
        slot_mask[:, first : first + batch[0].slots] = True
        out["slot_mask"] = slot_mask
    if any(e.text_labels is not None for e in batch):
        out["text_labels"] = padded([e.text_labels or [] for e in batch], width, IGNORE, shift)
    if all(e.teacher_ids is not None for e in batch):
        out.update(teacher_batch(batch, pad_id))
    if all(e.step_targets is not None for e in batch):
        out["step_labels"] = step_labels(batch, labels)
    if all(e.reach is not None for e in batch):
        out["reach"] = padded([e.reach for e in batch], width, IGNORE, shift)
    return out


def padded(rows: list[list[int]], width: int, fill: int, shift: list[int] | None = None) -> torch.Tensor:
    """[len(rows), width] long: row i starts at column ``shift[i]`` (0 by default), ``fill``
    around it. Built as lists and converted once: a small tensor per row dominated the collate."""
    shift = shift or [0] * len(rows)
    return torch.tensor([[fill] * d + list(r) + [fill] * (width - d - len(r)) for r, d in zip(rows, shift)],
                        dtype=torch.long).view(len(rows), width)


def teacher_batch(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """The CoT encodings a distillation teacher reads (right-padded), its question extent, and
    [B, K] the position where each reasoning step ends (-1 past a record's last step)."""
    width = max(len(e.teacher_ids) for e in batch)
    ids = padded([e.teacher_ids for e in batch], width, pad_id)
    column = torch.arange(width)
    real = column < torch.tensor([len(e.teacher_ids) for e in batch])[:, None]
    query = column < torch.tensor([e.prompt_length for e in batch])[:, None]
    steps = max(1, max(len(e.teacher_step_ends) for e in batch))
    ends = padded([e.teacher_step_ends for e in batch], steps, -1)
    return {"teacher_ids": ids, "teacher_real_mask": real, "teacher_query_mask": query, "teacher_step_ends": ends}


class Encoding:
    """How records become sequences: one of ``answer``, ``cot``, ``latent``, ``pause`` (see the
    module docstring). ``thoughts_per_step`` (c) slots stand for each replaced step;
    ``final_stage`` is the stage validation and generation use (the curriculum's last, K);
    ``continuous``: latent slots are filled by the model's thoughts (``loop.mode: thoughts``),
    otherwise a latent encoding has no slots and its stages are loop depth."""

    KINDS = ("answer", "cot", "latent", "pause")

    def __init__(self, kind: str = "answer", thoughts_per_step: int = 1, final_stage: int = 0,
                 continuous: bool = False):
        if kind not in self.KINDS:
            raise ValueError(f"unknown encoding {kind!r}; choose one of {', '.join(self.KINDS)}")
        self.kind, self.c, self.final_stage, self.continuous = kind, thoughts_per_step, final_stage, continuous

    @property
    def writes_steps(self) -> bool:
        """Whether generated text may hold reasoning steps before [ANS] and the answer."""
        return self.kind != "answer"

    def slots(self, stage: int) -> int:
        """Slot tokens at ``stage``: c per replaced step (none for answer, cot, and depth-mode latent)."""
        if self.kind == "pause" or (self.kind == "latent" and self.continuous):
            return stage * self.c
        return 0

    def with_thoughts(self, n: int) -> "Encoding":
        """This encoding at the curriculum stage that puts ``n`` continuous thoughts (or pause
        tokens) before the answer, as prompts, budgets and scoring read it; what that stage has not
        replaced is written out."""
        if not self.slots(1):
            raise ValueError(f"this cell answers without thoughts or pause tokens (encoding {self.kind!r}"
                             f"{' in depth mode' if self.kind == 'latent' else ''})")
        if n % self.c:
            raise ValueError(f"{n}: each replaced step is {self.c} thoughts in this cell; give a multiple of {self.c}")
        return Encoding(self.kind, self.c, n // self.c, self.continuous)

    def depth(self, stage: int) -> int | None:
        """The loop depth at ``stage`` when the stages are depth (depth-mode latent), else None."""
        if self.kind == "latent" and not self.continuous:
            return max(1, stage * self.c)
        return None

    def encode(self, record: Record, tokenizer, stage: int = 0, step_answers=None, reach_steps=None) -> Encoded:
        """``record`` at curriculum ``stage`` (ignored by answer and cot)."""
        if self.kind == "answer":
            return encode(record, tokenizer, step_answers, reach_steps)
        reach = question_reach(record, tokenizer, reach_steps) if reach_steps is not None else None
        return self.assemble(self.pieces(record, tokenizer), tokenizer, stage, reach=reach)

    @staticmethod
    def pieces(record: Record, tokenizer) -> list[list[int]]:
        """[prompt, step 1, ..., step n, answer]: the token pieces every stage is assembled from."""
        steps = [text_ids(tokenizer, " " + s.strip()) for s in record.get("steps", [])]
        return [prompt_ids(tokenizer, record["question"]), *steps, answer_ids(tokenizer, record["answer"])]

    def assemble(self, pieces: list[list[int]], tokenizer, stage: int = 0, teacher: bool = False,
                 reach: list[int] | None = None) -> Encoded:
        """The encoding of a record's ``pieces`` at ``stage``; ``teacher``: with its CoT
        encoding and step ends attached (distillation); ``reach``: the question tokens' reach
        steps (:func:`question_reach`), which every stage puts on the same leading positions."""
        eos = special_ids(tokenizer)[1]
        if self.kind == "answer":
            prompt, answer = pieces[0], pieces[-1]
            ids = prompt + answer + [eos]
            example = Encoded(ids, [IGNORE] * (len(prompt) - 1) + answer + [eos] + [IGNORE],
                              prompt_length=len(prompt))
        else:
            example = self._assemble_steps(pieces, tokenizer, stage)
        if teacher:
            cot = Encoding("cot")._assemble_steps(pieces, tokenizer, 0)
            example.teacher_ids = cot.input_ids
            ends, at = [], len(pieces[0])
            for step in pieces[1:-1]:
                at += len(step)
                ends.append(at - 1)
            example.teacher_step_ends = ends
        if reach is not None:
            example.reach = list(reach) + [IGNORE] * (len(example.input_ids) - len(reach))
        return example

    def _assemble_steps(self, pieces: list[list[int]], tokenizer, stage: int) -> Encoded:
        eos = special_ids(tokenizer)[1]
        marks = marker_ids(tokenizer)
        prompt, steps, answer = pieces[0], pieces[1:-1], [marks[ANS]] + pieces[-1] + [eos]
        if self.kind == "cot":
            head, written = prompt, steps
        else:
            slot = marks[PAUSE] if self.kind == "pause" else marks[THINK]
            head = prompt + [marks[BOT]] + [slot] * self.slots(stage) + [marks[EOT]]
            written = steps[stage:]
        text = [t for s in written for t in s]
        ids = head + text + answer
        # position i predicts token i + 1: the last head position predicts the first written token
        labels = [IGNORE] * (len(head) - 1 + len(text)) + answer + [IGNORE]
        text_labels = [IGNORE] * (len(head) - 1) + text + [IGNORE] * (len(answer) + 1)
        continuous = self.kind == "latent" and self.continuous
        return Encoded(ids, labels, text_labels=text_labels, prompt_length=len(prompt),
                       slots=self.slots(stage) if continuous else 0)

    def prompt(self, record: Record, tokenizer) -> list[int]:
        """What generation starts from at the final stage; continuous thoughts come after it,
        then [EOT] (:meth:`after_thoughts`)."""
        prompt = prompt_ids(tokenizer, record["question"])
        if self.kind in ("answer", "cot"):
            return prompt
        marks = marker_ids(tokenizer)
        if self.kind == "latent" and self.continuous:
            return prompt + [marks[BOT]]
        return prompt + [marks[BOT]] + [marks[PAUSE]] * self.slots(self.final_stage) + [marks[EOT]]

    def thoughts(self) -> int:
        """Continuous thoughts generated before [EOT] at the final stage."""
        return self.final_stage * self.c if self.kind == "latent" and self.continuous else 0

    def after_thoughts(self, tokenizer) -> list[int]:
        """What is fed after the continuous thoughts, before the first generated token."""
        return [marker_ids(tokenizer)[EOT]] if self.kind == "latent" and self.continuous else []

    def budget(self, record: Record, tokenizer) -> int:
        """New tokens a generated answer may take, fixed per record: the answer's own budget, plus
        for written reasoning twice the gold steps that remain at the final stage and [ANS]."""
        base = answer_budget(record, tokenizer)
        if not self.writes_steps:
            return base
        skip = 0 if self.kind == "cot" else self.final_stage
        written = sum(len(text_ids(tokenizer, " " + s.strip())) for s in record.get("steps", [])[skip:])
        return base + 1 + 2 * written

    def answer_text(self, new_ids: list[int], tokenizer) -> str:
        """The answer in generated ``new_ids``: all of it, or what follows the last [ANS] when
        steps are written first (nothing, when no [ANS] was generated)."""
        eos = special_ids(tokenizer)[1]
        ids = [t for t in new_ids if t != eos]
        if self.writes_steps:
            ans = marker_ids(tokenizer)[ANS]
            if ans not in ids:
                return ""
            ids = ids[len(ids) - ids[::-1].index(ans):]
        return tokenizer.decode(ids, skip_special_tokens=True)


def step_labels(batch: list[Encoded], labels: torch.Tensor) -> torch.Tensor:
    """[B, H, S]: for hop h, the labels with the answer tokens replaced by the answer after hop h;
    samples with fewer hops repeat their final answer, so iteration t reads row min(t, H) - 1."""
    hops = max(len(e.step_targets) for e in batch)
    rows = []  # built as lists and converted once: a tensor per (sample, hop) dominated the collate
    for e, row_labels in zip(batch, labels.tolist()):
        start = next(i for i, x in enumerate(e.labels) if x != IGNORE)
        for h in range(hops):
            target = e.step_targets[min(h, len(e.step_targets) - 1)]
            rows.append(row_labels[:start] + list(target) + row_labels[start + len(target):])
    return torch.tensor(rows, dtype=labels.dtype).view(len(batch), hops, labels.size(1))


def answer_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] bool: every answer token (and the end token) is the argmax under teacher forcing.

    For a causal model this is exactly "greedy decoding after the question returns the answer and
    stops": if every argmax matches, greedy decoding follows the gold tokens step by step; at the
    first mismatch it leaves them. One forward pass instead of one per answer token.
    """
    mask = labels != IGNORE
    hit = (logits.argmax(-1) == labels) | ~mask
    return hit.all(dim=1) & mask.any(dim=1)
