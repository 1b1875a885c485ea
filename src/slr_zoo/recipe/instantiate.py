"""Turn a validated recipe into built objects: a task, a LoopedLM, objectives, a whole cell.

Everything below this layer receives objects and typed settings, never the recipe itself, and the
errors that name a recipe key are raised here (or by ``Registry.build``, which prefixes a
component's argument with its node's dotted key).
"""

from __future__ import annotations

from pathlib import Path

# importing the component packages registers every shipped member
from slr_zoo import decoders, halting, stabilizers, tasks  # noqa: F401
from slr_zoo.backbones import BACKBONES, Backbone
from slr_zoo.looped import DEPTH_SAMPLERS, LoopedLM
from slr_zoo.recipe.schema import check_value
from slr_zoo.registry import REGISTRIES, ComponentError
from slr_zoo.tasks.base import TASKS, Task
from slr_zoo.tasks.tokenizer import SEP as SEPARATOR


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


def build_backbone(recipe: dict, vocab_size: int = 0, structure_only: bool = False) -> Backbone:
    return BACKBONES.build(recipe["backbone"], "backbone", vocab_size=vocab_size, structure_only=structure_only)


def check_cell(recipe: dict) -> None:
    """Everything about a cell that can fail before it trains, raised as a ComponentError naming
    the key: its task and curriculum are built and asked for their first records (and the
    per-hop answers or reach steps the objectives need), and its model and objectives are built
    on the meta device (no memory, no weights loaded), so that a bad shape or value in any node
    stops a grid before its first cell trains."""
    import torch

    task = build_task(recipe)
    for i, (_, stage) in enumerate(build_curriculum(recipe)):
        _first_records(stage, recipe, f"task.curriculum[{i}]")
    _first_records(task, recipe, "task")
    with torch.device("meta"):
        backbone = build_backbone(recipe, vocab_size=64, structure_only=True)
        model = build_model(recipe, backbone)
        build_objectives(recipe, model.backbone.hidden_size)


def _first_records(task: Task, recipe: dict, path: str) -> None:
    from slr_zoo.tasks.base import check_record

    for split in ("train", "val"):
        try:
            record = next(iter(task.records(split)), None)
        except (OSError, ValueError) as err:
            raise ComponentError(path, f"cannot read its {split} records: {err}") from None
        if record is None:
            raise ComponentError(path, f"its {split} split holds no records (n_{split} = 0 or an empty file)")
        try:
            check_record(record, 0, f"the {split} split")
        except ValueError as err:
            raise ComponentError(path, str(err)) from None
        if split == "train" and recipe["loop"]["step_supervision"] > 0 and task.step_answers(record) is None:
            raise ComponentError("loop.step_supervision", f"needs per-hop answers, which task "
                                 f"{type(task).__name__} does not give; set it to 0")
        if split == "train" and recipe["loop"]["reach_supervision"] > 0 and task.reach_steps(record) is None:
            raise ComponentError("loop.reach_supervision", f"needs per-word reach steps, which task "
                                 f"{type(task).__name__} does not give; set it to 0")


def build_model(recipe: dict, backbone: Backbone) -> LoopedLM:
    loop = recipe["loop"]
    check_value("loop.mode", loop["mode"])  # also for recipes built without validate()
    context = {
        "hidden_size": backbone.hidden_size,
        "max_steps": loop["max_steps"],
        "core": backbone.core,
        "replaced_layers": backbone.replaced_layers,  # share: average (loop_lora init: svd)
        "roles": backbone.roles,  # loop_lora targets by role: query, value, mlp, ...
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
        checkpoint_core=recipe["trainer"]["activation_checkpointing"],
        state_noise=loop["state_noise"],
    )


def objective_nodes(recipe: dict) -> dict[str, dict]:
    """The training objectives and their weights: the answer loss, shared with per-iteration
    supervision by ``loop.step_supervision`` = w as (1 - w) and w, plus the reach probe at
    ``loop.reach_supervision``."""
    loop = recipe["loop"]
    w = loop["step_supervision"]
    nodes = {"answer": {"name": "answer", "weight": 1.0 - w}}
    if w > 0:
        nodes["step_supervision"] = {"name": "step_supervision", "weight": w}
    if loop["reach_supervision"] > 0:
        nodes["reach"] = {"name": "reach", "weight": loop["reach_supervision"]}
    return nodes


