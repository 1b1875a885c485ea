"""The DataModule: task records -> tokenizer -> encoded examples -> padded batches."""

from __future__ import annotations

import itertools
from array import array
from pathlib import Path
from typing import Iterable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from slr_zoo.tasks.base import Task, check_record
from slr_zoo.tasks.encoding import Encoded, Encoding, collate, encode, question_reach
from slr_zoo.tasks.tokenizer import build_word_tokenizer
from slr_zoo.training.settings import CurriculumConfig


class EncodedDataset(Dataset):
    """Encoded examples stored flat: every example's ids (and labels) concatenated in one compact
    array, with offsets. A few hundred thousand examples then cost 2-4 bytes per token rather than
    a Python list of ints per example. ``typecode`` "h" (int16) fits vocabularies below 32768."""

    def __init__(self, examples: Iterable[Encoded] = (), hops: Iterable[int] | None = None, typecode: str = "i"):
        self.ids, self.labels = array(typecode), array(typecode)
        self.offsets, self.hops = array("q", [0]), array("i")
        # per-hop answer tokens (step supervision), flat, with the number of hops per example
        self.step_tokens, self.step_offsets, self.step_counts = array(typecode), array("q", [0]), array("i")
        # per-token reach steps (the reach probe), parallel to ids when every example has them
        self.reach, self.has_reach = array(typecode), None
        for example, hop in zip(examples, hops if hops is not None else itertools.repeat(0)):
            self.append(example, hop)

    def append(self, example: Encoded, hops: int = 0) -> None:
        if len(example.input_ids) != len(example.labels):
            raise ValueError("an encoded example needs one label per input id")
        has_reach = example.reach is not None
        if self.has_reach is not None and has_reach != self.has_reach:
            raise ValueError("either every example of a dataset has reach labels or none has")
        self.has_reach = has_reach
        if has_reach:
            if len(example.reach) != len(example.input_ids):
                raise ValueError("an encoded example needs one reach label per input id")
            self.reach.extend(example.reach)
        self.ids.extend(example.input_ids)
        self.labels.extend(example.labels)
        self.offsets.append(len(self.ids))
        self.hops.append(hops)
        for target in example.step_targets or []:
            self.step_tokens.extend(target)
        self.step_offsets.append(len(self.step_tokens))
        self.step_counts.append(len(example.step_targets or []))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int):
        start, end = self.offsets[i], self.offsets[i + 1]
        example = Encoded(self.ids[start:end].tolist(), self.labels[start:end].tolist())
        if self.has_reach:
            example.reach = self.reach[start:end].tolist()
        count = self.step_counts[i]
        if count:
            flat = self.step_tokens[self.step_offsets[i] : self.step_offsets[i + 1]].tolist()
            width = len(flat) // count
            example.step_targets = [flat[h * width : (h + 1) * width] for h in range(count)]
        return example, self.hops[i]


class PieceDataset(Dataset):
    """Records of a chain-of-thought encoding stored as their token pieces (prompt, each step,
    answer; ``Encoding.pieces``), flat, and assembled at the stage each batch asks for: item
    ``(i, stage, scheduled)`` is example i at ``stage``; a plain index is the final stage."""

    def __init__(self, encoding: Encoding, tokenizer, typecode: str = "i", teacher: bool = False):
        self.encoding, self.tokenizer, self.teacher = encoding, tokenizer, teacher
        self.tokens, self.piece_offsets = array(typecode), array("q", [0])
        self.first_piece, self.hops = array("q", [0]), array("i")
        # the question tokens' reach steps (the reach probe), when every record has them
        self.reach, self.reach_offsets = array("i"), array("q", [0])

    def append_pieces(self, pieces: list[list[int]], hops: int = 0, reach: list[int] | None = None) -> None:
        if len(self) and (len(self.reach_offsets) > 1) != (reach is not None):
            raise ValueError("either every example of a dataset has reach labels or none has")
        for piece in pieces:
            self.tokens.extend(piece)
            self.piece_offsets.append(len(self.tokens))
        self.first_piece.append(len(self.piece_offsets) - 1)
        self.hops.append(hops)
        if reach is not None:
            self.reach.extend(reach)
            self.reach_offsets.append(len(self.reach))

    def __len__(self) -> int:
        return len(self.first_piece) - 1

    def pieces(self, i: int) -> list[list[int]]:
        first, last = self.first_piece[i], self.first_piece[i + 1]
        return [self.tokens[self.piece_offsets[k]:self.piece_offsets[k + 1]].tolist() for k in range(first, last)]

    def __getitem__(self, key):
        i, stage, scheduled = key if isinstance(key, tuple) else (key, self.encoding.final_stage, self.encoding.final_stage)
        reach = self.reach[self.reach_offsets[i]:self.reach_offsets[i + 1]].tolist() if len(self.reach_offsets) > 1 else None
        example = self.encoding.assemble(self.pieces(i), self.tokenizer, stage, teacher=self.teacher, reach=reach)
        return example, self.hops[i], stage, scheduled


