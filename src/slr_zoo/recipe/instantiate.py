"""Turn a validated recipe into built objects: a task, a LoopedLM, objectives, a whole cell.

Everything below this layer receives objects and typed settings, never the recipe itself, and the
errors that name a recipe key are raised here (or by ``Registry.build``, which prefixes a
component's argument with its node's dotted key).
"""

from __future__ import annotations

import itertools
from pathlib import Path

# importing the component packages registers every shipped member
from slr_zoo import decoders, halting, stabilizers, tasks  # noqa: F401
from slr_zoo.backbones import BACKBONES, Backbone
from slr_zoo.looped import DEPTH_SAMPLERS, LoopedLM
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
    encoding = build_encoding(recipe)
    with torch.device("meta"):
        backbone = build_backbone(recipe, vocab_size=64, structure_only=True)
        model = build_model(recipe, backbone)
        objectives = build_objectives(recipe, model.backbone.hidden_size, load_teacher=False)
    slots = encoding.slots(encoding.final_stage)
    if slots + 2 >= backbone.max_positions:  # [BOT] and [EOT] besides the slots, and the question
        raise ComponentError("training.curriculum.max_latent_stage", f"its last stage puts {slots} thought slots "
                             f"(max_latent_stage x thoughts_per_step) in every sequence, and the model has "
                             f"{backbone.max_positions} positions")
    if recipe["training"]["mode"] == "finetune":
        backbone.freeze_base()
        # rows for added tokens train too: a separator the tokenizer lacks, the CoT markers
        adds_rows = encoding.kind != "answer" or backbone.tokenizer is None or backbone.tokenizer.sep_token is None
        if not adds_rows:
            _check_something_trains(model, objectives)
    if teacher_recipe(recipe) is not None:  # a distillation teacher: a CoT cell of the same width and words
        _check_teacher_vocabulary(recipe, task)


def _check_something_trains(model, objectives: dict) -> None:
    parameters = [*model.parameters(), *(p for objective in objectives.values() for p in objective.parameters())]
    if not any(p.requires_grad for p in parameters):
        raise ComponentError("training.mode", "finetune freezes the pretrained base, and nothing else has weights "
                             "to train: add backbone.lora, or a loop component with weights (loop.loop_lora, "
                             "loop.step_embedding, loop.combine, loop.injection)")


def _check_teacher_vocabulary(recipe: dict, task: Task) -> None:
    """A student built from scratch reads its teacher's word-level vocabulary; words it lacks
    would become [UNK], answers included, and train on nothing."""
    if recipe["backbone"].get("pretrained"):
        return  # both read the pretrained model's own tokenizer
    from transformers import PreTrainedTokenizerFast

    from slr_zoo.tasks.tokenizer import record_text, unknown_words

    key, directory = teacher_of(recipe)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(Path(directory) / "tokenizer"))
    for i, record in enumerate(itertools.islice(task.records("train"), 20)):
        for text in record_text(record):
            unknown = unknown_words(tokenizer, text)
            if unknown:
                raise ComponentError(key, f"the teacher's vocabulary lacks {unknown[0]!r}, a word of the student's "
                                     f"train record {i}: a teacher must be trained on the student's task")


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
            if task.records_file(split) is not None:
                _check_every_record(task, split)
        except (OSError, ValueError) as err:
            raise ComponentError(path, str(err)) from None
        encoding = recipe["training"]["encoding"]
        if split == "train" and (encoding != "answer" or teacher_of(recipe)) and not record.get("steps"):
            key = "training.encoding" if encoding != "answer" else teacher_of(recipe)[0]
            raise ComponentError(key, f"{'encoding ' + repr(encoding) if encoding != 'answer' else 'distillation'} "
                                 f"needs the written reasoning steps of every training record; the first record of "
                                 f"{path} has none (no 'steps' list)")
        if split == "train" and recipe["loop"]["step_supervision"] > 0 and task.step_answers(record) is None:
            raise ComponentError("loop.step_supervision", f"needs per-hop answers, which task "
                                 f"{type(task).__name__} does not give; set it to 0")
        readers = _reach_readers(recipe) if split == "train" else []
        if readers and task.reach_steps(record) is None:
            key = readers[0]
            raise ComponentError(key, f"needs per-word reach steps, which task {type(task).__name__} does not "
                                 f"give; {'set it to 0' if key.startswith('loop.') else 'remove it'}")


_CHECKED_FILES: set[tuple] = set()  # (task kind, parsing, path, size, mtime): a grid reads each file once


