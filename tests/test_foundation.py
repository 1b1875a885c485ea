"""The spine: recipes validate or fail with the right message, the loop is exactly the HF model it
wraps at neutral settings, gradients reach everything, and the main command runs end to end."""

from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import VOCAB, stand_ins, tiny_model, tiny_recipe
from slr_zoo import fit
from slr_zoo.looped import DEPTH_SAMPLERS
from slr_zoo.recipe import build_backbone, build_model, expand, load, validate
from slr_zoo.registry import ComponentError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


# ---------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_and_grid_cell_validates(path, tmp_path):
    recipe = load(path, stand_ins(path, tmp_path))  # a pretrained checkpoint not on this machine
    validate(recipe)
    for cell in expand(recipe):
        validate(cell.recipe)


def test_the_main_grid_runs_the_plain_loop_and_residual_a_over_three_seeds_and_the_no_loop_baseline():
    cells = expand(load(ROOT / "recipes/ablation_residual.yaml"))
    looped = sorted((c.recipe["loop"]["combine"]["name"], c.recipe["seed"]) for c in cells
                    if c.recipe["loop"]["max_steps"] > 1)
    assert looped == [(name, seed) for name in ("none", "residual_initial") for seed in (0, 1, 2)]
    assert [(c.recipe["loop"]["max_steps"], c.recipe["seed"]) for c in cells if c.recipe["loop"]["max_steps"] == 1] \
        == [(1, 0)]


def test_the_full_residual_grid_holds_every_residual_and_both_baselines():
    cells = expand(load(ROOT / "recipes/ablation_residual_all.yaml"))
    combines = {c.recipe["loop"]["combine"]["name"] for c in cells if c.recipe["loop"]["max_steps"] > 1}
    assert combines == {"none", "residual_initial", "residual_previous", "learned", "gated"}
    baselines = [(c.recipe["loop"]["max_steps"], c.recipe["backbone"]["core_layers"]) for c in cells
                 if c.recipe["loop"]["max_steps"] == 1]
    assert sorted(baselines) == [(1, 1), (1, 6)]  # no loop; unrolled to the loop's 6 layer applications


def test_the_long_loop_grid_runs_four_residuals_at_twelve_iterations_over_three_seeds():
    cells = expand(load(ROOT / "recipes/ablation_residual_long.yaml"))
    assert {(c.recipe["loop"]["max_steps"], tuple(c.recipe["task"]["hops"])) for c in cells} == {(12, (1, 12))}
    assert sorted((c.recipe["loop"]["combine"]["name"], c.recipe["seed"]) for c in cells) == [
        (name, seed) for name in ("gated", "none", "residual_initial", "residual_previous") for seed in (0, 1, 2)]