class ResumableBatchSampler(Sampler[list[int]]):
    """Training batches as a pure function of (seed, global batch index), sharded over ranks.

    Epoch ``e`` is a permutation drawn from (seed, e); its global batch ``i`` is the slice
    ``[i*G, (i+1)*G)`` with ``G = batch_size * world_size``, of which rank ``r`` takes rows
    ``[r*batch_size, (r+1)*batch_size)``. So one process with batch 2b and two with batch b train on
    the same global batches, and a run resumed at global batch ``start`` continues with exactly
    the batch it would have seen next: the epoch is ``start // len(self)`` and the batches before
    ``start`` are skipped. Epochs are counted here, not taken from Lightning's ``set_epoch``,
    because Lightning builds the first iterator of a resumed run before it sets the epoch.

    ``stages`` (a curriculum, ``task.curriculum``): ``(first global batch, first example, count)``
    per stage, in order; from its first batch on, a stage draws its batches, epoch by epoch in the
    same way, from its own examples only. Default: one stage, all ``size`` examples.
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start: int = 0, stages: list[tuple[int, int, int]] | None = None):
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.stages = stages or [(0, 0, size)]
        if self.stages[0][0] != 0:
            raise ValueError("the first stage must start at batch 0")
        for first, offset, count in self.stages:
            if count // (batch_size * world_size) == 0:
                raise ValueError(f"a training set has {count} examples, fewer than one global batch of "
                                 f"{batch_size} x {world_size} process(es); lower trainer.batch_size")
        self.per_epoch = self.stages[-1][2] // (batch_size * world_size)
        self.position = start  # global index of the next batch

    def __len__(self) -> int:
        return self.per_epoch

    def order(self, epoch: int, stage: int = 0) -> list[int]:
        generator = torch.Generator().manual_seed((self.seed * 2_654_435_761 + epoch * 40_503 + stage * 7_919 + 1) % 2**63)
        _, offset, count = self.stages[stage]
        return (torch.randperm(count, generator=generator) + offset).tolist()

    def __iter__(self):
        """From the next batch to the end of its epoch (or of its stage, if that comes first)."""
        stage = max(k for k, (first, _, _) in enumerate(self.stages) if first <= self.position)
        first, _, count = self.stages[stage]
        stage_end = self.stages[stage + 1][0] if stage + 1 < len(self.stages) else None
        per_epoch = count // (self.batch_size * self.world_size)
        epoch, offset = divmod(self.position - first, per_epoch)
        order = self.order(epoch, stage)
        stride, width = self.batch_size * self.world_size, self.batch_size
        for i in range(offset, per_epoch):
            if stage_end is not None and self.position >= stage_end:
                return
            self.position += 1
            start = i * stride + self.rank * width
            yield order[start:start + width]


def shard_batches(size: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Evaluation batches of rank ``rank``: every ``world_size``-th example, unpadded, so that
    metrics summed over ranks count each example exactly once."""
    mine = list(range(rank, size, world_size))
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def empty_dataset(tokenizer, encoding: Encoding | None = None, teacher: bool = False) -> EncodedDataset | PieceDataset:
    """Stored as int16 when the vocabulary fits; a chain-of-thought encoding keeps token pieces,
    and so does a student of distillation (``teacher``), whose batches carry the CoT encoding."""
    typecode = "h" if len(tokenizer) < 2**15 else "i"
    if encoding is not None and (encoding.kind != "answer" or teacher):
        return PieceDataset(encoding, tokenizer, typecode, teacher=teacher)
    return EncodedDataset(typecode=typecode)


