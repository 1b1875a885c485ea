"""The recipe schema: typed groups, and which keys are component nodes of which kind.

Validation walks the plain-dict recipe against these dataclasses; component nodes are checked
against their class's constructor (see ``Registry.validate``). Every error names the dotted key
and the closest valid names.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from slr_zoo.registry import (
    REGISTRIES,
    ArgumentError,
    ComponentError,
    check_type,
    closest,
)
from slr_zoo.training.settings import CurriculumConfig, OptimConfig, TrainerConfig

Node = dict  # a component node: {name: ..., **kwargs} or {_component_: ..., **kwargs}


def node(name: str, **kwargs: Any) -> Any:
    return field(default_factory=lambda: {"name": name, **kwargs})


@dataclass
class LoopConfig:
    mode: Literal["depth", "thoughts"] = "depth"
    max_steps: int = 4
    backprop_steps: Optional[int] = None
    depth_sampler: Node = node("fixed")
    step_embedding: Node = node("none")
    injection: Node = node("none")
    loop_lora: Node = node("none")
    combine: Node = node("none")
    halting: Node = node("fixed")
    check_finite: bool = True
    step_supervision: float = 0.0  # weight of the per-iteration loss toward the task's per-hop answers
    reach_supervision: float = 0.0  # weight of a per-token loss: has iteration t reached this word (task's reach_steps)
    state_noise: float = 0.0  # training only: Gaussian noise of std sigma ~ U(0, state_noise) per sample on the state entering each step


@dataclass
class TrainingConfig:
    # scratch: every weight trains; finetune: a pretrained base is frozen, and the loop's components,
    # any backbone.lora and added-token rows train
    mode: Literal["scratch", "finetune"] = "scratch"
    # how a record becomes a sequence (tasks/encoding.py): answer only, written chain of thought,
    # latent thoughts (continuous in loop.mode thoughts, loop depth in depth mode), pause tokens
    encoding: Literal["answer", "cot", "latent", "pause"] = "answer"
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    # distillation toward a trained CoT cell's hidden states at the end of each reasoning step:
    # {teacher: runs/<name>/<cell>, loss: mse | cosine, layer: state | features, weight: 1.0}
    distill: Optional[Node] = None


@dataclass
class Recipe:
    name: str = "run"
    seed: int = 0
    description: str = ""
    output_dir: str = "runs"
    task: Node = node("iterate")
    backbone: Node = node("llama")
    loop: LoopConfig = field(default_factory=LoopConfig)
    decoder: Node = node("coda")
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # further training objectives, key -> component node ({name: ..., weight: ...} or _component_)
    objectives: dict = field(default_factory=dict)
    grid: Union[dict, list, None] = None


# dotted key -> registry kind, for every component node of a recipe
COMPONENT_NODES = {
    "task": "task",
    "backbone": "backbone",
    "decoder": "decoder",
    "loop.depth_sampler": "depth_sampler",
    "loop.step_embedding": "step_embedding",
    "loop.injection": "injection",
    "loop.loop_lora": "loop_lora",
    "loop.combine": "combine",
    "loop.halting": "halting",
}


def defaults() -> dict:
    return dataclasses.asdict(Recipe())


# value ranges checked with the types: a bad value stops before anything is built
AT_LEAST = {
    "loop.max_steps": 1, "loop.backprop_steps": 1, "loop.state_noise": 0, "loop.step_supervision": 0,
    "loop.reach_supervision": 0,
    "optim.lr": 0, "optim.warmup_steps": 0, "optim.min_lr_ratio": 0, "optim.grad_clip": 0,
    "trainer.max_steps": 1, "trainer.batch_size": 1, "trainer.eval_batch_size": 1, "trainer.num_nodes": 1,
    "trainer.val_every": 1, "trainer.log_every": 1, "trainer.num_workers": 0, "trainer.threads": 1,
    "trainer.checkpoint_every": 1, "trainer.parallel_cells": 1,
    "training.curriculum.thoughts_per_step": 1, "training.curriculum.max_latent_stage": 0,
    "training.curriculum.epochs_per_stage": 0, "training.curriculum.uniform_prob": 0,
}
DEVICES = re.compile(r"^(auto|-1|\d+|\d+(,\d+)+,?)$")  # what Lightning's `devices` accepts as text


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")  # one folder under output_dir, never a path


def check_value(dotted: str, value: Any) -> None:
    if dotted == "name" and (not NAME.match(str(value)) or ".." in str(value)):
        raise ComponentError(dotted, f"{value!r} is not a folder name: use letters, digits and _ . + = - "
                             "(no slashes, no '..'); a run is written to <output_dir>/<name>/")
    if dotted in AT_LEAST and isinstance(value, float) and not math.isfinite(value):
        raise ComponentError(dotted, f"must be a finite number, got {value!r}")
    if dotted in AT_LEAST and value is not None and value < AT_LEAST[dotted]:
        raise ComponentError(dotted, f"must be >= {AT_LEAST[dotted]}, got {value!r}")
    if dotted == "trainer.devices" and not (isinstance(value, int) and (value >= 1 or value == -1)
                                            or isinstance(value, str) and DEVICES.match(value.strip())):
        raise ComponentError(dotted, f"expected a count >= 1, -1, 'auto' or a list like '0,1'; got {value!r}")
    if dotted == "loop.step_supervision" and value > 1:
        raise ComponentError(dotted, f"is the per-iteration loss's share of the loss, in [0, 1]; got {value!r}")
    if dotted == "training.curriculum.uniform_prob" and value > 1:
        raise ComponentError(dotted, f"is a probability, in [0, 1]; got {value!r}")


def validate(recipe: dict, path: str = "", schema: type = Recipe) -> None:
    """Raise ComponentError at the first key that does not fit the schema."""
    if not isinstance(recipe, dict):
        raise ComponentError(path or "recipe", f"expected a mapping, got {type(recipe).__name__}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key, value in recipe.items():
        dotted = f"{path}.{key}" if path else key
        if key not in fields:
            raise ComponentError(dotted, f"unknown key{closest(key, fields)}")
        if dotted in COMPONENT_NODES:
            if dotted == "task" and isinstance(value, dict) and "curriculum" in value:
                value = {k: v for k, v in value.items() if k != "curriculum"}
                _check_curriculum(recipe["task"]["curriculum"], value)
            REGISTRIES[COMPONENT_NODES[dotted]].validate(value, dotted)
            _check_paths(REGISTRIES[COMPONENT_NODES[dotted]].resolve(value, dotted), value, dotted)
        elif dataclasses.is_dataclass(hints[key]):
            validate(value, dotted, hints[key])
        else:
            check_type(value, hints[key], dotted)
            check_value(dotted, value)
    if schema is Recipe:
        check_value("name", recipe.get("name", "run"))
        _check_across_keys(recipe)


def _check_curriculum(stages: Any, task: dict) -> None:
    """``task.curriculum``: a list of stages, each ``until`` (the training step it ends before,
    increasing) plus task keys that differ from the task's own, e.g. smaller ``nodes``."""
    if not isinstance(stages, list) or not stages:
        raise ComponentError("task.curriculum", f"expected a non-empty list of stages like "
                             f"{{until: 1000, hops: [1, 2]}}, got {stages!r}")
    previous = 0
    for i, stage in enumerate(stages):
        path = f"task.curriculum[{i}]"
        if not isinstance(stage, dict):
            raise ComponentError(path, f"expected a mapping with 'until' and task keys, got {stage!r}")
        until = stage.get("until")
        if not (isinstance(until, int) and not isinstance(until, bool) and until > previous):
            raise ComponentError(f"{path}.until", f"must be an integer step after the previous stage's "
                                 f"end ({previous}), got {until!r}")
        previous = until
        overrides = {k: v for k, v in stage.items() if k != "until"}
        for key in set(overrides) & {"name", "_component_"}:
            raise ComponentError(f"{path}.{key}", "a stage changes the task's keys, not the task")
        merged = {**task, **overrides}
        REGISTRIES["task"].validate(merged, path)
        _check_paths(REGISTRIES["task"].resolve(merged, path), overrides, path)


