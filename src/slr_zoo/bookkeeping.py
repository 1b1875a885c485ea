"""What the loop remembers across iterations, kept out of the loop body (``looped.py``).

Four small pieces, each with one job:

- :class:`HaltingTracker`: the policy's per-forward state, which running samples and tokens have
  halted and at which iteration; halted tokens keep their state (they are frozen).
- :class:`OutputMixture`: the output the policy asks for (the halting step's state, a weighted
  mixture of the states, or in training each step's logits and weight for an expected loss).
- :class:`BatchCompaction`: at inference, samples that have halted leave the batch; their outputs
  are stored at their original rows and the loop goes on with the rest.
- :class:`StepTrace`: per-iteration records (states, decoded logits, norms and changes), kept only
  when asked for, so an ordinary forward pass (a generated token) pays nothing for them.

Every tensor that describes running rows is batch-first and shrinks with the batch; whatever a
finished row leaves behind goes to :class:`BatchCompaction`'s full-batch outputs.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from slr_zoo.halting.base import Decision, HaltingPolicy

LogitsFn = Callable[[], torch.Tensor]
RECORDS = frozenset({"states", "logits", "stability"})


def lazy(fn: LogitsFn) -> LogitsFn:
    """Decode at most once per grad mode: a policy that decodes under no_grad (``kl``) must not
    hand a graph-less tensor to a loss that needs one (step supervision, the output)."""
    cache: dict[bool, torch.Tensor] = {}

    def call() -> torch.Tensor:
        mode = torch.is_grad_enabled()
        if mode not in cache:
            cache[mode] = fn()
        return cache[mode]

    call.computed = lambda: torch.is_grad_enabled() in cache  # type: ignore[attr-defined]
    return call


def _rows(x: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor | None:
    return None if x is None else x.index_select(0, keep)


class HaltingTracker:
    """Which samples and tokens have halted, and at which iteration (``steps`` [B], and
    ``token_steps`` [B, S] under a per-token policy; pads count 0)."""

    def __init__(self, policy: HaltingPolicy, h0: torch.Tensor, query: torch.Tensor, max_steps: int):
        self.policy, self.max_steps = policy, max_steps
        self.per_token = policy.per_token
        self.state = policy.start(h0, query)
        self.done = torch.zeros(h0.size(0), dtype=torch.bool, device=h0.device)
        self.steps = torch.full((h0.size(0),), max_steps, dtype=torch.long, device=h0.device)
        self.frozen = ~query if self.per_token else None  # pads never run
        self.token_steps = torch.where(query, max_steps, 0) if self.per_token else None

    def freeze(self, h_next: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Tokens that halted keep their state; so do halted samples in training, where they still
        run (at inference they have left the batch)."""
        halted = self.frozen if self.frozen is not None else self.done[:, None]
        if not halted.any():
            return h_next
        return torch.where(halted[..., None], h, h_next)

    def observe(self, t: int, h_next: torch.Tensor, h: torch.Tensor, logits: LogitsFn) -> Decision:
        decision = self.policy.observe(self.state, t, h_next, h, logits, last=t == self.max_steps)
        done = decision.done
        if self.per_token and done is not None:
            self.token_steps = torch.where(done & ~self.frozen, t, self.token_steps)
            self.frozen = self.frozen | done
            done = self.frozen.all(dim=1)
        if done is not None:
            self.steps = torch.where(done & ~self.done, t, self.steps)
            self.done = self.done | done
        return decision

    def select(self, keep: torch.Tensor) -> None:
        self.done, self.steps = self.done[keep], self.steps[keep]
        self.frozen, self.token_steps = _rows(self.frozen, keep), _rows(self.token_steps, keep)
        self.state = {k: v.index_select(0, keep) if torch.is_tensor(v) and v.dim() > 0 else v
                      for k, v in self.state.items()}

    def aux_loss(self) -> torch.Tensor | None:
        return self.policy.aux_loss(self.state)


