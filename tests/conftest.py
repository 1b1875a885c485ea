"""Shared fixtures: tiny recipes and models that build in milliseconds on a CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from slr_zoo.recipe import build_backbone, build_model, set_key, validate
from slr_zoo.recipe.schema import defaults

VOCAB = 32


def tiny_recipe(**overrides) -> dict:
    """A validated recipe for a 2-layer-wide, 1-core-layer Llama model; dotted overrides apply."""
    recipe = defaults()
    recipe["backbone"] = {"name": "llama", "hidden_size": 32, "heads": 2, "prelude_layers": 1,
                          "core_layers": 1, "coda_layers": 1}
    recipe["loop"]["max_steps"] = 3
    recipe["task"] = {"name": "iterate", "n_train": 64, "n_val": 16}
    recipe["trainer"].update(max_steps=4, batch_size=8, progress_bar=False, log_every=1)
    for key, value in overrides.items():
        recipe = set_key(recipe, key.replace("__", "."), value)
    validate(recipe)
    return recipe


def tiny_model(recipe: dict | None = None, seed: int = 0):
    torch.manual_seed(seed)
    recipe = recipe or tiny_recipe()
    return build_model(recipe, build_backbone(recipe, vocab_size=VOCAB))


@pytest.fixture
def recipe():
    return copy.deepcopy(tiny_recipe())


@pytest.fixture
def tokens():
    return torch.randint(4, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)
    yield
