"""Halting policies: the arithmetic of each member on hand-worked cases, the loop's bookkeeping
(compaction, freezing, mixtures) against a slow reference, gradients, and causality."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import VOCAB, tiny_model, tiny_recipe
from slr_zoo.registry import ComponentError
from slr_zoo.halting import HALTING, HaltingPolicy
from slr_zoo.halting.act import ACTHalting
from slr_zoo.halting.exit_gate import ExitGateHalting
from slr_zoo.halting.kl import KLHalting
from slr_zoo.halting.ponder import PonderHalting
from slr_zoo.halting.threshold import ThresholdHalting
from slr_zoo.tasks.encoding import IGNORE
from slr_zoo.training.module import question_mask
from slr_zoo.training.objectives.answer import answer_loss


def states_with_logits(z: torch.Tensor, scale: float = 10.0) -> torch.Tensor:
    """States [..., 2] on which a halting unit with weight [scale, 0] and bias 0 outputs exactly z:
    (x, sqrt(2 - x^2)) has unit RMS, so the unit's normalisation leaves x = z / scale unchanged."""
    x = z / scale
    return torch.stack([x, (2 - x**2).sqrt()], dim=-1)


def set_unit(policy, scale: float = 10.0) -> None:
    with torch.no_grad():
        policy.unit.linear.weight.copy_(torch.tensor([[scale, 0.0]]))
        policy.unit.linear.bias.zero_()


def drive(policy: HaltingPolicy, hs: list[torch.Tensor], logits=None, query=None):
    """Feed a policy a sequence of states directly; returns its decisions and final state."""
    B, S = hs[0].shape[:2]
    query = torch.ones(B, S, dtype=torch.bool) if query is None else query
    state = policy.start(hs[0], query)
    decisions, prev = [], hs[0]
    for t, h in enumerate(hs, start=1):
        fn = (lambda t=t: logits[t - 1]) if logits is not None else None
        decisions.append(policy.observe(state, t, h, prev, fn, last=t == len(hs)))
        prev = h
    return decisions, state


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# ------------------------------------------------------------------ ACT
def test_act_hand_worked_weights_remainder_and_ponder_cost():
    # three tokens, lambdas per step: halts at 3 with R = 0.2; at 1 with R = 1; runs out at T = 3
    lams = torch.tensor([[0.3, 0.5, 0.4], [0.995, 0.5, 0.5], [0.1, 0.1, 0.1]])
    z = torch.tensor([[logit(p) for p in row] for row in lams.tolist()])
    hs = [states_with_logits(z[:, t])[None] for t in range(3)]           # [1, 3 tokens, 2]
    policy = ACTHalting(hidden_size=2, tau=0.5, epsilon=0.01)
    set_unit(policy)
    decisions, state = drive(policy, hs)
    weights = torch.stack([d.weight[0] for d in decisions], dim=-1)       # [3 tokens, 3 steps]
    expected = torch.tensor([[0.3, 0.5, 0.2], [1.0, 0.0, 0.0], [0.1, 0.1, 0.8]])
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3), atol=1e-6, rtol=0)
    assert [d.done[0].tolist() for d in decisions] == [[False, True, False], [False, True, False], [True, True, True]]
    # ponder cost N + R per token: 3.2, 2.0, 3.8, averaged and scaled by tau
    torch.testing.assert_close(policy.aux_loss(state), torch.tensor(0.5 * (3.2 + 2.0 + 3.8) / 3), atol=1e-5, rtol=0)


def test_act_weights_sum_to_one_per_token_for_random_units():
    torch.manual_seed(0)
    policy = ACTHalting(hidden_size=8, epsilon=0.05)
    torch.nn.init.normal_(policy.unit.linear.weight, std=1.0)
    hs = [torch.randn(4, 7, 8) for _ in range(5)]
    decisions, _ = drive(policy, hs)
    total = sum(d.weight for d in decisions)
    torch.testing.assert_close(total, torch.ones(4, 7), atol=1e-6, rtol=0)
    assert all(d.weight.dtype == torch.float32 for d in decisions)


