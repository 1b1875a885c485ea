"""Turn a validated recipe into a task and a LoopedLM."""

from __future__ import annotations

# importing the component packages registers every shipped member
from slr_zoo import decoders, halting, stabilizers, tasks  # noqa: F401
from slr_zoo.backbones import BACKBONES, Backbone
from slr_zoo.looped import DEPTH_SAMPLERS, LoopedLM
from slr_zoo.recipe.schema import check_value
from slr_zoo.registry import REGISTRIES, ComponentError
from slr_zoo.tasks.base import TASKS, Task


def _task_node(recipe: dict) -> dict:
    """The task node without its curriculum, which is the recipe's concern, not the task's."""
    return {k: v for k, v in recipe["task"].items() if k != "curriculum"}


def build_task(recipe: dict) -> Task:
    return TASKS.build(_task_node(recipe), "task", seed=recipe["seed"])


def build_curriculum(recipe: dict) -> list[tuple[int, Task]]:
    """``task.curriculum``: (the training step a stage ends before, its task) per stage; a stage
    is the recipe's task with the stage's keys changed (smaller graphs, fewer hops)."""
    node = _task_node(recipe)
    stages = []
    for i, stage in enumerate(recipe["task"].get("curriculum") or []):
        overrides = {k: v for k, v in stage.items() if k != "until"}
        stages.append((stage["until"], TASKS.build({**node, **overrides}, f"task.curriculum[{i}]", seed=recipe["seed"])))
    return stages


def build_backbone(recipe: dict, vocab_size: int = 0) -> Backbone:
    return BACKBONES.build(recipe["backbone"], "backbone", vocab_size=vocab_size)


def build_model(recipe: dict, backbone: Backbone) -> LoopedLM:
    loop = recipe["loop"]
    check_value("loop.mode", loop["mode"])  # also for recipes built without validate()
    context = {
        "hidden_size": backbone.hidden_size,
        "max_steps": loop["max_steps"],
        "core": backbone.core,
        "replaced_layers": backbone.replaced_layers,  # share: average (loop_lora init: svd)
    }

    def part(key: str):
        return REGISTRIES[key].build(loop[key], f"loop.{key}", **context)

    decoder = REGISTRIES["decoder"].build(recipe["decoder"], "decoder")
    if not decoder.uses_coda and len(backbone.coda):
        raise ComponentError(
            "decoder.name",
            f"decoder {recipe['decoder'].get('name')!r} skips the coda, so its "
            f"{len(backbone.coda)} layer(s) would never train; set backbone.coda_layers=0 or use 'coda'",
        )
    loop_lora = part("loop_lora")
    step_embedding = part("step_embedding")
    if getattr(step_embedding, "uses_noise", False) and not loop["state_noise"]:
        raise ComponentError(
            "loop.step_embedding.noise_level",
            "the noise-level input would never see a noisy state; set loop.state_noise > 0 "
            "(the largest noise std used in training) or noise_level: false",
        )
    return LoopedLM(
        backbone,
        max_steps=loop["max_steps"],
        step_embedding=step_embedding,
        injection=part("injection"),
        loop_lora=loop_lora,
        combine=part("combine"),
        halting=part("halting"),
        decoder=decoder,
        depth_sampler=DEPTH_SAMPLERS.build(loop["depth_sampler"], "loop.depth_sampler", **context),
        backprop_steps=loop["backprop_steps"],
        check_finite=loop["check_finite"],
        debug_nan_at_step=loop.get("debug_nan_at_step"),
        state_noise=loop["state_noise"],
        reach_probe=loop["reach_supervision"] > 0,
    )