def _check_every_record(task: Task, split: str) -> None:
    """Every record of a file-backed split read once, so that a broken one is named before any
    cell trains rather than when its cell builds its data. Reading checks each record
    (``json_file.read_records``), so nothing more is asked of them here."""
    source = Path(task.records_file(split)).expanduser()
    stat = source.stat()
    key = (type(task).__name__, tuple(getattr(task, "literal_fields", ())), str(source.resolve()),
           stat.st_size, stat.st_mtime_ns)
    if key in _CHECKED_FILES:
        return
    for _ in task.records(split):
        pass
    _CHECKED_FILES.add(key)


def _reach_readers(recipe: dict) -> list[str]:
    """The recipe keys of the objectives that read per-word reach steps."""
    from slr_zoo.training.objectives import OBJECTIVES

    keys = ["loop.reach_supervision"] if recipe["loop"]["reach_supervision"] > 0 else []
    for key, node in (recipe.get("objectives") or {}).items():
        if "name" in node and "reach" in OBJECTIVES.get(node["name"]).data:
            keys.append(f"objectives.{key}")
    return keys


def build_encoding(recipe: dict):
    """How the cell's records become sequences (``training.encoding``), at the curriculum's final
    stage for validation and generation."""
    from slr_zoo.tasks.encoding import Encoding

    training = recipe["training"]
    curriculum = training["curriculum"]
    return Encoding(training["encoding"], curriculum["thoughts_per_step"], curriculum["max_latent_stage"],
                    continuous=recipe["loop"]["mode"] == "thoughts")


def stabilizer_indices(recipe: dict) -> int:
    """How many step indices the step embedding and loop LoRA tables need: ``loop.max_steps`` in
    depth mode; in thoughts mode T per pass, for every thought's pass and the last one."""
    loop = recipe["loop"]
    if loop["mode"] != "thoughts":
        return loop["max_steps"]
    return (build_encoding(recipe).thoughts() + 1) * loop["max_steps"]


def build_model(recipe: dict, backbone: Backbone) -> LoopedLM:
    loop = recipe["loop"]
    context = {
        "hidden_size": backbone.hidden_size,
        "max_steps": stabilizer_indices(recipe),
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
        depth_sampler=DEPTH_SAMPLERS.build(loop["depth_sampler"], "loop.depth_sampler",
                                           **{**context, "max_steps": loop["max_steps"]}),
        backprop_steps=loop["backprop_steps"],
        check_finite=loop["check_finite"],
        checkpoint_core=recipe["trainer"]["activation_checkpointing"],
        state_noise=loop["state_noise"],
        mode=loop["mode"],
        compile_core=recipe["trainer"]["compile"],
    )


def objective_nodes(recipe: dict) -> dict[str, dict]:
    """The training objectives and their weights: the answer loss, shared with per-iteration
    supervision by ``loop.step_supervision`` = w as (1 - w) and w, plus the reach probe at
    ``loop.reach_supervision``, the language-model loss on written steps (every encoding but
    ``answer``), distillation (``training.distill``), and the recipe's own ``objectives``, which
    may also replace any of these by using its key."""
    loop = recipe["loop"]
    w = loop["step_supervision"]
    nodes = {"answer": {"name": "answer", "weight": 1.0 - w}}
    if w > 0:
        nodes["step_supervision"] = {"name": "step_supervision", "weight": w}
    if loop["reach_supervision"] > 0:
        nodes["reach"] = {"name": "reach", "weight": loop["reach_supervision"]}
    if recipe["training"]["encoding"] != "answer":
        nodes["language_model"] = {"name": "language_model", "weight": 1.0}
    if recipe["training"].get("distill"):
        nodes["distill"] = {"name": "distill", **recipe["training"]["distill"]}
    nodes.update(recipe.get("objectives") or {})
    return nodes


def teacher_of(recipe: dict) -> tuple[str, str] | None:
    """(dotted key, run directory) of the recipe's distillation teacher: ``training.distill`` or a
    ``distill`` entry of ``objectives``; None without one."""
    if recipe["training"].get("distill"):
        return "training.distill.teacher", str(recipe["training"]["distill"]["teacher"])
    for key, node in (recipe.get("objectives") or {}).items():
        if node.get("name") == "distill" and node.get("teacher"):
            return f"objectives.{key}.teacher", str(node["teacher"])
    return None