def build_objectives(recipe: dict, hidden_size: int) -> dict:
    from slr_zoo.training.objectives import OBJECTIVES

    return {key: OBJECTIVES.build(node, f"objectives.{key}", hidden_size=hidden_size)
            for key, node in objective_nodes(recipe).items()}


def build_cell(recipe: dict, directory: Path):
    """Every part of one cell, built from its recipe; seeds torch first, so the same recipe builds
    the same initial weights. The word-level tokenizer (from-scratch models) is built from the
    training records once and kept in ``directory/tokenizer``."""
    import lightning as L

    from slr_zoo.inference.answers import AnswerScorer
    from slr_zoo.training.data import ReasoningDataModule, load_or_build_tokenizer
    from slr_zoo.training.module import LoopedLMModule
    from slr_zoo.training.run import CellParts
    from slr_zoo.training.settings import OptimConfig, TrainerConfig

    trainer = TrainerConfig(**recipe["trainer"])
    optim = OptimConfig(**recipe["optim"])
    L.seed_everything(recipe["seed"], workers=True, verbose=False)
    task = build_task(recipe)
    curriculum = build_curriculum(recipe)
    finetune = recipe["training"]["mode"] == "finetune"
    if recipe["backbone"].get("pretrained"):
        backbone = build_backbone(recipe)
        if backbone.tokenizer.sep_token is None:  # the separator the model answers after
            backbone.add_tokens({"sep_token": SEPARATOR})
        tokenizer = load_or_build_tokenizer(task, directory / "tokenizer", backbone.tokenizer)
    else:
        stages = [stage for _, stage in curriculum]
        tokenizer = load_or_build_tokenizer(task, directory / "tokenizer", stages=stages)
        backbone = build_backbone(recipe, vocab_size=len(tokenizer))
    model = build_model(recipe, backbone)
    if finetune:
        backbone.freeze_base()
    objectives = build_objectives(recipe, backbone.hidden_size)
    module = LoopedLMModule(model, objectives, optim, seed=recipe["seed"], on_nonfinite=trainer.on_nonfinite,
                            log_every=trainer.log_every, save_trainable_only=finetune,
                            base_fingerprint=backbone.base_fingerprint, answer_scorer=AnswerScorer(tokenizer, task))
    needs = frozenset().union(*(o.data for o in objectives.values()))
    data = ReasoningDataModule(task, tokenizer, trainer.batch_size, trainer.eval_batch_size, seed=recipe["seed"],
                               num_workers=trainer.num_workers, needs=needs, curriculum=curriculum,
                               max_length=backbone.max_positions)
    return CellParts(name=recipe["name"], seed=recipe["seed"], task=task, tokenizer=tokenizer, module=module,
                     data=data, trainer=trainer, grad_clip=optim.grad_clip, config=recipe)



def train_cell(recipe: dict, directory: Path, keys: dict | None = None) -> dict:
    """Build a cell from its recipe and train it (``training.run.run_cell``); ``keys`` are its
    grid keys, stored in the summary with printable values."""
    from slr_zoo.recipe.grid import value_label
    from slr_zoo.training.run import run_cell

    plain = {k: value_label(v) if isinstance(v, (dict, list)) else v for k, v in (keys or {}).items()}
    return run_cell(build_cell(recipe, directory), directory, plain)


def load_cell(run_dir: Path):
    """A trained cell (``runs/<name>/<cell>``): its stored recipe built again, read onto today's
    defaults so that older runs still load, with the weights of its furthest checkpoint, in eval
    mode. Raises FileNotFoundError for a folder that is not a trained cell, CheckpointError
    naming a checkpoint that cannot be read."""
    import torch
    import yaml

    from slr_zoo.recipe.load import resolve_stored
    from slr_zoo.training.checkpoint import check_finished, resume_point

    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{run_dir} is not a cell directory (no config.yaml); pass runs/<name>/<cell>")
    recipe = resolve_stored(yaml.safe_load(config.read_text()) or {})
    check_finished(run_dir)
    parts = build_cell(recipe, run_dir)
    checkpoint = resume_point(run_dir, parts.module)  # checked: a corrupt file stops with its name
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints/last.ckpt not found: the cell has not been trained")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    parts.module.load_state_dict(state, strict=parts.module.strict_loading)
    parts.module.eval()
    return parts
