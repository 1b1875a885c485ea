"""The looped language model: one file, read top to bottom.

    h0 = prelude(x)
    h  = h0
    for t in 1..T while not halted:
        u  = injection(step_embedding(h, t), h0)
        h' = core(u)               with loop-wise LoRA L_t active
        h  = combine(h', h0, h, t)
        halting.observe(t, h, ...)
    logits = decoder(output state)

Training draws T from a depth sampler and back-propagates through the last ``backprop_steps``
iterations only. Inference stops at ``max_steps`` or earlier when the halting policy says so:
halted samples leave the batch, halted tokens are frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from slr_zoo.backbones.hf import Backbone, SequenceContext
from slr_zoo.decoders.base import Decoder
from slr_zoo.halting.base import HaltingPolicy
from slr_zoo.registry import Registry
from slr_zoo.stabilizers import Combine, Injection, LoopLoRA, StepEmbedding


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


def _within(key: str, value: int, max_steps: int) -> None:
    # deeper training runs would silently reuse the last step embedding and LoRA adapter
    if not 1 <= value <= max_steps:
        raise ValueError(f"depth_sampler.{key} must be in [1, loop.max_steps = {max_steps}], got {value}")


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
            raise ValueError(f"depth_sampler: need 1 <= low <= high, got low={low} high={self.high}")
        _within("high", self.high, max_steps)

    def sample(self, generator):
        return int(torch.randint(self.low, self.high + 1, (1,), generator=generator))


@DEPTH_SAMPLERS.register("lognormal_poisson")
class LogNormalPoissonDepth(DepthSampler):
    """Huginn's heavy-tailed depth: tau ~ N(log(mean) - sigma^2/2, sigma), T = Poisson(e^tau) + 1,
    capped at ``cap`` (default: ``max_steps``)."""

    def __init__(self, mean: float = 4.0, sigma: float = 0.5, cap: int | None = None, max_steps: int = 1):
        super().__init__(max_steps)
        self.mean, self.sigma, self.cap = mean, sigma, cap or max_steps
        _within("cap", self.cap, max_steps)

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
    aux_loss: torch.Tensor | None = None       # the halting policy's regulariser
    step_logits: list[torch.Tensor] = field(default_factory=list)   # per step, when mixes == "loss" or decode_steps
    step_weights: list[torch.Tensor] = field(default_factory=list)  # per step, when mixes == "loss"
    step_reach: list[torch.Tensor] = field(default_factory=list)    # per step [B, S] reach-probe logits, with probe_steps
    token_steps: torch.Tensor | None = None    # [B, S] for per-token policies
    states: list[torch.Tensor] = field(default_factory=list)       # per step, with keep_states
    norms: list[torch.Tensor] = field(default_factory=list)        # per step mean ||h_t||
    deltas: list[torch.Tensor] = field(default_factory=list)       # per step ||h_t - h_{t-1}|| / ||h_{t-1}||


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
        debug_nan_at_step: int | None = None,
        checkpoint_core: bool = False,
        state_noise: float = 0.0,
        reach_probe: bool = False,
    ):
        super().__init__()
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
        self.debug_nan_at_step = debug_nan_at_step  # plants a NaN in training, to test the guards
        self.checkpoint_core = checkpoint_core      # recompute each core pass in backward (less memory)
        self.state_noise = state_noise              # training: perturb the state entering each step
        # loop.reach_supervision: reads from each iteration's state, per token, whether the
        # reasoning has reached that token's concept yet (a trained probe, not part of the answer path)
        d = backbone.hidden_size
        self.reach_probe = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1)) if reach_probe else None
        # finish the pass before raising NonFiniteStateError: under FSDP a rank that left the
        # forward early would skip collectives (all-gathers of later units) the others make
        self.finish_on_nonfinite = False

    def core_at(self, u: torch.Tensor, ctx: SequenceContext, t: int) -> torch.Tensor:
        """One pass of the shared core with step t's adapters active."""
        with self.loop_lora.at_step(t):
            return self.backbone.core(u, ctx)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        steps: int | None = None,
        keep_states: bool = False,
        query_mask: torch.Tensor | None = None,
        real_mask: torch.Tensor | None = None,
        decode_steps: bool = False,
        probe_steps: bool = False,
    ) -> LoopOutput:
        """``query_mask`` [B, S] bool: the positions a per-sample halting decision may read (the
        question up to its separator, so that teacher-forced validation equals greedy decoding);
        default: every real position. ``real_mask`` [B, S] bool marks the real (unpadded)
        positions, default ``attention_mask``: a right-padded batch needs no attention mask under
        a causal model, but per-token halting must still know its pads, so that padding never
        changes a sample's steps. ``decode_steps``: keep every step's decoded logits in
        ``step_logits`` (per-iteration supervision); ``probe_steps``: every step's reach-probe
        logits in ``step_reach`` (training only: at inference halted samples leave the batch).
        Under ``backbone.attention: prefix``, ``query_mask`` is also the bidirectional question."""
        backbone, policy = self.backbone, self.halting
        T = steps or self.max_steps
        if probe_steps and self.reach_probe is None:
            raise ValueError("probe_steps needs a model built with reach_probe=True (loop.reach_supervision > 0)")
        ctx = full_ctx = backbone.context(input_ids, attention_mask, prefix=query_mask)
        h0 = backbone.prelude(backbone.embed(input_ids, ctx), ctx)
        h = h0
        if real_mask is None:
            real_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        real = real_mask.bool()
        # a per-token policy decides for every real position; pads are done before the first step
        query = real if policy.per_token or query_mask is None else query_mask.bool().expand_as(input_ids) & real
        track = _Track(policy, h0, T, compact=not self.training, keep_states=keep_states, query=query,
                       decode_steps=decode_steps)
        first_grad_step = T - self.backprop_steps + 1 if self.training and self.backprop_steps else 1
        # robustness to a perturbed state (diffusion-style): sigma per sample, told to the step embedding
        sigma = h0.new_empty(h0.size(0)).uniform_(0, self.state_noise) if self.training and self.state_noise else None
        nonfinite_at = None
        step_reach: list[torch.Tensor] = []

        for t in range(1, T + 1):
            with torch.set_grad_enabled(torch.is_grad_enabled() and t >= first_grad_step):
                if sigma is None:
                    u = self.injection(self.step_embedding(h, t), h0)
                else:
                    noisy = h + sigma[:, None, None].to(h.dtype) * torch.randn_like(h)
                    u = self.injection(self.step_embedding(noisy, t, noise_level=sigma), h0)
                if self.checkpoint_core and torch.is_grad_enabled():
                    # the recomputation calls core_at again, which re-enters at_step(t)
                    new = torch.utils.checkpoint.checkpoint(self.core_at, u, ctx, t, use_reentrant=False)
                else:
                    new = self.core_at(u, ctx, t)
                h_next = self.combine(new, h0, h, t)
                if self.training and t == self.debug_nan_at_step:
                    h_next = h_next + float("nan")
            if self.check_finite and nonfinite_at is None and not torch.isfinite(h_next).all():
                if not self.finish_on_nonfinite:
                    raise NonFiniteStateError(t)
                nonfinite_at = t
            h_next = track.freeze(h_next, h)
            if probe_steps and torch.is_grad_enabled():
                step_reach.append(self.reach_probe(h_next).squeeze(-1))
            logits_fn = _lazy(lambda s=h_next, c=ctx: self.decoder(s, backbone, c))
            decision = policy.observe(track.state, t, h_next, h, logits_fn, last=t == T)
            track.record(t, h_next, h, decision, logits_fn)
            h, h0, ctx = track.compact(t, h_next, h0, ctx, logits_fn)
            if h.size(0) == 0:
                break

        logits = track.decoded_output()
        if logits is None:
            logits = self.decoder(track.output(), backbone, full_ctx)
        if nonfinite_at is not None:
            raise NonFiniteStateError(nonfinite_at)
        return LoopOutput(
            logits=logits,
            steps=track.steps,
            aux_loss=policy.aux_loss(track.state),
            step_logits=track.step_logits,
            step_weights=track.step_weights,
            step_reach=step_reach,
            token_steps=track.token_steps,
            states=track.states,
            norms=track.norms,
            deltas=track.deltas,
        )


