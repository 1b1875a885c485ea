"""Properties that must hold for any input, checked on generated ones (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_model, tiny_recipe
from slr_zoo.tasks.tokenizer import SPACE, SPECIALS, build_word_tokenizer

# any character but surrogates (not text), the space marker itself and a special token's bracket
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters=SPACE + "["),
               min_size=1, max_size=40).filter(lambda s: not s[0].isspace() or s[0] != " ")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TEXT)
def test_any_text_round_trips_through_the_word_level_tokenizer(text):
    """Decoding gives back exactly the text (every text reads as if it began with a space, so a
    leading space is the one thing not kept); no word is cut into letters."""
    tokenizer = build_word_tokenizer([{"question": text, "answer": "x"}])
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(whitelist_categories=("Ll", "Lu", "Lo", "Mn", "Nd")), min_size=1,
                        max_size=8), min_size=1, max_size=6))
def test_words_of_any_script_are_one_token_each(words):
    text = " ".join(words)
    tokenizer = build_word_tokenizer([{"question": text, "answer": "x"}])
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))
    assert "".join(pieces).replace(SPACE, " ").strip() == text
    assert all(p not in SPECIALS for p in pieces)


SCALARS = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False, width=32),
                    st.booleans(), st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True),
                    st.lists(st.integers(0, 9), max_size=4))
KEYS = st.lists(st.from_regex(r"[a-z][a-z_]{0,6}", fullmatch=True), min_size=1, max_size=3).map(".".join)


@settings(max_examples=200, deadline=None)
@given(KEYS, SCALARS)
def test_overrides_parse_the_way_omegaconfs_dotlist_does(key, value):
    from omegaconf import OmegaConf

    from slr_zoo.recipe.load import parse_override

    text = str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, float) else str(value)
    expected = OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}={text}"]))
    for part in key.split("."):
        expected = expected[part]
    assert parse_override(f"{key}={text}") == (key, expected)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), length=st.integers(3, 10), steps=st.integers(1, 3), own=st.booleans())
def test_teacher_forced_scoring_agrees_with_greedy_generation(seed, length, steps, own):
    """For a causal model, "every answer token is the argmax under teacher forcing" holds exactly
    when greedy generation writes that answer and stops: on a random model and record, with the
    answer either the model's own greedy continuation or another one."""
    from slr_zoo.inference import generate_ids
    from slr_zoo.tasks.encoding import IGNORE, answer_correct

    torch.manual_seed(seed)
    model = tiny_model(tiny_recipe(loop__max_steps=steps), seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(5, 32, (1, length), generator=g)
    greedy = generate_ids(model, prompt, max_new_tokens=3).new_tokens[0].tolist()
    answer = list(greedy)
    if not own:
        answer[int(torch.randint(0, 3, (1,), generator=g))] = int(torch.randint(5, 32, (1,), generator=g))
    ids = torch.cat([prompt[0], torch.tensor(answer[:-1])])[None]
    labels = torch.full_like(ids, IGNORE)
    labels[0, length - 1:] = torch.tensor(answer)
    with torch.no_grad():
        forced = bool(answer_correct(model(ids).logits, labels))
    assert forced == (greedy == answer)
    if own:
        assert forced


# ------------------------------------------------------------------ one scoring path
def _fit_then_evaluate(tmp_path, task: dict, steps: int, **extra) -> tuple[float, float]:
    import json

    import yaml

    from slr_zoo import evaluate, fit

    recipe = {"name": "same", "task": task, "seed": 0,
              "backbone": {"name": "gpt2", "hidden_size": 32, "heads": 2, "prelude_layers": 1, "core_layers": 1,
                           "coda_layers": 0, "init": "torch", "tie_embeddings": False, **extra},
              "decoder": {"name": "linear"}, "loop": {"max_steps": 2},
              "optim": {"lr": 3.0e-3, "warmup_steps": 5, "min_lr_ratio": 1.0, "betas": [0.9, 0.999]},
              "trainer": {"max_steps": steps, "batch_size": 16, "progress_bar": False, "threads": 1,
                          "checkpoint_every": 7}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert fit.main([str(path), f"output_dir={tmp_path}"]) == 0
    cell = tmp_path / "same" / "default"
    fitted = json.loads((cell / "summary.json").read_text())["val_accuracy"]
    assert evaluate.main([str(cell), "--steps", "2", "--show", "0"]) == 0
    return fitted, json.loads((cell / "eval.json").read_text())["by_depth"][0]["accuracy"]


@pytest.mark.parametrize("task", [
    {"name": "iterate", "n_train": 64, "n_val": 16}, {"name": "walk", "n_train": 64, "n_val": 16},
    {"name": "prosqa", "n_train": 32, "n_val": 8, "hops": [1, 2], "nodes": [6, 8]},
    {"name": "prontoqa", "n_train": 32, "n_val": 8}, {"name": "multiplication", "n_train": 64, "n_val": 16,
                                                      "digits": [2, 2]},
], ids=lambda t: t["name"])
def test_fit_and_evaluate_give_the_same_accuracy_on_every_task(tmp_path, task):
    fitted, evaluated = _fit_then_evaluate(tmp_path, task, steps=3, max_positions=1024)
    assert fitted == pytest.approx(evaluated, abs=1e-4)


def test_fit_and_evaluate_agree_on_answers_in_any_script(tmp_path):
    """A copy task whose answers are non-ASCII words ("fünf", "zwölf", "日本"): a model that
    learns it is scored right by both (the word-level tokenizer used to split "fünf" into
    letters, and evaluate scored the decoded "f ü nf" wrong while fit scored tokens right)."""
    import json
    import random

    words = ["fünf", "zwölf", "Ærø", "日本", "naïve", "Łódź", "ελα", "ďáblík"]
    rng = random.Random(0)
    rows = [{"question": f"{w} {rng.choice(words)} ?", "answer": w} for w in words for _ in range(40)]
    rng.shuffle(rows)
    train, val = tmp_path / "train.json", tmp_path / "val.json"
    train.write_text(json.dumps(rows, ensure_ascii=False))
    val.write_text(json.dumps(rows[:24], ensure_ascii=False))
    fitted, evaluated = _fit_then_evaluate(tmp_path, {"name": "json", "train": str(train), "val": str(val)},
                                           steps=150)
    assert fitted == evaluated and fitted >= 0.9


SHAPES = st.tuples(st.integers(2, 12), st.integers(2, 12), st.integers(1, 12), st.integers(0, 2**16))


def _planted(out_f: int, in_f: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight difference and inputs spread very unevenly over the input directions."""
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    x = torch.randn(4 * in_f + 8, in_f, generator=g, dtype=torch.float64) * torch.logspace(1, -2, in_f, dtype=torch.float64)
    return delta, x


@settings(max_examples=60, deadline=None)
@given(SHAPES)
def test_a_whitened_truncation_is_no_worse_on_its_inputs_than_the_plain_one(shape):
    """On the inputs it was whitened by, the whitened rank-r stand-in is the best rank-r map
    (Eckart-Young on delta's outputs), so no worse than the Frobenius-optimal one; without a
    moment it is the plain truncated SVD; at full rank both are exact."""
    from slr_zoo.linears import low_rank_factors

    out_f, in_f, rank, seed = shape
    delta, x = _planted(out_f, in_f, seed)
    moment = x.mT @ x / x.size(0)
    B, A = low_rank_factors(delta, rank)
    Bw, Aw = low_rank_factors(delta, rank, moment)
    k = min(rank, out_f, in_f)
    assert B.shape == Bw.shape == (out_f, k) and A.shape == Aw.shape == (k, in_f)
    plain = torch.linalg.norm((delta - B @ A) @ x.mT)
    whitened = torch.linalg.norm((delta - Bw @ Aw) @ x.mT)
    assert whitened <= plain * (1 + 1e-6) + 1e-9
    # it is the optimum on the data: the error of the best rank-k approximation of delta's outputs
    best = torch.linalg.svdvals(delta @ x.mT)[k:].norm()
    assert whitened.item() == pytest.approx(best.item(), rel=1e-3, abs=1e-6 * torch.linalg.norm(delta @ x.mT).item())
    # each component's halves have equal norms, as the plain SVD's do
    torch.testing.assert_close(Bw.norm(dim=0), Aw.norm(dim=1), rtol=1e-6, atol=1e-9)
    dropped = torch.linalg.svdvals(delta)[k:].norm()
    assert torch.linalg.norm(delta - B @ A).item() == pytest.approx(dropped.item(), rel=1e-6, abs=1e-9)
    if k == min(out_f, in_f):
        torch.testing.assert_close(Bw @ Aw, delta, rtol=1e-5, atol=1e-6)


def test_input_moments_are_the_mean_outer_product_of_every_input_row():
    """Linears that read the same tensor (as q, k and v do) share one product, and each still
    gets its own, complete moment."""
    from slr_zoo.linears import InputMoments

    torch.manual_seed(0)
    first, sibling, second = torch.nn.Linear(3, 4), torch.nn.Linear(3, 5), torch.nn.Linear(4, 2)
    xs = [torch.randn(2, 5, 3), torch.randn(1, 7, 3)]
    with InputMoments({"first": first, "sibling": sibling, "second": second}) as moments:
        hidden = []
        for x in xs:
            hidden.append(first(x))
            sibling(x)
            second(hidden[-1])
        sibling(xs[0] + 1)  # the same shape, another tensor: its own product
    second(torch.randn(9, 4))  # after exit: not counted
    result = moments.result()
    rows = torch.cat([x.reshape(-1, 3) for x in xs]).double()
    torch.testing.assert_close(result["first"], rows.mT @ rows / rows.size(0), rtol=1e-5, atol=1e-6)
    rows = torch.cat([rows, (xs[0] + 1).reshape(-1, 3).double()])
    torch.testing.assert_close(result["sibling"], rows.mT @ rows / rows.size(0), rtol=1e-5, atol=1e-6)
    rows = torch.cat([h.detach().reshape(-1, 4) for h in hidden]).double()
    torch.testing.assert_close(result["second"], rows.mT @ rows / rows.size(0), rtol=1e-5, atol=1e-6)
