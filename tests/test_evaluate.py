"""``evaluate`` answers RQ2 and RQ3: every section of eval.json and its plots, stability numbers
that match a hand computation, probes that find a planted signal and not a shuffled one, and a
logit lens whose last iteration is the model's own prediction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_model, tiny_recipe
from slr_zoo.metrics.states import linear_probe, reach_table, stability

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"by_depth", "by_thoughts", "depth_histogram", "mistakes", "stability", "logit_lens", "probes"}


@pytest.fixture(scope="module")
def prosqa_cell(tmp_path_factory):
    """A tiny ProsQA cell with the reach probe and Parcae's diagonal injection, a few steps."""
    from slr_zoo import fit

    out = tmp_path_factory.mktemp("eval")
    args = [str(ROOT / "recipes/prosqa.yaml"), f"output_dir={out}", "task.n_train=64", "task.n_val=24",
            "task.val_file=null", "task.hops=[1,3]", "task.nodes=[6,8]", "task.curriculum=[{until: 1, hops: [1, 2], nodes: [6, 8], n_train: 16}]", "trainer.max_steps=3",
            "trainer.batch_size=16", "trainer.progress_bar=false", "loop.max_steps=2",
            "loop.injection={name: diagonal}"]
    assert fit.main(args) == 0
    return out / "prosqa" / "default"


def test_evaluate_writes_every_section_and_its_plots(prosqa_cell):
    from slr_zoo import evaluate

    assert evaluate.main([str(prosqa_cell), "--show", "2"]) == 0
    report = json.loads((prosqa_cell / "eval.json").read_text())
    assert SECTIONS <= set(report)
    assert [r["steps"] for r in report["by_depth"]] == [1, 2, 3, 4]  # past the trained depth
    histogram = report["depth_histogram"]
    assert histogram["steps"] == 2 and sum(histogram["first_token"].values()) == report["records"] == 24
    trained = next(r for r in report["by_depth"] if r["steps"] == 2)
    assert len(report["mistakes"]) == round((1 - trained["accuracy"]) * 24)  # every wrong answer, no right one
    assert all(m["answer"] != m["generated"] and 0 <= m["index"] < 24 for m in report["mistakes"])
    stats = report["stability"]
    assert len(stats["delta"]) == len(stats["norm"]) == 4 and {"diverged_fraction", "converged_at"} <= set(stats)
    assert {"contraction_max", "contraction_mean"} <= set(stats["contraction"])  # diagonal injection
    assert len(report["logit_lens"]) == 2
    assert [r["t"] for r in report["probes"]["entity"]] == [1, 2, 3, 4]
    reach = report["probes"]["reach"]
    assert [r["t"] for r in reach["table"]] == [0, 1, 2, 3, 4] and reach["option_choice_accuracy"] is not None
    for png in ("accuracy_vs_steps", "depth_histogram", "stability", "probes"):
        assert (prosqa_cell / f"{png}.png").stat().st_size > 10_000, png  # drawn, not an empty canvas


