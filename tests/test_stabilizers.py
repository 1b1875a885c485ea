"""The stabiliser zoo: step embeddings, injections, loop-wise LoRA, combines.

Cases are generated from the registries, so a newly registered member is built, run forward and
backward (fp32 and bf16 autocast, past its trained step count) and checked for recipe validation
the day it lands; ``EXTRA`` adds the settings of shipped members worth covering separately.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_model, tiny_recipe

from slr_zoo.recipe import build_backbone, build_model, expand, load, validate
from slr_zoo.registry import ComponentError
from slr_zoo.stabilizers import COMBINES, INJECTIONS, LOOP_LORAS, STEP_EMBEDDINGS
from slr_zoo.linears import weight_matrix

REGISTRIES = {
    "step_embedding": STEP_EMBEDDINGS,
    "injection": INJECTIONS,
    "loop_lora": LOOP_LORAS,
    "combine": COMBINES,
}

EXTRA = {
    ("step_embedding", "learned"): [{"mode": "concat"}, {"mode": "concat", "dim": 8}, {"noise_level": True}],
    ("step_embedding", "sinusoidal"): [{"mode": "concat", "dim": 8, "features": 16},
                                       {"noise_level": True, "mlp_hidden": 16}],
    ("injection", "concat"): [{"init": "identity"}, {"init": "random", "bias": True}],
    ("injection", "diagonal"): [{"a_init": 2.0, "dt_init": 0.1}],
    ("loop_lora", "per_step"): [{"targets": ["all-linear"], "rank": 2, "dropout": 0.1}, {"rank": 2, "norms": True}],
    ("loop_lora", "shared_scaled"): [{"targets": ["attention_output", "mlp"], "rank": 2}],
    ("combine", "none"): [{"norm": True}],
    ("combine", "residual_initial"): [{"alpha": 0.7, "learn_alpha": True}],
    ("combine", "residual_previous"): [{"alpha": 0.3, "learn_alpha": True, "norm": True}],
    ("combine", "learned"): [{"alpha": 0.7, "learn_alpha": True, "norm": True}],
    ("combine", "gated"): [{"alpha": 0.8, "learn_alpha": False}],
}

CASES = [
    pytest.param(kind, {"name": name, **extra}, id=f"{kind}-{name}-{i}")
    for kind, registry in REGISTRIES.items()
    for name in registry.names()
    for i, extra in enumerate([{}] + EXTRA.get((kind, name), []))
]


def model_with(kind: str, node: dict, seed: int = 0, **overrides):
    if node.get("noise_level"):  # the noise input needs a noisy state in training
        overrides.setdefault("loop__state_noise", 0.1)
    return tiny_model(tiny_recipe(**{f"loop__{kind}": node}, **overrides), seed=seed)


@torch.no_grad()
def perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Move every parameter off its (often neutral, often zero) init, as training would."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)


def loss_of(model, tokens, steps=None):
    logits = model(tokens, steps=steps).logits
    targets = torch.randint(0, VOCAB, logits.shape[:2], generator=torch.Generator().manual_seed(2))
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


# ---------------------------------------------------------------------------------------------
# Every member: built from a recipe, forward + backward, fp32 and bf16, past max_steps
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, precision", [("llama", "fp32"), ("llama", "bf16-autocast"), ("qwen2", "fp32"),
                                               ("mistral", "fp32"), ("gpt2", "fp32")])
@pytest.mark.parametrize("kind,node", CASES)
def test_member_runs_forward_backward_beyond_trained_steps(kind, node, family, precision, tokens):
    model = model_with(kind, node, backbone__name=family)
    part = getattr(model, kind)
    perturb(part)
    steps = model.max_steps + 2  # two iterations past the trained count
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"):
        out = model(tokens, steps=steps)
        loss = loss_of(model, tokens, steps=steps)
    assert out.logits.shape == (*tokens.shape, VOCAB)
    assert torch.isfinite(out.logits.float()).all()
    loss.backward()
    for name, p in part.named_parameters():
        assert p.grad is not None, f"{kind}.{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{kind}.{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{kind}.{name} got an all-zero gradient"


@pytest.mark.parametrize("kind,node", CASES)
def test_member_rejects_unknown_and_mistyped_keys(kind, node):
    import inspect
    import typing

    with pytest.raises(ComponentError, match=rf"loop\.{kind}\.bogus_key: unknown key"):
        tiny_recipe(**{f"loop__{kind}": {**node, "bogus_key": 1}})
    with pytest.raises(ComponentError, match=rf"loop\.{kind}\.hidden_size: is set by the model"):
        tiny_recipe(**{f"loop__{kind}": {**node, "hidden_size": 8}})
    # every typed argument refuses a value of another type, naming the key and the type it wanted
    cls = REGISTRIES[kind].get(node["name"])
    hints = typing.get_type_hints(cls.__init__)
    for key in inspect.signature(cls.__init__).parameters:
        if key in REGISTRIES[kind].context or key not in hints:
            continue
        wrong = 2.5 if hints[key] in (str, bool) or typing.get_origin(hints[key]) is typing.Literal else "text"
        if hints[key] is float or hints[key] == typing.Optional[float]:
            wrong = "text"
        with pytest.raises(ComponentError, match=rf"loop\.{kind}\.{key}: expected"):
            tiny_recipe(**{f"loop__{kind}": {**node, key: wrong}})


@pytest.mark.parametrize(
    "kind,key,value",
    [("combine", "alpha", "high"), ("step_embedding", "mode", "multiply"), ("loop_lora", "rank", 2.5),
     ("loop_lora", "targets", "q_proj"), ("injection", "dt_init", "fast")],
)
def test_validation_names_the_dotted_key_of_a_bad_value(kind, key, value):
    name = {"combine": "residual_initial", "step_embedding": "learned", "loop_lora": "per_step",
            "injection": "diagonal"}[kind]
    with pytest.raises(ComponentError, match=rf"loop\.{kind}\.{key}: expected"):
        tiny_recipe(**{f"loop__{kind}": {"name": name, key: value}})


@pytest.mark.parametrize("kind,node", [c for c in CASES if c.values[0] != "loop_lora"])
def test_member_works_on_single_position_states(kind, node):
    """thoughts mode feeds one position at a time: [B, 1, D] states must work like any other."""
    model = model_with(kind, node)
    part = getattr(model, kind)
    perturb(part)
    torch.manual_seed(3)
    h, h0, prev = (torch.randn(2, 1, 32) for _ in range(3))
    for t in (1, model.max_steps + 1):
        out = {"step_embedding": lambda: part(h, t), "injection": lambda: part(h, h0),
               "combine": lambda: part(h, h0, prev, t)}[kind]()
        assert out.shape == (2, 1, 32)
        # position-wise: a position's output does not depend on which other positions are present
        wide = {"step_embedding": lambda: part(torch.cat([h, h], 1), t),
                "injection": lambda: part(torch.cat([h, h], 1), torch.cat([h0, h0], 1)),
                "combine": lambda: part(torch.cat([h, h], 1), torch.cat([h0, h0], 1), torch.cat([prev, prev], 1), t),
                }[kind]()
        torch.testing.assert_close(wide[:, :1], out)


def test_loop_lora_on_single_position_inputs():
    model = model_with("loop_lora", {"name": "per_step", "targets": ["all-linear"]})
    perturb(model.loop_lora)
    out = model(torch.tensor([[5], [7]]), steps=4)
    assert out.logits.shape == (2, 1, VOCAB)


# ---------------------------------------------------------------------------------------------
# Neutral settings are exact
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["residual_initial", "residual_previous"])
def test_alpha_one_equals_no_combine(name, tokens):
    base = model_with("combine", {"name": "none"})(tokens).logits
    assert torch.equal(model_with("combine", {"name": name, "alpha": 1.0})(tokens).logits, base)


def test_learned_combine_starts_as_residual_initial(tokens):
    a = model_with("combine", {"name": "residual_initial", "alpha": 0.7})(tokens).logits
    c = model_with("combine", {"name": "learned", "alpha": 0.7})(tokens).logits
    assert torch.equal(c, a)
    a = model_with("combine", {"name": "residual_initial", "alpha": 0.7, "learn_alpha": True})(tokens).logits
    c = model_with("combine", {"name": "learned", "alpha": 0.7, "learn_alpha": True})(tokens).logits
    assert torch.equal(c, a)
    base = model_with("combine", {"name": "none"})(tokens).logits
    assert torch.equal(model_with("combine", {"name": "learned", "alpha": 1.0})(tokens).logits, base)


def test_gated_starts_as_residual_previous_with_its_alpha(tokens):
    b = model_with("combine", {"name": "residual_previous", "alpha": 0.8})(tokens).logits
    g = model_with("combine", {"name": "gated", "alpha": 0.8})(tokens).logits
    torch.testing.assert_close(g, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["learned", "sinusoidal"])
@pytest.mark.parametrize("noise", [False, True])
def test_add_mode_starts_with_zero_embedding_equal_to_none(name, noise, tokens):
    base = model_with("step_embedding", {"name": "none"})
    model = model_with("step_embedding", {"name": name, "mode": "add", "noise_level": noise})
    model.eval(), base.eval()  # inference: no state noise, whatever loop.state_noise says
    assert torch.equal(model(tokens).logits, base(tokens).logits)
    h = torch.randn(3, 10, 32)
    assert torch.equal(model.step_embedding(h, 2, noise_level=torch.rand(3)), h)


@pytest.mark.parametrize("name", ["learned", "sinusoidal"])
@pytest.mark.parametrize("dim", [None, 8, 48])
def test_concat_mode_keeps_width_and_starts_as_identity(name, dim, tokens):
    node = {"name": name, "mode": "concat", **({"dim": dim} if dim else {})}
    model = model_with("step_embedding", node)
    emb = model.step_embedding
    h = torch.randn(3, 10, 32)
    for t in (1, 2, 9):
        out = emb(h, t)
        assert out.shape == h.shape
        assert torch.equal(out, h)
    assert torch.equal(model(tokens).logits, model_with("step_embedding", {"name": "none"})(tokens).logits)
    perturb(emb)
    assert emb(h, 1).shape == h.shape and not torch.equal(emb(h, 1), emb(h, 2))


def test_add_mode_rejects_a_dim():
    with pytest.raises(ValueError, match=r"loop\.step_embedding\.dim: applies to mode=concat"):
        model_with("step_embedding", {"name": "learned", "mode": "add", "dim": 8})


def test_learned_steps_past_the_table_reuse_the_last_row():
    emb = model_with("step_embedding", {"name": "learned"}).step_embedding
    perturb(emb)
    h = torch.randn(2, 4, 32)
    T = emb.table.size(0)
    assert not torch.equal(emb(h, T - 1), emb(h, T))
    assert torch.equal(emb(h, T + 5), emb(h, T))


def test_sinusoidal_extrapolates_past_max_steps():
    emb = model_with("step_embedding", {"name": "sinusoidal"}).step_embedding
    perturb(emb)
    h = torch.randn(2, 4, 32)
    outs = [emb(h, t) for t in range(1, 9)]  # max_steps = 3
    assert all(torch.isfinite(o).all() for o in outs)
    assert all(not torch.equal(a, b) for a, b in zip(outs, outs[1:]))


@pytest.mark.parametrize("name", ["learned", "sinusoidal"])
def test_noise_level_accepts_scalar_per_sample_and_per_token(name):
    emb = model_with("step_embedding", {"name": name, "noise_level": True}).step_embedding
    perturb(emb)
    h = torch.randn(3, 5, 32)
    clean = emb(h, 2)
    assert torch.equal(emb(h, 2, noise_level=0.0), clean)  # sigma = 0 is a clean state
    for sigma in (0.5, torch.tensor([0.0, 0.5, 1.0]), torch.rand(3, 5)):
        out = emb(h, 2, noise_level=sigma)
        assert out.shape == h.shape and not torch.equal(out, clean)
    emb(h, 2, noise_level=torch.rand(3)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in emb.parameters())
    per_sample = emb(h, 2, noise_level=torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(per_sample[0], clean[0])
    torch.testing.assert_close(per_sample[1], emb(h, 2, noise_level=0.5)[1])


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("name", ["per_step", "shared_scaled"])
def test_fresh_loop_lora_is_bit_identical_to_none(name, dropout, tokens):
    base = model_with("loop_lora", {"name": "none"})
    lora = model_with("loop_lora", {"name": name, "targets": ["all-linear"], "dropout": dropout})
    for train in (True, False):
        base.train(train), lora.train(train)
        assert torch.equal(lora(tokens, steps=5).logits, base(tokens, steps=5).logits)
    # hooks leave the backbone's state-dict keys as they were
    assert list(lora.backbone.state_dict()) == list(base.backbone.state_dict())


def test_injection_concat_starts_as_add_or_identity(tokens):
    add = model_with("injection", {"name": "add"})(tokens).logits
    none = model_with("injection", {"name": "none"})(tokens).logits
    assert torch.equal(model_with("injection", {"name": "concat"})(tokens).logits, add)
    assert torch.equal(model_with("injection", {"name": "concat", "init": "identity"})(tokens).logits, none)


def test_diagonal_injection_is_contractive_and_matches_its_formula():
    inj = model_with("injection", {"name": "diagonal", "a_init": 2.0, "dt_init": 0.25}).injection
    h, h0 = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    torch.testing.assert_close(inj(h, h0), math.exp(-0.5) * h + 0.25 * h0)
    m = inj.monitors()
    assert m["contraction_max"] == pytest.approx(math.exp(-0.5), rel=1e-6)
    with torch.no_grad():  # whatever the parameters become, the carry-over stays in (0, 1)
        inj.log_A.copy_(torch.linspace(-30, 30, 32))
        inj.dt_raw.copy_(torch.linspace(30, -30, 32))
    decay = inj.decay()
    assert (decay > 0).all() and (decay <= 1).all() and inj.dt().gt(0).all()


# ---------------------------------------------------------------------------------------------
# Loop-wise LoRA: gradients, step selection, targets
# ---------------------------------------------------------------------------------------------
def lora_grads(model, tokens):
    model.zero_grad()
    loss_of(model, tokens, steps=model.max_steps).backward()
    return model.loop_lora


def test_per_step_lora_every_step_gets_gradient(tokens):
    model = model_with("loop_lora", {"name": "per_step", "targets": ["all-linear"], "rank": 4})
    T = model.max_steps
    # at init B = 0: dL/dB_t is non-zero for every step but dL/dA_t = (...) B_t is exactly zero
    lora = lora_grads(model, tokens)
    for key, stack in lora.adapters.items():
        for t in range(T):
            assert stack.B.grad[t].abs().sum() > 0, f"{key} B_{t + 1}"
            assert torch.equal(stack.A.grad[t], torch.zeros_like(stack.A.grad[t])), f"{key} A_{t + 1}"
    # one optimiser step moves every B_t off zero; from then on every A_t and B_t gets a gradient
    torch.optim.AdamW(lora.parameters(), lr=1e-3).step()
    lora = lora_grads(model, tokens)
    for key, stack in lora.adapters.items():
        for t in range(T):
            assert stack.A.grad[t].abs().sum() > 0, f"{key} A_{t + 1}"
            assert stack.B.grad[t].abs().sum() > 0, f"{key} B_{t + 1}"


def test_shared_scaled_lora_every_scale_gets_gradient(tokens):
    model = model_with("loop_lora", {"name": "shared_scaled", "targets": ["q_proj", "down_proj"]})
    perturb(model.loop_lora)
    lora = lora_grads(model, tokens)
    assert all(g != 0 for g in lora.step_scale.grad)
    for stack in lora.adapters.values():
        assert stack.A.grad.abs().sum() > 0 and stack.B.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["per_step", "shared_scaled"])
def test_lora_selects_the_step_and_reuses_the_last_past_it(name, tokens):
    model = model_with("loop_lora", {"name": name, "targets": ["all-linear"]})
    lora, backbone = model.loop_lora, model.backbone
    perturb(lora)
    ctx = backbone.context(tokens)
    u = backbone.prelude(backbone.embed(tokens, ctx), ctx)
    plain = backbone.core(u, ctx)  # outside at_step the hooks add nothing
    model.loop_lora.remove()
    assert torch.equal(backbone.core(u, ctx), plain)
    model = model_with("loop_lora", {"name": name, "targets": ["all-linear"]})
    perturb(model.loop_lora)
    outs = [model.core_at(u, ctx, t) for t in range(1, model.max_steps + 3)]
    T = model.max_steps
    assert all(not torch.equal(outs[t], outs[t + 1]) for t in range(T - 1))
    assert torch.equal(outs[T], outs[T - 1]) and torch.equal(outs[T + 1], outs[T - 1])


def test_copied_model_carries_its_own_adapters(tokens):
    import copy

    model = model_with("loop_lora", {"name": "per_step"})
    reference = model(tokens).logits
    clone = copy.deepcopy(model)
    perturb(clone.loop_lora)
    assert torch.equal(model(tokens).logits, reference)  # the copy's hooks use the copy's adapters
    assert not torch.equal(clone(tokens).logits, reference)


def test_unknown_lora_target_lists_the_linears():
    with pytest.raises(ComponentError) as err:
        model_with("loop_lora", {"name": "per_step", "targets": ["q_proj", "qkv"]})
    message = str(err.value)
    assert message.startswith("loop.loop_lora.targets: 'qkv' matches no linear layer")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "all-linear"):
        assert name in message


def test_lora_targets_gpt2_conv1d():
    model = model_with("loop_lora", {"name": "per_step", "targets": ["c_attn", "mlp.c_proj"], "rank": 2},
                       backbone={"name": "gpt2", "hidden_size": 32, "heads": 2, "prelude_layers": 1,
                                 "core_layers": 1, "coda_layers": 1})
    assert sorted(model.loop_lora.target_modules) == ["layers.0.attn.c_attn", "layers.0.mlp.c_proj"]
    assert model.loop_lora.adapters["layers-0-attn-c_attn"].B.shape == (3, 96, 2)


# ---------------------------------------------------------------------------------------------
# Relaxed Recursive Transformers: share: average + SVD-initialised per-step LoRA
# ---------------------------------------------------------------------------------------------
LLAMA = {"name": "llama", "hidden_size": 32, "heads": 2, "intermediate_size": 48}
GPT2 = {"name": "gpt2", "hidden_size": 32, "heads": 2, "intermediate_size": 48}


def relaxed(backbone: dict, core_layers: int, loops: int, rank: int, targets=("all-linear",)):
    recipe = tiny_recipe(
        backbone={**backbone, "prelude_layers": 1, "core_layers": core_layers, "coda_layers": 1,
                  "share": "average", "loops": loops},
        loop__max_steps=loops,
        loop__loop_lora={"name": "per_step", "rank": rank, "targets": list(targets), "init": "svd"},
    )
    torch.manual_seed(0)
    return build_model(recipe, build_backbone(recipe, vocab_size=VOCAB))


@pytest.mark.parametrize("backbone", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("core_layers,loops", [(1, 3), (2, 2)])
def test_full_rank_svd_lora_restores_every_replaced_layer(backbone, core_layers, loops):
    model = relaxed(backbone, core_layers, loops, rank=32)  # 32 = min(out, in) of every linear here
    lora, replaced = model.loop_lora, model.backbone.replaced_layers
    assert len(replaced) == core_layers * loops and len(lora.target_modules) >= 4
    for name, module in lora.target_modules.items():
        _, j, rest = name.split(".", 2)
        for t in range(1, loops + 1):
            original = weight_matrix(replaced[(t - 1) * core_layers + int(j)].get_submodule(rest))
            torch.testing.assert_close(lora.effective_weight(name, t), original, rtol=0, atol=2e-6)
        # the averaged core is what every step shares
        mean = torch.stack([weight_matrix(replaced[i * core_layers + int(j)].get_submodule(rest))
                            for i in range(loops)]).mean(0)
        torch.testing.assert_close(weight_matrix(module), mean)


def test_truncated_svd_lora_is_the_best_rank_r_approximation():
    model = relaxed(LLAMA, 1, 3, rank=4, targets=["q_proj"])
    lora, replaced = model.loop_lora, model.backbone.replaced_layers
    shared = weight_matrix(lora.target_modules["layers.0.self_attn.q_proj"])
    for t in range(1, 4):
        diff = replaced[t - 1].self_attn.q_proj.weight - shared
        s = torch.linalg.svdvals(diff.double())
        err = (lora.effective_weight("layers.0.self_attn.q_proj", t) - replaced[t - 1].self_attn.q_proj.weight).double()
        # Eckart-Young: the residual's Frobenius norm is that of the dropped singular values
        assert torch.linalg.norm(err).item() == pytest.approx(s[4:].norm().item(), rel=1e-4)


def test_whitened_init_gives_each_step_the_stand_in_best_on_its_own_inputs():
    """init_from_replaced with input moments: step t's adapter on each linear is, on that
    linear's own inputs, the best rank-r stand-in for (original layer t - shared), and so better
    there than the plain SVD init."""
    model = relaxed(LLAMA, 1, 3, rank=4)
    lora = model.loop_lora
    plain = {key: lora.effective_weight(key[1], key[0]).detach().clone() for key in lora.replaced_linears()}
    g = torch.Generator().manual_seed(1)
    inputs = {}
    for (t, name) in lora.replaced_linears():
        width = lora.target_modules[name].in_features
        inputs[(t, name)] = torch.randn(200, width, generator=g, dtype=torch.float64) * torch.rand(width, generator=g,
                                                                                                  dtype=torch.float64) ** 4
    lora.init_from_replaced({key: x.mT @ x / x.size(0) for key, x in inputs.items()})
    assert len(inputs) == 3 * len(lora.target_modules)
    for (t, name), x in inputs.items():
        original = weight_matrix(lora.replaced_linears()[(t, name)]).double()
        shared = weight_matrix(lora.target_modules[name]).double()
        whitened_error = torch.linalg.norm((lora.effective_weight(name, t).double() - original) @ x.mT)
        plain_error = torch.linalg.norm((plain[(t, name)].double() - original) @ x.mT)
        best = torch.linalg.svdvals((original - shared) @ x.mT)[4:].norm()  # Eckart-Young on the outputs
        assert whitened_error.item() == pytest.approx(best.item(), rel=1e-3)
        assert whitened_error < plain_error


def test_calibration_layer_by_layer_equals_the_moments_of_one_whole_run():
    """calibrate() holds one replaced layer's input moments at a time (only that layer's linears
    are hooked while it runs) and gives exactly the adapters that the moments of one whole run,
    collected at once, give."""
    from slr_zoo.linears import InputMoments

    model = relaxed(LLAMA, 2, 2, rank=4)
    lora, backbone = model.loop_lora, model.backbone
    g = torch.Generator().manual_seed(2)
    texts = [torch.randint(0, VOCAB, (1, n), generator=g) for n in (7, 12)]
    with InputMoments(lora.replaced_linears()) as moments:
        backbone.run_replaced(texts)
    lora.init_from_replaced(moments.result())
    at_once = {key: lora.effective_weight(key[1], key[0]).detach().clone() for key in lora.replaced_linears()}
    lora.init_from_replaced()  # back to the plain SVD
    assert any(not torch.equal(lora.effective_weight(n, t), w) for (t, n), w in at_once.items())

    originals = [m for layer in backbone.replaced_layers for m in layer.modules()]
    hooked = {}

    def run_originals(watch):
        def spying(index):
            context = watch(index)

            class Spy:
                def __enter__(self):
                    context.__enter__()
                    hooked[index] = sum(len(m._forward_hooks) for m in originals)

                def __exit__(self, *exc):
                    return context.__exit__(*exc)
            return Spy()
        backbone.run_replaced(texts, watch=spying)

    lora.calibrate(run_originals)
    per_layer = len(lora.target_modules) // 2  # the core's two layers split the targets
    assert hooked == {0: per_layer, 1: per_layer, 2: per_layer, 3: per_layer}
    for (t, name), weight in at_once.items():
        torch.testing.assert_close(lora.effective_weight(name, t), weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"replaced layer\(s\) \[0, 1, 2, 3\] were not run under watch"):
        lora.calibrate(lambda watch: backbone.run_replaced(texts))


def test_a_failed_calibration_changes_nothing_and_the_originals_keep_their_exact_weights():
    """An error in the middle (here in layer 2's watch) leaves every adapter as it was, and the
    originals, run in a bf16 model's dtype, get their own fp32 tensors back (not a rounded copy)."""
    model = relaxed(LLAMA, 2, 2, rank=4)
    lora, backbone = model.loop_lora, model.backbone
    backbone.to(torch.bfloat16)
    weights = [p.detach().clone() for layer in backbone.replaced_layers for p in layer.parameters()]
    adapters = {k: v.clone() for k, v in lora.state_dict().items()}
    texts = [torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))]

    def failing(watch):
        def at(index):
            if index == 2:
                raise RuntimeError("out of memory in layer 2")
            return watch(index)
        backbone.run_replaced(texts, watch=at)

    with pytest.raises(RuntimeError, match="out of memory in layer 2"):
        lora.calibrate(failing)
    for key, value in lora.state_dict().items():
        assert torch.equal(value, adapters[key]), key
    after = [p for layer in backbone.replaced_layers for p in layer.parameters()]
    assert all(p.dtype == torch.float32 and torch.equal(p, w) for p, w in zip(after, weights))
    assert backbone.training
    lora.calibrate(lambda watch: backbone.run_replaced(texts, watch=watch))  # and it then runs whole
    assert all(torch.equal(p, w) for p, w in zip(after, weights))
    assert any(not torch.equal(v, adapters[k]) for k, v in lora.state_dict().items())


