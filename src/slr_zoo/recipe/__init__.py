"""Recipes: load, override, validate, expand grids, instantiate."""

from slr_zoo.recipe.grid import Cell, expand
from slr_zoo.recipe.instantiate import (build_backbone, build_cell, check_cell, build_curriculum, build_model, build_objectives,
                                        build_task, load_cell, train_cell)
from slr_zoo.recipe.load import (RecipeError, StoredConfigError, differences, load, read_config, read_stored, resolve_stored,
                                 set_key)
from slr_zoo.recipe.schema import COMPONENT_NODES, Recipe, validate

__all__ = [
    "COMPONENT_NODES", "Cell", "Recipe", "RecipeError", "build_backbone", "build_cell", "check_cell", "build_curriculum", "build_model",
    "build_objectives", "build_task", "load_cell", "train_cell",
    "StoredConfigError", "differences", "expand", "load", "read_config", "read_stored", "resolve_stored", "set_key",
    "validate",
]
