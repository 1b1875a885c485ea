"""One registry per component kind: register a class under a short name, list, build.

A recipe node is a mapping with either ``name`` (a registered short name) or ``_component_`` (a
dotted import path to any subclass of the kind's base class); every other key is a constructor
argument. Constructors may also accept *context* arguments (``hidden_size``, ``max_steps``, ...)
that the builder supplies from the model being assembled; a recipe may not set those.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import types
import typing
from typing import Any, Callable, Mapping

RESERVED_KEYS = ("name", "_component_")


class ComponentError(ValueError):
    """A recipe node that cannot be turned into a component; ``path`` is its dotted key."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class ArgumentError(ValueError):
    """A component's constructor argument ``argument`` has a value it cannot work with.

    Components know their own arguments, not where they sit in a recipe: :meth:`Registry.build`
    turns this into a :class:`ComponentError` at the node's dotted key (``loop.loop_lora.rank``)."""

    def __init__(self, argument: str, message: str):
        self.argument, self.message = argument, message
        super().__init__(f"{argument}: {message}")


def closest(word: str, choices: typing.Iterable[str], n: int = 3) -> str:
    """A ' (did you mean ...?)' hint, or '' when nothing is close."""
    choices = sorted(set(choices))
    near = difflib.get_close_matches(word, choices, n=n, cutoff=0.5)
    if near:
        return " (did you mean " + " or ".join(repr(c) for c in near) + "?)"
    return " (valid: " + ", ".join(choices) + ")" if choices else ""


def import_object(path: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ImportError(f"{path!r} is not a dotted path like 'package.module.Class'")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ImportError(f"module {module_name!r} has no attribute {attr!r}") from err


class Registry:
    """Short names for the subclasses of one base class."""

    def __init__(self, kind: str, base: type, context: typing.Iterable[str] = ()):
        self.kind = kind
        self.base = base
        self.context = frozenset(context)
        self._classes: dict[str, type] = {}
        REGISTRIES[kind] = self

    def register(self, name: str) -> Callable[[type], type]:
        def decorator(cls: type) -> type:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered to {self._classes[name]}")
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"{cls} must subclass {self.base.__name__} to be a {self.kind}")
            self._classes[name] = cls
            return cls

        return decorator

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __contains__(self, name: str) -> bool:
        return name in self._classes

    def get(self, name: str) -> type:
        try:
            return self._classes[name]
        except KeyError:
            raise ComponentError("", f"unknown {self.kind} {name!r}{closest(name, self._classes)}") from None

    # ------------------------------------------------------------------ resolve and validate
    def resolve(self, node: Mapping[str, Any], path: str = "") -> type:
        """The class a node names; raises ComponentError naming ``path``."""
        if not isinstance(node, Mapping):
            raise ComponentError(path, f"expected a mapping with 'name' or '_component_', got {node!r}")
        if "name" in node and "_component_" in node:
            raise ComponentError(path, "give either 'name' or '_component_', not both")
        if "_component_" in node:
            target = node["_component_"]
            try:
                cls = import_object(str(target))
            except Exception as err:  # noqa: BLE001  (a user module may fail to import in any way)
                raise ComponentError(f"{path}._component_", f"cannot import {target!r}: {type(err).__name__}: {err}") from None
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise ComponentError(
                    f"{path}._component_", f"{target!r} is not a subclass of {self.base.__name__}"
                )
            return cls
        if "name" not in node:
            raise ComponentError(path, f"missing 'name' (one of: {', '.join(self.names())})")
        name = node["name"]
        if name not in self._classes:
            raise ComponentError(f"{path}.name", f"unknown {self.kind} {name!r}{closest(str(name), self._classes)}")
        return self._classes[name]

    def validate(self, node: Mapping[str, Any], path: str = "") -> type:
        """Check a node's keys and value types against the constructor before anything is built."""
        cls = self.resolve(node, path)
        params = _init_parameters(cls)
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        settable = {k: p for k, p in params.items() if k not in self.context and p.kind not in _VARIADIC}
        for key, value in node.items():
            if key in RESERVED_KEYS:
                continue
            if key in self.context:
                raise ComponentError(f"{path}.{key}", "is set by the model, not by the recipe")
            if key not in settable:
                if accepts_any:
                    continue
                raise ComponentError(
                    f"{path}.{key}",
                    f"unknown key for {self.kind} {_label(node)}{closest(key, settable)}",
                )
            check_type(value, _hints(cls).get(key, settable[key].annotation), f"{path}.{key}")
        for key, p in settable.items():
            if p.default is inspect.Parameter.empty and key not in node:
                raise ComponentError(f"{path}.{key}", f"required by {self.kind} {_label(node)}")
        return cls

    def build(self, node: Mapping[str, Any], path: str = "", **context: Any) -> Any:
        """The component; a bad argument value becomes a ComponentError naming its dotted key."""
        cls = self.validate(node, path)
        params = _init_parameters(cls)
        kwargs = {k: v for k, v in node.items() if k not in RESERVED_KEYS}
        kwargs.update({k: v for k, v in context.items() if k in params})
        try:
            return cls(**kwargs)
        except ComponentError:
            raise
        except ArgumentError as err:
            raise ComponentError(f"{path}.{err.argument}" if path else err.argument, err.message) from None
        except ValueError as err:
            raise ComponentError(path, str(err)) from None


REGISTRIES: dict[str, Registry] = {}

_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _label(node: Mapping[str, Any]) -> str:
    return repr(node.get("name", node.get("_component_")))


def _init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self", None)
    return params


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable forward references: fall back to raw annotations
        return {}


def check_type(value: Any, annotation: Any, path: str) -> None:
    """A small structural type check for recipe values: int/float/str/bool, lists, mappings, unions."""
    if not _matches(value, annotation):
        raise ComponentError(path, f"expected {_type_name(annotation)}, got {type(value).__name__} {value!r}")


def _matches(value: Any, ann: Any) -> bool:
    if ann is inspect.Parameter.empty or ann is Any or ann is None and value is None:
        return True
    if ann is type(None):
        return value is None
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(ann))
    if origin is typing.Literal:
        return value in typing.get_args(ann)
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann in (str, bool):
        return isinstance(value, ann)
    if origin in (list, tuple, typing.Sequence) or ann in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(ann)
        if args and not (len(args) == 2 and args[1] is Ellipsis) and origin is tuple:
            return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
        return all(_matches(v, args[0]) for v in value) if args else True
    if origin in (dict, typing.Mapping) or ann is dict:
        return isinstance(value, Mapping)
    if isinstance(ann, type):
        return isinstance(value, ann)
    return True


def _type_name(ann: Any) -> str:
    if isinstance(ann, type):
        return ann.__name__
    return str(ann).replace("typing.", "")
