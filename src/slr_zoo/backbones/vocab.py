"""Tokens added to a pretrained vocabulary (a separator, latent-thought markers, pause tokens).

Resizing the embedding matrix would make every row trainable, and a frozen base would then be
decayed by AdamW through rows nobody meant to train. Instead the pretrained embedding and head stay
as they are (frozen with the base), and the added tokens get rows of their own:
:class:`AddedEmbedding` and :class:`AddedHead` hold ``n`` trainable rows for the ids
``first, ..., first + n - 1``, which shadow whatever the base held there (a padded vocabulary
has unused rows past the tokenizer's length). With tied embeddings the head reads the same rows.
New rows start at the mean of the pretrained embeddings, a neutral point of the input space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AddedEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, first: int, count: int):
        super().__init__()
        self.base, self.first, self.count = base, first, count
        with torch.no_grad():
            mean = base.weight.float().mean(dim=0).to(base.weight.dtype)
        self.added = nn.Parameter(mean.expand(count, -1).clone())

    @property
    def weight(self) -> torch.Tensor:  # what callers read for the dtype, device and width
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return max(self.base.num_embeddings, self.first + self.count)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        added = (ids >= self.first) & (ids < self.first + self.count)
        out = self.base(torch.where(added | (ids >= self.base.num_embeddings), 0, ids))
        rows = F.embedding((ids - self.first).clamp(0, self.count - 1), self.added)
        return torch.where(added[..., None], rows.to(out.dtype), out)


class AddedHead(nn.Module):
    """The pretrained head, with the logits of the added ids read from their own rows."""

    def __init__(self, base: nn.Linear, rows: nn.Parameter, first: int):
        super().__init__()
        self.base, self.rows, self.first = base, rows, first

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def out_features(self) -> int:
        return max(self.base.out_features, self.first + self.rows.size(0))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.base(h)
        end = self.first + self.rows.size(0)
        if end > logits.size(-1):
            logits = F.pad(logits, (0, end - logits.size(-1)))
        added = F.linear(h, self.rows.to(h.dtype))
        return torch.cat([logits[..., : self.first], added.to(logits.dtype), logits[..., end:]], dim=-1)
