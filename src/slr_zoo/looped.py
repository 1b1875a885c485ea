"""The looped language model: one file, read top to bottom.

    h0 = prelude(x)
    h  = h0
    for t in 1..T while not halted:
        h = step(h, h0, t, ctx)     # injection(step_embedding(h, t), h0) -> core with L_t -> combine
        halting.observe(t, h, ...)
    logits = decoder(output state)

``step`` is the whole iteration and knows no loop mode: the depth loop below calls it on every
position's state, and the thoughts loop (``loop.mode: thoughts``, Coconut) runs the depth loop
once per continuous thought over the KV cache:

    pass 0: the question up to [BOT]          -> thought 1 = features at [BOT]
    pass i: thought i as the input embedding   -> thought i + 1      (i = 1 .. n - 1)
    pass n: thought n, [EOT], the rest          -> the logits of what follows

Pass i runs T iterations with stabiliser indices i·T + 1 .. i·T + T, so e_t and L_t are those of
the thought being made, the combine at a pass's first iteration mixes with the previous thought
(h0 is made from it), and with T > 1 every thought is itself refined by T depth iterations.
With no slots the thoughts loop is the depth loop. Training draws T from a
depth sampler and back-propagates through the last ``backprop_steps`` iterations only. Inference
stops at ``max_steps`` or earlier when the halting policy says so: halted samples leave the batch,
halted tokens are frozen. With a ``cache`` the pass continues a generation: the prompt's keys are
written once per iteration, and a decoding step runs the iterations over the new token only.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.utils.checkpoint
from torch import nn

from slr_zoo.backbones.cache import LoopKVCache
from slr_zoo.backbones.hf import Backbone, SequenceContext
from slr_zoo.bookkeeping import (
    BatchCompaction,
    HaltingTracker,
    OutputMixture,
    StepTrace,
    lazy,
)
from slr_zoo.decoders.base import Decoder
from slr_zoo.halting.base import HaltingPolicy
from slr_zoo.registry import ArgumentError, Registry
from slr_zoo.stabilizers import Combine, Injection, LoopLoRA, StepEmbedding


def _fully_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 sharded ``module``. Whoever sharded it imported FSDP; a recipe refused before
    any model is built is spared that import's 0.7 s."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


# ---------------------------------------------------------------------------------------------
# Training-time depth
# ---------------------------------------------------------------------------------------------
class DepthSampler(nn.Module):
    """How many loop steps a training batch runs. Draws from the generator it is given, so every
    rank (and a resumed run) draws the same depth for the same global step."""

    def __init__(self, max_steps: int = 1):
        super().__init__()
        self.max_steps = max_steps

    def sample(self, generator: torch.Generator) -> int:
        raise NotImplementedError


def _within(key: str, value: float, max_steps: int) -> None:
    # deeper training runs would silently reuse the last step embedding and LoRA adapter
    if not 1 <= value <= max_steps:
        raise ArgumentError(key, f"must be in [1, max_steps = {max_steps}] (the loop's max_steps), got {value}")


DEPTH_SAMPLERS = Registry("depth_sampler", DepthSampler, context=("max_steps",))


@DEPTH_SAMPLERS.register("fixed")
class FixedDepth(DepthSampler):
    """Always ``steps`` (default: the loop's ``max_steps``)."""

    def __init__(self, steps: int | None = None, max_steps: int = 1):
        super().__init__(max_steps)
        self.steps = steps or max_steps
        _within("steps", self.steps, max_steps)

    def sample(self, generator):
        return self.steps


@DEPTH_SAMPLERS.register("uniform")
class UniformDepth(DepthSampler):
    """Uniform over ``[low, high]`` (default ``[1, max_steps]``)."""

    def __init__(self, low: int = 1, high: int | None = None, max_steps: int = 1):
        super().__init__(max_steps)
        self.low, self.high = low, high or max_steps
        if not 1 <= self.low <= self.high:
            raise ArgumentError("low", f"need 1 <= low <= high, got low={low} high={self.high}")
        _within("high", self.high, max_steps)

    def sample(self, generator):
        return int(torch.randint(self.low, self.high + 1, (1,), generator=generator))


@DEPTH_SAMPLERS.register("lognormal_poisson")
class LogNormalPoissonDepth(DepthSampler):
    """Huginn's heavy-tailed depth: tau ~ N(log(mean) - sigma^2/2, sigma), T = Poisson(e^tau) + 1,
    capped at ``cap`` (default: ``max_steps``). ``mean`` defaults to half the cap."""

    def __init__(self, mean: float | None = None, sigma: float = 0.5, cap: int | None = None, max_steps: int = 1):
        super().__init__(max_steps)
        self.sigma, self.cap = sigma, cap or max_steps
        self.mean = mean if mean is not None else max(1.0, self.cap / 2)
        _within("cap", self.cap, max_steps)
        # a mean past the cap would clip nearly every draw to the cap: a fixed depth in disguise
        _within("mean", self.mean, self.cap)
        if sigma <= 0:
            raise ArgumentError("sigma", f"must be > 0, got {sigma}")

    def sample(self, generator):
        mu = math.log(self.mean) - 0.5 * self.sigma**2
        tau = torch.normal(torch.tensor([mu]), torch.tensor([self.sigma]), generator=generator)
        steps = int(torch.poisson(tau.exp(), generator=generator)) + 1
        return max(1, min(steps, self.cap))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
@dataclass
class LoopOutput:
    logits: torch.Tensor                       # [B, S, V] from the output state
    steps: torch.Tensor                        # [B] loop steps each sample used
    token_steps: torch.Tensor | None = None    # [B, S] per-token policies: each position's steps (pads 0)
    aux_loss: torch.Tensor | None = None       # the halting policy's regulariser
    first_graph_step: int = 1                  # iterations from this one on ran with autograd
    # training under a loss-mixing policy: (logits, weight) of every step with a graph
    loss_terms: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    sample_weights: torch.Tensor | None = None  # [B, T] a per-sample "state" policy's step weights
    # what `record` asked for, one entry per iteration run
    features: torch.Tensor | None = None       # [B, S, d] the decoder's features before the head, when asked
    # the positions `logits`, loss_terms and step_logits cover: None, all [B, S]; [K] columns, [B, K]; [B, S] bool, [N]
    logits_kept: torch.Tensor | None = None
    states: list[torch.Tensor] = field(default_factory=list)              # "states"
    initial_state: torch.Tensor | None = None                             # "states": h_0, the prelude's output
    step_logits: list[torch.Tensor | None] = field(default_factory=list)  # "logits", at logits_kept (None: no graph)
    norms: list[torch.Tensor] = field(default_factory=list)               # "stability": mean ||h_t||
    deltas: list[torch.Tensor] = field(default_factory=list)              # "stability": ||h_t - h_{t-1}|| / ||h_{t-1}||


class NonFiniteStateError(FloatingPointError):
    """The loop state became NaN or infinite; ``step`` says at which iteration."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"non-finite hidden state at loop iteration {step}")


class LoopedLM(nn.Module):
    def __init__(
        self,
        backbone: Backbone,
        *,
        max_steps: int,
        step_embedding: StepEmbedding,
        injection: Injection,
        loop_lora: LoopLoRA,
        combine: Combine,
        halting: HaltingPolicy,
        decoder: Decoder,
        depth_sampler: DepthSampler,
        backprop_steps: int | None = None,
        check_finite: bool = True,
        checkpoint_core: bool = False,
        state_noise: float = 0.0,
        mode: str = "depth",
        compile_core: bool = False,
    ):
        super().__init__()
        if mode not in ("depth", "thoughts"):
            raise ValueError(f"unknown loop mode {mode!r}; choose 'depth' or 'thoughts'")
        self.mode = mode
        self.backbone = backbone
        self.max_steps = max_steps
        self.step_embedding = step_embedding
        self.injection = injection
        self.loop_lora = loop_lora
        self.combine = combine
        self.halting = halting
        self.decoder = decoder
        self.depth_sampler = depth_sampler
        self.backprop_steps = backprop_steps
        self.check_finite = check_finite
        self.checkpoint_core = checkpoint_core  # recompute each core pass in backward (less memory)
        self.state_noise = state_noise          # training: perturb the state entering each step
        if compile_core:
            compile_shared_core(backbone.core)

    # ------------------------------------------------------------------ one iteration
    def step(self, h: torch.Tensor, h0: torch.Tensor, t: int, ctx: SequenceContext,
             noise_level: torch.Tensor | None = None, iteration: int | None = None) -> torch.Tensor:
        """Iteration t, the same in every loop mode: the step embedding e_t and the input
        injection make the core's input, the shared core runs with loop LoRA L_t active, and the
        combine merges its output with h0 and h_{t-1}. ``noise_level`` [B] (training with
        ``state_noise``): the input state is perturbed by Gaussian noise of that std, and the
        step embedding is told so; the combine still sees the clean h_{t-1}. ``iteration``: the
        depth iteration whose cache slots the core uses (default t; a thoughts pass continues
        iterations 1..T at stabiliser indices past T)."""
        x = h if noise_level is None else h + noise_level[:, None, None].to(h.dtype) * torch.randn_like(h)
        u = _shaped("step_embedding", self.step_embedding(x, t, noise_level=noise_level), h)
        u = _shaped("injection", self.injection(u, h0), h)
        ctx = ctx.at_step(t if iteration is None else iteration)
        if self.checkpoint_core and torch.is_grad_enabled():
            # the recomputation calls core_at again, which re-enters at_step(t)
            new = torch.utils.checkpoint.checkpoint(self.core_at, u, ctx, t, use_reentrant=False)
        else:
            new = self.core_at(u, ctx, t)
        return _shaped("combine", self.combine(new, h0, h, t), h)

    def core_at(self, u: torch.Tensor, ctx: SequenceContext, t: int) -> torch.Tensor:
        """One pass of the shared core with step t's adapters active."""
        with self.loop_lora.at_step(t):
            return self.backbone.core(u, ctx)

    # ------------------------------------------------------------------ the depth loop
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        steps: int | None = None,
        query_mask: torch.Tensor | None = None,
        real_mask: torch.Tensor | None = None,
        record: Iterable[str] = (),
        cache: LoopKVCache | None = None,
        halting: HaltingPolicy | None = None,
        compact: bool | None = None,
        slot_mask: torch.Tensor | None = None,
        replace: tuple[torch.Tensor, torch.Tensor] | None = None,
        step_offset: int = 0,
        features: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> LoopOutput:
        """``query_mask`` [B, S] bool: the positions a per-sample halting decision may read (the
        question up to its separator, so that teacher-forced validation equals greedy decoding);
        default: every real position. Under ``backbone.attention: prefix`` it is also the
        bidirectional question. ``real_mask`` [B, S] bool marks the real (unpadded) positions,
        default ``attention_mask``'s last S columns: a right-padded batch needs no attention mask
        under a causal model, but per-token halting must still know its pads, so that padding
        never changes a sample's steps.

        ``record``: per-iteration records to keep (``states``, ``logits``, ``stability``; see
        ``bookkeeping.StepTrace``). ``cache``: continue a generation at ``cache.length`` and write
        every iteration's keys and values into it; ``attention_mask`` then covers the cached
        positions too. ``halting`` replaces the model's policy for this pass (a generation replays
        the depth its prompt decided). ``compact``: let halted samples leave the batch (default:
        at inference).

        ``slot_mask`` [B, S] bool: continuous-thought slots (thoughts mode), the same columns in
        every row; the pass then runs the thoughts loop. ``replace`` = (vectors, where): input
        vectors in place of token embeddings; ``step_offset``: the stabiliser index before this
        pass's first iteration; ``features``: also return the decoder's features.

        ``logits_to_keep``: Hugging Face's convention, 0 computes the head's logits at every
        position, k > 0 at the last k, a 1-D tensor at those columns ([B, K, V]); and a [B, S] bool
        mask at its True entries ([N, V], row by row), which is what a loss over scattered answer
        tokens needs. With a large vocabulary the head is a large part of a step and its logits of
        its memory, while the loss and generation read a few positions. ``LoopOutput.logits_kept``
        says which were kept (``at_kept`` picks the same entries of a [B, S] tensor); recorded
        per-iteration logits (``record=("logits",)``) are kept at the same entries, since step
        supervision reads them where the answer loss reads the output. The thoughts loop keeps
        every position."""
        if slot_mask is not None and bool(slot_mask.any()):
            if self.mode != "thoughts":
                raise ValueError("a batch with thought slots needs loop.mode: thoughts")
            return self.thoughts(input_ids, attention_mask, slot_mask, steps=steps, query_mask=query_mask,
                                 real_mask=real_mask, record=record)
        backbone = self.backbone
        policy = self.halting if halting is None else halting
        T = steps or self.max_steps
        ctx = full_ctx = backbone.context(input_ids, attention_mask, prefix=query_mask, cache=cache)
        kept = _kept(logits_to_keep, input_ids.shape, input_ids.device)
        h0 = backbone.prelude(backbone.embed(input_ids, ctx, replace), ctx)
        query = _decision_positions(policy, input_ids, attention_mask, query_mask, real_mask)

        halted = HaltingTracker(policy, h0, query, T)
        mixture = OutputMixture(policy, h0, T)
        compaction = BatchCompaction(h0, enabled=not self.training if compact is None else compact)
        trace = StepTrace(record, compaction, self.training)
        first_graph_step = T - self.backprop_steps + 1 if self.training and self.backprop_steps else 1
        # robustness to a perturbed state (diffusion-style): one noise std per sample
        noise = h0.new_empty(h0.size(0)).uniform_(0, self.state_noise) if self.training and self.state_noise else None
        # under FSDP every rank must make every all-gather, so a diverged pass still runs to the end
        finish_first = _fully_sharded(self)
        nonfinite_at = None

        initial_state = h0 if "states" in trace.record else None
        h = h0
        grad = torch.is_grad_enabled()
        for t in range(1, T + 1):
            graph = grad and t >= first_graph_step
            with torch.set_grad_enabled(graph):
                h_next = self.step(h, h0, step_offset + t, ctx, noise, iteration=t)
            if self.check_finite and nonfinite_at is None and not torch.isfinite(h_next).all():
                if not finish_first:
                    raise NonFiniteStateError(t)
                nonfinite_at = t
            h_next = halted.freeze(h_next, h)
            logits = lazy(lambda s=h_next, c=ctx: self.decoder(s, backbone, c))
            # the head at the kept positions only, unless a policy has decoded every position
            kept_logits = logits if kept is None else lazy(
                lambda s=h_next, c=ctx, every=logits: at_kept(every(), kept) if every.computed()
                else self._head_at(s, backbone, c, kept))
            decision = halted.observe(t, h_next, h, logits)
            mixture.add(t, h_next, decision, logits)
            trace.add(h_next, h, kept_logits, graph)
            h, h0, ctx = compaction.step(t, h_next, h0, ctx, halted, mixture, logits)
            if h.size(0) == 0:
                break

        state, used, token_steps, weights, decoded = compaction.results(h, halted, mixture, logits)
        feats = self.decoder.features(state, backbone, full_ctx) if features else None
        if feats is not None:
            output = backbone.lm_head(at_kept(feats, kept))
        elif decoded is not None:
            output = at_kept(decoded, kept)
        elif kept is not None and mixture.mixture is None and not compaction.enabled and kept_logits.computed():
            output = kept_logits()  # the last iteration's, decoded for the trace
        elif kept is None:
            output = self.decoder(state, backbone, full_ctx)
        else:
            output = self._head_at(state, backbone, full_ctx, kept)
        loss_terms = mixture.loss_terms if kept is None else [
            (at_kept(lg, kept), at_kept(w if w.dim() == 2 else w[:, None].expand(input_ids.shape), kept))
            for lg, w in mixture.loss_terms]
        if nonfinite_at is not None:  # after the decoder: its coda layers are FSDP units too
            raise NonFiniteStateError(nonfinite_at)
        if cache is not None:
            cache.length = full_ctx.offset + input_ids.size(1)
        return LoopOutput(
            logits=output, steps=used, token_steps=token_steps, aux_loss=halted.aux_loss(),
            first_graph_step=first_graph_step if grad else T + 1,
            loss_terms=loss_terms, sample_weights=weights, features=feats, logits_kept=kept,
            states=trace.states, initial_state=initial_state, step_logits=trace.logits, norms=trace.norms,
            deltas=trace.deltas,
        )

    def _head_at(self, state: torch.Tensor, backbone, ctx, kept: torch.Tensor) -> torch.Tensor:
        """The decoder's logits at the ``kept`` positions only: its features (the coda runs over
        every position, which attention needs), then the head at the kept ones. A decoder without
        ``features`` gives every position's logits, picked."""
        if type(self.decoder).features is Decoder.features:
            return at_kept(self.decoder(state, backbone, ctx), kept)
        return backbone.lm_head(at_kept(self.decoder.features(state, backbone, ctx), kept))

    # ------------------------------------------------------------------ the thoughts loop
    def thoughts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, slot_mask: torch.Tensor,
                 steps: int | None = None, query_mask=None, real_mask=None, record: Iterable[str] = ()) -> LoopOutput:
        """Coconut's multi-pass forward (see the module docstring): one depth pass per thought
        over a differentiable cache, each thought the features of the position before its slot.
        The slots must fill the same contiguous columns of every row (``encoding.collate``
        aligns them by left padding)."""
        columns = slot_mask.any(dim=0).nonzero().squeeze(1)
        first, n = int(columns[0]), int(columns.numel())
        if int(columns[-1]) != first + n - 1 or not bool(slot_mask[:, first:first + n].all()):
            raise ValueError("thought slots must fill the same contiguous columns of every row of a batch")
        if first == 0:
            raise ValueError("a thought slot needs a position before it (the [BOT] its first thought is made at)")
        T = steps or self.max_steps
        B, S = input_ids.shape
        real = real_mask if real_mask is not None else (attention_mask.bool() if attention_mask is not None else None)
        cache = LoopKVCache(B, S, differentiable=torch.is_grad_enabled())
        bounds = [0, first] + [first + i for i in range(1, n)] + [S]
        passes, thought = [], None
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            replace = None
            if thought is not None:  # the pass's first column is thought i's slot
                where = torch.zeros((B, b - a), dtype=torch.bool, device=input_ids.device)
                where[:, 0] = slot_mask[:, a]
                replace = (thought[:, None, :].expand(B, b - a, -1), where)
            passes.append(self(
                input_ids[:, a:b], None if attention_mask is None else attention_mask[:, :b], steps=T,
                query_mask=None if query_mask is None else query_mask[:, a:b],
                real_mask=None if real is None else real[:, a:b], record=record, cache=cache,
                halting=self.halting, compact=False, replace=replace, step_offset=i * T, features=True,
            ))
            thought = passes[-1].features[:, -1]
        return _joined(passes)