def encode_split(task: Task, split: str, tokenizer, step_answers: bool = False, reach: bool = False,
                 into: EncodedDataset | PieceDataset | None = None, max_length: int | None = None,
                 encoding: Encoding | None = None) -> EncodedDataset | PieceDataset:
    """Encode records one at a time as the task yields them; no split is ever held as records.
    ``step_answers``: also encode the task's per-hop answers (for step supervision); ``reach``: the
    per-token reach steps (for the reach probe). ``into``: append to this dataset (the stages of
    a curriculum share one). ``max_length``: the model's positions; a longer record stops the run
    here, before anything trains, with its split, index and length (at its longest curriculum
    stage). ``encoding``: a chain-of-thought encoding (default: answer only)."""
    dataset = into if into is not None else empty_dataset(tokenizer, encoding)
    staged = isinstance(dataset, PieceDataset)
    before = len(dataset)
    for i, record in enumerate(task.records(split)):
        check_record(record, i, f"task {split} split")
        steps = task.step_answers(record) if step_answers else None
        if step_answers and steps is None:
            raise ValueError(f"step supervision needs per-hop answers, which task "
                             f"{type(task).__name__} does not give (record {i} of the {split} split)")
        reach_steps = task.reach_steps(record) if reach else None
        if reach and reach_steps is None:
            raise ValueError(f"the reach probe needs per-word reach steps, which task "
                             f"{type(task).__name__} does not give (record {i} of the {split} split)")
        if staged and split == "train" and not record.get("steps"):
            raise ValueError(f"record {i} of the {split} split has no reasoning steps, which encoding "
                             f"{dataset.encoding.kind!r} (or distillation) needs in every training record")
        try:
            if staged:
                pieces = Encoding.pieces(record, tokenizer)
                question = question_reach(record, tokenizer, reach_steps) if reach_steps is not None else None
                # a stage's length is not monotone in k when steps differ in length: check each one
                final = dataset.encoding.final_stage
                stages = range(final + 1) if split == "train" else (final,)
                length = max(len(dataset.encoding.assemble(pieces, tokenizer, k).input_ids) for k in stages)
            else:
                encoded = encode(record, tokenizer, steps, reach_steps)
                length = len(encoded.input_ids)
        except ValueError as err:
            raise ValueError(f"record {i} of the {split} split: {err}") from None
        if max_length is not None and length > max_length:
            raise ValueError(f"record {i} of the {split} split is {length} tokens long (question, "
                             f"answer and the tokens around them), more than the model's {max_length} positions; "
                             "shorten the record or use a backbone with more positions")
        if staged:
            dataset.append_pieces(pieces, int(record.get("hops", 0)), question)
        else:
            dataset.append(encoded, int(record.get("hops", 0)))
    if len(dataset) == before:
        raise ValueError(f"task produced no {split} records")
    return dataset


def load_or_build_tokenizer(task: Task, directory: Path, pretrained_tokenizer=None, stages: Iterable[Task] = ()):
    """The pretrained backbone's tokenizer, else the word-level one saved in ``directory``, else a
    new one built from the training records (and saved there), a curriculum's ``stages`` included."""
    if pretrained_tokenizer is not None:
        return pretrained_tokenizer
    from transformers import PreTrainedTokenizerFast

    if (directory / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(directory))
    tokenizer = build_word_tokenizer(itertools.chain(*(t.records("train") for t in [*stages, task])))
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


