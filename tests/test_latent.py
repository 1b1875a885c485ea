"""Latent chain of thought in one harness: the encodings label the right tokens, the curriculum
gives the right stage at every batch (a resumed run too), continuous thoughts over the cache equal
the same thoughts without one, gradients reach every thought's stabilisers, and distillation
learns toward its teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_model, tiny_recipe

from slr_zoo import fit
from slr_zoo.inference import generate_ids
from slr_zoo.recipe import build_task, check_cell, load, validate
from slr_zoo.registry import ComponentError
from slr_zoo.tasks.encoding import IGNORE, Encoding, collate
from slr_zoo.tasks.tokenizer import (
    ANS,
    BOT,
    EOS,
    EOT,
    PAUSE,
    SEP,
    THINK,
    build_word_tokenizer,
)
from slr_zoo.training.curriculum import StagedBatchSampler, StageSchedule
from slr_zoo.training.data import ResumableBatchSampler
from slr_zoo.training.settings import CurriculumConfig

ROOT = Path(__file__).resolve().parents[1]
RECORD = {"question": "Tom is a cat. Is Tom a cat or a dog?", "steps": ["Tom is a cat.", "Every cat is a pet."],
          "answer": "Tom is a pet."}


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer([RECORD])


def pieces(encoded, tokenizer):
    """Each position's token, and what it is labelled with (text or answer), as strings."""
    tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids)
    label = [tokenizer.convert_ids_to_tokens([x])[0] if x != IGNORE else None for x in encoded.labels]
    text = [tokenizer.convert_ids_to_tokens([x])[0] if x != IGNORE else None for x in encoded.text_labels]
    return tokens, label, text


# ------------------------------------------------------------------------------- encodings
def test_cot_labels_every_step_token_as_text_and_the_answer_after_ans(tokenizer):
    e = Encoding("cot").encode(RECORD, tokenizer)
    tokens, label, text = pieces(e, tokenizer)
    sep = tokens.index(SEP)
    ans = tokens.index(ANS)
    assert e.prompt_length == sep + 1
    # position i predicts token i + 1: text labels from [SEP] up to the token before [ANS]
    assert text[sep:ans - 1] == tokens[sep + 1:ans] and all(x is None for x in text[:sep] + text[ans - 1:])
    assert label[ans - 1:] == tokens[ans:] + [None] and tokens[-1] == EOS
    assert all(x is None for x in label[:ans - 1])
    assert "".join(tokens[sep + 1:ans]).replace("▁", " ").strip() == "Tom is a cat. Every cat is a pet."


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_latent_replaces_the_first_k_steps_with_unlabelled_slots_and_never_predicts_eot(tokenizer, stage):
    e = Encoding("latent", thoughts_per_step=2, final_stage=2, continuous=True).encode(RECORD, tokenizer, stage)
    tokens, label, text = pieces(e, tokenizer)
    bot, eot, ans = tokens.index(BOT), tokens.index(EOT), tokens.index(ANS)
    assert tokens[bot + 1:eot] == [THINK] * (2 * stage) and e.slots == 2 * stage
    assert bot == e.prompt_length  # [BOT] right after the question and its [SEP]
    assert all(x is None for x in label[:ans - 1] + text[:eot])  # question, markers, slots: no label
    written = ["Tom is a cat.", "Every cat is a pet."][stage:]
    assert "".join(t for t in text[eot:ans - 1]).replace("▁", " ").strip() == " ".join(written)
    assert label[ans - 1:] == tokens[ans:] + [None]


def test_pause_fills_the_slots_with_pause_tokens_in_one_pass_and_depth_latent_has_no_slots(tokenizer):
    pause = Encoding("pause", final_stage=2).encode(RECORD, tokenizer, 2)
    tokens, _, text = pieces(pause, tokenizer)
    assert tokens.count(PAUSE) == 2 and pause.slots == 0 and all(x is None for x in text)
    depth = Encoding("latent", thoughts_per_step=3, final_stage=2)
    assert THINK not in tokenizer.convert_ids_to_tokens(depth.encode(RECORD, tokenizer, 1).input_ids)
    assert [depth.depth(k) for k in (0, 1, 2)] == [1, 3, 6]