def test_act_output_is_the_weighted_mixture_of_the_states():
    torch.manual_seed(0)
    model = tiny_model(tiny_recipe(loop__halting={"name": "act", "epsilon": 0.05}, loop__max_steps=4))
    torch.nn.init.normal_(model.halting.unit.linear.weight, std=2.0)
    ids = torch.randint(4, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        out = model(ids, record=("states",))
        decisions, _ = drive(model.halting, out.states)
        mixture = sum(d.weight[..., None] * h for d, h in zip(decisions, out.states))
        ctx = model.backbone.context(ids)
        expected = model.decoder(mixture, model.backbone, ctx)
    assert len({tuple(r) for r in out.token_steps.tolist()}) > 1 or out.token_steps.min() < 4
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ PonderNet and Ouro's exit gate
@pytest.mark.parametrize("granularity", ["sample", "token"])
def test_ponder_exit_distribution_sums_to_one_at_max_steps(granularity):
    torch.manual_seed(0)
    policy = PonderHalting(hidden_size=8, granularity=granularity).train()
    torch.nn.init.normal_(policy.unit.linear.weight, std=1.0)
    hs = [torch.randn(4, 6, 8) for _ in range(5)]
    decisions, _ = drive(policy, hs)
    total = sum(d.weight for d in decisions)
    shape = (4, 6) if granularity == "token" else (4,)
    torch.testing.assert_close(total, torch.ones(shape), atol=1e-6, rtol=0)
    assert all(d.done is None for d in decisions)  # training never halts: every step runs


def test_ponder_kl_to_the_truncated_geometric_prior():
    lams = [0.3, 0.6, 0.5]
    z = torch.tensor([[logit(p) for p in lams]])
    hs = [states_with_logits(z[:, t])[:, None] for t in range(3)]        # [1 sample, 1 position, 2]
    policy = PonderHalting(hidden_size=2, beta=0.7, prior=0.25, granularity="sample").train()
    set_unit(policy)
    decisions, state = drive(policy, hs)
    p = torch.tensor([0.3, 0.7 * 0.6, 0.7 * 0.4])                          # the last step takes the rest
    prior = torch.tensor([0.25, 0.75 * 0.25, 0.75**2])
    torch.testing.assert_close(torch.cat([d.weight for d in decisions]), p, atol=1e-6, rtol=0)
    kl = (p * (p / prior).log()).sum()
    torch.testing.assert_close(policy.aux_loss(state), 0.7 * kl, atol=1e-6, rtol=0)
    # a unit that outputs the prior's lambda everywhere has nothing to pay
    with torch.no_grad():
        policy.unit.linear.weight.zero_()
        policy.unit.linear.bias.fill_(logit(0.25))
    _, state = drive(policy, hs)
    assert abs(policy.aux_loss(state).item()) < 1e-6


def test_exit_gate_entropy_bonus_and_q_exit():
    lams = [0.2, 0.25, 0.5, 0.5]   # CDF: 0.2, 0.4, 0.7, 1.0
    z = torch.tensor([[logit(p) for p in lams]])
    hs = [states_with_logits(z[:, t])[:, None] for t in range(4)]
    policy = ExitGateHalting(hidden_size=2, beta=0.3, granularity="token", q=0.6).train()
    set_unit(policy)
    decisions, state = drive(policy, hs)
    p = torch.tensor([0.2, 0.8 * 0.25, 0.6 * 0.5, 0.3])
    torch.testing.assert_close(torch.cat([d.weight.flatten() for d in decisions]), p, atol=1e-6, rtol=0)
    torch.testing.assert_close(policy.aux_loss(state), 0.3 * (p * p.log()).sum(), atol=1e-6, rtol=0)
    policy.eval()
    decisions, state = drive(policy, hs)
    assert [bool(d.done) for d in decisions] == [False, False, True, True]   # first CDF >= 0.6 at step 3
    assert policy.aux_loss(state) is None


# ------------------------------------------------------------------ KL (Huginn) and threshold
def two_class_logits(probs: list[float]) -> list[torch.Tensor]:
    return [torch.tensor([[[math.log(p), math.log(1 - p)]]]) for p in probs]


def kl_two(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_kl_halts_exactly_when_the_kl_falls_below_the_threshold():
    probs = [0.5, 0.6, 0.64, 0.656, 0.667, 0.6755]
    kls = [kl_two(a, b) for a, b in zip(probs, probs[1:])]
    # successive KLs straddle Huginn's 5e-4 between the 3rd and the 4th, with room for fp32 rounding
    assert kls[2] > 5.5e-4 and 4.5e-4 > kls[3] > kls[4]
    hs = [torch.zeros(1, 1, 4)] * len(probs)
    decisions, _ = drive(KLHalting(), hs, logits=two_class_logits(probs))
    # step t compares p_{t-1} with p_t (KL index t-2): the first KL below 5e-4 is at t = 5
    assert [bool(d.done) for d in decisions] == [False, False, False, False, True, True]
    # a threshold just under the smallest KL never halts; just over it halts at its step only
    decisions, _ = drive(KLHalting(threshold=kls[4] * 0.97), hs, logits=two_class_logits(probs))
    assert not any(bool(d.done) for d in decisions)
    decisions, _ = drive(KLHalting(threshold=kls[4] * 1.03), hs, logits=two_class_logits(probs))
    assert [bool(d.done) for d in decisions] == [False] * 5 + [True]


def test_per_sample_kl_at_the_separator_reads_only_the_decision_position():
    """``granularity: sample, reduce: last``: each sample halts on the KL at its last question
    position alone; what the other positions do, settled or not, does not matter."""
    probs = [0.5, 0.6, 0.64, 0.656, 0.667, 0.6755]          # settles under 5e-4 at step 5
    noisy = [0.1, 0.9, 0.1, 0.9, 0.1, 0.9]                  # never settles
    query = torch.tensor([[True, True, True, False], [True, True, False, False]])  # decide at 2 and 1
    logits = []
    for p, q in zip(probs, noisy):
        rows = [[q, q, p, q], [q, p, q, q]]
        logits.append(torch.tensor([[[math.log(x), math.log(1 - x)] for x in row] for row in rows]))
    hs = [torch.zeros(2, 4, 4)] * len(probs)
    decisions, _ = drive(KLHalting(granularity="sample", reduce="last"), hs, logits=logits, query=query)
    assert [d.done.tolist() for d in decisions] == [[False, False]] * 4 + [[True, True]] * 2
    decisions, _ = drive(KLHalting(granularity="sample", reduce="max"), hs, logits=logits, query=query)
    assert not any(d.done.any() for d in decisions)         # max over the question: the noisy ones count


def test_threshold_policy_reads_only_the_query_positions():
    policy = ThresholdHalting(epsilon=0.1)          # per sample, max over the question
    h0 = torch.ones(2, 4, 3)
    h1 = h0.clone()
    h1[:, 3] *= 2                                   # position 3 moves a lot; 0..2 not at all
    query = torch.tensor([[True, True, True, False], [True, True, True, True]])
    state = policy.start(h0, query)
    decision = policy.observe(state, 1, h1, h0, None, last=False)
    assert decision.done.tolist() == [True, False]
    cosine = ThresholdHalting(epsilon=1e-6, metric="cosine", granularity="token")
    decision = cosine.observe(cosine.start(h0, query), 1, h1, h0, None, last=False)
    assert decision.done.all()                      # doubling a vector keeps its direction


# ------------------------------------------------------------------ the loop: compaction, freezing
def pick_threshold(values: torch.Tensor) -> float:
    """A threshold that splits the observed values, so samples halt at different steps."""
    return float(values.flatten().median())


@pytest.mark.parametrize("member", ["threshold", "kl", "act"])
def test_compaction_matches_running_each_sample_alone(member):
    torch.manual_seed(0)
    T = 5
    ids = torch.randint(4, VOCAB, (6, 10), generator=torch.Generator().manual_seed(3))
    query = torch.arange(10) <= torch.tensor([5, 6, 7, 5, 6, 9])[:, None]
    base = tiny_model(tiny_recipe(loop__max_steps=T, loop__combine={"name": "residual_previous", "alpha": 0.5}))
    base.eval()
    with torch.no_grad():
        ref = base(ids, record=("states",))
    if member == "threshold":
        policy = ThresholdHalting(epsilon=1.0)
        changes = torch.stack([policy.over_query({"query": query}, policy.change(b, a), "max")
                               for a, b in zip(ref.states, ref.states[1:])])
        policy.epsilon = pick_threshold(changes)
    elif member == "kl":
        policy = KLHalting(threshold=1.0)
        with torch.no_grad():
            ctx = base.backbone.context(ids)
            lps = [F.log_softmax(base.decoder(h, base.backbone, ctx), -1) for h in ref.states]
        kls = torch.stack([(a.exp() * (a - b)).sum(-1) for a, b in zip(lps, lps[1:])])
        policy.threshold = pick_threshold(kls.amax(dim=-1))   # a sample halts when all its tokens have
    else:
        policy = ACTHalting(hidden_size=32, epsilon=0.05, init_bias=0.5)
        torch.nn.init.normal_(policy.unit.linear.weight, std=0.2)
    base.halting = policy
    with torch.no_grad():
        out = base(ids, query_mask=query)
    assert 1 < len(set(out.steps.tolist())), out.steps          # samples really halt at different steps
    assert out.steps.min() < T
    for i in range(ids.size(0)):
        with torch.no_grad():
            if member == "threshold":     # the reference: no halting at all, stopped at the sample's step
                base.halting = HALTING.build({"name": "fixed"})
                alone = base(ids[i : i + 1], steps=int(out.steps[i]))
                base.halting = policy
            else:
                alone = base(ids[i : i + 1], query_mask=query[i : i + 1])
                assert int(alone.steps) == int(out.steps[i])
        torch.testing.assert_close(out.logits[i : i + 1], alone.logits, atol=1e-6, rtol=1e-5)
        assert torch.equal(out.logits[i].argmax(-1), alone.logits[0].argmax(-1))


def test_compaction_runs_fewer_rows_and_stops_when_all_halted():
    model = tiny_model(tiny_recipe(loop__max_steps=6, loop__halting={"name": "threshold", "epsilon": 1e9}))
    model.eval()
    calls = []
    model.backbone.core.register_forward_hook(lambda m, i, o: calls.append(o.size(0)))
    with torch.no_grad():
        out = model(torch.randint(4, VOCAB, (3, 8)))
    assert calls == [3] and out.steps.tolist() == [1, 1, 1]    # everyone halts at step 1: one core pass


def test_a_policy_that_decodes_each_step_is_not_decoded_again_for_the_output():
    model = tiny_model(tiny_recipe(loop__max_steps=4, loop__halting={"name": "kl", "threshold": -1.0}))
    model.eval()
    decodes = []
    model.decoder.register_forward_hook(lambda m, i, o: decodes.append(o.size(0)))
    ids = torch.randint(4, VOCAB, (3, 8))
    with torch.no_grad():
        out = model(ids, record=("states",))
        assert decodes == [3, 3, 3, 3]                     # one decode per step, none after the loop
        again = model.decoder(out.states[-1], model.backbone, model.backbone.context(ids))
    torch.testing.assert_close(out.logits, again)


def test_training_runs_every_step_for_every_sample_and_freezes_halted_ones():
    model = tiny_model(tiny_recipe(loop__max_steps=4, loop__halting={"name": "threshold", "epsilon": 1e9}))
    model.train()
    calls = []
    model.backbone.core.register_forward_hook(lambda m, i, o: calls.append(o.size(0)))
    ids = torch.randint(4, VOCAB, (3, 8))
    out = model(ids, record=("states",))
    assert calls == [3, 3, 3, 3]                                  # mask, do not skip
    assert all(torch.equal(s, out.states[0]) for s in out.states)  # halted at step 1, then frozen
    assert out.steps.tolist() == [1, 1, 1]


# ------------------------------------------------------------------ causality: teacher forcing == greedy
@pytest.mark.parametrize("member", ["threshold", "ponder", "act", "kl", "exit_gate"])
def test_decisions_never_read_the_answer(member):
    """Changing tokens after the separator changes neither the steps of a per-sample decision nor
    any logit at or before the separator: so teacher-forced accuracy equals greedy decoding."""
    torch.manual_seed(0)
    node = {"name": member}
    if member == "threshold":
        node["epsilon"] = 0.3
    if member == "kl":
        node["threshold"] = 0.05
    model = tiny_model(tiny_recipe(loop__max_steps=5, loop__halting=node))
    if hasattr(model.halting, "unit"):
        torch.nn.init.normal_(model.halting.unit.linear.weight, std=3.0)
    model.eval()
    sep = 6
    a = torch.randint(4, VOCAB, (4, 10), generator=torch.Generator().manual_seed(5))
    b = a.clone()
    b[:, sep + 1 :] = torch.randint(4, VOCAB, (4, 10 - sep - 1), generator=torch.Generator().manual_seed(6))
    labels = torch.full_like(a, IGNORE)
    labels[:, sep:] = 1
    query = question_mask(labels)
    assert query[0].tolist() == [True] * (sep + 1) + [False] * (10 - sep - 1)
    with torch.no_grad():
        out_a, out_b = model(a, query_mask=query), model(b, query_mask=query)
    torch.testing.assert_close(out_a.logits[:, : sep + 1], out_b.logits[:, : sep + 1], atol=1e-6, rtol=1e-5)
    if not model.halting.per_token:
        assert torch.equal(out_a.steps, out_b.steps)
    else:
        assert torch.equal(out_a.token_steps[:, : sep + 1], out_b.token_steps[:, : sep + 1])


def test_question_mask_ends_at_the_separator():
    labels = torch.tensor([[IGNORE, IGNORE, 7, 3, IGNORE], [IGNORE, 5, 2, IGNORE, IGNORE], [IGNORE] * 5])
    assert question_mask(labels).int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


# ------------------------------------------------------------------ every member: train and eval
def member_nodes():
    """Every registered member with its defaults, and with its other granularity if it has one."""
    for name in HALTING.names():
        yield {"name": name}
        params = inspect.signature(HALTING.get(name).__init__).parameters
        if "granularity" in params:
            yield {"name": name, "granularity": "sample" if params["granularity"].default == "token" else "token"}


@pytest.mark.parametrize("node", list(member_nodes()), ids=lambda n: "-".join(map(str, n.values())))
def test_every_member_trains_and_evaluates(node):
    torch.manual_seed(0)
    model = tiny_model(tiny_recipe(loop__max_steps=3, loop__halting=node))
    ids = torch.randint(4, VOCAB, (4, 10), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, IGNORE)
    labels[:, 6:9] = ids[:, 7:10]
    model.train()
    out = model(ids, query_mask=question_mask(labels))
    loss = answer_loss(out, labels) + (0 if out.aux_loss is None else out.aux_loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    for name, p in model.halting.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{node}: {name} got no gradient"
    if model.halting.mixes == "loss":
        weights = [w for _, w in out.loss_terms]
        torch.testing.assert_close(sum(weights), torch.ones_like(weights[0]), atol=1e-6, rtol=0)
    model.eval()
    with torch.no_grad():
        out = model(ids, query_mask=question_mask(labels))
    assert out.logits.shape == (4, 10, VOCAB) and torch.isfinite(out.logits).all()
    assert ((1 <= out.steps) & (out.steps <= 3)).all()


@pytest.mark.parametrize("node", list(member_nodes()), ids=lambda n: "-".join(map(str, n.values())))
def test_every_parameter_is_in_the_graph_even_at_depth_one(node):
    """DDP (find_unused_parameters=False) needs every parameter used at every sampled depth."""
    model = tiny_model(tiny_recipe(loop__max_steps=3, loop__halting=node)).train()
    ids = torch.randint(4, VOCAB, (2, 8))
    labels = torch.full_like(ids, IGNORE)
    labels[:, 5:] = ids[:, 5:]
    out = model(ids, steps=1, query_mask=question_mask(labels))
    (answer_loss(out, labels) + (0 if out.aux_loss is None else out.aux_loss)).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["act", "ponder", "exit_gate", "kl", "threshold"])
def test_decisions_and_accumulators_are_float32_under_bf16_autocast(name):
    torch.manual_seed(0)
    model = tiny_model(tiny_recipe(loop__max_steps=3, loop__halting={"name": name}))
    ids = torch.randint(4, VOCAB, (2, 8))
    model.train()
    seen = []
    observe = model.halting.observe

    def spy(state, t, h, prev, logits, last):
        decision = observe(state, t, h, prev, logits, last)
        seen.append((decision, {k: v.dtype for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}))
        return decision

    model.halting.observe = spy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
    for decision, dtypes in seen:
        assert decision.weight is None or decision.weight.dtype == torch.float32
        assert all(d == torch.float32 for d in dtypes.values()), dtypes
    assert out.aux_loss is None or out.aux_loss.dtype == torch.float32


@pytest.mark.parametrize("node, key", [
    ({"name": "act", "granularity": "batch"}, "granularity"),
    ({"name": "ponder", "prior": 1.5}, "prior"),
    ({"name": "exit_gate", "q": 0.0}, "q"),
    ({"name": "ponder", "inference": "median"}, "inference"),
])
def test_bad_arguments_fail_with_the_dotted_key(node, key):
    with pytest.raises(ComponentError, match=rf"^loop\.halting\.{key}: (must be|expected)"):
        HALTING.build(node, "loop.halting", hidden_size=4, max_steps=3)


def test_ponder_sampled_exit_follows_the_exit_distribution():
    """inference: sample stops at step t with probability lambda_t, i.e. draws the exit step from p."""
    lams = [0.3, 0.5, 0.4]
    z = torch.tensor([logit(p) for p in lams])
    n = 20000
    hs = [states_with_logits(z[t].expand(n))[:, None] for t in range(3)]
    policy = PonderHalting(hidden_size=2, inference="sample").eval()
    set_unit(policy)
    torch.manual_seed(0)
    decisions, _ = drive(policy, hs)
    done = torch.stack([d.done for d in decisions], dim=1)           # [n, 3]
    first = done.int().argmax(dim=1)                                   # exit step - 1
    observed = torch.bincount(first, minlength=3).float() / n
    expected = torch.tensor([0.3, 0.7 * 0.5, 0.7 * 0.5])
    torch.testing.assert_close(observed, expected, atol=0.015, rtol=0)


# ------------------------------------------------------------------ the depth metric
def test_depth_histogram_counts_and_sums_across_ranks():
    from slr_zoo.metrics.depth import DepthHistogram

    rank0, rank1 = DepthHistogram(max_steps=4), DepthHistogram(max_steps=4)
    rank0.update(torch.tensor([1, 4, 4, 2]))
    rank1.update(torch.tensor([4, 3]))
    assert rank0.counts.tolist() == [1, 1, 0, 2]
    rank0.merge_state(rank1)   # combines states with the metric's dist_reduce_fx, as the DDP sync does
    assert rank0.compute().tolist() == [1, 1, 1, 3]


# ------------------------------------------------------------------ padding changes nothing
PER_TOKEN = [
    {"name": "act", "epsilon": 0.05, "init_bias": 0.0},
    {"name": "exit_gate", "q": 0.5},
    {"name": "kl", "threshold": 1e-3},
    {"name": "threshold", "epsilon": 0.5, "granularity": "token"},
]


@pytest.mark.parametrize("node", PER_TOKEN, ids=lambda n: n["name"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_changes_neither_steps_nor_aux_loss_of_per_token_policies(node, side):
    torch.manual_seed(0)
    model = tiny_model(tiny_recipe(loop__max_steps=6, loop__halting=node))
    if hasattr(model.halting, "unit"):           # a unit that reads the state, so tokens differ
        torch.nn.init.normal_(model.halting.unit.linear.weight, std=1.0)
    ids = torch.randint(4, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    pad = torch.zeros(1, 5, dtype=torch.long)
    padded = torch.cat([ids, pad], 1) if side == "right" else torch.cat([pad, ids], 1)
    real = padded != 0 if side == "right" else torch.arange(12)[None] >= 5
    kwargs = {"real_mask": real} if side == "right" else {"attention_mask": real.long()}
    for training in (False, True):
        model.train(training)
        with torch.no_grad():
            alone, batched = model(ids), model(padded, **kwargs)
        assert batched.steps.tolist() == alone.steps.tolist()
        keep = real[0]
        assert torch.equal(batched.token_steps[0, keep], alone.token_steps[0])
        assert (batched.token_steps[0, ~keep] == 0).all()             # pads never ran
        if alone.aux_loss is not None:
            torch.testing.assert_close(batched.aux_loss, alone.aux_loss)


def test_kl_output_under_bf16_autocast_has_the_precision_of_a_fixed_depth_run():
    torch.manual_seed(0)
    model = tiny_model(tiny_recipe(loop__max_steps=3, loop__halting={"name": "kl", "threshold": -1.0}))
    model.eval()
    ids = torch.randint(4, VOCAB, (2, 8))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        halting = model(ids).logits
        model.halting = HALTING.build({"name": "fixed"})
        fixed = model(ids).logits
    assert halting.dtype == fixed.dtype == torch.bfloat16
    assert torch.equal(halting, fixed)


@pytest.mark.parametrize("name", ["ponder", "exit_gate"])
def test_loss_mixing_policies_decode_the_last_state_once_in_training(name):
    model = tiny_model(tiny_recipe(loop__max_steps=4, loop__halting={"name": name}))
    model.train()
    decodes = []
    model.decoder.register_forward_hook(lambda m, i, o: decodes.append(o.size(0)))
    out = model(torch.randint(4, VOCAB, (3, 8)))
    assert len(decodes) == 4                                   # one per step, none extra
    assert out.logits is out.loss_terms[-1][0] and out.logits.requires_grad
