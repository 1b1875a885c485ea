"""``python -m slr_zoo.export``: a trained cell's backbone as a Hugging Face checkpoint. A run that
names it in ``backbone.pretrained`` with the same split starts from exactly the cell's model, and
transformers reads it as the cell with its loop run once; what cannot be a plain model is refused."""

from __future__ import annotations

import json

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
    assert export.main([str(cell), str(directory / "hf")]) == 0
    return request.param, cell, directory / "hf"




def test_a_run_from_the_export_starts_from_exactly_the_cells_model(exported):
    from slr_zoo.recipe import build_cell, load_cell

    family, cell, hf_dir = exported
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

    _, cell, hf_dir = exported
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


def test_added_token_rows_are_merged_into_the_exported_embedding_and_head(tmp_path):
    """A pretrained model given the chain-of-thought markers has them in rows of their own; the
    export holds them in the plain embedding and head, at their ids."""
    from slr_zoo.backbones.hf import BACKBONES
    from slr_zoo.testing import save_tiny_pretrained

    save_tiny_pretrained(tmp_path / "base", family="llama")
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
    _, cell, _ = exported
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("keep me")
    assert export.main([str(cell), str(tmp_path / "used")]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert (tmp_path / "used" / "notes.txt").read_text() == "keep me"
    assert export.main([str(tmp_path), str(tmp_path / "new")]) == 2
    assert "not a cell directory" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
