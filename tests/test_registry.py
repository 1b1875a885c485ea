"""Every registered member of every component kind, at its defaults, on every backbone family:
built from a recipe, run forward and backward, every parameter reached. A member registered
tomorrow is covered the day it lands."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, tiny_model, tiny_recipe
from slr_zoo.registry import REGISTRIES
from slr_zoo.testing import FAMILIES
from slr_zoo.training.module import question_mask
from slr_zoo.training.objectives.answer import answer_loss

LOOP_KINDS = ("step_embedding", "injection", "loop_lora", "combine", "halting", "depth_sampler")


def members():
    for kind in (*LOOP_KINDS, "decoder"):
        for name in REGISTRIES[kind].names():
            yield pytest.param(kind, name, id=f"{kind}-{name}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind, name", list(members()))
def test_every_member_at_its_defaults_builds_and_trains_on_every_family(kind, name, family):
    overrides = {"backbone__name": family, "loop__max_steps": 2}
    if kind == "decoder":
        overrides["decoder"] = {"name": name}
        overrides["backbone__coda_layers"] = 1 if REGISTRIES["decoder"].get(name).uses_coda else 0
    else:
        overrides[f"loop__{kind}"] = {"name": name}
    model = tiny_model(tiny_recipe(**overrides)).train()
    ids = torch.randint(4, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, 5:] = ids[:, 5:]
    out = model(ids, query_mask=question_mask(labels))
    assert out.logits.shape == (2, 8, VOCAB)
    loss = answer_loss(out, labels) + (0 if out.aux_loss is None else out.aux_loss)
    loss.backward()
    unreached = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unreached, unreached
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(ids, query_mask=question_mask(labels)).logits).all()


# what a batch must carry for an objective -> the recipe keys that give it
OBJECTIVE_DATA = {
    "text_labels": {"training.encoding": "cot"},
    "step_answers": {},  # the default task (iterate) gives per-hop answers
    "reach": {"task": {"name": "prosqa", "n_train": 32, "n_val": 4, "hops": [1, 2], "nodes": [6, 8]}},
    "teacher": {"task": {"name": "prosqa", "n_train": 32, "n_val": 4, "hops": [1, 2], "nodes": [6, 8]}},
}


@pytest.mark.parametrize("name", REGISTRIES["objective"].names())
def test_every_objective_builds_from_a_recipe_and_its_loss_reaches_the_model(name, tmp_path):
    """Each objective, named in the recipe's ``objectives``, on a real encoded batch of the data it
    says it needs: a finite loss whose gradient reaches the loop and every parameter of its own."""
    from pathlib import Path

    from conftest import _teacher_stand_in
    from slr_zoo.recipe import build_cell, load, validate
    from slr_zoo.tasks.encoding import collate

    objective = REGISTRIES["objective"].get(name)
    root = Path(__file__).resolve().parents[1]
    recipe_path, node, overrides = root / "recipes/quickstart.yaml", {"name": name}, []
    for need in objective.data:
        overrides += [f"{key}={value}" for key, value in OBJECTIVE_DATA[need].items()]
    if "teacher" in objective.data:  # a real CoT cell of the student's width
        recipe_path = root / "recipes/distill.yaml"
        teacher, = _teacher_stand_in({"training": {"distill": {"teacher": "/absent"}}}, recipe_path, tmp_path)
        node["teacher"] = teacher.split("=", 1)[1]
        overrides += ["training.distill=null", "task.val_file=null"]
    if "depth" not in objective.modes:  # an objective of continuous thoughts: Coconut's recipe
        recipe_path = root / "recipes/coconut.yaml"
        overrides += ["task.val_file=null"]
    overrides.append("objectives={extra: {" + ", ".join(f"{k}: {v}" for k, v in node.items()) + "}}")
    recipe = load(str(recipe_path), [*overrides, "task.n_train=32", "task.n_val=4", "loop.step_supervision=0"])
    validate(recipe)
    parts = build_cell(recipe, tmp_path / "cell")
    module, data = parts.module, parts.data
    data.setup("fit")
    last = data.encoding.final_stage  # thoughts, if the encoding has any
    items = [data.train_set[(i, last, last)] if hasattr(data.train_set, "encoding") else data.train_set[i]
             for i in range(4)]
    batch = collate([item[0] for item in items], parts.tokenizer.pad_token_id)
    from slr_zoo.training.module import question_mask

    query = batch.get("query_mask", question_mask(batch["labels"]))
    out = module.model(batch["input_ids"], batch.get("attention_mask"), query_mask=query,
                       real_mask=batch["real_mask"], record=module.record, slot_mask=batch.get("slot_mask"))
    loss, logs = module.objectives["extra"](batch, out)
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    own = [n for n, p in module.objectives["extra"].named_parameters() if p.grad is None]
    assert not own, own
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters())
