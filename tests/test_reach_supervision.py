"""Prefix attention (``backbone.attention: prefix``) and per-token reach supervision
(``loop.reach_supervision``): the question is read both ways while the answer stays causal, every
mention of a concept is labelled with the hop that reaches it, and the probe's loss trains the loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import VOCAB, tiny_model, tiny_recipe
from slr_zoo import fit
from slr_zoo.tasks.base import UNREACHED
from slr_zoo.tasks.encoding import IGNORE, collate, encode
from slr_zoo.tasks.json_file import read_records
from slr_zoo.tasks.prosqa import ProsQATask
from slr_zoo.tasks.tokenizer import build_word_tokenizer, text_ids, token_words
from slr_zoo.training.data import EncodedDataset, encode_split
from slr_zoo.training.objectives.reach import ReachProbe

ROOT = Path(__file__).resolve().parents[1]
SHARED_PROSQA = ROOT.parent / "shared/data/prosqa/valid.json"
SHARED_PRONTOQA = ROOT.parent / "shared/data/prontoqa/valid.json"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_attention_reads_the_question_both_ways_and_the_answer_causally(family):
    recipe = tiny_recipe(backbone__name=family, backbone__attention="prefix")
    model = tiny_model(recipe).eval()
    ids = torch.randint(4, VOCAB, (1, 10), generator=torch.Generator().manual_seed(0))
    question = torch.arange(10)[None] < 6   # positions 0..5 are the question (its separator included)
    base = model(ids, query_mask=question).logits
    later_question = ids.clone()
    later_question[0, 5] = (ids[0, 5] + 1 - 4) % (VOCAB - 4) + 4
    changed = model(later_question, query_mask=question).logits
    assert not torch.allclose(base[0, 0], changed[0, 0])   # an early question position sees a later one
    later_answer = ids.clone()
    later_answer[0, 8] = (ids[0, 8] + 1 - 4) % (VOCAB - 4) + 4
    changed = model(later_answer, query_mask=question).logits
    torch.testing.assert_close(base[0, :8], changed[0, :8])   # nothing before an answer token sees it
    causal = tiny_model(tiny_recipe(backbone__name=family)).eval()
    torch.testing.assert_close(causal(ids).logits[0, 0], causal(later_question).logits[0, 0])


def test_prefix_attention_ignores_padding_and_needs_the_question():
    model = tiny_model(tiny_recipe(backbone__attention="prefix")).eval()
    ids = torch.randint(4, VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    question = torch.arange(7)[None] < 5
    alone = model(ids, query_mask=question).logits
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)          # right padding
    out = model(padded, query_mask=torch.arange(10)[None] < 5, real_mask=torch.arange(10)[None] < 7).logits
    torch.testing.assert_close(out[:, :7], alone)
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)             # left padding (generation)
    mask = (torch.arange(10)[None] >= 3).long()
    out = model(left, attention_mask=mask, query_mask=(torch.arange(10)[None] >= 3) & (torch.arange(10)[None] < 8)).logits
    torch.testing.assert_close(out[:, 3:], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attention='prefix' needs the question's extent"):
        model(ids)


def test_an_unknown_attention_is_named(tmp_path, capsys):
    recipe = str(ROOT / "recipes/quickstart.yaml")
    assert fit.main([recipe, f"output_dir={tmp_path}", "backbone.attention=bidirectional"]) == 2
    assert "backbone.attention" in capsys.readouterr().err


def prosqa_records(n=12):
    task = ProsQATask(n_train=n, n_val=2)
    return task, list(task.records("train"))


def test_prosqa_reach_steps_are_distances_from_the_root():
    task, records = prosqa_records()
    for r in records + list(read_records(str(SHARED_PROSQA)))[:50]:
        reach = task.reach_steps(r)
        symbols = r["idx_to_symbol"]
        assert reach[symbols[r["root"]]] == 0
        assert 1 <= reach[symbols[r["target"]]] <= len(r["steps"])
        assert reach[symbols[r["neg_target"]]] == UNREACHED
        for parent, child in r["edges"]:   # one hop further at most
            if reach[symbols[parent]] != UNREACHED:
                assert reach[symbols[child]] <= reach[symbols[parent]] + 1
    # a file of questions alone (evaluate --data) has no graph to measure: no reach steps, no error
    assert task.reach_steps({"question": records[0]["question"], "answer": records[0]["answer"]}) is None


def test_prontoqa_reach_steps_follow_the_entity_up_its_chain_of_concepts():
    """Generated records know their chain; published ones are only text, and their chain of
    thought names the concepts in the order the reasoning reaches them."""
    from slr_zoo.tasks.prontoqa import ProntoQATask, plural

    task = ProntoQATask(n_train=200, hops=[1, 5])
    for r in task.records("train"):
        reach = task.reach_steps(r)
        assert reach[r["entity"]] == 0
        for t, concept in enumerate(r["chain"], start=1):
            assert reach[concept] == reach[plural(concept)] == reach[plural(concept).capitalize()] == t
        mentioned = {w.lower().rstrip(".") for w in r["question"].split()}
        never = [w for w, step in reach.items() if step == UNREACHED and w in mentioned]
        assert never  # the subtype and the distractor concept: named, never reached
    for r in read_records(str(SHARED_PRONTOQA)):
        reach = task.reach_steps(r)
        concepts = [step.split(". ")[0].rsplit(" ", 1)[-1].rstrip(".") for step in r["steps"][:-1]]
        assert [reach[c] for c in concepts] == list(range(1, len(concepts) + 1))


def test_prontoqa_properties_are_reached_exactly_when_the_entity_has_them():
    """Read from the question alone, checked against the answer: the statement's property is
    reached iff the entity has it, so the statement is true iff it is reached and not negated."""
    from slr_zoo.tasks.prontoqa import ProntoQATask

    task = ProntoQATask(n_train=300, hops=[1, 5])
    for r in list(task.records("train")) + list(read_records(str(SHARED_PRONTOQA))):
        reach = task.reach_steps(r)
        statement = r["question"].rsplit(":", 1)[1].strip().rstrip(".").split()
        has = ("not" not in statement) == (r["answer"] == "True")
        assert (reach[statement[-1]] != UNREACHED) == has
        if has and "hops" in r and "chain" in r:  # one hop after the concept that gives it
            assert reach[statement[-1]] == r["hops"] + 1


def test_every_mention_of_a_concept_carries_its_reach_step():
    task, records = prosqa_records()
    tokenizer = build_word_tokenizer(records)
    encoded = [encode(r, tokenizer, reach_steps=task.reach_steps(r)) for r in records[:4]]
    for r, e in zip(records, encoded):
        reach = task.reach_steps(r)
        words = token_words(tokenizer, r["question"])
        assert len(e.reach) == len(e.input_ids)
        for i, word in enumerate(words):
            assert e.reach[i] == reach.get(word, IGNORE)
        assert all(x == IGNORE for x in e.reach[len(words):])          # separator and answer: unlabelled
        assert sum(x != IGNORE for x in e.reach) >= 2 * len(r["edges"])  # both ends of every fact
    stored = EncodedDataset(encoded, typecode="h")
    assert [stored[i][0] for i in range(4)] == encoded
    batch = collate(encoded, tokenizer.pad_token_id)
    assert batch["reach"].shape == batch["input_ids"].shape
    assert (batch["reach"][~batch["real_mask"]] == IGNORE).all()


def test_token_words_label_every_piece_of_a_split_word():
    """A sub-word tokenizer splits names into pieces; each piece carries the word's label."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["Every wumpus is a lempus ."] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["[UNK]"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    text = "Every zorpus is a wumpus."
    words = token_words(fast, text)
    pieces = [fast.decode([i]).strip() for i in text_ids(fast, text)]
    assert len(words) == len(pieces) and words.count("zorpus") >= 2      # an unseen word: several pieces
    assert "".join(p for p, w in zip(pieces, words) if w == "zorpus") == "zorpus"
    assert words[-1] is None                                             # the full stop


