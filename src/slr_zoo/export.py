"""``python -m slr_zoo.export RUN_DIR OUT_DIR``

Writes a trained cell's backbone as a Hugging Face checkpoint (``save_pretrained``) with its
tokenizer: the prelude, the core once and the coda as the model's layers, in order. Another run
starts from it with ``backbone.pretrained=OUT_DIR`` and the same split; the command prints those
overrides. transformers loads it as a plain causal LM, which is the cell with its loop run once.
The loop's own components (step embedding, loop LoRA, combine, halting, probes) are not part of
it; a cell that has any says so. ``OUT_DIR`` must be new or empty, and is written whole or not at
all.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

SPLIT_KEYS = ("name", "prelude_layers", "core_layers", "coda_layers", "attention")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m slr_zoo.export", description=__doc__.split("\n\n")[1])
    parser.add_argument("run_dir", type=Path, help="a trained cell directory: runs/<name>/<cell>")
    parser.add_argument("out_dir", type=Path, help="where the Hugging Face checkpoint goes (new or empty)")
    return parser.parse_args(argv)


def loop_components(model) -> list[str]:
    """The loop's parts that hold trained weights and are left out of an export."""
    names = ("step_embedding", "injection", "loop_lora", "combine", "halting")
    return [name for name in names if any(True for _ in getattr(model, name).parameters())]


def main(argv=None) -> int:
    from slr_zoo.recipe import load_cell
    from slr_zoo.training.checkpoint import CheckpointError

    args = parse_args(argv)
    out = args.out_dir
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"{out} exists and is not an empty directory; give a new one")
        parts = load_cell(args.run_dir)
        model = parts.module.model
        backbone_recipe = parts.config["backbone"]
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
            model.backbone.save_pretrained(tmp, tokenizer=parts.tokenizer)
            split = {key: backbone_recipe[key] for key in SPLIT_KEYS if key in backbone_recipe}
            (Path(tmp) / "slr_zoo_export.json").write_text(json.dumps(
                {"run_dir": str(args.run_dir), "backbone": split, "left_out": loop_components(model)}, indent=2) + "\n")
            if out.exists():
                out.rmdir()
            shutil.move(tmp, out)
            Path(tmp).mkdir()  # the context manager removes the (now moved) directory
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    left = loop_components(model)
    print(f"wrote {out}: {len(model.backbone.prelude.layers)} + {len(model.backbone.core.layers)} + "
          f"{len(model.backbone.coda.layers)} layers and the tokenizer")
    if left:
        print(f"not in it (the loop's own components): {', '.join(left)}")
    overrides = [f"backbone.pretrained={out}"] + [f"backbone.{k}={split[k]}" for k in SPLIT_KEYS if k in split]
    print("start a run from it with:", " ".join(overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
