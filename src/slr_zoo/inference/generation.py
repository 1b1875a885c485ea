"""Batched generation over the per-iteration key/value cache.

The prompt is prefilled once: the loop runs over it as in validation, writing every iteration's
keys and values (``LoopKVCache``). Each decoding step then runs the loop over the new token only,
reading the cache at each iteration. Hugging Face's conventions hold: left-padded batches, greedy
or sampled (temperature, top-k, top-p), ``max_new_tokens``, one EOS per sample (a finished sample
leaves the batch), on the model's device.

Depth follows the halting policy:

- **per sample** (``threshold``, ``kl`` or ``ponder`` per sample, ...): the decision reads the
  prompt only, so the depth the prefill decides is the depth of every token of that sample; the
  decoding steps replay it (:class:`ReplayHalting`) and finished samples leave the batch at their
  depth. This is exactly what re-running the loop on the whole sequence would do.
- **per token** (``kl``, ``threshold``, ``act``, ``exit_gate`` per token): every new token runs
  until its own exit (Huginn's zero-shot adaptive compute). What later tokens read at the
  iterations it skipped is the cache strategy's choice (``inference/strategies.py``).

``use_cache=False`` re-runs the loop on the whole sequence for every token: the reference that
cached generation is tested against, and the baseline of ``benchmarks/generation.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slr_zoo.backbones.cache import LoopKVCache
from slr_zoo.halting.base import Decision, HaltingPolicy
from slr_zoo.inference.strategies import CACHE_STRATEGIES, CacheStrategy


@dataclass
class Generated:
    sequences: torch.Tensor    # [B, P + N]: the (left-padded) prompts, then the new tokens (pad after EOS)
    new_tokens: torch.Tensor   # [B, N]
    token_steps: torch.Tensor  # [B, N] loop iterations that computed each new token (0 after EOS)
    lengths: torch.Tensor      # [B] new tokens per sample, its EOS included
    logits: torch.Tensor | None = None  # [B, N, V] with output_logits: the scores each new token came from

    def per_sample(self) -> tuple[list[list[int]], list[list[int]]]:
        """(new token ids, iterations per token) of each sample, up to and including its EOS."""
        ids = [row[:n].tolist() for row, n in zip(self.new_tokens, self.lengths)]
        steps = [row[:n].tolist() for row, n in zip(self.token_steps, self.lengths)]
        return ids, steps


class ReplayHalting(HaltingPolicy):
    """Each sample stops at the iteration ``depth`` its prompt decided, with the per-step output
    weights ``weights`` [B, T] of a per-sample mixing policy (ACT), so that every later token of
    the sample is computed at the depth, and mixed with the weights, that a full re-run of the
    loop would give it."""

    def __init__(self, policy: HaltingPolicy, depth: torch.Tensor, weights: torch.Tensor | None = None):
        super().__init__()
        self.mixes = policy.mixes
        self.depth, self.weights = depth, weights

    def start(self, h0, query):
        state = {"query": query, "depth": self.depth}
        if self.weights is not None:
            state["weights"] = self.weights
        return state

    def observe(self, state, t, h, prev, logits, last):
        weight = state["weights"][:, t - 1] if "weights" in state else None
        return Decision(done=state["depth"] <= t, weight=weight)

    def select(self, keep: torch.Tensor) -> "ReplayHalting":
        weights = None if self.weights is None else self.weights[keep]
        return ReplayHalting(self, self.depth[keep], weights)


def next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B] the next token of each row from its last-position logits [B, V]."""
    if not do_sample:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k:
        kth = scores.topk(min(top_k, scores.size(-1)), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = scores.sort(dim=-1, descending=True)
        mass = ordered.softmax(-1).cumsum(-1)
        drop = mass - ordered.softmax(-1) >= top_p  # keep the smallest prefix that reaches top_p
        scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)