def test_a_task_without_reach_steps_is_named():
    from slr_zoo.tasks.iterate import IterateTask

    task = IterateTask(n_train=4, n_val=2)
    tokenizer = build_word_tokenizer(task.records("train"))
    with pytest.raises(ValueError, match="the reach probe needs per-word reach steps, which task IterateTask"):
        encode_split(task, "train", tokenizer, reach=True)


def test_reach_loss_is_the_mean_over_iterations_and_trains_probe_and_core():
    torch.manual_seed(0)
    model = tiny_model(tiny_recipe(backbone__attention="prefix")).train()
    probe = ReachProbe(weight=1.0, hidden_size=model.backbone.hidden_size).train()
    ids = torch.randint(4, VOCAB, (2, 6))
    reach = torch.full_like(ids, IGNORE)
    reach[:, 1], reach[:, 2], reach[0, 4] = 0, 2, UNREACHED
    out = model(ids, query_mask=torch.ones_like(ids, dtype=torch.bool), record=probe.record)
    probed = probe.step_logits(out)
    assert [t for t, _ in probed] == [0, 1, 2, 3] and probed[0][1].shape == ids.shape
    torch.testing.assert_close(probed[0][1], probe.probe(out.initial_state).squeeze(-1))  # h_0: where the search starts
    labelled = reach != IGNORE
    expected = sum(F.binary_cross_entropy_with_logits(z[labelled], (reach[labelled] <= t).float())
                   for t, z in probed) / 4
    loss, logs = probe({"reach": reach}, out, detail=True)
    torch.testing.assert_close(loss, expected)
    assert set(logs) == {"reach_loss", *(f"reach_accuracy_t{t}" for t in range(4))}
    loss.backward()
    for name, p in [*model.named_parameters(), *(("probe." + n, p) for n, p in probe.named_parameters())]:
        if name.startswith(("probe", "backbone.core", "backbone.prelude")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_reach_probe_under_truncated_backprop_reads_each_iteration_at_its_own_hop():
    """Only the iterations with a graph are probed, each against the hop count of its own
    iteration: with backprop_steps = 1 of 3, iteration 3 is asked for 'reached within 3 hops'."""
    torch.manual_seed(0)
    model = tiny_model(tiny_recipe(backbone__attention="prefix", loop__backprop_steps=1)).train()
    probe = ReachProbe(hidden_size=model.backbone.hidden_size).train()
    ids = torch.randint(4, VOCAB, (2, 6))
    reach = torch.full_like(ids, IGNORE)
    reach[:, 1], reach[:, 2] = 3, UNREACHED
    out = model(ids, query_mask=torch.ones_like(ids, dtype=torch.bool), record=probe.record)
    (t0, z0), (t, z) = probe.step_logits(out)
    assert (t0, t) == (0, 3)
    labelled = reach != IGNORE
    expected = (F.binary_cross_entropy_with_logits(z0[labelled], (reach[labelled] <= 0).float())
                + F.binary_cross_entropy_with_logits(z[labelled], (reach[labelled] <= 3).float())) / 2
    torch.testing.assert_close(probe({"reach": reach}, out)[0], expected)


def test_reach_probe_in_thoughts_mode_reads_the_prompt_pass_and_trains_the_loop():
    """Continuous thoughts made by the depth loop (both granularities): the question's states at
    iteration t are those of a plain depth pass over the prompt, so the depth loop's probe asks
    them the same question, and its loss reaches the core and every thought's pass."""
    torch.manual_seed(0)
    model = tiny_model(tiny_recipe(backbone__attention="prefix", loop__mode="thoughts", training__encoding="latent",
                                   loop__reach_supervision=1.0)).train()
    probe = ReachProbe(hidden_size=model.backbone.hidden_size).train()
    # row 1's question is two tokens shorter and left-padded (as collate aligns the slots)
    ids = torch.randint(4, VOCAB, (2, 9))
    real = torch.ones_like(ids, dtype=torch.bool)
    real[1, :2] = False
    query = torch.zeros_like(ids, dtype=torch.bool)
    query[0, :3], query[1, 2:3] = True, True
    slots = torch.zeros_like(ids, dtype=torch.bool)
    slots[:, 4:6] = True  # [BOT] at 3, two thoughts, then [EOT] and the answer
    reach = torch.full_like(ids, IGNORE)
    reach[0, 0], reach[0, 1], reach[0, 2], reach[1, 2] = 0, 2, UNREACHED, 1
    out = model(ids, real.long(), query_mask=query, slot_mask=slots, real_mask=real, record=probe.record)
    loss, _ = probe({"reach": reach}, out)
    for row, start in ((0, 0), (1, 2)):  # each question alone, unpadded, in a plain depth pass
        plain = model(ids[row:row + 1, start:4], query_mask=query[row:row + 1, start:4], record=probe.record)
        assert len(out.states) == len(plain.states) == 3
        for joined, alone in zip([out.initial_state, *out.states], [plain.initial_state, *plain.states]):
            torch.testing.assert_close(joined[row:row + 1, start:4], alone)
    loss.backward()  # the probe's loss alone reaches the probe and the loop
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in probe.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.core.parameters())


def test_the_shipped_reach_recipe_trains_end_to_end(tmp_path):
    """recipes/prosqa.yaml as shipped (prefix attention, reach probe, curriculum), shortened."""
    out = tmp_path / "runs"
    args = [str(ROOT / "recipes/prosqa.yaml"), f"output_dir={out}", "task.n_train=32", "trainer.max_steps=3",
            "trainer.batch_size=8", "trainer.val_every=3", "trainer.progress_bar=false", "name=tiny",
            "task.curriculum=[{until: 2, hops: [1, 2], nodes: [6, 8], n_train: 16}]"]
    assert fit.main(args) == 0
    summary = json.loads((out / "tiny/default/summary.json").read_text())
    assert summary["status"] == "ok" and summary["train_steps"] == 3
