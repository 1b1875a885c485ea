"""``python -m slr_zoo.export RUN_DIR OUT_DIR``

Writes a trained cell's backbone as a Hugging Face checkpoint (``save_pretrained``) with its
tokenizer: the prelude, the core once and the coda as the model's layers, in order. Another run
starts from it with ``backbone.pretrained=OUT_DIR`` and the same split; the command prints the
override. transformers loads it as a plain causal LM, which is the cell with its loop run once.
The loop's own components (step embedding, injection, loop LoRA, combine, a learned halting unit)
and the objectives' probes are not part of it; the command names those the cell has.
``OUT_DIR`` must be new or empty, and is written whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SPLIT_KEYS = ("name", "prelude_layers", "core_layers", "coda_layers", "attention")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m slr_zoo.export", description=__doc__.split("\n\n")[1])
    parser.add_argument("run_dir", type=Path, help="a trained cell directory: runs/<name>/<cell>")
    parser.add_argument("out_dir", type=Path, help="where the Hugging Face checkpoint goes (new or empty)")
    return parser.parse_args(argv)


def left_out(parts) -> list[str]:
    """What the cell computes besides its backbone, which the export does not hold: every loop
    component that is not the neutral kind (a parameter-free one such as a sinusoidal step
    embedding or a fixed residual changes even one pass), and the objectives' trained probes."""
    loop = parts.config["loop"]
    names = [f"loop.{key} ({loop[key]['name']})" for key in ("step_embedding", "injection", "loop_lora", "combine")
             if loop[key]["name"] != "none"]
    if any(True for _ in parts.module.model.halting.parameters()):
        names.append(f"loop.halting ({loop['halting']['name']})")
    return names + [f"objective {name}" for name, objective in parts.module.objectives.items()
                    if any(True for _ in objective.parameters())]


def restart_override(out: Path, backbone: dict) -> str:
    """The one override that makes a recipe start from the export: the whole backbone node, since
    a from-scratch recipe's shape keys (hidden_size, heads, ...) are refused beside a checkpoint."""
    split = {key: backbone[key] for key in SPLIT_KEYS if key in backbone}
    node = ", ".join(f"{key}: {value}" for key, value in {"name": split.pop("name"), "pretrained": str(out), **split}.items())
    return f"backbone={{{node}}}"


def main(argv=None) -> int:
    from slr_zoo.files import atomic_directory, cannot_make_folder
    from slr_zoo.recipe import load_cell
    from slr_zoo.training.checkpoint import CheckpointError

    args = parse_args(argv)
    out = args.out_dir
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"{out} exists and is not an empty directory; give a new one")
        if cannot_make_folder(out):
            raise ValueError(cannot_make_folder(out))
        if (args.run_dir / "config.yaml").is_file() and out.resolve().is_relative_to(args.run_dir.resolve()):
            raise ValueError(f"{out} is inside the cell it exports; a --rerun of the cell would move it to "
                             ".replaced/ with the cell, so give a directory outside it")
        parts = load_cell(args.run_dir)
        backbone, recipe = parts.module.model.backbone, parts.config["backbone"]
        left = left_out(parts)

        def write(directory: Path) -> None:
            backbone.save_pretrained(directory, tokenizer=parts.tokenizer)
            (directory / "slr_zoo_export.json").write_text(json.dumps(
                {"run_dir": str(args.run_dir), "backbone": {k: recipe[k] for k in SPLIT_KEYS if k in recipe},
                 "left_out": left}, indent=2) + "\n")

        atomic_directory(out, write)
    except (FileNotFoundError, ValueError, CheckpointError, OSError) as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {len(backbone.prelude.layers)} + {len(backbone.core.layers)} + "
          f"{len(backbone.coda.layers)} layers and the tokenizer")
    if left:
        print(f"not in it, so a run from it starts these afresh: {', '.join(left)}")
    print(f'start a run from it with the override "{restart_override(out, recipe)}"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
