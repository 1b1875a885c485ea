"""Cached, batched generation: the per-iteration KV cache gives what re-running the loop gives, depth
follows the halting policy per sample or per token, and the conventions of Hugging Face hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import VOCAB, tiny_model, tiny_recipe
from slr_zoo.backbones.cache import LoopKVCache
from slr_zoo.inference import generate_ids
from slr_zoo.inference.generation import next_tokens

ROOT = Path(__file__).resolve().parents[1]


def left_padded(lengths=(4, 9, 6), seed=5):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(5, VOCAB, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def busy_model(dtype=torch.float32, **overrides):
    """A tiny model whose every stabiliser is on and away from its neutral start, so that each
    iteration computes something different: a cache that mixed up iterations would show.
    Equivalences are checked in float64, where the two computations agree to rounding (~1e-14);
    in float32 single-token and full-sequence matrix products round differently (~1e-5)."""
    torch.manual_seed(0)
    nodes = dict(loop__step_embedding={"name": "learned"}, loop__combine={"name": "gated"},
                 loop__injection={"name": "add"},
                 loop__loop_lora={"name": "per_step", "rank": 2, "targets": ["all-linear"]})
    model = tiny_model(tiny_recipe(**{**nodes, **overrides}))
    with torch.no_grad():
        for module in (model.step_embedding, model.loop_lora, model.combine):
            for p in module.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return model.to(dtype).eval()


# ------------------------------------------------------------------ cached equals uncached
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("attention", ["causal", "prefix"])
@pytest.mark.parametrize("steps", [1, 3])
def test_cached_generation_equals_uncached_token_for_token(family, attention, steps):
    model = busy_model(torch.float64, backbone__name=family, backbone__attention=attention, loop__max_steps=steps)
    ids, mask = left_padded()
    cached = generate_ids(model, ids, mask, max_new_tokens=6, output_logits=True)
    uncached = generate_ids(model, ids, mask, max_new_tokens=6, use_cache=False, output_logits=True)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.logits, uncached.logits, atol=1e-10, rtol=1e-10)
    assert (cached.token_steps == steps).all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("attention", ["causal", "prefix"])
def test_cached_generation_in_float32_agrees_to_1e_5(family, attention):
    """A stabilised loop (residual to h0, additive injection) keeps float32 rounding small."""
    torch.manual_seed(0)
    model = tiny_model(tiny_recipe(backbone__name=family, backbone__attention=attention, loop__max_steps=3,
                                   loop__combine={"name": "residual_initial", "alpha": 0.5},
                                   loop__injection={"name": "add"})).eval()
    ids, mask = left_padded()
    cached = generate_ids(model, ids, mask, max_new_tokens=6, output_logits=True)
    uncached = generate_ids(model, ids, mask, max_new_tokens=6, use_cache=False, output_logits=True)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.logits, uncached.logits, atol=1e-5, rtol=1e-5)


def test_uncached_generation_is_greedy_decoding_of_the_forward_pass():
    """The reference itself: every new token is the argmax of a full forward pass over the row."""
    model = busy_model(loop__max_steps=3)
    ids, mask = left_padded()
    out = generate_ids(model, ids, mask, max_new_tokens=4, use_cache=False)
    for row in range(ids.size(0)):
        real = mask[row].bool()
        seq = torch.cat([ids[row][real], out.new_tokens[row, :-1]])[None]
        with torch.no_grad():
            forced = model(seq).logits[0, int(real.sum()) - 1:].argmax(-1)
        assert forced.tolist() == out.new_tokens[row].tolist()


def test_a_cache_keyed_by_layer_alone_would_differ():
    """The core's layers run once per iteration: if iteration 2 read iteration 1's keys, the output
    would change. Checked by routing every core iteration to one slot."""
    model = busy_model(loop__max_steps=3)
    ids, mask = left_padded()
    right = generate_ids(model, ids, mask, max_new_tokens=4, output_logits=True)
    original = LoopKVCache.view

    def one_slot(self, iteration, offset, rows=None):
        view = original(self, iteration, offset, rows)
        view.at_iteration = lambda t: type(view)(self, 1 if t else 0, view.offset, view.rows)
        return view

    LoopKVCache.view = one_slot
    try:
        wrong = generate_ids(model, ids, mask, max_new_tokens=4, output_logits=True)
    finally:
        LoopKVCache.view = original
    assert not torch.allclose(right.logits, wrong.logits, atol=1e-3)


# ------------------------------------------------------------------ depth per sample
@pytest.mark.parametrize("node", [{"name": "ponder"}, {"name": "threshold", "epsilon": 0.3, "reduce": "last"},
                                  {"name": "act", "granularity": "sample"}])
def test_per_sample_halting_under_the_cache_matches_the_uncached_loop(node):
    torch.manual_seed(0)
    model = tiny_model(tiny_recipe(loop__max_steps=6, loop__halting=node,
                                   loop__combine={"name": "residual_previous", "alpha": 0.5})).double().eval()
    if hasattr(model.halting, "unit"):
        torch.nn.init.normal_(model.halting.unit.linear.weight, std=3.0)
    ids, mask = left_padded((4, 9, 6, 7, 5, 8))
    cached = generate_ids(model, ids, mask, max_new_tokens=4, output_logits=True)
    uncached = generate_ids(model, ids, mask, max_new_tokens=4, use_cache=False, output_logits=True)
    assert len(set(cached.token_steps[:, 0].tolist())) > 1          # the samples really halt apart
    assert (cached.token_steps == cached.token_steps[:, :1]).all()  # each keeps its prompt's depth
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.equal(cached.token_steps, uncached.token_steps)
    torch.testing.assert_close(cached.logits, uncached.logits, atol=1e-10, rtol=1e-10)


# ------------------------------------------------------------------ depth per token
def kl_model(threshold: float):
    return busy_model(torch.float64, loop__max_steps=6, loop__halting={"name": "kl", "threshold": threshold},
                      backbone__coda_layers=0, decoder={"name": "linear"})


def test_a_per_token_policy_gives_tokens_different_depths_and_reports_what_ran():
    model = kl_model(threshold=2e-3)
    ids, mask = left_padded((7,))
    core_calls, per_forward = [0], []
    model.backbone.core.register_forward_hook(lambda m, i, o: core_calls.__setitem__(0, core_calls[0] + 1))
    model.register_forward_hook(lambda m, i, o: per_forward.append(core_calls[0] - sum(per_forward)))
    out = generate_ids(model, ids, mask, max_new_tokens=10)
    steps = out.token_steps[0].tolist()
    assert len(set(steps[1:])) > 1, steps
    # one row: a decoding step calls the core once per iteration of its token, and token n + 1 is
    # computed by decoding step n; the first comes from the prefill, which runs until every prompt
    # position has exited
    assert per_forward[1:] == steps[1:]
    assert steps[0] <= per_forward[0]


def test_frozen_strategy_equals_the_uncached_loop_under_a_per_token_policy():
    model = kl_model(threshold=2e-3)
    ids, mask = left_padded()
    frozen = generate_ids(model, ids, mask, max_new_tokens=8, cache_strategy="frozen", output_logits=True)
    uncached = generate_ids(model, ids, mask, max_new_tokens=8, use_cache=False, output_logits=True)
    assert len(set(frozen.token_steps.flatten().tolist())) > 1
    assert torch.equal(frozen.sequences, uncached.sequences)
    assert torch.equal(frozen.token_steps, uncached.token_steps)
    torch.testing.assert_close(frozen.logits, uncached.logits, atol=1e-10, rtol=1e-10)


def test_latest_strategy_saves_iterations_and_equals_frozen_when_no_token_exits_early():
    ids, mask = left_padded()
    never = kl_model(threshold=-1.0)  # a KL is never below -1: every token runs the full depth
    latest = generate_ids(never, ids, mask, max_new_tokens=5, output_logits=True)
    frozen = generate_ids(never, ids, mask, max_new_tokens=5, cache_strategy="frozen", output_logits=True)
    torch.testing.assert_close(latest.logits, frozen.logits, atol=1e-10, rtol=1e-10)
    model = kl_model(threshold=2e-3)
    calls = {"latest": 0, "frozen": 0}
    for name in calls:
        handle = model.backbone.core.register_forward_hook(lambda m, i, o, n=name: calls.__setitem__(n, calls[n] + o.size(0)))
        generate_ids(model, ids, mask, max_new_tokens=8, cache_strategy=name)
        handle.remove()
    assert calls["latest"] < calls["frozen"]     # exited tokens really leave the batch


def test_copy_forward_gives_skipped_iterations_the_latest_reached():
    cache = LoopKVCache(batch_size=2, max_length=4)
    for t in (1, 2, 3):
        for layer in (1, 2):
            k = torch.full((2, 1, 1, 2), float(10 * t + layer))
            cache.write((t, layer), k, -k, offset=0)
    cache.copy_forward(torch.tensor([1, 3]), last=3, start=0, end=1)
    for t in (2, 3):
        for layer in (1, 2):
            assert cache.keys[(t, layer)][0, 0, 0].tolist() == [10.0 + layer] * 2       # row 0 stopped at 1
            assert cache.values[(t, layer)][0, 0, 0].tolist() == [-10.0 - layer] * 2
            assert cache.keys[(t, layer)][1, 0, 0].tolist() == [10.0 * t + layer] * 2   # row 1 ran them


# ------------------------------------------------------------------ conventions
def test_each_sample_stops_at_its_own_eos_and_pads_after():
    model = busy_model(loop__max_steps=2)
    ids, mask = left_padded()
    free = generate_ids(model, ids, mask, max_new_tokens=6)
    eos = int(free.new_tokens[1, 2])                       # the token row 1 writes third
    out = generate_ids(model, ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    for row in range(ids.size(0)):
        tokens = free.new_tokens[row].tolist()
        n = tokens.index(eos) + 1 if eos in tokens else 6
        assert out.lengths[row] == n
        assert out.new_tokens[row, :n].tolist() == tokens[:n]        # the same until its EOS
        assert (out.new_tokens[row, n:] == 0).all() and (out.token_steps[row, n:] == 0).all()
    assert int(out.lengths[1]) <= 3


def test_sampling_is_reproducible_and_top_k_one_is_greedy():
    model = busy_model(loop__max_steps=2)
    ids, mask = left_padded()
    greedy = generate_ids(model, ids, mask, max_new_tokens=5)
    top1 = generate_ids(model, ids, mask, max_new_tokens=5, do_sample=True, top_k=1,
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy.sequences, top1.sequences)
    a, b = (generate_ids(model, ids, mask, max_new_tokens=5, do_sample=True, temperature=2.0,
                         generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, greedy.sequences)


def test_top_k_and_top_p_keep_only_the_likeliest_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(next_tokens(logits, True, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(next_tokens(logits, True, top_p=0.7, generator=g).tolist()) == {0, 1}   # 0.5 + 0.3 reach 0.7
    assert set(next_tokens(logits, True, top_p=0.4, generator=g).tolist()) == {0}


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"max_new_tokens": 2, "temperature": 0.0}, "temperature must be > 0"),
    ({"max_new_tokens": 2, "top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"max_new_tokens": 2, "cache_strategy": "lastest"}, "unknown cache_strategy 'lastest'"),
])
def test_bad_generation_arguments_are_named(kwargs, message):
    model = busy_model()
    ids, mask = left_padded()
    with pytest.raises(ValueError, match=message):
        generate_ids(model, ids, mask, **kwargs)


def test_right_padded_prompts_and_training_mode_are_refused():
    model = busy_model()
    ids, mask = left_padded()
    with pytest.raises(ValueError, match="left-padded"):
        generate_ids(model, ids.flip(1), mask.flip(1), max_new_tokens=2)
    with pytest.raises(ValueError, match="eval mode"):
        generate_ids(model.train(), ids, mask, max_new_tokens=2)


# ------------------------------------------------------------------ text level, CLI, evaluate
@pytest.fixture(scope="module")
def trained_cell(tmp_path_factory):
    """A tiny quickstart cell with per-token KL halting, trained for a few steps."""
    from slr_zoo import fit

    out = tmp_path_factory.mktemp("gen")
    args = [str(ROOT / "recipes/quickstart.yaml"), f"output_dir={out}", "task.n_train=64", "task.n_val=12",
            "trainer.max_steps=3", "trainer.batch_size=16", "backbone.hidden_size=32", "trainer.progress_bar=false",
            "loop.halting={name: kl, threshold: 3.0e-3}", "loop.step_supervision=0.5",
            "loop.combine={name: none}"]  # a state that still moves after 3 steps: tokens exit at different depths
    assert fit.main(args) == 0
    return out / "quickstart" / "default"


def test_slr_zoo_generate_answers_text_questions(trained_cell):
    import slr_zoo
    from slr_zoo.recipe import load_cell

    parts = load_cell(trained_cell)
    questions = [r["question"] for r in list(parts.task.records("val"))[:5]]
    result = slr_zoo.generate(parts.module.model, parts.tokenizer, questions, max_new_tokens=3)
    assert len(result.texts) == 5 and all(1 <= len(ids) <= 3 for ids in result.ids)
    assert [len(s) for s in result.steps] == [len(ids) for ids in result.ids]
    one = slr_zoo.generate(parts.module.model, parts.tokenizer, questions[2], max_new_tokens=3)
    assert one.ids == [result.ids[2]]                          # a batch gives what each prompt gives alone
    assert not parts.module.model.training


def test_evaluate_reports_the_iterations_of_every_generated_token(trained_cell):
    from slr_zoo import evaluate
    from slr_zoo.inference.answers import score_answers
    from slr_zoo.recipe import load_cell

    assert evaluate.main([str(trained_cell), "--steps", "6", "--show", "0"]) == 0
    row = json.loads((trained_cell / "eval.json").read_text())["by_depth"][0]
    parts = load_cell(trained_cell)
    records = list(parts.task.records("val"))
    scored = score_answers(parts.module.model, parts.tokenizer, parts.task, records, steps=6)
    every = [s for steps in scored.steps for s in steps]
    assert row["generated_tokens"] == len(every) > len(records)      # answer and EOS tokens both counted
    assert row["mean_steps"] == pytest.approx(sum(every) / len(every), abs=1e-3)
    assert row["mean_steps"] != row["mean_steps_first_token"]        # a first-token-only count differs
    assert row["accuracy"] == pytest.approx(sum(scored.correct) / len(records), abs=1e-4)


def test_the_generate_command_prints_answers_and_iterations(trained_cell):
    def command(*args):
        return subprocess.run([sys.executable, "-m", "slr_zoo.generate", *args], capture_output=True, text=True,
                              timeout=300)

    def run(*args):
        return command(str(trained_cell), *args)

    ok = run("--prompt", "3 7 1 0 9 2 8 5 4 6 ? 4 3", "--prompt", "0 1 2 3 4 5 6 7 8 9 ? 1 1",
             "--halting", "kl", "threshold=1e-3", "--max-new-tokens", "3")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("iterations per token:") == 2 and "mean iterations per generated token" in ok.stdout
    bad = run("--prompt", "1", "--halting", "act")
    assert bad.returncode == 2 and "learned parameters" in bad.stderr and "Traceback" not in bad.stderr
    nowhere = command("/no/such/run", "--prompt", "1")
    assert nowhere.returncode == 2 and "not a cell directory" in nowhere.stderr