class OutputMixture:
    """The output state a policy asks for (``HaltingPolicy.mixes``): the state at the halting
    step (``last``), sum_t w_t h_t (``state``, ACT), or, in training, the state of the last step
    plus every step's logits and weight for the expected loss (``loss``, PonderNet and Ouro).

    A per-sample ``state`` policy's weights are also kept per step ([B, T]), so a generation can
    mix each later token's states with the weights its prompt decided."""

    def __init__(self, policy: HaltingPolicy, h0: torch.Tensor, max_steps: int):
        self.mixes = policy.mixes
        self.mixture = h0.new_zeros(h0.shape, dtype=torch.float32) if self.mixes == "state" else None
        per_sample_weights = self.mixes == "state" and not policy.per_token
        self.weights = h0.new_zeros((h0.size(0), max_steps), dtype=torch.float32) if per_sample_weights else None
        self.loss_terms: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, t: int, h_next: torch.Tensor, decision: Decision, logits: LogitsFn) -> None:
        if self.mixture is not None:
            w = decision.weight if decision.weight.dim() == 2 else decision.weight[:, None]
            self.mixture = self.mixture + (w[..., None] * h_next).to(self.mixture.dtype)
            if self.weights is not None:
                self.weights[:, t - 1] = decision.weight.detach()
        elif self.mixes == "loss" and torch.is_grad_enabled():
            self.loss_terms.append((logits(), decision.weight))

    def state(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.mixture is None else self.mixture.to(h.dtype)

    def select(self, keep: torch.Tensor) -> None:
        self.mixture, self.weights = _rows(self.mixture, keep), _rows(self.weights, keep)


class BatchCompaction:
    """At inference (``enabled``), samples that have halted leave the batch. Their output state,
    steps, token steps and per-sample weights are stored at their original rows, and so are their
    logits when the policy already decoded them at the halting step (``kl``), so the output is
    not decoded twice."""

    def __init__(self, h0: torch.Tensor, enabled: bool):
        self.enabled = enabled
        self.size = h0.size(0)
        self.active = torch.arange(self.size, device=h0.device)  # original row of each running row
        self.outputs: dict[str, torch.Tensor] = {}
        self.decoded = torch.zeros(self.size, dtype=torch.bool, device=h0.device)

    def _store(self, name: str, finished: torch.Tensor, value: torch.Tensor | None) -> None:
        if value is None:
            return
        if name not in self.outputs:
            self.outputs[name] = value.new_zeros((self.size, *value.shape[1:]))
        self.outputs[name][self.active[finished]] = value[finished].to(self.outputs[name].dtype)

    def step(self, t: int, h_next: torch.Tensor, h0: torch.Tensor, ctx, halted: HaltingTracker,
             mixture: OutputMixture, logits: LogitsFn):
        """The rows that go on, with their h0 and context."""
        if not self.enabled:
            return h_next, h0, ctx
        finished = halted.done | (t == halted.max_steps)
        if not finished.any():
            return h_next, h0, ctx
        self._store("state", finished, mixture.state(h_next))
        self._store("steps", finished, halted.steps)
        self._store("token_steps", finished, halted.token_steps)
        self._store("weights", finished, mixture.weights)
        if mixture.mixture is None and logits.computed():
            self._store("logits", finished, logits())
            self.decoded[self.active[finished]] = True
        keep = (~finished).nonzero().squeeze(1)
        self.active = self.active[keep]
        halted.select(keep)
        mixture.select(keep)
        return h_next[keep], h0[keep], ctx.select(keep)

    def full(self, h: torch.Tensor) -> torch.Tensor:
        """A full-batch copy of a running state: finished rows hold their output state."""
        if not self.enabled or "state" not in self.outputs:
            return h
        full = self.outputs["state"].clone()
        full[self.active] = h.to(full.dtype)
        return full

    def results(self, h: torch.Tensor, halted: HaltingTracker, mixture: OutputMixture, logits: LogitsFn):
        """(output state, steps, token steps, per-sample weights, logits or None) of the whole batch."""
        if self.enabled:
            out = self.outputs
            decoded = out.get("logits") if bool(self.decoded.all()) else None
            return out["state"], out["steps"], out.get("token_steps"), out.get("weights"), decoded
        decoded = logits() if mixture.mixture is None and logits.computed() else None
        return mixture.state(h), halted.steps, halted.token_steps, mixture.weights, decoded


class StepTrace:
    """Per-iteration records, each only when asked for: ``states`` (full batch), ``logits`` (each
    iteration decoded at the positions the pass keeps logits at; in training only where the
    iteration has a graph, since only a loss reads them there) and ``stability`` (mean ||h_t|| and ||h_t - h_{t-1}|| / ||h_{t-1}||)."""

    def __init__(self, record: Iterable[str], compaction: BatchCompaction, training: bool):
        self.record = frozenset(record)
        unknown = self.record - RECORDS
        if unknown:
            raise ValueError(f"record: unknown {sorted(unknown)}; choose from {sorted(RECORDS)}")
        if "logits" in self.record and compaction.enabled:
            raise ValueError("record=('logits',) keeps every iteration's logits of the whole batch; "
                             "it needs compact=False (halted samples then stay in the batch)")
        self.compaction, self.training = compaction, training
        self.states: list[torch.Tensor] = []
        self.logits: list[torch.Tensor | None] = []
        self.norms: list[torch.Tensor] = []
        self.deltas: list[torch.Tensor] = []

    def add(self, h_next: torch.Tensor, h: torch.Tensor, logits: LogitsFn, graph: bool) -> None:
        """``graph``: this iteration runs with autograd (truncated backprop leaves early ones out)."""
        if not self.record:
            return
        if "states" in self.record:
            self.states.append(self.compaction.full(h_next))
        if "logits" in self.record:
            self.logits.append(logits() if graph or not self.training else None)
        if "stability" in self.record:
            with torch.no_grad():
                self.norms.append(h_next.float().norm(dim=-1).mean())
                change = (h_next - h).float().norm(dim=-1) / h.float().norm(dim=-1).clamp_min(1e-6)
                self.deltas.append(change.mean())