def _check_across_keys(recipe: dict) -> None:
    stages = (recipe.get("task") or {}).get("curriculum")
    max_steps = (recipe.get("trainer") or {}).get("max_steps", TrainerConfig.max_steps)
    if stages and stages[-1]["until"] >= max_steps:
        raise ComponentError(f"task.curriculum[{len(stages) - 1}].until",
                             f"{stages[-1]['until']} leaves no step of trainer.max_steps ({max_steps}) for "
                             "the task's own distribution")
    backbone = recipe.get("backbone") or {}
    if (recipe.get("training") or {}).get("mode") == "finetune" and not backbone.get("pretrained"):
        raise ComponentError("training.mode", "finetune freezes a pretrained base; set backbone.pretrained "
                             "(a local Hugging Face directory or a .gguf file), or use mode: scratch")
    if backbone.get("lora") is not None and not backbone.get("pretrained"):
        raise ComponentError("backbone.lora", "peft LoRA adapts a pretrained model's weights; a model built "
                             "from scratch trains all of them (use loop.loop_lora for per-iteration adapters)")
    loop = recipe.get("loop") or {}
    _check_encoding(recipe)
    if loop.get("step_supervision", 0) >= 1 and "halting" in loop:
        cls = REGISTRIES["halting"].resolve(loop["halting"], "loop.halting")
        if getattr(cls, "mixes", "last") != "last":
            raise ComponentError(
                "loop.step_supervision",
                f"1.0 leaves no weight on the answer loss, the only loss through which halting "
                f"{loop['halting'].get('name') or loop['halting'].get('_component_')!r} learns when to stop "
                "(its output mixes steps); use a weight below 1, e.g. 0.5",
            )