@pytest.mark.parametrize(
    "override, message",
    [
        ("loop.max_stepz=3", ["loop.max_stepz", "max_steps"]),
        ("loop.max_steps=many", ["loop.max_steps", "int"]),
        ("loop.combine.name=gatd", ["loop.combine", "gated"]),
        ("loop.combine={name: gated, alpah: 0.5}", ["loop.combine.alpah", "alpha"]),
        ("backbone.pretrained=/no/such/model", ["backbone.pretrained", "/no/such/model"]),
        ("task.name=json", ["task"]),
        ("trainer.batch_size=0", ["trainer.batch_size", ">= 1"]),
        ("loop.max_steps=0", ["loop.max_steps", ">= 1"]),
        ("trainer.devices=2x", ["trainer.devices", "'2x'"]),
        ("loop.mode=thoughts", ["loop.mode", "training.encoding: latent"]),
        ("loop.combine={name: gated", ["loop.combine", "cannot parse"]),
        ("loop.combine={_component_: json.NoSuchThing}", ["loop.combine._component_", "json.NoSuchThing"]),
    ],
)
def test_bad_recipe_exits_2_naming_the_key_and_trains_nothing(override, message, tmp_path, capsys):
    status = fit.main([str(ROOT / "recipes/quickstart.yaml"), override, f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("recipe error:") and "Traceback" not in err
    for fragment in message:
        assert fragment in err
    assert not any(tmp_path.iterdir())


def test_bad_grid_cell_is_named_before_any_cell_trains(tmp_path, capsys):
    recipe = tmp_path / "grid.yaml"
    recipe.write_text(
        (ROOT / "recipes/quickstart.yaml").read_text()
        + f"output_dir: {tmp_path}/runs\ngrid:\n  loop.combine: [{{name: none}}, {{name: gatd}}]\n"
    )
    assert fit.main([str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "grid cell 1" in err and "gated" in err
    assert not (tmp_path / "runs").exists()


def test_missing_recipe_file_is_a_recipe_error(tmp_path, capsys):
    assert fit.main([str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_malformed_yaml_is_a_recipe_error_without_a_traceback(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("loop: {max_steps: 3\ntrainer: {}\n")
    assert fit.main([str(broken), f"output_dir={tmp_path}/runs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recipe error: recipe: cannot parse") and "broken.yaml" in err and "Traceback" not in err


# ------------------------------------------------------------------- the loop is the HF model
def _save_tiny_hf(family: str, directory: Path, layers: int = 3) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_head=2, n_layer=layers, n_positions=64))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=layers, num_attention_heads=2,
                                             num_key_value_heads=2, max_position_embeddings=64))
    model.save_pretrained(directory)
    _save_word_tokenizer(directory)
    return model.eval()


def _save_word_tokenizer(directory: Path) -> None:
    from slr_zoo.tasks.tokenizer import build_word_tokenizer

    build_word_tokenizer([{"question": "a b c", "answer": "d"}]).save_pretrained(directory)


def _pretrained_looped(directory: Path, family: str, steps: int):
    recipe = tiny_recipe(**{"backbone": {"name": family, "pretrained": str(directory), "prelude_layers": 1,
                                         "core_layers": 1, "coda_layers": 1},
                            "loop__max_steps": steps})
    return build_model(recipe, build_backbone(recipe, vocab_size=VOCAB)).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_iteration_with_pass_through_components_is_the_pretrained_hf_model(family, tmp_path, tokens):
    hf = _save_tiny_hf(family, tmp_path)
    looped = _pretrained_looped(tmp_path, family, steps=1)
    assert looped.backbone.tokenizer is not None  # loaded from the same local directory
    with torch.no_grad():
        torch.testing.assert_close(looped(tokens).logits, hf(tokens).logits, rtol=0, atol=1e-5)


def test_t_iterations_equal_an_hf_model_with_the_core_layer_repeated(tmp_path, tokens):
    hf = _save_tiny_hf("llama", tmp_path)
    looped = _pretrained_looped(tmp_path, "llama", steps=3)
    unrolled = copy.deepcopy(hf)
    layers = unrolled.model.layers
    core = [copy.deepcopy(layers[1]) for _ in range(3)]  # same weights, distinct modules
    unrolled.model.layers = torch.nn.ModuleList([layers[0], *core, layers[2]])
    unrolled.config.num_hidden_layers = 5
    for i, layer in enumerate(unrolled.model.layers):
        layer.self_attn.layer_idx = i
    with torch.no_grad():
        torch.testing.assert_close(looped(tokens).logits, unrolled(tokens).logits, rtol=0, atol=1e-5)


def test_pretrained_directory_must_hold_a_model(tmp_path):
    with pytest.raises(ComponentError, match=r"^backbone\.pretrained: .* is not a local model directory \(no "
                                             r"config\.json\) or \.gguf file; save one with save_pretrained\(\)"):
        tiny_recipe(backbone__pretrained=str(tmp_path))


# ------------------------------------------------------------------------- the head's positions
def test_logits_to_keep_gives_the_kept_positions_of_the_full_logits(tokens):
    model = tiny_model(tiny_recipe(decoder={"name": "coda"})).eval()
    full = model(tokens).logits
    last = model(tokens, logits_to_keep=2)
    torch.testing.assert_close(last.logits, full[:, -2:], rtol=1e-5, atol=1e-6)
    assert last.logits_kept.tolist() == [8, 9]
    picked = torch.tensor([0, 3, 7])
    out = model(tokens, logits_to_keep=picked)
    torch.testing.assert_close(out.logits, full[:, picked], rtol=1e-5, atol=1e-6)
    assert out.logits_kept.tolist() == [0, 3, 7]
    for every in (0, 10, 12):  # 0 and k >= S: every position, as in Hugging Face
        kept = model(tokens, logits_to_keep=every)
        assert kept.logits_kept is None and kept.logits.shape == full.shape
    assert model(tokens, logits_to_keep=torch.tensor([], dtype=torch.long)).logits.shape == (3, 0, VOCAB)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[0, 4], mask[1, 1:3], mask[2, 9] = True, True, True
    scattered = model(tokens, logits_to_keep=mask)
    torch.testing.assert_close(scattered.logits, full[mask], rtol=1e-5, atol=1e-6)
    assert scattered.logits.shape == (4, VOCAB)
    with pytest.raises(ValueError, match="logits_to_keep must be >= 0"):
        model(tokens, logits_to_keep=-1)
    with pytest.raises(ValueError, match=r"as positions must be 1-D \(or a \[batch, positions\] bool mask\)"):
        model(tokens, logits_to_keep=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"as a mask must be \[batch, positions\] = \(3, 10\), got \(3, 9\)"):
        model(tokens, logits_to_keep=mask[:, 1:])


@pytest.mark.parametrize("halting", [{"name": "fixed"}, {"name": "ponder"}, {"name": "ponder", "granularity": "token"},
                                     {"name": "kl", "threshold": 1.0e-3}])
def test_losses_and_gradients_are_the_same_with_the_head_at_the_labelled_positions_only(tokens, halting):
    """The training module keeps the logits where some objective has a label: the answer, CoT
    and step supervision losses (each iteration's logits kept at the same entries), the
    loss-mixing halting policies' per-step terms (their per-sample and per-token weights) and
    every gradient are unchanged."""
    from slr_zoo.tasks.encoding import IGNORE
    from slr_zoo.training.objectives import logit_positions
    from slr_zoo.training.objectives.answer import AnswerLoss
    from slr_zoo.training.objectives.language_model import LanguageModelLoss
    from slr_zoo.training.objectives.step_supervision import StepSupervision

    recipe = tiny_recipe(loop__halting=halting)
    labels = torch.full_like(tokens, IGNORE)
    labels[0, 6:8], labels[1, 8:10], labels[2, 5] = tokens[0, 7:9], tokens[1, 1:3], 5
    text = torch.full_like(tokens, IGNORE)
    text[0, 2:4] = tokens[0, 3:5]
    hop_labels = torch.where(labels == IGNORE, IGNORE, (labels + 1) % VOCAB)[:, None].repeat(1, 2, 1)
    hop_labels[:, 1] = torch.where(labels == IGNORE, IGNORE, (labels + 2) % VOCAB)
    batch = {"input_ids": tokens, "labels": labels, "text_labels": text, "step_labels": hop_labels}
    objectives = [AnswerLoss(), LanguageModelLoss(), StepSupervision()]
    keep = logit_positions(objectives, batch)
    assert keep.nonzero().tolist() == [[0, 2], [0, 3], [0, 6], [0, 7], [1, 8], [1, 9], [2, 5]]

    def loss_and_grads(logits_to_keep):
        model = tiny_model(recipe).train()
        out = model(tokens, logits_to_keep=logits_to_keep, record=("logits",))
        loss = sum(objective(batch, out)[0] for objective in objectives)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out

    loss_all, grads_all, out_all = loss_and_grads(0)
    loss_kept, grads_kept, out_kept = loss_and_grads(keep)
    assert out_kept.logits.shape == (7, VOCAB) and out_all.logits.shape == (3, 10, VOCAB)
    assert [x.shape for x in out_kept.step_logits] == [(7, VOCAB)] * recipe["loop"]["max_steps"]
    assert len(out_kept.loss_terms) == len(out_all.loss_terms) == (3 if halting["name"] == "ponder" else 0)
    torch.testing.assert_close(loss_kept, loss_all, rtol=1e-5, atol=1e-6)
    assert grads_kept.keys() == grads_all.keys() and len(grads_all) == len(list(tiny_model(recipe).parameters()))
    for name, grad in grads_all.items():
        torch.testing.assert_close(grads_kept[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_an_objective_that_may_read_any_position_keeps_every_logit(tokens):
    from slr_zoo.tasks.encoding import IGNORE
    from slr_zoo.training.objectives import Objective, logit_positions
    from slr_zoo.training.objectives.answer import AnswerLoss

    class ReadsAnything(Objective):  # declares no logits_at
        def forward(self, batch, out, detail=False):
            return out.logits.mean(), {}

    batch = {"input_ids": tokens, "labels": torch.full_like(tokens, IGNORE)}
    assert logit_positions([AnswerLoss(), ReadsAnything()], batch) == 0
    assert not logit_positions([AnswerLoss()], batch).any()


@pytest.mark.parametrize("halting, expected", [({"name": "fixed"}, "nan"), ({"name": "ponder"}, 0.0)])
def test_a_batch_without_labels_gives_the_loss_it_gave_with_every_logit(tokens, halting, expected):
    """No labelled entry keeps no logits ([0, V]); the answer loss is then what it was over every
    position: NaN (which the training step turns into its agreed stop or skip) or, mixed over
    steps, zero."""
    from slr_zoo.tasks.encoding import IGNORE
    from slr_zoo.training.objectives import logit_positions
    from slr_zoo.training.objectives.answer import AnswerLoss

    batch = {"input_ids": tokens, "labels": torch.full_like(tokens, IGNORE)}
    model = tiny_model(tiny_recipe(loop__halting=halting)).train()
    kept = model(tokens, logits_to_keep=logit_positions([AnswerLoss()], batch))
    assert kept.logits.shape == (0, VOCAB)
    loss, _ = AnswerLoss()(batch, kept)
    before, _ = AnswerLoss()(batch, model(tokens))
    if expected == "nan":
        assert torch.isnan(loss) and torch.isnan(before)
    else:
        assert float(loss.detach()) == float(before.detach()) == expected


# ------------------------------------------------------------------------- gradients, depth
def test_gradients_reach_every_parameter(tokens):
    model = tiny_model(tiny_recipe(**{"loop__injection": {"name": "add"}}))
    model.train()
    out = model(tokens)
    out.logits.float().pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("backprop_steps", [1, 2, 3])
def test_truncated_backprop_runs_exactly_the_last_iterations_with_a_graph(tokens, backprop_steps):
    model = tiny_model(tiny_recipe(loop__backprop_steps=backprop_steps)).train()   # T = 3
    modes = []
    model.backbone.core.register_forward_pre_hook(lambda m, args: modes.append(torch.is_grad_enabled()))
    model(tokens).logits.float().pow(2).mean().backward()
    assert modes == [t > 3 - backprop_steps for t in (1, 2, 3)]
    # with no injection, h0 reaches the loss only through iteration 1
    reached = all(p.grad is not None for p in model.backbone.prelude.parameters())
    assert reached == (backprop_steps == 3)
    assert all(p.grad is not None for p in model.backbone.core.parameters())


def test_depth_samplers_stay_in_range_and_follow_their_generator():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    fixed = DEPTH_SAMPLERS.build({"name": "fixed"}, max_steps=8)
    assert {fixed.sample(g()) for _ in range(5)} == {8}
    uniform = DEPTH_SAMPLERS.build({"name": "uniform", "low": 2}, max_steps=8)
    gen = g()
    draws = [uniform.sample(gen) for _ in range(400)]
    assert set(draws) == set(range(2, 9))
    huginn = DEPTH_SAMPLERS.build({"name": "lognormal_poisson", "mean": 4}, max_steps=32)
    first, second = g(), g()
    a = [huginn.sample(first) for _ in range(2000)]
    assert a == [huginn.sample(second) for _ in range(2000)]
    assert min(a) >= 1 and max(a) <= 32
    assert 4.5 < sum(a) / len(a) < 5.5  # Poisson(mean) + 1
    for node, key in (({"name": "fixed", "steps": 9}, "steps"), ({"name": "uniform", "high": 9}, "high"),
                      ({"name": "lognormal_poisson", "cap": 9}, "cap"), ({"name": "lognormal_poisson", "mean": 9}, "mean")):
        with pytest.raises(ComponentError, match=rf"^loop\.depth_sampler\.{key}: must be in \[1, max_steps = 8\]"):
            DEPTH_SAMPLERS.build(node, "loop.depth_sampler", max_steps=8)


# ------------------------------------------------------------------ the main command, end to end
def test_main_command_runs_the_residual_grid_writes_its_outputs_and_resumes(tmp_path):
    tiny = [f"output_dir={tmp_path}", "task.n_train=128", "task.n_val=32", "trainer.max_steps=3",
            "trainer.batch_size=16", "trainer.eval_batch_size=32", "backbone.hidden_size=32"]
    cmd = [sys.executable, "-m", "slr_zoo.fit", str(ROOT / "recipes/ablation_residual.yaml"), *tiny]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "ablation_residual"
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert len(rows) == 7 and all(r["status"] == "ok" for r in rows)
    for row in rows:  # the table is what each cell wrote
        cell = run_dir / row["cell"]
        summary = json.loads((cell / "summary.json").read_text())
        assert {"val_accuracy", "mean_steps", "train_seconds", "params"} <= set(summary)
        assert float(row["val_accuracy"]) == pytest.approx(summary["val_accuracy"])
        assert (cell / "config.yaml").is_file()
    no_loop = json.loads((run_dir / "max_steps=1" / "summary.json").read_text())
    plain = json.loads((run_dir / "combine=none__seed=1" / "summary.json").read_text())
    assert no_loop["mean_steps"] == 1 and plain["mean_steps"] == 6 and plain["seed"] == 1
    assert "| combine" in first.stdout and (run_dir / "results.md").is_file()
    assert "3/3" in (run_dir / "results.md").read_text()  # each variant's row pools its three seeds
    assert first.stdout.count(": started (output in") == 7            # two cells at a time, as shipped
    assert len(list((run_dir / ".logs").glob("*.log"))) == 7
    assert (run_dir / "accuracy.png").stat().st_size > 0

    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert again.returncode == 0
    assert again.stdout.count("done already, skipped") == 7


# ---------------------------------------------------------------------------------- evaluate
def test_evaluate_reports_each_depth_and_the_intermediate_states(tmp_path):
    from slr_zoo import evaluate

    recipe = tmp_path / "r.yaml"
    recipe.write_text((ROOT / "recipes/quickstart.yaml").read_text())
    tiny = [f"output_dir={tmp_path}", "task.n_train=64", "task.n_val=16", "trainer.max_steps=2",
            "trainer.batch_size=16", "backbone.hidden_size=32", "trainer.progress_bar=false"]
    assert fit.main([str(recipe), *tiny]) == 0
    cell = tmp_path / "quickstart" / "default"
    assert evaluate.main([str(cell), "--steps", "1", "6", "--limit", "8", "--show", "2"]) == 0
    report = json.loads((cell / "eval.json").read_text())
    assert [r["steps"] for r in report["by_depth"]] == [1, 6]
    assert [r["mean_steps"] for r in report["by_depth"]] == [1, 6]
    assert len(report["logit_lens"]) == 2
    assert all(len(item["states"]) == 6 for item in report["logit_lens"].values())
    assert evaluate.main([str(tmp_path / "nowhere")]) == 2
    # a run saved before a key existed still evaluates: its config is read onto today's defaults
    config = cell / "config.yaml"
    config.write_text("".join(line for line in config.read_text().splitlines(True) if "state_noise" not in line))
    assert "state_noise" not in config.read_text()
    assert evaluate.main([str(cell), "--steps", "2", "--limit", "4", "--show", "0"]) == 0
    assert evaluate.main([str(cell), "--steps", "0"]) == 2
    last = cell / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:100])
    assert evaluate.main([str(cell)]) == 2                     # a torn checkpoint: named, no traceback


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_torch_init_and_untied_head(family):
    recipe = tiny_recipe(backbone__name=family, backbone__init="torch", backbone__tie_embeddings=False)
    bb = tiny_model(recipe).backbone
    assert bb.lm_head.weight is not bb.embed_tokens.weight
    assert 0.9 < float(bb.embed_tokens.weight.detach().std()) < 1.1                 # N(0, 1) embeddings
    d = recipe["backbone"]["hidden_size"]
    attention = {"c_attn", "q_proj", "k_proj", "v_proj"}
    for name, p in bb.core.named_parameters():
        module, kind = name.split(".")[-2:]
        if module in attention:                                  # nn.MultiheadAttention's Xavier over q/k/v
            if kind == "bias":
                assert not p.any(), name
            else:
                assert float(p.detach().abs().max()) <= (6 / (d + 3 * d)) ** 0.5 + 1e-6, name
                assert float(p.detach().abs().max()) > d ** -0.5, name    # wider than a plain Linear
        elif name.endswith(("attn.c_proj.bias", "o_proj.bias")):                  # attention output bias
            assert not p.any(), name
        elif p.dim() == 2:                                                           # U(+-1/sqrt(fan_in))
            fan_in = p.size(1) if "c_" not in module else p.size(0)
            assert float(p.detach().abs().max()) <= fan_in ** -0.5 + 1e-6, name
    tied = tiny_model(tiny_recipe(backbone__name=family, backbone__init="torch")).backbone
    assert tied.lm_head.weight is tied.embed_tokens.weight
    with pytest.raises(ComponentError, match=r"backbone\.init: expected Literal\['normal', 'torch'\]"):
        tiny_recipe(backbone__name=family, backbone__init="xavier")