def _kept(logits_to_keep: int | torch.Tensor, shape: torch.Size, device) -> torch.Tensor | None:
    """The positions ``logits_to_keep`` asks for (see ``LoopedLM.forward``), None for all."""
    length = shape[1]
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dtype == torch.bool:
            if logits_to_keep.shape != shape:
                raise ValueError(f"logits_to_keep as a mask must be [batch, positions] = {tuple(shape)}, "
                                 f"got {tuple(logits_to_keep.shape)}")
            return logits_to_keep.to(device)
        if logits_to_keep.dim() != 1:
            raise ValueError("logits_to_keep as positions must be 1-D (or a [batch, positions] bool mask), "
                             f"got shape {tuple(logits_to_keep.shape)}")
        return logits_to_keep.to(device=device, dtype=torch.long)
    if logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be >= 0 (0: every position), got {logits_to_keep}")
    if logits_to_keep == 0 or logits_to_keep >= length:
        return None
    return torch.arange(length - logits_to_keep, length, device=device)


def at_kept(x: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """The entries of ``x`` [B, S, ...] at ``LoopOutput.logits_kept``: all, [B, K, ...] at kept
    columns, or [N, ...] at a mask's True entries."""
    if kept is None:
        return x
    kept = kept.to(x.device)
    return x[kept] if kept.dtype == torch.bool else x[:, kept]


def thought_features(features: torch.Tensor, slot_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, n, d]: the n continuous thoughts of a thoughts forward, read from its ``features``
    [B, S, d] (thought t is made at the position before slot t: [BOT], then slot t - 1); None
    when the batch has no slots."""
    if slot_mask is None or not bool(slot_mask.any()):
        return None
    columns = slot_mask.any(dim=0).nonzero().squeeze(1)
    return features[:, columns - 1]


def compile_shared_core(core: nn.Module) -> None:
    """torch.compile the core in place (its state-dict keys unchanged), with dynamic shapes, so
    that a new batch size or sequence length does not recompile. The loop LoRA's hooks inside the
    core read the step as a tensor, so one compilation serves every iteration and depth."""
    core.compile(dynamic=True)


def _joined(passes: list[LoopOutput]) -> LoopOutput:
    """One output for the positions of all passes of a thoughts forward, in order."""
    def cat(items):
        return None if any(x is None for x in items) else torch.cat(items, dim=1)

    first = passes[0]
    per_step = lambda name: [cat(list(xs)) for xs in zip(*(getattr(p, name) for p in passes))]  # noqa: E731
    token_steps = cat([p.token_steps for p in passes])
    return LoopOutput(
        logits=cat([p.logits for p in passes]), steps=first.steps, token_steps=token_steps,
        aux_loss=None, first_graph_step=first.first_graph_step, features=cat([p.features for p in passes]),
        states=per_step("states"), step_logits=per_step("step_logits"),
        initial_state=cat([p.initial_state for p in passes]),
        norms=[torch.stack(x).mean() for x in zip(*(p.norms for p in passes))],
        deltas=[torch.stack(x).mean() for x in zip(*(p.deltas for p in passes))],
    )


def _shaped(kind: str, out, like: torch.Tensor) -> torch.Tensor:
    """A component's output, checked: a user component of the wrong shape is named here rather
    than failing as a size mismatch deep inside the next layer."""
    if not isinstance(out, torch.Tensor) or out.shape != like.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"loop component {kind} returned {got}; it must return a state of the shape it was given, "
                         f"[batch, positions, hidden] = {tuple(like.shape)}")
    return out


def _decision_positions(policy: HaltingPolicy, input_ids: torch.Tensor, attention_mask, query_mask,
                        real_mask) -> torch.Tensor:
    """[B, S] bool: what the halting policy decides for. A per-token policy decides for every
    real position (pads are done before the first step); a per-sample one reads the query."""
    if real_mask is None:
        length = input_ids.size(1)
        real_mask = attention_mask[:, -length:] if attention_mask is not None else torch.ones_like(input_ids)
    real = real_mask.bool()
    if policy.per_token or query_mask is None:
        return real
    return query_mask.bool().expand_as(real) & real