def test_accuracy_against_the_number_of_continuous_thoughts(tmp_path, capsys):
    """``--thoughts``: a Coconut cell answers after n thoughts (stage n of its curriculum, the
    steps not replaced written out); at its trained number the row is the trained-depth row, and
    every answer costs one sequential pass per thought more. An answer-only cell has no thoughts to
    count, and a negative count is refused by the option's name."""
    from slr_zoo import evaluate, fit

    args = [str(ROOT / "recipes/coconut.yaml"), f"output_dir={tmp_path}", "task.n_train=32", "task.n_val=8",
            "task.val_file=null", "task.hops=[2,3]", "task.nodes=[6,8]", "trainer.max_steps=2", "trainer.batch_size=8",
            "trainer.val_every=2", "trainer.progress_bar=false", "training.curriculum.max_latent_stage=3", "name=cc"]
    assert fit.main(args) == 0
    cell = tmp_path / "cc" / "default"
    assert evaluate.main([str(cell), "--thoughts", "0", "1", "3", "--show", "1"]) == 0
    report = json.loads((cell / "eval.json").read_text())
    # what each of the 3 thoughts decodes to: top tokens for the shown example, and the split of its
    # probability on the question's concepts by distance from the root, for every record
    read = report["thoughts"]
    assert read["thoughts"] == 3 and [len(item["thoughts"]) for item in read["lens"].values()] == [1 * 3]
    assert read["reach"]["records"] == 8 and [r["thought"] for r in read["reach"]["rows"]] == [1, 2, 3]
    for row in read["reach"]["rows"]:
        assert 0 < row["mass_on_question_words"] <= 1 and row["records_with_mass"] == 8
        assert sum(row["share_by_reach_step"].values()) == pytest.approx(1, abs=1e-3)
        assert "0" in row["share_by_reach_step"] and "never" in row["share_by_reach_step"]
    assert len(read["target_ahead"]) == 3 and all(0 <= v <= 1 for v in read["target_ahead"])
    assert (cell / "thoughts_reach.png").stat().st_size > 10_000
    rows = {r["thoughts"]: r for r in report["by_thoughts"]}
    assert sorted(rows) == [0, 1, 3] and report["arguments"]["thoughts"] == [0, 1, 3]
    assert rows[3]["accuracy"] == report["by_depth"][0]["accuracy"]
    for n, row in rows.items():  # the prefill, a pass per thought ([EOT] alone without one), a pass per later token
        assert row["passes_per_answer"] == pytest.approx(1 + n + (n == 0) + row["tokens_per_answer"] - 1)
    assert (cell / "accuracy_vs_thoughts.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "| thoughts | accuracy |" in printed and "| thought | on question words |" in printed
    with pytest.raises(SystemExit) as exit_:
        evaluate.main([str(cell), "--thoughts", "-1"])
    assert exit_.value.code == 2 and "argument --thoughts: must be an integer >= 0, got '-1'" in capsys.readouterr().err


def test_an_answer_only_cell_has_no_thoughts_to_count(prosqa_cell, capsys):
    from slr_zoo import evaluate

    assert evaluate.main([str(prosqa_cell), "--thoughts", "2", "--limit", "2"]) == 2
    assert "--thoughts this cell answers without thoughts or pause tokens (encoding 'answer')" in capsys.readouterr().err


def test_ood_and_data_files_are_evaluated_and_a_task_without_a_harder_split_says_so(prosqa_cell, tmp_path):
    from slr_zoo import evaluate

    assert evaluate.main([str(prosqa_cell), "--ood", "--limit", "4", "--steps", "2", "--show", "0"]) == 0
    report = json.loads((prosqa_cell / "eval.json").read_text())
    assert report["split"] == "ood" and {r["hops"] for r in
                                         list(_task(prosqa_cell).harder().records("val"))[:4]} <= {7, 8}
    records = list(_task(prosqa_cell).records("val"))[:3]
    path = tmp_path / "some.json"
    path.write_text(json.dumps(records))
    assert evaluate.main([str(prosqa_cell), "--data", str(path), "--steps", "2", "--show", "0"]) == 0
    assert json.loads((prosqa_cell / "eval.json").read_text())["records"] == 3


def _task(cell):
    from slr_zoo.recipe import load_cell

    return load_cell(cell).task


def test_stability_matches_a_hand_computation_on_a_two_step_run():
    from slr_zoo.evaluate import loop_states

    model = tiny_model(tiny_recipe(loop__max_steps=2, loop__combine={"name": "gated"})).double().eval()
    ids = torch.randint(4, 32, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row: its pads are not read
    query = mask.bool()
    states = loop_states(model, ids, mask, query, 2)
    ctx = model.backbone.context(ids, mask, prefix=query)
    h0 = model.backbone.prelude(model.backbone.embed(ids, ctx), ctx)
    h1 = model.step(h0, h0, 1, ctx)
    h2 = model.step(h1, h0, 2, ctx)
    for got, want in zip(states, (h0, h1, h2)):
        torch.testing.assert_close(got, want)
    real = mask.bool()
    by_hand = {"delta": [], "norm": []}
    for prev, h in ((h0.detach(), h1.detach()), (h1.detach(), h2.detach())):
        m = real[..., None].double()
        change = [((h - prev) * m)[b].norm() / (prev * m)[b].norm() for b in range(3)]
        norm = [(h * m)[b].norm() / real[b].sum().double().sqrt() for b in range(3)]
        by_hand["delta"].append(float(sum(change) / 3))
        by_hand["norm"].append(float(sum(norm) / 3))
    stats = stability(states, real)
    assert stats["delta"] == pytest.approx(by_hand["delta"], rel=1e-5)
    assert stats["norm"] == pytest.approx(by_hand["norm"], rel=1e-5)
    assert stats["diverged_fraction"] == 0.0


def test_a_state_that_blows_up_diverges_and_one_that_settles_converges():
    h0 = torch.ones(2, 3, 4)
    growing = [h0 * 10.0 ** t for t in range(4)]                    # x10 per step: past 100 x h0 at t = 3
    settling = [h0 * (1 + 0.5 ** (3 * t)) for t in range(6)]       # changes 0.44, 0.1, 0.013, 0.0017, 0.0002
    real = torch.ones(2, 3, dtype=torch.bool)
    assert stability(growing, real)["diverged_fraction"] == 1.0
    stats = stability(settling, real)
    assert stats["converged_fraction"] == 1.0 and stats["converged_at"] == 5  # the first change under 1e-3
    nan = [h0, h0 * float("nan")]
    assert stability(nan, real)["diverged_fraction"] == 1.0


def test_the_probe_finds_a_planted_linear_signal_and_not_shuffled_labels():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (600,), generator=g)
    directions = torch.randn(4, 16, generator=g)
    features = torch.randn(600, 16, generator=g) + 3 * directions[labels]
    assert linear_probe(features, labels)["accuracy"] > 0.95
    shuffled = labels[torch.randperm(600, generator=g)]
    result = linear_probe(features, shuffled)
    assert abs(result["accuracy"] - 0.25) < 0.08  # four balanced classes: chance


def test_the_reach_table_counts_marked_tokens_by_kind():
    reach = torch.tensor([[0, 1, 2, 999, -100]])
    logits = [torch.tensor([[1.0, 1.0, -1.0, -1.0, 5.0]]), torch.tensor([[1.0, -1.0, -1.0, 1.0, 5.0]]),
              torch.tensor([[1.0, 1.0, -1.0, -1.0, 5.0]])]
    table = reach_table(logits, reach, unreached=999)
    assert table[0] == {"t": 0, "reached": 1.0, "unreached": 0.5, "never": 0.0}    # h_0: only the root is reached
    assert table[1] == {"t": 1, "reached": 0.5, "unreached": 0.0, "never": 1.0}    # hops 0, 1 are reached by t = 1
    assert table[2] == pytest.approx({"t": 2, "reached": 0.6667, "unreached": None, "never": 0.0})


def test_the_logit_lens_at_the_last_iteration_is_the_models_own_prediction():
    from slr_zoo.evaluate import logit_lens
    from slr_zoo.tasks.tokenizer import build_word_tokenizer

    records = [{"question": " ".join("w" + chr(97 + i % 26) + chr(97 + i // 26) for i in range(40)), "answer": "waa"}]  # every id of the model a token
    tokenizer = build_word_tokenizer(records)
    model = tiny_model(tiny_recipe(loop__max_steps=3, loop__combine={"name": "gated"})).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask, query = torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)
    lines = logit_lens(model, tokenizer, ids, mask, query, 3, top=1)[0]
    predicted = int(model(ids, mask, query_mask=query).logits[0, -1].argmax())
    assert len(lines) == 3
    assert lines[-1].split(": ")[1].split(" ")[0] == tokenizer.convert_ids_to_tokens(predicted)


def test_evaluating_a_grid_evaluates_each_cell_resumes_and_reports_accuracy_by_depth_over_seeds(tmp_path, capsys):
    """``evaluate runs/<name>`` on a two-seed grid: an eval.json per cell, the grid's results.md
    gains the mean ± std by inference depth, a second run skips what is done, and a cell that
    cannot be evaluated is named while the others still are."""
    import shutil
    import statistics

    from slr_zoo import evaluate, fit

    args = [str(ROOT / "recipes/quickstart.yaml"), f"output_dir={tmp_path}", "grid.seed=[0,1,2]", "task.n_train=64",
            "task.n_val=20", "trainer.max_steps=3", "trainer.progress_bar=false", "loop.max_steps=2"]
    assert fit.main(args) == 0
    grid = tmp_path / "quickstart"
    shutil.rmtree(grid / "seed=2" / "checkpoints")  # a cell whose weights are gone
    capsys.readouterr()
    assert evaluate.main([str(grid), "--steps", "1", "2", "3", "--show", "0"]) == 1
    captured = capsys.readouterr()
    assert "seed=2: failed" in captured.err and not (grid / "seed=2" / "eval.json").exists()
    by_depth = {}
    for cell in ("seed=0", "seed=1"):
        rows = json.loads((grid / cell / "eval.json").read_text())["by_depth"]
        assert [r["steps"] for r in rows] == [1, 2, 3]
        by_depth[cell] = {r["steps"]: r["accuracy"] for r in rows}
    table = (grid / "results.md").read_text().split("by loop iterations at inference")[1]
    row = next(line for line in table.splitlines() if line.startswith("| 2/3 |"))  # seeds 0-2: one variant
    expected = [f"{100 * statistics.fmean(v[t] for v in by_depth.values()):.1f} ± "
                f"{100 * statistics.stdev(v[t] for v in by_depth.values()):.1f}" for t in (1, 2, 3)]
    assert row == "| 2/3 | " + " | ".join(expected) + " |", row
    written = (grid / "seed=0" / "eval.json").stat().st_mtime_ns
    assert evaluate.main([str(grid), "--steps", "1", "2", "3", "--show", "0"]) == 1
    assert capsys.readouterr().out.count("already evaluated") == 2
    assert (grid / "seed=0" / "eval.json").stat().st_mtime_ns == written


def test_answer_cost_benchmark_reproduces_the_cells_own_validation_figures(prosqa_cell, tmp_path):
    """benchmarks/answer_cost.py answers as validation does: the accuracy, tokens and passes the run
    wrote in summary.json, and a cell against itself costs a ratio of 1 in passes."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import answer_cost

    out = tmp_path / "cost.json"
    assert answer_cost.main([str(prosqa_cell), str(prosqa_cell), "--rounds", "1", "--json", str(out)]) == 0
    summary = json.loads((prosqa_cell / "summary.json").read_text())
    rows = json.loads(out.read_text())["rows"]
    for row in rows:
        assert row["accuracy"] == pytest.approx(summary["val_accuracy"], abs=1e-4)
        assert row["tokens_per_answer"] == pytest.approx(summary["tokens_per_answer"], abs=1e-3)
        assert row["passes_per_answer"] == pytest.approx(summary["passes_per_answer"], abs=1e-3)
    assert rows[1]["passes_ratio"] == 1.0 and rows[0]["seconds_per_example"] > 0


def test_the_reach_probes_option_choice_is_scored_only_where_the_answer_names_an_option():
    """ProntoQA's published records carry a target and a neg_target like ProsQA's, but the answer is
    True or False: a 'choice between the two options' there would score something nobody asked."""
    from slr_zoo.evaluate import _reach_batch
    from slr_zoo.tasks import TASKS
    from slr_zoo.tasks.json_file import read_records
    from slr_zoo.tasks.tokenizer import build_word_tokenizer, text_ids

    prosqa, prontoqa = TASKS.get("prosqa")(), TASKS.get("prontoqa")()
    asks = next(prosqa.records("train"))
    # a record that mentions both its target and its neg_target by name
    tells = list(read_records(str(Path(__file__).resolve().parents[2] / "shared/data/prontoqa/valid.json")))[3]
    tokenizer = build_word_tokenizer([asks, tells])
    probe = torch.nn.Module()
    probe.probe = torch.nn.Linear(4, 1)
    for task, record, scored in ((prosqa, asks, 1), (prontoqa, tells, 0)):
        ids = torch.tensor([text_ids(tokenizer, record["question"])])
        query = torch.ones_like(ids, dtype=torch.bool)
        batch = _reach_batch(probe, [torch.randn(1, ids.size(1), 4)], [record], tokenizer, task, ids, query)
        assert len(batch["chosen"]) == scored, task


@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--batch-size", "-4"), ("--limit", "-1"),
                                           ("--limit", "0"), ("--limit", "many")])
def test_a_count_below_one_is_refused_by_its_option_name(option, value, tmp_path, capsys):
    """A negative --limit would slice from the end (7 of 8 records, silently) and a batch size
    below one divides by zero: both are refused before the cell loads."""
    from slr_zoo import evaluate

    with pytest.raises(SystemExit) as exit_:
        evaluate.main([str(tmp_path), option, value])
    assert exit_.value.code == 2
    assert f"argument {option}: must be an integer >= 1, got '{value}'" in capsys.readouterr().err


def test_a_data_file_is_named_its_unknown_words_warned_and_an_unevaluated_trained_depth_not_scored(
        prosqa_cell, tmp_path, capsys):
    """A file of another vocabulary scores near zero for that reason alone: the warning names the
    words, the header the file; with --steps leaving the trained depth (2) out, no count of its
    mistakes is claimed, and eval.json holds null there, not an empty list."""
    from slr_zoo import evaluate

    records = list(_task(prosqa_cell).records("val"))[:3]
    records[1] = {**records[1], "question": "zebra " + records[1]["question"]}
    path = tmp_path / "other.json"
    path.write_text(json.dumps(records))
    capsys.readouterr()
    assert evaluate.main([str(prosqa_cell), "--data", str(path), "--steps", "1", "--show", "0"]) == 0
    captured = capsys.readouterr()
    assert f"warning: 1 of 3 records of {path} have words the model's vocabulary lacks, read as [UNK]: zebra" \
        in captured.err
    assert f"3 records of {path}, trained at max_steps=2" in captured.out
    assert "the trained depth (2) was not among --steps: no mistakes listed" in captured.out
    assert "answered wrongly" not in captured.out
    assert json.loads((prosqa_cell / "eval.json").read_text())["mistakes"] is None


def test_the_first_thought_decodes_as_the_prompts_last_position_and_later_ones_follow_the_thoughts():
    """A thought decoded is the head's reading of the state it is made from: the first is the
    prompt's own prediction at [BOT]; the second is the prediction after the first thought is fed
    back, which a forward over the prompt with that thought as the next input gives too."""
    from slr_zoo.metrics.thoughts import decoded_thoughts

    torch.manual_seed(0)
    model = tiny_model(tiny_recipe(loop__mode="thoughts", loop__max_steps=2, training__encoding="latent")).eval()
    ids = torch.randint(4, 30, (2, 7))
    mask, query = torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)
    probs = decoded_thoughts(model, ids, mask, query, 2)
    assert probs.shape == (2, 2, model.backbone.lm_head.out_features)
    with torch.no_grad():
        plain = model(ids, mask, query_mask=query, features=True)
        torch.testing.assert_close(probs[:, 0], plain.logits[:, -1].float().softmax(-1), rtol=1e-5, atol=1e-6)
        thought = plain.features[:, -1]
        longer = torch.cat([ids, ids[:, -1:]], dim=1)
        fed = model(longer, torch.ones_like(longer), query_mask=torch.cat([query, torch.zeros_like(query[:, :1])], 1),
                    replace=(thought[:, None], torch.arange(8) == 7))
        torch.testing.assert_close(probs[:, 1], fed.logits[:, -1].float().softmax(-1), rtol=1e-5, atol=1e-6)


def test_a_thoughts_probability_is_split_by_the_reach_step_of_the_words_it_falls_on():
    from slr_zoo.metrics.thoughts import first_tokens, reach_shares, summarise_shares

    # a word split into two pieces is read by its first; punctuation is no word
    assert first_tokens(["tom", "wum", "wum", None, "tom"], [5, 6, 7, 8, 5]) == {"tom": 5, "wum": 6}
    # two words that start with the same piece cannot be told apart: both are left out
    assert first_tokens(["wumpus", "wumpus", "wumpuses", "wumpuses", "tom"], [6, 7, 6, 9, 5]) == {"tom": 5}
    probs = torch.zeros(2, 10)
    probs[0, 3] = 1.0                                   # thought 1: all on a word 2 hops away
    probs[1, 4], probs[1, 5], probs[1, 9] = 0.3, 0.1, 0.6  # thought 2: 1 hop, never reached, no word
    tokens = {2: 0, 3: 2, 4: 1, 5: 999}
    mass, shares = reach_shares(probs, tokens)
    assert mass == pytest.approx([1.0, 0.4])
    assert shares[0] == {0: 0.0, 1: 0.0, 2: 1.0, 999: 0.0}
    assert shares[1] == pytest.approx({0: 0.0, 1: 0.75, 2: 0.0, 999: 0.25})
    summary = summarise_shares([(mass, shares), ([0.5, 1.0], [{0: 1.0}, {0: 1.0}])], unreached=999)
    assert summary["records"] == 2
    assert summary["rows"][0] == {"thought": 1, "mass_on_question_words": 0.75, "records_with_mass": 2,
                                  "share_by_reach_step": {"0": 0.5, "1": 0.0, "2": 0.5, "never": 0.0}}
    # a thought with nothing on the question's words has no split to average in
    none = reach_shares(torch.zeros(1, 10), tokens)
    assert none == ([0.0], [{0: 0.0, 1: 0.0, 2: 0.0, 999: 0.0}])
    summary = summarise_shares([none, ([1.0], [{2: 1.0}])], unreached=999)
    assert summary["rows"][0]["share_by_reach_step"] == {"0": 0.0, "1": 0.0, "2": 1.0, "never": 0.0}
    assert summary["rows"][0]["records_with_mass"] == 1
    assert summarise_shares([none], unreached=999)["rows"][0]["share_by_reach_step"]["2"] is None