def teacher_recipe(recipe: dict) -> dict | None:
    """The stored recipe of the distillation teacher (``teacher_of``), checked to be a CoT cell of
    the student's width; None without distillation."""
    import torch

    from slr_zoo.recipe.load import StoredConfigError, read_stored

    found = teacher_of(recipe)
    if found is None:
        return None
    key, directory = found
    config = Path(directory) / "config.yaml"
    if not config.is_file():
        raise ComponentError(key, f"{directory!r} is not a trained cell (no config.yaml); pass "
                             "runs/<name>/<cell> of a CoT run")
    try:
        teacher = read_stored(directory)
    except StoredConfigError as err:
        raise ComponentError(key, str(err)) from None
    checkpoints = [Path(directory) / "checkpoints" / "last.ckpt", *Path(directory).glob("hpc_ckpt_*.ckpt")]
    if not any(path.is_file() for path in checkpoints):
        raise ComponentError(key, f"{directory!r} has no checkpoint (checkpoints/last.ckpt): train the teacher first")
    if not recipe["backbone"].get("pretrained") and not (Path(directory) / "tokenizer" / "tokenizer.json").is_file():
        raise ComponentError(key, f"{directory!r} has no tokenizer/tokenizer.json, the vocabulary a student "
                             "built from scratch shares with its teacher")
    if teacher["training"]["encoding"] != "cot":
        raise ComponentError(key, f"{directory!r} was trained with encoding {teacher['training']['encoding']!r}; "
                             "a teacher writes its steps (encoding: cot)")
    with torch.device("meta"):
        theirs = build_backbone(teacher, vocab_size=64, structure_only=True).hidden_size
        ours = build_backbone(recipe, vocab_size=64, structure_only=True).hidden_size
    if theirs != ours:
        raise ComponentError(key, f"the teacher's hidden size is {theirs}, the student's "
                             f"backbone.hidden_size is {ours}; its states can only be targets for a student of "
                             "the same width")
    return teacher


def build_objectives(recipe: dict, hidden_size: int, load_teacher: bool = True) -> dict:
    """``load_teacher``: read a distillation teacher's weights (not when only checking a cell)."""
    from slr_zoo.training.objectives import OBJECTIVES

    context: dict = {"hidden_size": hidden_size, "thoughts_mode": recipe["loop"]["mode"] == "thoughts",
                     "thoughts_per_step": recipe["training"]["curriculum"]["thoughts_per_step"]}
    if load_teacher and teacher_recipe(recipe) is not None:
        context["teacher_model"] = load_cell(Path(teacher_of(recipe)[1])).module.model

    def where(key: str) -> str:
        return "training.distill" if key == "distill" and key not in (recipe.get("objectives") or {}) else f"objectives.{key}"

    return {key: OBJECTIVES.build(node, where(key), **context) for key, node in objective_nodes(recipe).items()}


def build_cell(recipe: dict, directory: Path, load_teacher: bool = True):
    """Every part of one cell, built from its recipe; seeds torch first, so the same recipe builds
    the same initial weights. The word-level tokenizer (from-scratch models) is built from the
    training records once and kept in ``directory/tokenizer``. ``load_teacher``: load a
    distillation teacher (not needed to evaluate a trained student)."""
    import lightning as L

    from slr_zoo.inference.answers import AnswerScorer
    from slr_zoo.training.data import ReasoningDataModule, load_or_build_tokenizer
    from slr_zoo.training.module import LoopedLMModule
    from slr_zoo.training.run import CellParts
    from slr_zoo.training.settings import CurriculumConfig, OptimConfig, TrainerConfig

    trainer = TrainerConfig(**recipe["trainer"])
    optim = OptimConfig(**recipe["optim"])
    L.seed_everything(recipe["seed"], workers=True, verbose=False)
    task = build_task(recipe)
    curriculum = build_curriculum(recipe)
    finetune = recipe["training"]["mode"] == "finetune"
    encoding = build_encoding(recipe)
    if recipe["backbone"].get("pretrained"):
        backbone = build_backbone(recipe)
        if backbone.tokenizer.sep_token is None:  # the separator the model answers after
            backbone.add_tokens({"sep_token": SEPARATOR})
        if encoding.kind != "answer":
            from slr_zoo.tasks.tokenizer import MARKERS

            backbone.add_tokens({m: m for m in MARKERS})
        tokenizer = load_or_build_tokenizer(task, directory / "tokenizer", backbone.tokenizer)
    else:
        stages = [stage for _, stage in curriculum]
        if teacher_of(recipe) and not (directory / "tokenizer").exists():
            import shutil  # a student reads its teacher's token ids: the teacher's vocabulary

            shutil.copytree(Path(teacher_of(recipe)[1]) / "tokenizer", directory / "tokenizer")
        tokenizer = load_or_build_tokenizer(task, directory / "tokenizer", stages=stages)
        backbone = build_backbone(recipe, vocab_size=len(tokenizer))
    model = build_model(recipe, backbone)
    if finetune:
        backbone.freeze_base()
    objectives = build_objectives(recipe, backbone.hidden_size, load_teacher=load_teacher)
    if finetune:
        _check_something_trains(model, objectives)
    module = LoopedLMModule(model, objectives, optim, seed=recipe["seed"], on_nonfinite=trainer.on_nonfinite,
                            log_every=trainer.log_every, save_trainable_only=finetune,
                            base_fingerprint=backbone.base_fingerprint,
                            answer_scorer=AnswerScorer(tokenizer, task, encoding),
                            reset_optimizer_per_stage=recipe["training"]["curriculum"]["reset_optimizer"])
    needs = frozenset().union(*(o.data for o in objectives.values()))
    data = ReasoningDataModule(task, tokenizer, trainer.batch_size, trainer.eval_batch_size, seed=recipe["seed"],
                               num_workers=trainer.num_workers, needs=needs, curriculum=curriculum,
                               max_length=backbone.max_positions, encoding=encoding,
                               stages=CurriculumConfig(**recipe["training"]["curriculum"]))
    return CellParts(name=recipe["name"], seed=recipe["seed"], task=task, tokenizer=tokenizer, module=module,
                     data=data, trainer=trainer, grad_clip=optim.grad_clip, config=recipe)