# ---------------------------------------------------------------------------------------------
# Bookkeeping: which samples are still running, frozen tokens, output mixtures
# ---------------------------------------------------------------------------------------------
def _lazy(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
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


class _Track:
    """Everything the loop must remember across steps, kept out of the loop body."""

    def __init__(self, policy: HaltingPolicy, h0: torch.Tensor, T: int, compact: bool, keep_states: bool,
                 query: torch.Tensor, decode_steps: bool = False):
        B, S, _ = h0.shape
        self.policy, self.T, self.keep_states, self.decode_steps = policy, T, keep_states, decode_steps
        self.compact_batch = compact
        self.state = policy.start(h0, query)
        self.active = torch.arange(B, device=h0.device)          # original row of each running row
        self.steps = torch.full((B,), T, dtype=torch.long, device=h0.device)
        self.final = h0.new_zeros(h0.shape) if compact else None  # output rows of halted samples
        self.mixture = h0.new_zeros(h0.shape, dtype=torch.float32) if policy.mixes == "state" else None
        self.frozen = ~query if policy.per_token else None            # pads never run
        self.token_steps = torch.where(query, T, 0) if policy.per_token else None
        self.done = torch.zeros(B, dtype=torch.bool, device=h0.device)
        self.last_h = h0
        # logits a policy already decoded at each sample's halting step (inference, e.g. `kl`),
        # so the output is not decoded a second time
        self.final_logits: torch.Tensor | None = None
        self.decoded = torch.zeros(B, dtype=torch.bool, device=h0.device)
        self.last_logits_fn: Callable[[], torch.Tensor] | None = None
        self.step_logits: list[torch.Tensor] = []
        self.step_weights: list[torch.Tensor] = []
        self.states: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []
        self.deltas: list[torch.Tensor] = []

    def freeze(self, h_next: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Tokens that halted earlier keep their state; so do halted samples in training, where
        they still run (at inference they have left the batch)."""
        halted = self.frozen if self.frozen is not None else self.done[:, None]
        if not halted.any():
            return h_next
        return torch.where(halted[..., None], h, h_next)

    def record(self, t, h_next, h, decision, logits_fn) -> None:
        with torch.no_grad():
            self.norms.append(h_next.detach().float().norm(dim=-1).mean())
            change = (h_next - h).float().norm(dim=-1) / h.float().norm(dim=-1).clamp_min(1e-6)
            self.deltas.append(change.mean())
        if self.keep_states:
            self.states.append(self._scatter(h_next.detach()))
        done = decision.done
        if self.policy.per_token and done is not None:
            newly = done & ~self.frozen
            self.token_steps[self.active] = torch.where(newly, t, self.token_steps[self.active])
            self.frozen = self.frozen | done
            done = self.frozen.all(dim=1)
        if done is not None:
            newly = done & ~self.done
            self.steps[self.active[newly]] = t
            self.done = self.done | done
        if self.mixes("state"):
            w = decision.weight if decision.weight.dim() == 2 else decision.weight[:, None]
            self.mixture = self.mixture.index_add(0, self.active, (w[..., None] * h_next).to(self.mixture.dtype))
        if (self.mixes("loss") or self.decode_steps) and torch.is_grad_enabled():
            self.step_logits.append(logits_fn())
            if self.mixes("loss"):
                self.step_weights.append(decision.weight)
        self.last_h = h_next
        self.last_logits_fn = logits_fn

    def mixes(self, kind: str) -> bool:
        return self.policy.mixes == kind

    def compact(self, t, h, h0, ctx, logits_fn):
        """At inference, halted samples leave the batch; their output state is stored, and so are
        its logits when the policy decoded them this step."""
        if not self.compact_batch:
            return h, h0, ctx
        finished = self.done | (t == self.T)
        if not finished.any():
            return h, h0, ctx
        rows = self.active[finished]
        self.final[rows] = h[finished].to(self.final.dtype)
        if self.mixture is None and logits_fn.computed():
            logits = logits_fn()
            if self.final_logits is None:
                self.final_logits = logits.new_zeros((self.final.size(0), *logits.shape[1:]))
            self.final_logits[rows] = logits[finished]
            self.decoded[rows] = True
        keep = (~finished).nonzero().squeeze(1)
        self.active = self.active[keep]
        self.done = self.done[keep]
        if self.frozen is not None:
            self.frozen = self.frozen[keep]
        self.state = {k: v.index_select(0, keep) if torch.is_tensor(v) and v.dim() > 0 else v
                      for k, v in self.state.items()}
        return h[keep], h0[keep], ctx.select(keep)

    def decoded_output(self) -> torch.Tensor | None:
        """The output logits, if already decoded in this grad mode: at inference, at each sample's
        halting step; in training, at the last step (whose state is the output)."""
        if self.mixture is not None:
            return None
        if self.compact_batch:
            return self.final_logits if self.final_logits is not None and bool(self.decoded.all()) else None
        fn = self.last_logits_fn
        return fn() if fn is not None and fn.computed() else None

    def output(self) -> torch.Tensor:
        if self.mixture is not None:
            return self.mixture.to(self.last_h.dtype)
        return self.final if self.final is not None else self.last_h

    def _scatter(self, h: torch.Tensor) -> torch.Tensor:
        """A full-batch copy of a (possibly compacted) state; halted rows hold their final state."""
        if not self.compact_batch:
            return h
        full = self.final.clone()
        full[self.active] = h.to(full.dtype)
        return full
