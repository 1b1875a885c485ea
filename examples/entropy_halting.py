"""A halting policy defined outside slr_zoo: stop a token once the model is sure of its next token.

Use it from a recipe with ``examples/`` on PYTHONPATH:

    loop:
      halting: {_component_: entropy_halting.EntropyHalting, max_entropy: 0.1}

    PYTHONPATH=examples python -m slr_zoo.fit recipes/quickstart.yaml \
        'loop.halting={_component_: entropy_halting.EntropyHalting, max_entropy: 0.1}'
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slr_zoo.halting import Decision, HaltingPolicy, fp32


class EntropyHalting(HaltingPolicy):
    """Done when the entropy (in nats) of a token's predicted distribution is below
    ``max_entropy``, from step ``min_steps`` on. Per token, so it is causal; no parameters."""

    per_token = True

    def __init__(self, max_entropy: float = 0.1, min_steps: int = 1):
        super().__init__()
        self.max_entropy, self.min_steps = max_entropy, min_steps

    def observe(self, state, t, h, prev, logits, last):
        with torch.no_grad():
            decoded = logits()  # decode under the run's precision; only the arithmetic is fp32
            with fp32(h.device):
                log_p = F.log_softmax(decoded.float(), dim=-1)
                entropy = -(log_p.exp() * log_p).sum(dim=-1)
        return Decision(done=(entropy < self.max_entropy) & (t >= self.min_steps))