def test_generated_text_is_scored_from_after_the_last_ans(tokenizer):
    enc = Encoding("cot")
    ids = tokenizer.encode(" Tom is a cat. [ANS] Tom is a pet. [EOS]", add_special_tokens=False)
    assert enc.answer_text(ids, tokenizer).strip() == "Tom is a pet."
    no_answer = tokenizer.encode(" Tom is a cat.", add_special_tokens=False)
    assert enc.answer_text(no_answer, tokenizer) == ""


def test_a_thoughts_batch_aligns_every_rows_slots_by_left_padding(tokenizer):
    enc = Encoding("latent", final_stage=2, continuous=True)
    short = {**RECORD, "question": "Is Tom a cat?"}
    batch = collate([enc.encode(r, tokenizer, 2) for r in (RECORD, short)], tokenizer.pad_token_id)
    slots = batch["slot_mask"]
    assert slots.sum(1).tolist() == [2, 2] and torch.equal(slots[0], slots[1])
    think = tokenizer.convert_tokens_to_ids(THINK)
    assert bool((batch["input_ids"][slots] == think).all())
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][0].all()  # the short row is left-padded


@pytest.mark.parametrize("stage", [0, 2])
def test_latent_reach_labels_sit_on_the_question_words_at_every_stage_and_follow_left_padding(tokenizer, stage):
    """thought_reach's labels: the answer encoding's reach steps on the question's tokens, the same
    at every curriculum stage, nothing elsewhere; a left-padded thoughts batch shifts them with
    their tokens."""
    steps = {"Tom": 0, "cat": 1, "dog": 3}
    enc = Encoding("latent", final_stage=2, continuous=True)
    e = enc.encode(RECORD, tokenizer, stage, reach_steps=steps)
    plain = Encoding("answer").encode(RECORD, tokenizer, reach_steps=steps)
    tokens = tokenizer.convert_ids_to_tokens(e.input_ids)
    assert len(e.reach) == len(e.input_ids) and e.reach[:e.prompt_length] == plain.reach[:e.prompt_length]
    labelled = {i: r for i, r in enumerate(e.reach) if r != IGNORE}
    assert {tokens[i].lstrip("▁"): r for i, r in labelled.items()} == steps
    assert sorted(labelled) == [0, 3, 6, 8, 11]  # Tom, cat, Tom, cat, dog; [SEP], slots and steps unlabelled
    short = {**RECORD, "question": "Is Tom a dog?"}
    batch = collate([enc.encode(r, tokenizer, stage, reach_steps=steps) for r in (RECORD, short)],
                    tokenizer.pad_token_id)
    marked = batch["reach"] != IGNORE
    words = tokenizer.convert_ids_to_tokens(batch["input_ids"][marked].tolist())
    assert [w.lstrip("▁") for w in words] == ["Tom", "cat", "Tom", "cat", "dog", "Tom", "dog"]
    assert batch["reach"][marked].tolist() == [0, 1, 0, 1, 3, 0, 3]


