"""``python -m slr_zoo.export``: a trained cell's backbone as a Hugging Face checkpoint. A run that
names it in ``backbone.pretrained`` with the same split starts from exactly the cell's model, and
transformers reads it as the cell with its loop run once; what cannot be a plain model is refused."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
import torch
import yaml

from slr_zoo import export, fit

FAMILIES = {
    "llama": {"name": "llama", "hidden_size": 32, "heads": 2, "prelude_layers": 1, "core_layers": 2,
              "coda_layers": 1, "tie_embeddings": False},
    "gpt2": {"name": "gpt2", "hidden_size": 32, "heads": 2, "prelude_layers": 1, "core_layers": 1, "coda_layers": 1},
}


def _train(directory, backbone: dict, encoding: str = "answer") -> object:
    recipe = {"name": "src", "task": {"name": "iterate", "n_train": 32, "n_val": 4, "hops": [1, 3]},
              "backbone": backbone, "loop": {"max_steps": 3}, "training": {"encoding": encoding},
              "trainer": {"max_steps": 3, "batch_size": 8, "progress_bar": False, "threads": 1}}
    (directory / "src.yaml").write_text(yaml.safe_dump(recipe))
    assert fit.main([str(directory / "src.yaml"), f"output_dir={directory}"]) == 0
    return directory / "src" / "default"


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    cell = _train(directory, FAMILIES[request.param])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert export.main([str(cell), str(directory / "hf")]) == 0
    return request.param, cell, directory / "hf", printed.getvalue()




def test_a_run_from_the_export_starts_from_exactly_the_cells_model(exported):
    from slr_zoo.recipe import build_cell, load_cell

    family, cell, hf_dir, _ = exported
    source = load_cell(cell)
    recipe = yaml.safe_load((cell / "config.yaml").read_text())
    split = {k: FAMILIES[family][k] for k in ("name", "prelude_layers", "core_layers", "coda_layers")}
    recipe["backbone"] = {**split, "pretrained": str(hf_dir)}
    restarted = build_cell(recipe, hf_dir.parent / "restart")
    assert restarted.tokenizer.get_vocab() == source.tokenizer.get_vocab()
    ids = torch.randint(0, source.tokenizer.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = source.module.model.eval()(ids, steps=3).logits
        got = restarted.module.model.eval()(ids, steps=3).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_transformers_reads_the_export_as_the_cell_with_its_loop_run_once(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slr_zoo.recipe import load_cell

    _, cell, hf_dir, _ = exported
    source = load_cell(cell)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    assert tokenizer.get_vocab() == source.tokenizer.get_vocab()
    ids = torch.randint(0, source.tokenizer.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = source.module.model.eval()(ids, steps=1).logits
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    written = json.loads((hf_dir / "slr_zoo_export.json").read_text())
    assert written["backbone"]["core_layers"] == source.config["backbone"]["core_layers"]


def test_the_printed_override_turns_the_source_recipe_into_a_run_from_the_export(exported):
    """The source recipe keeps its from-scratch shape keys (hidden_size, heads), which are refused
    beside a checkpoint: the printed override replaces the whole backbone node."""
    _, cell, hf_dir, printed = exported
    override = re.search(r'override "(.*)"', printed)[1]
    recipe, _ = fit.checked_cells(cell.parent.parent / "src.yaml", [override, f"output_dir={hf_dir.parent}"])
    assert recipe["backbone"]["pretrained"] == str(hf_dir)


def test_what_the_export_leaves_out_is_named(tmp_path, capsys):
    """A parameter-free stabiliser changes even one pass; the export says it is not in it."""
    backbone = {**FAMILIES["llama"], "tie_embeddings": True}
    recipe = {"name": "src", "task": {"name": "iterate", "n_train": 32, "n_val": 4, "hops": [1, 3]},
              "backbone": backbone, "trainer": {"max_steps": 2, "batch_size": 8, "progress_bar": False, "threads": 1},
              "loop": {"max_steps": 2, "combine": {"name": "residual_initial", "alpha": 0.5},
                       "step_embedding": {"name": "sinusoidal"}}}
    (tmp_path / "src.yaml").write_text(yaml.safe_dump(recipe))
    assert fit.main([str(tmp_path / "src.yaml"), f"output_dir={tmp_path}"]) == 0
    assert export.main([str(tmp_path / "src" / "default"), str(tmp_path / "hf")]) == 0
    said = capsys.readouterr().out
    assert "loop.step_embedding (sinusoidal)" in said and "loop.combine (residual_initial)" in said
    assert json.loads((tmp_path / "hf" / "slr_zoo_export.json").read_text())["left_out"] == [
        "loop.step_embedding (sinusoidal)", "loop.combine (residual_initial)"]


def test_a_truncated_qwen2_exports_its_kept_layers_with_their_own_settings(tmp_path):
    """Qwen2's config lists a setting per layer (layer_types): the export keeps the kept layers'."""
    from transformers import AutoModelForCausalLM

    from slr_zoo.backbones.hf import BACKBONES
    from slr_zoo.testing import save_tiny_pretrained

    base, _ = save_tiny_pretrained(tmp_path / "base", family="qwen2")
    backbone = BACKBONES.build({"name": "qwen2", "pretrained": str(tmp_path / "base"), "prelude_layers": 1,
                                "core_layers": 1, "coda_layers": 1, "truncate": True}, "backbone")
    backbone.save_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 3 and len(model.config.layer_types) == 3
    kept = [0, 1, base.config.num_hidden_layers - 1]  # the coda is the last layer
    for i, j in enumerate(kept):
        torch.testing.assert_close(model.model.layers[i].mlp.up_proj.weight, base.model.layers[j].mlp.up_proj.weight)


def test_added_token_rows_are_merged_into_the_exported_embedding_and_head(tmp_path):
    """A pretrained model given the chain-of-thought markers has them in rows of their own; the
    export holds them in the plain embedding and head, at their ids."""
    from slr_zoo.backbones.hf import BACKBONES
    from slr_zoo.testing import save_tiny_pretrained

    save_tiny_pretrained(tmp_path / "base", family="llama", tie=False)  # the head has rows of its own
    backbone = BACKBONES.build({"name": "llama", "pretrained": str(tmp_path / "base"), "prelude_layers": 1,
                                "core_layers": 1, "coda_layers": 0, "truncate": True}, "backbone")
    ids = backbone.add_tokens({"<bot>": "<bot>", "<eot>": "<eot>"})
    with torch.no_grad():
        backbone.embed_tokens.added.normal_()
        backbone.lm_head.rows.normal_()
    backbone.save_pretrained(tmp_path / "out", tokenizer=backbone.tokenizer)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(model.model.embed_tokens.weight[ids], backbone.embed_tokens.added.detach())
    torch.testing.assert_close(model.lm_head.weight[ids], backbone.lm_head.rows.detach())


def test_an_averaged_core_is_refused_by_name(tmp_path):
    from slr_zoo.backbones.hf import BACKBONES
    from slr_zoo.testing import save_tiny_pretrained

    save_tiny_pretrained(tmp_path / "base", family="llama")
    backbone = BACKBONES.build({"name": "llama", "pretrained": str(tmp_path / "base"), "prelude_layers": 0,
                                "core_layers": 1, "coda_layers": 0, "share": "average", "loops": 2, "truncate": True},
                               "backbone")
    with pytest.raises(ValueError, match="share: average"):
        backbone.save_pretrained(tmp_path / "out")


def test_a_used_output_directory_or_a_folder_that_is_no_cell_is_refused_with_exit_2(exported, tmp_path, capsys):
    _, cell, _, _ = exported
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("keep me")
    assert export.main([str(cell), str(tmp_path / "used")]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert (tmp_path / "used" / "notes.txt").read_text() == "keep me"
    assert export.main([str(tmp_path), str(tmp_path / "new")]) == 2
    assert "not a cell directory" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
