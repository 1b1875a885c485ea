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
