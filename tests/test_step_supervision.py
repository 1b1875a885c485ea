"""Per-iteration supervision (``loop.step_supervision``): the per-hop targets reach the right
positions, the loss is the stated mixture, and a run trains end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model, tiny_recipe
from slr_zoo import fit
from slr_zoo.tasks.encoding import IGNORE, collate, encode
from slr_zoo.tasks.iterate import IterateTask
from slr_zoo.tasks.tokenizer import build_word_tokenizer
from slr_zoo.training.data import EncodedDataset, encode_split
from slr_zoo.training.objectives.answer import answer_loss
from slr_zoo.training.objectives.step_supervision import step_loss

ROOT = Path(__file__).resolve().parents[1]


def iterate_records(n=40):
    task = IterateTask(n_train=n, n_val=8, hops=[1, 4])
    return task, list(task.records("train"))


def test_iterate_gives_the_value_after_each_hop():
    task, records = iterate_records()
    for r in records:
        table = [int(v) for v in r["question"].split()[:10]]
        x, k = int(r["question"].split()[-2]), r["hops"]
        expected, v = [], x
        for _ in range(k):
            v = table[v]
            expected.append(str(v))
        assert task.step_answers(r) == expected and expected[-1] == r["answer"]


def test_step_labels_put_each_hop_answer_on_the_answer_positions():
    task, records = iterate_records()
    tokenizer = build_word_tokenizer(records)
    encoded = [encode(r, tokenizer, task.step_answers(r)) for r in records[:6]]
    # stored flat and read back unchanged
    stored = EncodedDataset(encoded, [r["hops"] for r in records[:6]], typecode="h")
    assert [stored[i][0] for i in range(6)] == encoded
    batch = collate(encoded, tokenizer.pad_token_id)
    H = max(r["hops"] for r in records[:6])
    assert batch["step_labels"].shape == (6, H, batch["labels"].size(1))
    for row, r in enumerate(records[:6]):
        start = int((batch["labels"][row] != IGNORE).nonzero()[0])
        answers = task.step_answers(r)
        for h in range(H):
            want = answers[min(h, len(answers) - 1)]
            assert tokenizer.convert_ids_to_tokens(int(batch["step_labels"][row, h, start])) == "▁" + want
            other = torch.ones_like(batch["labels"][row], dtype=torch.bool)
            other[start] = False
            assert torch.equal(batch["step_labels"][row, h][other], batch["labels"][row][other])  # EOS, ignores


def test_a_task_without_hop_answers_is_named():
    from slr_zoo.tasks.walk import WalkTask

    task = WalkTask(n_train=4, n_val=2)
    tokenizer = build_word_tokenizer(task.records("train"))
    with pytest.raises(ValueError, match="step supervision needs per-hop answers, which task WalkTask"):
        encode_split(task, "train", tokenizer, step_answers=True)


def hop_batch(*earlier_hops: list[int]):
    """A training-mode model (T = 3), two questions of 6 tokens answered at position 3 with [5, 6],
    and step labels whose first hops answer ``earlier_hops`` (the last hop is the answer)."""
    torch.manual_seed(0)
    model = tiny_model(tiny_recipe(loop__max_steps=3)).train()
    ids = torch.randint(4, 32, (2, 6))
    labels = torch.full_like(ids, IGNORE)
    labels[:, 3] = torch.tensor([5, 6])
    step_labels = labels[:, None].repeat(1, len(earlier_hops) + 1, 1)
    for hop, answers in enumerate(earlier_hops):
        step_labels[:, hop, 3] = torch.tensor(answers)
    return model, ids, labels, step_labels


def test_step_loss_is_the_mean_over_iterations_of_each_hop_target():
    model, ids, labels, step_labels = hop_batch([7, 8])   # hop 1 answer differs; hop 2 is the answer
    out = model(ids, record=("logits",))
    assert len(out.step_logits) == 3 and all(x.requires_grad for x in out.step_logits)
    expected = sum(F.cross_entropy(out.step_logits[t].flatten(0, 1), step_labels[:, min(t + 1, 2) - 1].flatten(),
                                   ignore_index=IGNORE) for t in range(3)) / 3
    torch.testing.assert_close(step_loss(out.step_logits, step_labels, labels), expected)
    assert out.logits is out.step_logits[-1]                    # the output is not decoded twice
    torch.testing.assert_close(answer_loss(out, labels),
                               F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE))
    step_loss(out.step_logits, step_labels, labels).backward()
    core = [p for n, p in model.named_parameters() if ".core." in f".{n}" or n.startswith("backbone.core")]
    assert core and all(p.grad is not None and p.grad.abs().sum() > 0 for p in core)


def test_a_loop_shorter_than_the_chain_ends_on_the_final_answer():
    """With fewer iterations than hops (``loop.max_steps=1``: no loop) the last iteration is still
    trained toward the answer, not toward a partial one it has no iteration left to finish."""
    model, ids, labels, step_labels = hop_batch([7, 8], [9, 10])   # three hops; the loop runs two iterations
    out = model(ids, steps=2, record=("logits",))
    first, last = (F.cross_entropy(x.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
                   for x, y in [(out.step_logits[0], step_labels[:, 0]), (out.step_logits[1], labels)])
    torch.testing.assert_close(step_loss(out.step_logits, step_labels, labels), (first + last) / 2)


def test_truncated_backprop_supervises_each_iteration_toward_its_own_hop():
    """With ``backprop_steps`` = 2 of 3 iterations, the two iterations with a graph are iterations
    2 and 3, trained toward hop 2's answer and the final answer; iteration 1 is left out."""
    model, ids, labels, step_labels = hop_batch([7, 8], [9, 10])   # three hops
    model.backprop_steps = 2
    out = model(ids, record=("logits",))
    assert out.step_logits[0] is None and all(x.requires_grad for x in out.step_logits[1:])
    second, last = (F.cross_entropy(x.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
                    for x, y in [(out.step_logits[1], step_labels[:, 1]), (out.step_logits[2], labels)])
    torch.testing.assert_close(step_loss(out.step_logits, step_labels, labels), (second + last) / 2)


def test_fit_trains_with_step_supervision_and_rejects_an_out_of_range_weight(tmp_path, capsys):
    tiny = [f"output_dir={tmp_path}", "task.n_train=64", "task.n_val=16", "trainer.max_steps=3",
            "trainer.batch_size=16", "backbone.hidden_size=32", "trainer.progress_bar=false"]
    recipe = str(ROOT / "recipes/quickstart.yaml")
    assert fit.main([recipe, *tiny, "loop.step_supervision=0.5"]) == 0
    summary = json.loads((tmp_path / "quickstart/default/summary.json").read_text())
    assert summary["status"] == "ok" and summary["train_steps"] == 3
    assert fit.main([recipe, *tiny, "loop.step_supervision=1.5", "name=bad"]) == 2
    assert "loop.step_supervision: is the per-iteration loss's share" in capsys.readouterr().err


def test_prosqa_gives_the_concept_reached_after_each_hop():
    from slr_zoo.tasks.prosqa import ProsQATask

    task = ProsQATask(n_train=20, n_val=2)
    records = list(task.records("train"))
    tokenizer = build_word_tokenizer(records)
    for r in records:
        answers = task.step_answers(r)
        assert len(answers) == len(r["steps"]) and answers[-1] == r["answer"]
        person = r["answer"].split(" is a ")[0]
        path = [a.split(" is a ")[1].rstrip(".") for a in answers]
        assert all(a.startswith(f"{person} is a ") for a in answers)
        assert set(path) <= set(r["idx_to_symbol"])
        encode(r, tokenizer, answers)   # every per-hop answer has the answer's token length


def test_step_supervision_with_a_policy_that_decodes_without_grad():
    """``kl`` decodes each step under no_grad; the per-step loss must still get a graph."""
    torch.manual_seed(0)
    model = tiny_model(tiny_recipe(loop__max_steps=3, loop__halting={"name": "kl"})).train()
    ids = torch.randint(4, 32, (2, 6))
    out = model(ids, record=("logits",))
    assert len(out.step_logits) == 3 and all(x.requires_grad for x in out.step_logits)
    assert out.logits.requires_grad
    labels = torch.full_like(ids, IGNORE)
    labels[:, 3] = 5
    step_loss(out.step_logits, labels[:, None], labels).backward()


@pytest.mark.parametrize("policy", ["act", "exit_gate", "ponder"])
def test_full_step_supervision_is_refused_for_a_policy_that_learns_from_the_answer_loss(policy):
    from slr_zoo.recipe import load, validate
    from slr_zoo.registry import ComponentError

    recipe = str(ROOT / "recipes/quickstart.yaml")
    with pytest.raises(ComponentError, match=rf"loop.step_supervision: 1.0 leaves no weight on the answer loss, "
                                             rf"the only loss through which halting '{policy}' learns when to stop"):
        validate(load(recipe, [f"loop.halting={{name: {policy}}}", "loop.step_supervision=1.0"]))
    validate(load(recipe, [f"loop.halting={{name: {policy}}}", "loop.step_supervision=0.5"]))
    validate(load(recipe, ["loop.halting={name: kl}", "loop.step_supervision=1.0"]))   # decides, learns nothing