def _check(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use do_sample=False for greedy decoding")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@torch.no_grad()
def generate_ids(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    steps: int | None = None,
    halting: HaltingPolicy | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    cache_strategy: str | CacheStrategy = "latest",
    use_cache: bool = True,
    output_logits: bool = False,
    thoughts: int = 0,
    after_thoughts: list[int] | None = None,
    query_mask: torch.Tensor | None = None,
) -> Generated:
    """Generate up to ``max_new_tokens`` after each left-padded prompt of ``input_ids`` [B, P]
    (``attention_mask`` marks its real tokens) with a LoopedLM in eval mode. ``steps``: loop depth
    (default: the model's ``max_steps``); ``halting``: a policy other than the model's.
    ``query_mask`` [B, P]: the question (the positions per-sample halting reads, and under prefix
    attention the part that attends both ways), default the whole prompt; a prompt that ends in
    markers after its question ([BOT], pause slots) marks the question alone, as in training.
    ``output_logits``: keep the logits each new token was chosen
    from (Hugging Face's ``output_logits``).

    ``thoughts`` (``loop.mode: thoughts``): continuous thoughts made after the prompt, each the
    features of the position before it fed back as the next input embedding, then the tokens
    ``after_thoughts`` ([EOT]) are fed before the first generated token; every later pass uses
    the stabiliser indices of the last thought's pass, as in training."""
    _check(temperature, top_k, top_p, max_new_tokens)
    if model.training:
        raise ValueError("generate with the model in eval mode (model.eval()): training mode never "
                         "lets halted samples leave the batch, and keeps dropout on")
    strategy = CACHE_STRATEGIES.get(cache_strategy)() if isinstance(cache_strategy, str) else cache_strategy
    policy = model.halting if halting is None else halting
    T = steps or model.max_steps
    B, P = input_ids.shape
    device = input_ids.device
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    if not bool(mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: the last position of every row must be a real token")
    eos = torch.tensor([] if eos_token_id is None else
                       [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    # under a per-token policy a strategy may keep halted tokens running; samples always leave at their depth
    compact = strategy.compact or not policy.per_token

    def depth_of_last(out) -> torch.Tensor:
        return out.token_steps[:, -1] if policy.per_token else out.steps

    after = list(after_thoughts or [])
    if (thoughts or after) and not use_cache:
        raise ValueError("continuous thoughts are made over the cache; use_cache=False cannot make them")
    cache = LoopKVCache(B, P + thoughts + len(after) + max_new_tokens) if use_cache else None
    question = mask.bool() if query_mask is None else query_mask.bool() & mask.bool()
    out = model(input_ids, mask, steps=T, query_mask=question, halting=policy, cache=cache, compact=compact,
                features=thoughts > 0, logits_to_keep=1)
    plan: HaltingPolicy = policy
    if use_cache:
        if policy.per_token:
            strategy.after_pass(cache, out.steps, T, 0, P)
        else:
            plan = ReplayHalting(policy, out.steps, out.sample_weights)
    offset = 0  # the stabiliser index before each later pass's first iteration
    for i in range(1, thoughts + 1):
        extra = after if i == thoughts else []
        chunk = torch.tensor([[pad_token_id] + extra], dtype=torch.long, device=device).expand(B, -1)
        where = torch.zeros(chunk.shape, dtype=torch.bool, device=device)
        where[:, 0] = True
        vectors = out.features[:, -1:].expand(B, chunk.size(1), -1)
        mask = torch.cat([mask, mask.new_ones(B, chunk.size(1))], dim=1)
        offset = i * T
        out = model(chunk, mask, steps=T, halting=plan, cache=cache, compact=compact, replace=(vectors, where),
                    step_offset=offset, features=i < thoughts, logits_to_keep=1)
    if after and not thoughts:
        chunk = torch.tensor([after], dtype=torch.long, device=device).expand(B, -1)
        mask = torch.cat([mask, mask.new_ones(B, chunk.size(1))], dim=1)
        out = model(chunk, mask, steps=T, halting=plan, cache=cache, compact=compact, logits_to_keep=1)

    alive = torch.arange(B, device=device)
    new_tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    token_steps = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    ids = input_ids
    logits, used = out.logits[:, -1], depth_of_last(out)
    scores = logits.new_zeros((B, max_new_tokens, logits.size(-1))) if output_logits else None
    for n in range(max_new_tokens):
        token = next_tokens(logits, do_sample, temperature, top_k, top_p, generator)
        if scores is not None:
            scores[alive, n] = logits
        new_tokens[alive, n] = token
        token_steps[alive, n] = used
        ended = torch.isin(token, eos)
        lengths[alive[ended]] = n + 1
        if n == max_new_tokens - 1 or bool(ended.all()):
            break
        if bool(ended.any()):  # finished samples leave the batch for good
            keep = (~ended).nonzero().squeeze(1)
            alive, token, mask, ids, question = alive[keep], token[keep], mask[keep], ids[keep], question[keep]
            if use_cache:
                cache.keep_rows(keep)
                if isinstance(plan, ReplayHalting):
                    plan = plan.select(keep)
        mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
        if use_cache:
            out = model(token[:, None], mask, steps=T, halting=plan, cache=cache, compact=compact, step_offset=offset,
                        logits_to_keep=1)
            if policy.per_token:
                strategy.after_pass(cache, out.steps, T, cache.length - 1, cache.length)
        else:
            ids = torch.cat([ids, token[:, None]], dim=1)
            question = torch.cat([question, question.new_zeros(question.size(0), 1)], dim=1)
            out = model(ids, mask, steps=T, query_mask=question, halting=policy, logits_to_keep=1)
        logits, used = out.logits[:, -1], depth_of_last(out)
    return Generated(torch.cat([input_ids, new_tokens], dim=1), new_tokens, token_steps, lengths, scores)
