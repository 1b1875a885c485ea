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


def stand_ins(recipe_path, directory, always: bool = False) -> list[str]:
    """Overrides that stand a tiny model in for a pretrained checkpoint this machine does not have
    (a .gguf path gets a GGUF file; a ``${package_file:...}`` of a package that is not installed
    counts as missing), with as many layers as the recipe's split needs. ``always``: stand in even
    for a checkpoint that is there (a quick run of a recipe meant for a GPU)."""
    from pathlib import Path

    import yaml

    from slr_zoo.testing import save_tiny_pretrained, write_gguf

    raw = yaml.safe_load(Path(recipe_path).read_text()) or {}
    overrides = _record_stand_ins(raw.get("task") or {}, Path(directory))
    overrides += _teacher_stand_in(raw, Path(recipe_path), Path(directory))
    node = {"name": "llama", **raw.get("backbone", {})}
    path = node.get("pretrained")
    if path and "${package_file:" in str(path):
        from slr_zoo.recipe import load

        try:
            path = load(recipe_path)["backbone"]["pretrained"]
        except ValueError:
            path = "/not/installed"
    if not path or (Path(path).expanduser().exists() and not always):
        return overrides
    core = node.get("core_layers", 1) * (node.get("loops") or 1 if node.get("share") == "average" else 1)
    layers = node.get("prelude_layers", 1) + core + node.get("coda_layers", 1) + (2 if node.get("truncate") else 0)
    target = Path(directory) / f"stand-in-{node['name']}-{layers}"
    model, tokenizer = save_tiny_pretrained(target, node["name"], layers=layers)
    if str(path).endswith(".gguf"):  # beside the directory: transformers would mix in its tokenizer files
        target = write_gguf(model, tokenizer, target.with_suffix(".gguf"))
    return [*overrides, f"backbone.pretrained={target}"]


def _teacher_stand_in(raw: dict, recipe_path, directory) -> list[str]:
    """A distillation teacher that has not been trained here: a real CoT cell of the recipe's
    backbone (recipes/cot.yaml), trained for two steps on a few records."""
    from pathlib import Path

    teacher = ((raw.get("training") or {}).get("distill") or {}).get("teacher")
    if not teacher or Path(teacher).exists():
        return []
    from slr_zoo import fit

    cot = Path(recipe_path).parent / "cot.yaml"
    out = Path(directory) / "teacher"
    args = [str(cot), f"output_dir={out}", "task.n_train=32", "task.n_val=4", "task.val_file=null",
            "trainer.max_steps=2", "trainer.batch_size=8", "trainer.progress_bar=false"]
    if fit.main(args) != 0:
        raise RuntimeError(f"could not train a stand-in teacher from {cot}")
    return [f"training.distill.teacher={out / 'cot' / 'default'}"]


def _record_stand_ins(task: dict, directory) -> list[str]:
    """Tiny Coconut-format files (GSM8k-like arithmetic) for a json task whose files are absent."""
    import json
    from pathlib import Path

    if task.get("name") != "json":
        return []
    out = []
    for split in ("train", "val"):
        if task.get(split) and not Path(task[split]).exists():
            records = [{"question": f"Tom has {a} apples and buys {b} more. How many has he?",
                        "steps": [f"<<{a}+{b}={a + b}>>"], "answer": str(a + b)} for a in range(1, 9) for b in (2, 3)]
            path = Path(directory) / f"{split}.json"
            path.write_text(json.dumps(records))
            out.append(f"task.{split}={path}")
    return out