class ReasoningDataModule(L.LightningDataModule):
    def __init__(self, task: Task, tokenizer, batch_size: int, eval_batch_size: int | None = None,
                 seed: int = 0, num_workers: int = 0, needs: frozenset[str] = frozenset(),
                 curriculum: list[tuple[int, Task]] = (), max_length: int | None = None,
                 encoding: Encoding | None = None, stages: CurriculumConfig | None = None):
        """``needs``: what the objectives read beyond ids and labels (``step_answers``, ``reach``;
        ``Objective.data``). ``curriculum``: (the training batch it ends before, task) of each
        stage before ``task``'s own distribution, which takes over where the last stage ends
        (``task.curriculum``). ``encoding``: how records become sequences (default: answer only);
        ``stages``: the latent curriculum the training batches are encoded at (``training.curriculum``)."""
        super().__init__()
        self.encoding = encoding or Encoding()
        self.latent_stages = stages
        unknown = set(needs) - {"step_answers", "reach", "text_labels", "teacher"}
        if unknown:
            raise ValueError(f"the data cannot provide {sorted(unknown)}; it knows 'step_answers', 'reach', "
                             "'text_labels' and 'teacher'")
        self.teacher = "teacher" in needs
        if "text_labels" in needs and not (encoding and encoding.writes_steps):
            raise ValueError("'text_labels' (written reasoning steps) need a cot, latent or pause encoding")
        self.task, self.tokenizer = task, tokenizer
        self.curriculum = list(curriculum)
        self.stages: list[tuple[int, int, int]] = []  # (first batch, first example, count), for the sampler
        self.step_answers, self.reach = "step_answers" in needs, "reach" in needs
        self.max_length = max_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.seed, self.num_workers = seed, num_workers
        self.train_set: EncodedDataset | None = None
        self.val_set: EncodedDataset | None = None
        self.val_records: list[dict] = []  # what validation answers and scores (generation, then Task.score)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = empty_dataset(self.tokenizer, self.encoding, teacher=self.teacher)
            firsts = [0] + [until for until, _ in self.curriculum]
            for first, task in zip(firsts, [*(t for _, t in self.curriculum), self.task]):
                before = len(self.train_set)
                encode_split(task, "train", self.tokenizer, self.step_answers, self.reach, into=self.train_set,
                             max_length=self.max_length, encoding=self.encoding)
                self.stages.append((first, before, len(self.train_set) - before))
        if self.val_set is None:
            self.val_set = encode_split(self.task, "val", self.tokenizer, max_length=self.max_length,
                                        encoding=self.encoding)
            self.val_records = [check_record(r, i, "task val split") for i, r in enumerate(self.task.records("val"))]

    def calibration_batches(self, count: int) -> list[dict]:
        """``count`` training examples, one collated batch each (no padding), spread evenly over
        the training set so that every curriculum stage's task is among them; the same on every
        rank, so a calibration from them starts every rank from the same weights. A
        chain-of-thought encoding gives its stage-0 text (question, written steps, answer): the
        text a latent stage's thought slots stand in for."""
        self.setup("fit")
        size = len(self.train_set)
        indices = sorted({i * size // count for i in range(count)}) if count < size else range(size)
        pieces = isinstance(self.train_set, PieceDataset)
        return [collate([self.train_set[(i, 0, 0) if pieces else i][0]], self.tokenizer.pad_token_id) for i in indices]

    def _collate(self, items):
        batch = collate([item[0] for item in items], self.tokenizer.pad_token_id)
        batch["hops"] = torch.tensor([item[1] for item in items])
        if len(items[0]) == 4:  # a staged dataset: every item of a batch has the same stage
            stage, scheduled = items[0][2], items[0][3]
            batch["stage"], batch["scheduled_stage"] = torch.tensor(stage), torch.tensor(scheduled)
            depth = self.encoding.depth(stage)
            if depth is not None:
                batch["loop_steps"] = torch.tensor(depth)
        return batch

    def _collate_val(self, indices):
        batch = self._collate([self.val_set[i] for i in indices])
        batch["records"] = [self.val_records[i] for i in indices]
        return batch

    def _placement(self) -> tuple[int, int, int]:
        """(rank, world size, global batches consumed so far); the last is > 0 after a resume."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1, 0
        return trainer.global_rank, trainer.world_size, trainer.global_step * trainer.accumulate_grad_batches

    def train_dataloader(self):
        rank, world, start = self._placement()
        sampler = ResumableBatchSampler(len(self.train_set), self.batch_size, self.seed, rank, world, start,
                                        stages=self.stages)
        if isinstance(self.train_set, PieceDataset):
            from slr_zoo.training.curriculum import StagedBatchSampler, StageSchedule

            config = self.latent_stages or CurriculumConfig(max_latent_stage=self.encoding.final_stage)
            sampler = StagedBatchSampler(sampler, StageSchedule(config, len(sampler), self.seed))
        return DataLoader(self.train_set, batch_sampler=sampler, collate_fn=self._collate,
                          num_workers=self.num_workers)

    def val_dataloader(self):
        """Batches of record indices (each rank its own shard), collated with their records."""
        rank, world, _ = self._placement()
        batches = shard_batches(len(self.val_set), self.eval_batch_size, rank, world)
        return DataLoader(batches, batch_size=None, collate_fn=self._collate_val, num_workers=self.num_workers)
