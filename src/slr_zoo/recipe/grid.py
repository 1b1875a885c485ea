"""Grid expansion: the cartesian product of ``grid:`` values, one cell per combination."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from slr_zoo.recipe.load import RecipeError, set_key


@dataclass
class Cell:
    index: int
    label: str                  # directory name under runs/<name>/
    keys: dict[str, Any]        # dotted grid key -> this cell's value
    recipe: dict                # the full recipe of this cell, grid removed


def expand(recipe: dict) -> list[Cell]:
    """Cells of ``grid``: one mapping is one cartesian product; a list of mappings is the union of
    their products (for cells that do not fit one product, such as baselines)."""
    grid = recipe.get("grid") or {}
    base = {k: v for k, v in recipe.items() if k != "grid"}
    parts = grid if isinstance(grid, list) else [grid]
    combos = []
    for i, part in enumerate(parts):
        where = f"grid[{i}]" if isinstance(grid, list) else "grid"
        if not isinstance(part, dict):
            raise RecipeError(where, "expected a mapping of dotted key -> list of values")
        for key, values in part.items():
            if not isinstance(values, list) or not values:
                raise RecipeError(f"{where}.{key}", f"expected a non-empty list of values, got {values!r}")
        combos += [dict(zip(part.keys(), combo)) for combo in itertools.product(*part.values()) if part]
    if not combos:
        return [Cell(0, "default", {}, base)]
    cells, seen = [], {}
    for index, keys in enumerate(combos):
        cell_recipe = base
        for key, value in keys.items():
            cell_recipe = set_key(cell_recipe, key, value)
        label = "__".join(f"{key.split('.')[-1]}={value_label(v)}" for key, v in keys.items())
        label = re.sub(r"[^A-Za-z0-9_.=+\-]", "-", label)[:180]
        if label in seen:
            seen[label] += 1
            label = f"{label}__{seen[label]}"
        else:
            seen[label] = 0
        cells.append(Cell(index, label, keys, cell_recipe))
    return cells


def value_label(value: Any) -> str:
    """A short readable label: a component node shows its name and its arguments, a group of keys
    its keys and values, and a file path its file name alone."""
    if isinstance(value, dict):
        head = str(value.get("name") or str(value.get("_component_", "")).rsplit(".", 1)[-1])
        args = [f"{k}{value_label(v)}" for k, v in value.items() if k not in ("name", "_component_")]
        return "-".join([head, *args] if head else args)
    if isinstance(value, (list, tuple)):
        return "+".join(value_label(v) for v in value)
    if isinstance(value, str) and "/" in value:
        return value.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return str(value)
