"""Decoders turn a loop state into next-token logits."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from slr_zoo.registry import Registry


class Trunk(Protocol):
    """What a decoder reads from the backbone: its remaining layers and its final norm + head."""

    coda: nn.Module

    def head(self, h: torch.Tensor) -> torch.Tensor: ...


class Decoder(nn.Module):
    """``(h, backbone, ctx) -> logits``; ``ctx`` is the backbone's per-batch context.

    A decoder that gives ``features`` must keep ``forward(h) == backbone.lm_head(features(h))``:
    the loop applies the head to the features of the positions it keeps (``logits_to_keep``, in
    training and generation) and of continuous thoughts, not ``forward``.

    The backbone is passed in rather than held, so its head and coda are registered once (in the
    backbone) and appear once in state dicts and optimisers.
    """

    uses_coda: bool = False

    def forward(self, h: torch.Tensor, backbone: Trunk, ctx: Any) -> torch.Tensor:
        raise NotImplementedError

    def features(self, h: torch.Tensor, backbone: Trunk, ctx: Any) -> torch.Tensor:
        """The last hidden state before the LM head (``forward`` = head of it): what a continuous
        thought feeds back as the next input embedding (``loop.mode: thoughts``)."""
        raise NotImplementedError(f"decoder {type(self).__name__} gives no features(); thoughts mode needs them")


DECODERS = Registry("decoder", Decoder)


@DECODERS.register("linear")
class LinearDecoder(Decoder):
    """The backbone's final norm and (tied) LM head, straight from the loop state."""

    def forward(self, h, backbone, ctx):
        return backbone.head(h)

    def features(self, h, backbone, ctx):
        return backbone.final_norm(h)


@DECODERS.register("coda")
class CodaDecoder(Decoder):
    """The backbone's remaining layers, then its final norm and LM head."""

    uses_coda = True

    def forward(self, h, backbone, ctx):
        return backbone.head(backbone.coda(h, ctx))

    def features(self, h, backbone, ctx):
        return backbone.final_norm(backbone.coda(h, ctx))
