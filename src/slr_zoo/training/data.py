"""The DataModule: task records -> tokenizer -> encoded examples -> padded batches."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from slr_zoo.tasks.base import Task, check_record
from slr_zoo.tasks.encoding import Encoded, collate, encode
from slr_zoo.tasks.tokenizer import build_word_tokenizer


class EncodedDataset(Dataset):
    def __init__(self, examples: list[Encoded], hops: list[int] | None = None):
        self.examples, self.hops = examples, hops

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        return self.examples[i], (self.hops[i] if self.hops else 0)


def encode_split(task: Task, split: str, tokenizer) -> EncodedDataset:
    examples, hops = [], []
    for i, record in enumerate(task.records(split)):
        check_record(record, i, f"task {split} split")
        examples.append(encode(record, tokenizer))
        hops.append(int(record.get("hops", 0)))
    if not examples:
        raise ValueError(f"task produced no {split} records")
    return EncodedDataset(examples, hops)


def load_or_build_tokenizer(task: Task, directory: Path, pretrained_tokenizer=None):
    """The pretrained backbone's tokenizer, else the word-level one saved in ``directory``, else a
    new one built from the training records (and saved there)."""
    if pretrained_tokenizer is not None:
        return pretrained_tokenizer
    from transformers import PreTrainedTokenizerFast

    if (directory / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(directory))
    tokenizer = build_word_tokenizer(task.records("train"))
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


class ReasoningDataModule(L.LightningDataModule):
    def __init__(self, task: Task, tokenizer, batch_size: int, eval_batch_size: int | None = None,
                 seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.task, self.tokenizer = task, tokenizer
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.seed, self.num_workers = seed, num_workers
        self.train_set: EncodedDataset | None = None
        self.val_set: EncodedDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = encode_split(self.task, "train", self.tokenizer)
        if self.val_set is None:
            self.val_set = encode_split(self.task, "val", self.tokenizer)

    def _collate(self, items):
        batch = collate([e for e, _ in items], self.tokenizer.pad_token_id)
        batch["hops"] = torch.tensor([h for _, h in items])
        return batch

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          generator=generator, collate_fn=self._collate, num_workers=self.num_workers)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self._collate, num_workers=self.num_workers)