def _check_encoding(recipe: dict) -> None:
    """The encoding, the latent curriculum, the loop mode and the objectives must fit together."""
    import slr_zoo.training.objectives  # noqa: F401  (registers the objective kind)

    training = recipe.get("training") or {}
    loop = recipe.get("loop") or {}
    encoding = training.get("encoding", "answer")
    stages = {**dataclasses.asdict(CurriculumConfig()), **(training.get("curriculum") or {})}
    mode = loop.get("mode", "depth")
    for key, value in (recipe.get("objectives") or {}).items():
        REGISTRIES["objective"].validate(value, f"objectives.{key}")
        modes = getattr(REGISTRIES["objective"].resolve(value, f"objectives.{key}"), "modes", {"depth", "thoughts"})
        if mode not in modes:
            raise ComponentError(f"objectives.{key}", f"{value.get('name', 'this objective')} reads the "
                                 f"{' or '.join(sorted(modes))} loop; it needs loop.mode: {sorted(modes)[0]} "
                                 f"(got {mode!r})")
    if training.get("distill") is not None:
        REGISTRIES["objective"].validate({"name": "distill", **training["distill"]}, "training.distill")
        _check_paths(REGISTRIES["objective"].get("distill"), training["distill"], "training.distill")
        if encoding == "cot":
            raise ComponentError("training.distill", "distils a CoT teacher into a student that does not write "
                                 "its steps; use training.encoding answer or latent")
    if encoding in ("answer", "cot") and (stages["max_latent_stage"] or stages["epochs_per_stage"]):
        raise ComponentError("training.curriculum", f"replaces reasoning steps by thoughts, which encoding "
                             f"{encoding!r} has none of; use training.encoding latent or pause")
    # each hop's answer is a target at the answer's position, which only the answer-only encoding
    # has in the same place at every depth; the reach probe labels question words, which all have
    if encoding != "answer" and loop.get("step_supervision", 0) > 0:
        raise ComponentError("loop.step_supervision", f"labels the answer-only encoding; set it to 0 with "
                             f"training.encoding {encoding!r}")
    if mode == "thoughts":
        if encoding != "latent":
            raise ComponentError("loop.mode", f"thoughts fills the latent slots with continuous thoughts; set "
                                 f"training.encoding: latent (got {encoding!r})")
        for key in ("halting", "depth_sampler"):
            node = loop.get(key) or {"name": "fixed"}
            if node.get("name", "fixed") != "fixed" or "_component_" in node:
                raise ComponentError(f"loop.{key}", "thoughts mode runs every thought at the same depth "
                                     "(loop.max_steps); use {name: fixed}")
        steps = (loop.get("depth_sampler") or {}).get("steps")
        if steps is not None and steps != loop.get("max_steps", LoopConfig.max_steps):
            # pass i reads stabiliser rows i*T + 1 .. i*T + T, and validation and generation run T = max_steps
            raise ComponentError("loop.depth_sampler.steps", f"thoughts mode makes every thought in loop.max_steps "
                                 f"= {loop.get('max_steps', LoopConfig.max_steps)} iterations; leave steps out "
                                 f"(got {steps})")
    elif encoding == "latent":
        depth = max(1, stages["max_latent_stage"] * stages["thoughts_per_step"])
        if loop.get("max_steps", LoopConfig.max_steps) != depth:
            raise ComponentError("loop.max_steps", f"in depth mode the latent curriculum's last stage runs "
                                 f"max_latent_stage x thoughts_per_step = {depth} iterations; set loop.max_steps "
                                 f"to {depth} (got {loop.get('max_steps', LoopConfig.max_steps)})")
        if stages["uniform_prob"] > 0 and (loop.get("depth_sampler") or {}).get("name", "fixed") != "fixed":
            raise ComponentError("loop.depth_sampler", "the latent curriculum sets the depth of every batch")


def _check_paths(cls: type, value: dict, path: str) -> None:
    for key in getattr(cls, "path_args", ()):
        target = value.get(key)
        if target is not None and not Path(str(target)).expanduser().exists():
            raise ComponentError(f"{path}.{key}", f"no such file or directory: {target!r}")
    if path == "backbone" and value.get("pretrained") is not None:
        try:
            cls.check_pretrained(str(value["pretrained"]))
        except ArgumentError as err:
            raise ComponentError(f"{path}.{err.argument}", err.message) from None