def train_cell(recipe: dict, directory: Path, keys: dict | None = None) -> dict:
    """Build a cell from its recipe and train it (``training.run.run_cell``); ``keys`` are its
    grid keys, stored in the summary with printable values."""
    from slr_zoo.recipe.grid import value_label
    from slr_zoo.training.run import run_cell

    plain = {k: value_label(v) if isinstance(v, (dict, list)) else v for k, v in (keys or {}).items()}
    return run_cell(build_cell(recipe, directory), directory, plain)


def paths_as_trained(recipe: dict, run_dir: Path) -> dict:
    """The stored recipe with its relative file paths (the task's files, ``backbone.pretrained``)
    read from the directory ``fit`` ran in: ``val_file: ../shared/...`` then means the file the
    cell was validated on, from wherever ``evaluate`` or ``generate`` is started. That directory
    is in the cell's ``summary.json``; for a cell without one (killed, or older) it is found from
    the cell's place under a relative ``output_dir``, as the path was given (links not followed)."""
    import os

    from slr_zoo.files import summary_or_none

    launched = (summary_or_none(Path(run_dir) / "summary.json") or {}).get("working_directory")
    if launched:
        launched = Path(launched)
    else:
        out, cell = Path(recipe["output_dir"]), Path(os.path.abspath(run_dir))
        if out.is_absolute() or len(cell.parents) < len(out.parts) + 2:
            return recipe
        launched = cell.parents[len(out.parts) + 1]
        if Path(os.path.normpath(launched / out / recipe["name"])) != cell.parent:
            return recipe  # the cell was moved or renamed: its paths stay as written
    recipe = {**recipe, "task": dict(recipe["task"]), "backbone": dict(recipe["backbone"])}
    name = recipe["task"].get("name")
    task_paths = TASKS.get(name).path_args if name in TASKS else ()
    for node, key in [("task", key) for key in task_paths] + [("backbone", "pretrained")]:
        value = recipe[node].get(key)
        if isinstance(value, str) and not Path(value).expanduser().is_absolute() and (launched / value).exists():
            recipe[node][key] = str(launched / value)
    return recipe


def load_cell(run_dir: Path):
    """A trained cell (``runs/<name>/<cell>``): its stored recipe built again, read onto today's
    defaults so that older runs still load, with the weights of its furthest checkpoint, in eval
    mode. Raises FileNotFoundError for a folder that is not a trained cell, CheckpointError
    naming a checkpoint that cannot be read, StoredConfigError (a ValueError) for a damaged
    ``config.yaml``."""
    import torch

    from slr_zoo.files import summary_or_none
    from slr_zoo.recipe.load import read_stored
    from slr_zoo.training.checkpoint import check_finished, resume_point

    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        failed = summary_or_none(run_dir / "summary.json")
        if failed is not None and failed.get("status") == "failed":
            raise FileNotFoundError(f"{run_dir} is a cell that failed before it trained: {failed.get('error')}")
        raise FileNotFoundError(f"{run_dir} is not a cell directory (no config.yaml); pass runs/<name>/<cell>")
    recipe = paths_as_trained(read_stored(run_dir), run_dir)
    check_finished(run_dir)
    parts = build_cell(recipe, run_dir, load_teacher=False)
    checkpoint = resume_point(run_dir, parts.module)  # checked: a corrupt file stops with its name
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints/last.ckpt not found: the cell has not been trained")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    parts.module.load_state_dict(state, strict=parts.module.strict_loading)
    parts.module.eval()
    return parts