def test_svd_init_needs_share_average():
    with pytest.raises(ComponentError, match="loop.loop_lora.init: svd initialises"):
        model_with("loop_lora", {"name": "per_step", "init": "svd"})


def test_share_average_needs_loops():
    with pytest.raises(ValueError, match=r"backbone\.loops: share=average needs loops"):
        tiny_model(tiny_recipe(backbone={**LLAMA, "share": "average"}))


def _save_deep_llama(directory, layers: int, perturb_norms: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    from slr_zoo.tasks.iterate import IterateTask
    from slr_zoo.tasks.tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(IterateTask(n_train=20, n_val=0).records("train"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0,
                         bos_token_id=None, eos_token_id=None)
    hf = LlamaForCausalLM(config).eval()
    if perturb_norms:  # a trained model's norm gains differ from layer to layer
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "layernorm" in name:
                    p.uniform_(0.5, 1.5)
    hf.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return hf


@pytest.mark.parametrize("perturb_norms", [False, True])
def test_relaxed_recursive_conversion_of_a_pretrained_model(tmp_path, perturb_norms, capsys):
    """A 5-layer model looped as prelude 1 + core 1 (x3) + coda 1: with full-rank SVD LoRA on every
    linear, the only difference from the original is that the norm gains are averaged; per-step
    norm gains (``norms: true``) remove that too."""
    hf = _save_deep_llama(tmp_path, layers=5, perturb_norms=perturb_norms)
    tokens = torch.randint(5, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = hf(tokens).logits
    diffs = {}
    full = {"name": "per_step", "rank": 32, "targets": ["all-linear"], "init": "svd"}
    for key, lora in (("none", {"name": "none"}), ("per_step", full), ("norms", {**full, "norms": True})):
        recipe = tiny_recipe(
            backbone={"name": "llama", "pretrained": str(tmp_path), "prelude_layers": 1, "core_layers": 1,
                      "coda_layers": 1, "share": "average", "loops": 3},
            loop__max_steps=3, loop__loop_lora=lora,
        )
        model = build_model(recipe, build_backbone(recipe)).eval()
        with torch.no_grad():
            diffs[key] = (model(tokens).logits - reference).abs().max().item()
    with capsys.disabled():
        print(f"\n[relaxed recursive, norms {'perturbed' if perturb_norms else 'equal'}] max |logit - original|: "
              f"averaged core {diffs['none']:.3g}, + full-rank SVD LoRA {diffs['per_step']:.3g}, "
              f"+ per-step norms {diffs['norms']:.3g}")
    assert diffs["norms"] < 1e-4 < diffs["none"]
    if perturb_norms:
        assert diffs["per_step"] < 0.5 * diffs["none"] and diffs["norms"] < 0.01 * diffs["per_step"]
    else:
        assert diffs["per_step"] < 1e-4


# ---------------------------------------------------------------------------------------------
# Combines: learnable alpha, norm, monitors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["residual_initial", "residual_previous", "learned"])
def test_learnable_alpha_starts_at_alpha_and_stays_in_unit_interval(name, tokens):
    model = model_with("combine", {"name": name, "alpha": 0.7, "learn_alpha": True})
    comb = model.combine
    assert comb.monitors()["alpha"] == pytest.approx(0.7)
    loss_of(model, tokens).backward()
    assert comb.alpha_logit.grad != 0
    for value in (-1e4, 1e4):
        with torch.no_grad():
            comb.alpha_logit.fill_(value)
            assert 0.0 <= float(comb.alpha) <= 1.0
    with pytest.raises(ValueError, match=r"must be in \(0, 1\) when learned"):
        model_with("combine", {"name": name, "alpha": 1.0, "learn_alpha": True})
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        model_with("combine", {"name": name, "alpha": 1.5})


def test_norm_after_combine_bounds_the_state():
    comb = model_with("combine", {"name": "residual_previous", "alpha": 0.5, "norm": True}).combine
    new, h0, prev = (torch.randn(2, 3, 32) * 100 for _ in range(3))
    rms = comb(new, h0, prev, 1).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-4, atol=1e-4)


def test_monitors_of_components():
    combine = model_with("combine", {"name": "learned", "alpha": 0.7}).combine
    assert combine.monitors() == pytest.approx({"alpha": 0.7, "alpha_new": 0.7, "alpha_h0": 0.3, "alpha_prev": 0.0})
    with torch.no_grad():
        combine.mixer.weight.view(32, 3, 32).diagonal(dim1=0, dim2=2)[2].fill_(0.25)  # prev block's diagonal
    assert combine.monitors()["alpha_prev"] == pytest.approx(0.25)
    gated = model_with("combine", {"name": "gated", "alpha": 0.8}).combine
    assert gated.monitors()["gate_mean"] == pytest.approx(0.8)
    with torch.no_grad():
        gated.gate.weight.normal_()
    h = torch.randn(2, 3, 32)
    g = torch.sigmoid(gated.gate(torch.cat([h, -h], -1)) + gated.gate_bias)
    gated(h, h, -h, 1)
    assert gated.monitors()["gate_mean"] == pytest.approx(g.mean().item(), rel=1e-6)
    lora = model_with("loop_lora", {"name": "shared_scaled"}).loop_lora
    assert lora.monitors() == {"scale_t1": 1.0, "scale_t2": 1.0, "scale_t3": 1.0}
    per_step = model_with("loop_lora", {"name": "per_step"}).loop_lora
    assert per_step.monitors() == {"delta_norm_t1": 0.0, "delta_norm_t2": 0.0, "delta_norm_t3": 0.0}
    perturb(per_step)
    stack = per_step.adapters["layers-0-self_attn-q_proj"]
    manual = [per_step.scale * (s.B[0] @ s.A[0]).norm() for s in per_step.adapters.values()]
    assert per_step.monitors()["delta_norm_t1"] == pytest.approx(torch.stack(manual).mean().item(), rel=1e-5)
    assert stack.A.shape == (3, 8, 32) and stack.B.shape == (3, 32, 8)


def test_monitors_reach_the_training_module_log_keys(tokens):
    from slr_zoo.recipe import build_objectives
    from slr_zoo.training.module import LoopedLMModule
    from slr_zoo.training.settings import OptimConfig

    recipe = tiny_recipe(loop__injection={"name": "diagonal"}, loop__combine={"name": "gated"},
                         loop__loop_lora={"name": "shared_scaled"},
                         loop__step_embedding={"name": "learned"})
    torch.manual_seed(0)
    model = build_model(recipe, build_backbone(recipe, vocab_size=VOCAB))
    module = LoopedLMModule(model, build_objectives(recipe, model.backbone.hidden_size), OptimConfig(**recipe["optim"]))
    module.model(tokens)
    logged = module.model_monitors()
    for key in ("injection/contraction_max", "injection/contraction_mean", "combine/gate_mean",
                "loop_lora/scale_t1", "loop_lora/scale_t3"):
        assert key in logged and math.isfinite(logged[key])
    assert 0 < logged["injection/contraction_max"] < 1


# ---------------------------------------------------------------------------------------------
# Shipped ablation recipes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ablation_step_embedding", "ablation_loop_lora", "ablation_stabilizers"])
def test_shipped_ablation_recipes_validate_and_build(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml"
    recipe = load(path)
    validate(recipe)
    cells = expand(recipe)
    assert 2 <= len(cells) <= 8
    for cell in cells:
        validate(cell.recipe)
        model = build_model(cell.recipe, build_backbone(cell.recipe, vocab_size=VOCAB))
        assert model(torch.randint(4, VOCAB, (2, 6))).logits.shape == (2, 6, VOCAB)


def test_state_noise_trains_the_noise_input_and_leaves_inference_clean(tokens):
    node = {"name": "learned", "noise_level": True}
    noisy = model_with("step_embedding", node, loop__state_noise=0.5)
    clean = model_with("step_embedding", {"name": "learned"})
    clean.load_state_dict(noisy.state_dict(), strict=False)   # same weights, no noise input
    noisy.eval(), clean.eval()
    assert torch.equal(noisy(tokens).logits, clean(tokens).logits)       # inference is clean
    noisy.train()
    torch.manual_seed(0)
    first = noisy(tokens).logits
    assert not torch.equal(first, noisy(tokens).logits)                 # training perturbs the state
    loss_of(noisy, tokens).backward()
    assert noisy.step_embedding.noise.grad.abs().sum() > 0               # and teaches the noise input


def test_a_noise_input_without_state_noise_is_a_recipe_error():
    with pytest.raises(ComponentError, match=r"loop\.step_embedding\.noise_level: .*loop\.state_noise"):
        model_with("step_embedding", {"name": "sinusoidal", "noise_level": True}, loop__state_noise=0.0)