# ------------------------------------------------------------------------------ curriculum
def test_the_schedule_advances_every_epochs_per_stage_and_stops_at_the_last():
    schedule = StageSchedule(CurriculumConfig(max_latent_stage=3, epochs_per_stage=2), batches_per_epoch=5)
    assert [schedule.scheduled(b) for b in (0, 9, 10, 19, 20, 29, 30, 500)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert StageSchedule(CurriculumConfig(max_latent_stage=3), 5).scheduled(0) == 3  # no curriculum: the last stage
    # a fraction of an epoch: 0.2 x 1250 batches = a stage every 250 batches; never under one batch
    fifth = StageSchedule(CurriculumConfig(max_latent_stage=6, epochs_per_stage=0.2), batches_per_epoch=1250)
    assert [fifth.scheduled(b) for b in (0, 249, 250, 1499, 1500, 8000)] == [0, 0, 1, 5, 6, 6]
    tiny = StageSchedule(CurriculumConfig(max_latent_stage=2, epochs_per_stage=0.01), batches_per_epoch=5)
    assert [tiny.scheduled(b) for b in (0, 1, 2, 3)] == [0, 1, 2, 2]
    mixed = StageSchedule(CurriculumConfig(max_latent_stage=3, epochs_per_stage=100, uniform_prob=0.5), 5, seed=1)
    draws = [mixed.stage(b) for b in range(200)]
    assert draws == [mixed.stage(b) for b in range(200)]  # a pure function of the batch: resumable
    assert 60 < sum(d != 0 for d in draws) < 140 and set(draws) <= {0, 1, 2, 3}


def test_a_resumed_sampler_lands_in_the_stage_it_left():
    schedule = StageSchedule(CurriculumConfig(max_latent_stage=4, epochs_per_stage=1), batches_per_epoch=4)

    def stages(start, n):
        sampler = StagedBatchSampler(ResumableBatchSampler(32, 8, seed=3, start=start), schedule)
        out = []
        while len(out) < n:
            out += [(b[0][1], [i for i, _, _ in b]) for b in sampler]
        return out[:n]

    whole = stages(0, 14)
    assert [s for s, _ in whole] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 2
    assert stages(6, 8) == whole[6:]  # same stages and same examples after a resume at batch 6


# -------------------------------------------------------------------------------- thoughts
def thoughts_model(dtype=torch.float64, stage=2, **overrides):
    """A tiny thoughts-mode model with stabilisers away from their neutral start."""
    nodes = dict(loop__mode="thoughts", training__encoding="latent", training__curriculum__max_latent_stage=stage,
                 loop__combine={"name": "gated"}, loop__injection={"name": "add"})
    model = tiny_model(tiny_recipe(**{**nodes, **overrides}))
    with torch.no_grad():
        for p in list(model.combine.parameters()) + list(model.loop_lora.parameters()) + \
                list(model.step_embedding.parameters()):
            p.add_(0.3 * torch.randn_like(p))
    return model.to(dtype)


def slotted(n=2, lengths=(5, 8), seed=4):
    """A left-padded batch whose rows have ``n`` slots right after their prompts, then 3 tokens."""
    g = torch.Generator().manual_seed(seed)
    prefix = max(lengths)
    width = prefix + n + 3
    ids = torch.randint(5, VOCAB, (len(lengths), width), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        mask[row, : prefix - length] = 0
    slots = torch.zeros_like(ids, dtype=torch.bool)
    slots[:, prefix:prefix + n] = True
    return ids, mask, slots


@pytest.mark.parametrize("grad", [False, True])
def test_a_thought_made_over_the_cache_equals_the_same_thought_made_without_one(grad):
    model = thoughts_model(stage=1, loop__loop_lora={"name": "none"}).eval()  # index-free, so one uncached pass compares
    ids, mask, slots = slotted(n=1)
    first = int(slots.any(0).nonzero()[0])
    with torch.set_grad_enabled(grad):
        cached = model(ids, mask, slot_mask=slots)
        before = model(ids[:, :first], mask[:, :first], features=True)
        thought = before.features[:, -1]
        where = slots.clone()
        plain = model(ids, mask, replace=(thought[:, None].expand(-1, ids.size(1), -1), where))
    torch.testing.assert_close(cached.logits[:, :first], before.logits, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(cached.logits[:, first:], plain.logits[:, first:], atol=1e-10, rtol=1e-10)


def test_zero_thoughts_is_the_no_cot_model():
    torch.manual_seed(0)
    depth = tiny_model(tiny_recipe(loop__combine={"name": "gated"}), seed=3).double().eval()
    thoughts = tiny_model(tiny_recipe(loop__mode="thoughts", training__encoding="latent",
                                      loop__combine={"name": "gated"}), seed=3).double().eval()
    ids, mask, _ = slotted(n=0)
    assert torch.equal(depth(ids, mask).logits, thoughts(ids, mask, slot_mask=torch.zeros_like(ids).bool()).logits)
    a = generate_ids(depth, ids, mask, max_new_tokens=4)
    b = generate_ids(thoughts, ids, mask, max_new_tokens=4, thoughts=0)
    assert torch.equal(a.sequences, b.sequences)


@pytest.mark.parametrize("steps", [1, 2])
def test_generation_makes_the_thoughts_training_makes(steps):
    """Thoughts fed back by generation, then [EOT]: the first answer token's logits equal the
    multi-pass forward's at [EOT], with every stabiliser index-dependent."""
    model = thoughts_model(loop__max_steps=steps, loop__step_embedding={"name": "learned"},
                           loop__loop_lora={"name": "per_step", "rank": 2, "targets": ["all-linear"]}).eval()
    ids, mask, slots = slotted(n=2)
    eot = 7
    first = int(slots.any(0).nonzero()[0])
    full = ids.clone()
    full[:, first + 2] = eot
    forward = model(full[:, :first + 3], mask[:, :first + 3], slot_mask=slots[:, :first + 3])
    generated = generate_ids(model, ids[:, :first], mask[:, :first], max_new_tokens=1, thoughts=2,
                             after_thoughts=[eot], output_logits=True)
    torch.testing.assert_close(generated.logits[:, 0], forward.logits[:, -1], atol=1e-10, rtol=1e-10)


def test_gradients_reach_every_thoughts_step_embedding_and_loop_lora():
    T, n = 2, 2
    model = thoughts_model(torch.float32, stage=n, loop__max_steps=T, loop__step_embedding={"name": "learned"},
                           loop__loop_lora={"name": "per_step", "rank": 2, "targets": ["all-linear"]}).train()
    ids, mask, slots = slotted(n=n)
    model(ids, mask, slot_mask=slots).logits[:, -3:].pow(2).mean().backward()
    indices = (n + 1) * T  # every pass's T indices
    table = next(p for p in model.step_embedding.parameters() if p.dim() == 2)
    assert table.size(0) >= indices and all(table.grad[i].abs().sum() > 0 for i in range(indices))
    for name, p in model.loop_lora.named_parameters():
        assert p.grad is not None, name
        per_step = p.grad.flatten(1).abs().sum(1)
        assert bool((per_step[:indices] > 0).all()), (name, per_step)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_the_thought_reach_probe_scores_each_thought_against_the_question_and_trains_every_part():
    """thought_reach: thought t (the features at [BOT], then at slot t - 1) against each labelled
    question token's features, a bilinear score, BCE toward "reached within t hops"; computed by
    hand here. Its gradient reaches the probe and the model that makes the thoughts; with no
    thoughts (stage 0) it is zero and still touches every probe parameter (DDP)."""
    from slr_zoo.training.objectives.thought_reach import ThoughtReachProbe

    n = 2
    model = thoughts_model(torch.float32, stage=n).train()
    ids, mask, slots = slotted(n=n)
    torch.manual_seed(0)
    probe = ThoughtReachProbe(hidden_size=model.backbone.hidden_size)
    with torch.no_grad():
        probe.bias.fill_(0.2)
    reach = torch.full_like(ids, IGNORE)
    reach[0, 4:7], reach[1, 0:3] = torch.tensor([0, 1, 2]), torch.tensor([2, 3, 1])
    out = model(ids, mask, slot_mask=slots)
    loss, logs = probe({"reach": reach, "slot_mask": slots}, out, detail=True)
    first = int(slots.any(0).nonzero()[0])
    terms = []
    for b, s in [(0, 4), (0, 5), (0, 6), (1, 0), (1, 1), (1, 2)]:
        for t in (1, 2):
            q = probe.query(out.features[b, first - 2 + t])
            k = probe.key(out.features[b, s])
            z = q @ k / k.numel() ** 0.5 + 0.2
            terms.append(torch.nn.functional.binary_cross_entropy_with_logits(z, (reach[b, s] <= t).float()))
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    assert set(logs) == {"thought_reach_loss", "thought_reach_accuracy_t1", "thought_reach_accuracy_t2"}
    loss.backward()
    for name, p in [*probe.named_parameters(), *model.backbone.named_parameters()]:
        if "embed_tokens" not in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    probe.zero_grad()
    zero, logs = probe({"reach": reach}, out)
    zero.backward()
    assert float(zero.detach()) == 0 and logs == {} and all(p.grad is not None for p in probe.parameters())
    with pytest.raises(ComponentError, match="objectives.probe: thought_reach reads the thoughts loop; it needs "
                                             "loop.mode: thoughts .got 'depth'."):
        tiny_recipe(objectives={"probe": {"name": "thought_reach"}})
    with pytest.raises(ComponentError, match="objectives.probe: needs per-word reach steps, which task IterateTask"):
        check_cell(tiny_recipe(loop__mode="thoughts", training__encoding="latent",
                               training__curriculum__max_latent_stage=1, objectives={"probe": {"name": "thought_reach"}}))


# ---------------------------------------------------------------------------- recipes, distillation
def run(recipe: str, tmp_path: Path, *overrides: str) -> dict:
    args = [str(ROOT / "recipes" / f"{recipe}.yaml"), f"output_dir={tmp_path}", "task.n_train=64", "task.n_val=8",
            "task.val_file=null", "trainer.max_steps=3", "trainer.batch_size=8", "trainer.eval_batch_size=8",
            "trainer.progress_bar=false", *overrides]
    assert fit.main(args) == 0
    return json.loads((tmp_path / recipe / "default" / "summary.json").read_text())


@pytest.mark.parametrize("recipe", ["no_cot", "cot", "pause", "coconut"])
def test_each_training_mode_recipe_validates_and_trains_a_few_steps(recipe, tmp_path):
    summary = run(recipe, tmp_path, "training.curriculum.epochs_per_stage=0" if recipe == "coconut" else "seed=0")
    assert summary["status"] == "ok" and summary["train_steps"] == 3


def test_distillation_from_a_cot_teacher_trains_and_a_wrong_width_is_a_recipe_error(tmp_path):
    run("cot", tmp_path)
    teacher = tmp_path / "cot" / "default"
    summary = run("distill", tmp_path, f"training.distill.teacher={teacher}")
    assert summary["status"] == "ok"
    recipe = load(str(ROOT / "recipes/distill.yaml"), [f"training.distill.teacher={teacher}", "backbone.hidden_size=32",
                                                         "task.val_file=null"])
    validate(recipe)
    with pytest.raises(ComponentError, match=r"training.distill.teacher.*hidden size is 64.*32"):
        check_cell(recipe)


def test_the_distillation_loss_falls_toward_the_teachers_states(tmp_path):
    from slr_zoo.training.data import ReasoningDataModule

    run("cot", tmp_path)
    teacher = tmp_path / "cot" / "default"
    recipe = load(str(ROOT / "recipes/distill.yaml"), [f"training.distill.teacher={teacher}", "task.val_file=null",
                                                         "task.n_train=16", "task.n_val=4", "training.distill.loss=mse"])
    from slr_zoo.recipe import build_cell

    parts = build_cell(recipe, tmp_path / "student")
    objective = parts.module.objectives["distill"]
    data: ReasoningDataModule = parts.data
    data.setup("fit")
    batch = collate([data.train_set[(i, 0, 0)][0] for i in range(8)], parts.tokenizer.pad_token_id)
    model = parts.module.model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = model(batch["input_ids"], steps=6, query_mask=batch["query_mask"], real_mask=batch["real_mask"],
                    record=("states",))
        loss, _ = objective(batch, out)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    assert objective.teacher is not None and not any(p.requires_grad for p in objective.teacher.parameters())


def test_thoughts_mode_refuses_what_it_cannot_run():
    with pytest.raises(ComponentError, match="loop.mode.*training.encoding: latent"):
        tiny_recipe(loop__mode="thoughts")
    with pytest.raises(ComponentError, match="loop.halting.*fixed"):
        tiny_recipe(loop__mode="thoughts", training__encoding="latent", loop__halting={"name": "act"})
    with pytest.raises(ComponentError, match="loop.max_steps.*6"):
        tiny_recipe(training__encoding="latent", training__curriculum__max_latent_stage=3,
                    training__curriculum__thoughts_per_step=2)
    with pytest.raises(ComponentError, match="training.curriculum"):
        tiny_recipe(training__encoding="cot", training__curriculum__epochs_per_stage=2)
    assert build_task(tiny_recipe())  # the defaults still build


def test_the_rq4_grid_runs_shortened_and_reports_what_an_answer_costs(tmp_path):
    """Two cells of recipes/compare_training.yaml (Coconut and the CoT baseline on ProsQA), two
    steps each: the grid's table says what each answer cost."""
    from slr_zoo.recipe.grid import expand

    cells = expand(load(str(ROOT / "recipes/compare_training.yaml")))
    coconut = next(c.index for c in cells if "thoughts" in c.label and "prosqa" in c.label)
    cot = next(c.index for c in cells if c.label.endswith("encodingcot") and "prosqa" in c.label)
    for index in (cot, coconut):
        args = [str(ROOT / "recipes/compare_training.yaml"), f"output_dir={tmp_path}", "trainer.max_steps=2",
                "trainer.val_every=2", "trainer.eval_batch_size=300", "--cell", str(index)]
        assert fit.main(args) == 0
    summaries = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "compare_training").glob("*/summary.json")}
    assert len(summaries) == 2
    thoughts = next(s for name, s in summaries.items() if "thoughts" in name)
    written = next(s for name, s in summaries.items() if "thoughts" not in name)
    assert thoughts["thoughts_per_answer"] == 6 and written["thoughts_per_answer"] == 0
    # a thought is one sequential pass; so is every generated token after the first
    assert thoughts["passes_per_answer"] == pytest.approx(1 + 6 + thoughts["tokens_per_answer"] - 1)
    assert written["passes_per_answer"] == pytest.approx(written["tokens_per_answer"])
    assert all(s["flops_per_answer"] > 0 and s["seconds_per_example"] > 0 for s in summaries.values())


def _student_and_batches(mode: str, c: int, stages: tuple[int, ...]):
    from slr_zoo.recipe import build_backbone, build_model
    from slr_zoo.tasks.tokenizer import build_word_tokenizer

    records = [{"question": "a b c d e f g", "steps": ["s t", "u v w x"], "answer": "z"},
               {"question": "a b", "steps": ["s t u v w", "x"], "answer": "y z"}]
    tokenizer = build_word_tokenizer(records)
    thoughts = mode == "thoughts"
    recipe = tiny_recipe(loop__mode=mode, training__encoding="latent", loop__max_steps=1 if thoughts else 2 * c,
                         training__curriculum__max_latent_stage=2, training__curriculum__thoughts_per_step=c)
    torch.manual_seed(0)
    model = build_model(recipe, build_backbone(recipe, vocab_size=len(tokenizer))).train()
    encoding = Encoding("latent", c, 2, continuous=thoughts)
    batches = {k: collate([encoding.assemble(Encoding.pieces(r, tokenizer), tokenizer, k, teacher=True)
                           for r in records], tokenizer.pad_token_id) for k in stages}
    return model, batches


def test_distillation_compares_the_last_latent_computation_of_each_replaced_step():
    """With c latent computations per step, step s's end is the target of the s·c-th (thought or
    iteration), not of the s-th; a thoughts student at stage 0 has no thought to compare."""
    from slr_zoo.training.objectives.distill import Distillation

    model, batches = _student_and_batches("thoughts", c=2, stages=(0, 1))
    objective = Distillation("unused", thoughts_mode=True, thoughts_per_step=2)
    b = batches[0]
    out = model(b["input_ids"], query_mask=b["query_mask"], real_mask=b["real_mask"], record={"states"})
    assert objective.student(b, out).size(1) == 0  # the loop state at [SEP] is no thought
    b = batches[1]
    out = model(b["input_ids"], query_mask=b["query_mask"], real_mask=b["real_mask"], slot_mask=b["slot_mask"],
                record={"states"})
    slots = b["slot_mask"].any(dim=0).nonzero().squeeze(1)
    assert len(slots) == 2
    torch.testing.assert_close(objective.student(b, out), out.features[:, slots[1:] - 1], rtol=0, atol=0)

    model, batches = _student_and_batches("depth", c=2, stages=(2,))
    b = batches[2]
    out = model(b["input_ids"], steps=4, query_mask=b["query_mask"], real_mask=b["real_mask"], record=("states",))
    last = b["query_mask"].size(1) - 1 - b["query_mask"].flip(1).int().argmax(dim=1)
    rows = torch.arange(2)
    chosen = Distillation("unused", thoughts_per_step=2).student(b, out)
    torch.testing.assert_close(chosen, torch.stack([out.states[1][rows, last], out.states[3][rows, last]], dim=1),
                               rtol=0, atol=0)


def test_thoughts_mode_refuses_a_fixed_depth_other_than_its_max_steps():
    recipe = tiny_recipe(loop__mode="thoughts", training__encoding="latent", loop__max_steps=2,
                         training__curriculum__max_latent_stage=1)
    recipe["loop"]["depth_sampler"] = {"name": "fixed", "steps": 1}
    with pytest.raises(ComponentError, match=r"loop\.depth_sampler\.steps: thoughts mode makes every thought in "
                                             r"loop\.max_steps = 2 iterations"):
        validate(recipe)


def test_every_curriculum_stage_is_held_to_the_models_positions():
    """Stage k's length is question + k·c slots + the steps left: not largest at stage 0 or K."""
    from slr_zoo.tasks.base import Task
    from slr_zoo.tasks.tokenizer import build_word_tokenizer
    from slr_zoo.training.data import empty_dataset, encode_split

    record = {"question": "q", "steps": ["s", "t u v w x y z"], "answer": "a"}

    class OneRecord(Task):
        def records(self, split):
            yield dict(record)

    tokenizer = build_word_tokenizer([record])
    encoding = Encoding("pause", 4, 2)
    lengths = [len(encoding.assemble(Encoding.pieces(record, tokenizer), tokenizer, k).input_ids) for k in range(3)]
    assert lengths[1] > max(lengths[0], lengths[2]), lengths
    with pytest.raises(ValueError, match=rf"record 0 of the train split is {lengths[1]} tokens long"):
        encode_split(OneRecord(), "train", tokenizer, into=empty_dataset(tokenizer, encoding),
                     max_length=max(lengths[0], lengths[2]), encoding=encoding)


def test_an_encoding_at_a_number_of_thoughts_is_that_curriculum_stage():
    """What ``evaluate --thoughts`` asks: n thoughts are stage n / c, and only a multiple of c."""
    latent = Encoding("latent", thoughts_per_step=2, final_stage=3, continuous=True)
    assert latent.with_thoughts(4).thoughts() == 4 and latent.with_thoughts(4).final_stage == 2
    assert latent.with_thoughts(0).thoughts() == 0 and latent.thoughts() == 6  # the original is untouched
    assert Encoding("pause", 1, 6).with_thoughts(2).final_stage == 2  # two pause tokens
    with pytest.raises(ValueError, match="^3: each replaced step is 2 thoughts in this cell; give a multiple of 2$"):
        latent.with_thoughts(3)
    with pytest.raises(ValueError, match=r"without thoughts or pause tokens \(encoding 'latent' in depth mode\)"):
        Encoding("latent", 1, 3).with_thoughts(2)
