"""Bad input, as a new user gives it: each row is a recipe, override or data file and what ``fit``,
``evaluate`` or ``generate`` must answer. Every row runs the command in a subprocess and checks
its exit status (2: refused before anything ran; 1: failed while running), a message that names
the key, record or file, that no traceback reaches the user, and that nothing was created or
touched: no run folder for a refused recipe, and an existing run's files unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(1800)  # the rows run in the first test's setup: ~40 subprocesses
TINY = {
    "name": "bad", "task": {"name": "iterate", "n_train": 64, "n_val": 8, "hops": [1, 3]},
    "backbone": {"name": "gpt2", "hidden_size": 32, "heads": 2, "prelude_layers": 1, "core_layers": 1,
                 "coda_layers": 0},
    "decoder": {"name": "linear"}, "loop": {"max_steps": 2},
    "trainer": {"max_steps": 2, "batch_size": 8, "progress_bar": False, "threads": 1},
}


def write(path: Path, content) -> Path:
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Files the rows point at, and one finished run whose files must never change."""
    from slr_zoo.testing import bpe_tokenizer, save_tiny_pretrained

    base = tmp_path_factory.mktemp("bad")
    (base / "a_directory").mkdir()
    (base / "unfinished" / "seed=0").mkdir(parents=True)  # a grid whose one cell never finished
    write(base / "unfinished" / "seed=0" / "config.yaml", TINY)
    files = {
        "recipe": write(base / "tiny.yaml", TINY),
        "string": write(base / "string.yaml", "just some words\n"),
        "empty": write(base / "empty.yaml", ""),
        "broken_yaml": write(base / "broken.yaml", "loop: {max_steps: 2\n"),
        "records_ok": write(base / "ok.json", json.dumps([{"question": "a b ?", "answer": "b"}] * 4)),
        "record_without_answer": write(base / "noanswer.json", json.dumps([{"question": "a b ?"}] * 4)),
        "late_bad_record": write(base / "late.json", json.dumps([{"question": "a b ?", "answer": "b"}] * 3
                                                                + [{"question": "a", "answer": 7.5, "steps": "x"}])),
        "long_record": write(base / "long.json", json.dumps([{"question": "a b ?", "answer": "b"}] * 4
                                                            + [{"question": " ".join(["a"] * 300), "answer": "b"}])),
    }
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(base / "bert")
    save_tiny_pretrained(base / "llama", "llama", layers=3)
    LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                 num_attention_heads=2)).save_pretrained(base / "small_vocab")
    bpe_tokenizer().save_pretrained(base / "small_vocab")
    files["bert"], files["llama"], files["small_vocab"] = base / "bert", base / "llama", base / "small_vocab"
    broken_checkpoints(base, files)
    runs = base / "runs"
    done = run(["fit", str(files["recipe"]), f"output_dir={runs}"], base)
    assert done.returncode == 0, done.stderr[-2000:]
    files["finished"] = runs / "bad" / "default"
    files["unfinished"] = base / "unfinished"
    fake_teachers(base, files)
    damaged_cells(base, files)
    return base, files, runs


def damaged_cells(base: Path, files: dict) -> None:
    """Copies of the finished cell whose config.yaml was broken, replaced by a list, or emptied."""
    import shutil

    for name, text in (("cell_broken_config", "loop: {max_steps: 2\n"), ("cell_list_config", "- 1\n- 2\n"),
                       ("cell_empty_config", "")):
        shutil.copytree(files["finished"], base / name)
        write(base / name / "config.yaml", text)
        files[name] = base / name


def broken_checkpoints(base: Path, files: dict) -> None:
    """Pretrained directories and files damaged as downloads and copies damage them."""
    import shutil

    from slr_zoo.testing import save_tiny_pretrained, write_gguf

    for name in ("no_weights", "corrupt_weights", "bad_config"):
        shutil.copytree(base / "llama", base / name)
        files[name] = base / name
    (base / "no_weights" / "model.safetensors").unlink()
    weights = base / "corrupt_weights" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    config = json.loads((base / "bad_config" / "config.json").read_text())
    write(base / "bad_config" / "config.json", json.dumps({**config, "hidden_size": "big"}))
    model, tokenizer = save_tiny_pretrained(base / "with_sep", "llama", layers=3)
    tokenizer.add_special_tokens({"sep_token": "[SEP]"})  # nothing to add at build time: no new rows
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(base / "with_sep")
    tokenizer.save_pretrained(base / "with_sep")
    files["with_sep"] = base / "with_sep"
    model, tokenizer = save_tiny_pretrained(base / "for_gguf", "llama", layers=3)
    whole = write_gguf(model, tokenizer, base / "whole.gguf")
    files["truncated_gguf"] = base / "truncated.gguf"
    files["truncated_gguf"].write_bytes(whole.read_bytes()[:5000])


def fake_teachers(base: Path, files: dict) -> None:
    """Distillation teachers that are not whole: a CoT cell's files with one part missing or wrong."""
    import shutil

    cot = tiny(training__encoding="cot")
    for name in ("teacher_untrained", "teacher_other_task", "teacher_broken_config", "teacher_string_config"):
        (base / name / "checkpoints").mkdir(parents=True)
        write(base / name / "config.yaml", cot)
        shutil.copytree(files["finished"] / "tokenizer", base / name / "tokenizer")
        (base / name / "checkpoints" / "last.ckpt").write_bytes(b"stands in: only its presence is checked first")
        files[name] = base / name
    (base / "teacher_untrained" / "checkpoints" / "last.ckpt").unlink()
    write(base / "teacher_broken_config" / "config.yaml", "loop: {max_steps: 2\n")
    write(base / "teacher_string_config" / "config.yaml", "hello\n")
    files["zebra_records"] = write(base / "zebra.json", json.dumps([{"question": "zebra 1 ?", "answer": "1",
                                                                    "steps": ["1"]}] * 4))


def run(command: list[str], cwd: Path, env: dict | None = None):
    verb, *args = command
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), **(env or {})}
    return subprocess.run([sys.executable, "-m", f"slr_zoo.{verb}", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env=env)


def tiny(**changes) -> dict:
    recipe = json.loads(json.dumps(TINY))
    for dotted, value in changes.items():
        node = recipe
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return recipe


# (id, command as a function of the files, exit status, message regex)
ROWS = [
    # ------------------------------------------------------------- recipes that already got it right
    ("unknown key", lambda f: ["fit", f["recipe"], "loop.max_stepz=3"], 2, r"loop\.max_stepz: unknown key \(did you mean 'max_steps'"),
    ("wrong type", lambda f: ["fit", f["recipe"], "loop.max_steps=many"], 2, r"loop\.max_steps: expected int, got str 'many'"),
    ("unknown component", lambda f: ["fit", f["recipe"], "loop.combine.name=gatd"], 2, r"loop\.combine\.name: unknown combine 'gatd' \(did you mean 'gated'"),
    ("malformed yaml", lambda f: ["fit", f["broken_yaml"]], 2, r"recipe: cannot parse .*broken\.yaml"),
    ("missing recipe", lambda f: ["fit", "no/such.yaml"], 2, r"no such recipe file: 'no/such\.yaml'"),
    ("bad override", lambda f: ["fit", f["recipe"], "loop.max_steps"], 2, r"override: expected dotted\.key=value"),
    ("no space after a colon", lambda f: ["fit", f["recipe"], "loop.combine={name:gated}"], 2, r"loop\.combine: cannot parse value .*'name:gated' has no space after its colon; write 'name: gated'"),
    ("zero batch", lambda f: ["fit", f["recipe"], "trainer.batch_size=0"], 2, r"trainer\.batch_size: must be >= 1"),
    ("missing pretrained", lambda f: ["fit", f["recipe"], "backbone.pretrained=/no/such/model"], 2, r"backbone\.pretrained: no such file or directory: '/no/such/model'"),
    ("missing data file", lambda f: ["fit", f["recipe"], "task={name: json, train: /no/train.json, val: /no/val.json}"], 2, r"task\.train: no such file or directory"),
    ("first record broken", lambda f: ["fit", f["recipe"], f"task={{name: json, train: {f['record_without_answer']}, val: {f['records_ok']}}}"], 2, r"task: cannot read its train records: record 0 of .*noanswer\.json: field 'answer' must be a non-empty string"),
    ("thoughts mode", lambda f: ["fit", f["recipe"], "loop.mode=thoughts"], 2, r"loop\.mode"),
    # ------------------------------------------------------------- the latent-CoT keys
    ("unknown encoding", lambda f: ["fit", f["recipe"], "training.encoding=latnet"], 2, r"training\.encoding: expected Literal\['answer', 'cot', 'latent', 'pause'\], got str 'latnet'"),
    ("uniform_prob above 1", lambda f: ["fit", f["recipe"], "training.encoding=pause", "training.curriculum.uniform_prob=2"], 2, r"training\.curriculum\.uniform_prob: is a probability"),
    ("curriculum without steps to replace", lambda f: ["fit", f["recipe"], "training.curriculum.epochs_per_stage=2"], 2, r"training\.curriculum: replaces reasoning steps"),
    ("a stage length that is not a number", lambda f: ["fit", f["recipe"], "training.encoding=pause", "training.curriculum.max_latent_stage=1", "training.curriculum.epochs_per_stage=.nan"], 2, r"training\.curriculum\.epochs_per_stage: must be a finite number, got nan"),
    ("depth curriculum of the wrong depth", lambda f: ["fit", f["recipe"], "training.encoding=latent", "training.curriculum.max_latent_stage=3"], 2, r"loop\.max_steps: in depth mode the latent curriculum"),
    ("missing teacher", lambda f: ["fit", f["recipe"], "training.distill={teacher: /no/teacher}"], 2, r"training\.distill\.teacher: no such file or directory"),
    ("unknown distill loss", lambda f: ["fit", f["recipe"], "training.distill={teacher: /tmp, loss: l3}"], 2, r"training\.distill\.loss: unknown loss 'l3'"),
    ("unknown objective", lambda f: ["fit", f["recipe"], "objectives={extra: {name: entropi}}"], 2, r"objectives\.extra\.name: unknown objective 'entropi'"),
    ("compile not a bool", lambda f: ["fit", f["recipe"], "trainer.compile=maybe"], 2, r"trainer\.compile: expected bool"),
    # ------------------------------------------------------------- defects of the issue, and their class
    ("recipe is a directory", lambda f: ["fit", f["string"].parent / "a_directory"], 2, r"is a directory; give a recipe file"),
    ("recipe holds a string", lambda f: ["fit", f["string"]], 2, r"must hold a mapping of recipe keys at the top level, not a str"),
    ("empty recipe", lambda f: ["fit", f["empty"]], 2, r"empty\.yaml is empty"),
    ("name up a level", lambda f: ["fit", f["recipe"], "name=.."], 2, r"name: '\.\.' is not a folder name"),
    ("name outside runs", lambda f: ["fit", f["recipe"], "name=../../x"], 2, r"name: '\.\./\.\./x' is not a folder name"),
    ("empty name", lambda f: ["fit", f["recipe"], "name="], 2, r"name: '' is not a folder name"),
    ("heads in a grid", lambda f: ["fit", f["recipe"], "grid.backbone.heads=[2,3]"], 2, r"backbone\.heads: hidden_size must be a positive multiple of heads, got hidden_size=32, heads=3 \(in grid cell 1: heads=3\)"),
    ("kv heads", lambda f: ["fit", f["recipe"], "backbone={name: llama, hidden_size: 32, heads: 4, kv_heads: 3, prelude_layers: 1, core_layers: 1, coda_layers: 0}"], 2, r"backbone\.kv_heads: must divide heads"),
    ("lora targets", lambda f: ["fit", f["recipe"], "loop.loop_lora={name: per_step, targets: [nowhere]}"], 2, r"loop\.loop_lora\.targets: 'nowhere' matches no linear layer of the core; roles: attention"),
    ("calibration below 0", lambda f: ["fit", f["recipe"], "loop.loop_lora={name: per_step, calibration: -1}"], 2, r"loop\.loop_lora\.calibration: must be >= 0 \(training examples\), got -1"),
    ("calibration without svd", lambda f: ["fit", f["recipe"], "loop.loop_lora={name: per_step, calibration: 8}"], 2, r"loop\.loop_lora\.calibration: whitens the svd initialisation .* it needs init: svd"),
    ("thought probe in depth mode", lambda f: ["fit", f["recipe"], "objectives={probe: {name: thought_reach}}"], 2, r"objectives\.probe: thought_reach reads the thoughts loop; it needs loop\.mode: thoughts \(got 'depth'\)"),
    ("thought probe without reach steps", lambda f: ["fit", f["recipe"], "loop.mode=thoughts", "training={encoding: latent, curriculum: {max_latent_stage: 2}}", "loop.max_steps=1", "objectives={probe: {name: thought_reach}}"], 2, r"objectives\.probe: needs per-word reach steps, which task \w+ does not give; remove it"),
    ("init with pretrained", lambda f: ["fit", f["recipe"], f"backbone={{name: llama, pretrained: {f['llama']}, init: torch, prelude_layers: 1, core_layers: 1, coda_layers: 1}}"], 2, r"backbone\.init: applies to a model built from scratch; a pretrained model's init comes from its checkpoint"),
    ("step supervision without hops", lambda f: ["fit", f["recipe"], "task={name: walk, n_train: 64, n_val: 8}", "loop.step_supervision=0.5"], 2, r"loop\.step_supervision: needs per-hop answers, which task WalkTask does not give"),
    ("digit separator", lambda f: ["fit", f["recipe"], "task={name: multiplication, n_train: 16, n_val: 4, separator: ','}"], 2, r"task\.separator: expected Literal\[' ', ''\], got str ','"),
    ("hops reversed", lambda f: ["fit", f["recipe"], "task.hops=[6,1]"], 2, r"task\.hops: must be \[min, max\] with 1 <= min <= max, got \[6, 1\]"),
    ("no validation records", lambda f: ["fit", f["recipe"], "task.n_val=0"], 2, r"task: its val split holds no records"),
    ("lognormal mean past max", lambda f: ["fit", f["recipe"], "loop.depth_sampler={name: lognormal_poisson, mean: 9}"], 2, r"loop\.depth_sampler\.mean: must be in \[1, max_steps = 2\]"),
    ("a bert directory", lambda f: ["fit", f["recipe"], f"backbone.pretrained={f['bert']}"], 2, r"backbone\.pretrained: .* holds a 'bert' model, which backbone 'gpt2' cannot split; the supported causal LM model types are gpt2, llama, mistral, qwen2"),
    ("tokenizer larger than the model", lambda f: ["fit", f["recipe"], f"backbone={{name: llama, pretrained: {f['small_vocab']}, prelude_layers: 1, core_layers: 1, coda_layers: 1}}"], 2, r"backbone\.pretrained: the tokenizer has \d+ tokens but the model's embedding only 20 rows"),
    ("finetune without a base", lambda f: ["fit", f["recipe"], "training.mode=finetune"], 2, r"training\.mode: finetune freezes a pretrained base"),
    # ------------------------------------------------------------- refused before any cell trains (the second review)
    ("teacher never trained", lambda f: ["fit", f["recipe"], f"training.distill={{teacher: {f['teacher_untrained']}}}"], 2, r"training\.distill\.teacher: .*teacher_untrained' has no checkpoint"),
    ("teacher config not yaml", lambda f: ["fit", f["recipe"], f"training.distill={{teacher: {f['teacher_broken_config']}}}"], 2, r"training\.distill\.teacher: cannot parse .*config\.yaml"),
    ("teacher config a string", lambda f: ["fit", f["recipe"], f"training.distill={{teacher: {f['teacher_string_config']}}}"], 2, r"training\.distill\.teacher: .*config\.yaml holds a str, not a mapping of recipe keys"),
    ("teacher of another task", lambda f: ["fit", f["recipe"], f"training.distill={{teacher: {f['teacher_other_task']}}}", f"task={{name: json, train: {f['zebra_records']}, val: {f['zebra_records']}}}"], 2, r"training\.distill\.teacher: the teacher's vocabulary lacks 'zebra', a word of the student's train record 0"),
    ("cot without steps", lambda f: ["fit", f["recipe"], "training.encoding=cot", f"task={{name: json, train: {f['records_ok']}, val: {f['records_ok']}}}"], 2, r"training\.encoding: encoding 'cot' needs the written reasoning steps of every training record"),
    ("slots past the positions", lambda f: ["fit", f["recipe"], "training.encoding=pause", "training.curriculum.max_latent_stage=1000"], 2, r"training\.curriculum\.max_latent_stage: its last stage puts 1000 thought slots .* 512 positions"),
    ("lora target misspelt beside a good one", lambda f: ["fit", f["recipe"], f"backbone={{name: llama, pretrained: {f['llama']}, prelude_layers: 1, core_layers: 1, coda_layers: 1, lora: {{targets: [attention, mpl]}}}}"], 2, r"backbone\.lora\.targets: 'mpl' matches no linear layer of the model; roles: attention"),
    ("lora target not a name", lambda f: ["fit", f["recipe"], f"backbone={{name: llama, pretrained: {f['llama']}, prelude_layers: 1, core_layers: 1, coda_layers: 1, lora: {{targets: [3]}}}}"], 2, r"backbone\.lora\.targets: each target is a role or a linear's name, got 3"),
    ("a width beside a pretrained model", lambda f: ["fit", f["recipe"], f"backbone={{name: llama, pretrained: {f['llama']}, hidden_size: 64, prelude_layers: 1, core_layers: 1, coda_layers: 1}}"], 2, r"backbone\.hidden_size: applies to a model built from scratch"),
    ("pretrained without weights", lambda f: ["fit", f["recipe"], f"backbone={{name: llama, pretrained: {f['no_weights']}, prelude_layers: 1, core_layers: 1, coda_layers: 1}}"], 2, r"backbone\.pretrained: .*no_weights' has a config\.json but no weights"),
    ("pretrained weights cut short", lambda f: ["fit", f["recipe"], f"backbone={{name: llama, pretrained: {f['corrupt_weights']}, prelude_layers: 1, core_layers: 1, coda_layers: 1}}"], 2, r"backbone\.pretrained: .*corrupt_weights/model\.safetensors cannot be read"),
    ("pretrained config with a bad field", lambda f: ["fit", f["recipe"], f"backbone={{name: llama, pretrained: {f['bad_config']}, prelude_layers: 1, core_layers: 1, coda_layers: 1}}"], 2, r"backbone\.pretrained: the configuration of .*bad_config cannot be read .*hidden_size"),
    ("gguf cut short", lambda f: ["fit", f["recipe"], f"backbone={{name: llama, pretrained: {f['truncated_gguf']}, prelude_layers: 1, core_layers: 1, coda_layers: 1}}"], 2, r"backbone\.pretrained: .*truncated\.gguf is not a readable GGUF file"),
    ("finetune with nothing to train", lambda f: ["fit", f["recipe"], "training.mode=finetune", f"backbone={{name: llama, pretrained: {f['with_sep']}, prelude_layers: 1, core_layers: 1, coda_layers: 1}}", "decoder={name: coda}"], 2, r"training\.mode: finetune freezes the pretrained base, and nothing else has weights to train"),
    # ------------------------------------------------------------- refused before any cell trains (the third review)
    ("a later train record broken", lambda f: ["fit", f["recipe"], f"task={{name: json, train: {f['late_bad_record']}, val: {f['records_ok']}}}"], 2, r"task: record 3 of .*late\.json: field '\w+' must be"),
    ("a later validation record broken", lambda f: ["fit", f["recipe"], f"task={{name: json, train: {f['records_ok']}, val: {f['late_bad_record']}}}"], 2, r"task: record 3 of .*late\.json: field '\w+' must be"),
    ("rerun and resume at once", lambda f: ["fit", f["recipe"], "--rerun", "--resume"], 2, r"--rerun trains from scratch and --resume only continues: give one of them"),
    ("evaluate a cell whose config is not yaml", lambda f: ["evaluate", f["cell_broken_config"], "--steps", "1"], 2, r"evaluate: cannot parse .*cell_broken_config/config\.yaml"),
    ("generate from a cell whose config is a list", lambda f: ["generate", f["cell_list_config"], "--prompt", "1 2 ?"], 2, r"generate: .*cell_list_config/config\.yaml holds a list, not a mapping of recipe keys"),
    ("export a cell whose config is empty", lambda f: ["export", f["cell_empty_config"], f["cell_empty_config"].parent / "empty_export"], 2, r"export: .*cell_empty_config/config\.yaml is empty: the cell's recipe is lost"),
    ("export into the cell", lambda f: ["export", f["finished"], f["finished"] / "hf"], 2, r"export: .*/hf is inside the cell it exports"),
    ("export under a file", lambda f: ["export", f["finished"], f["records_ok"] / "hf"], 2, r"export: '.*ok\.json' is a file, where '.*/hf' needs a folder"),
    ("evaluate shows a negative count", lambda f: ["evaluate", f["finished"], "--show", "-1"], 2, r"--show: must be an integer >= 0, got '-1'"),
    ("generate sampling flags without sampling", lambda f: ["generate", f["finished"], "--prompt", "1 2 ?", "--temperature", "3", "--top-k", "2"], 2, r"--temperature, --top-k shape sampling, and decoding is greedy without --sample; add --sample"),
    ("generate a temperature of zero", lambda f: ["generate", f["finished"], "--prompt", "1 2 ?", "--sample", "--temperature", "0"], 2, r"--temperature must be a finite number > 0, got 0\.0"),
    ("generate a top-p past one", lambda f: ["generate", f["finished"], "--prompt", "1 2 ?", "--sample", "--top-p", "1.5"], 2, r"--top-p must be in \(0, 1\], got 1\.5"),
    ("statistics of a missing file", lambda f: ["tasks.stats", "--file", "/no/such.json", "--n", "2"], 2, r"stats: no such records file: /no/such\.json"),
    ("statistics of graphs too small", lambda f: ["tasks.stats", "--nodes", "2", "3", "--n", "2"], 2, r"stats: --nodes: must be \[min, max\] with max hops \+ 2 <= min <= max, got \[2, 3\]"),
    ("statistics of no questions", lambda f: ["tasks.stats", "--n", "0"], 2, r"--n: must be an integer >= 1, got '0'"),
    ("statistics of records that are not ProsQA", lambda f: ["tasks.stats", "--file", f["records_ok"], "--n", "2"], 2, r"stats: .*ok\.json does not hold ProsQA records"),
    # ------------------------------------------------------------- failures at run time: exit 1, named
    ("a record longer than the positions", lambda f: ["fit", f["recipe"], "backbone.max_positions=64", f"task={{name: json, train: {f['long_record']}, val: {f['records_ok']}}}"], 1, r"record 4 of the train split is 303 tokens long .* more than the model's 64 positions"),
    ("a component of the wrong shape", lambda f: ["fit", f["recipe"], "loop.combine={_component_: wrong_shape.HalfWidth}"], 1, r"loop component combine returned \(8, \d+, 16\); it must return a state of the shape it was given"),
    ("every batch skipped", lambda f: ["fit", f["recipe"], "trainer.on_nonfinite=skip", "loop.combine={_component_: nan_plant.NaNAtStep, at_step: 1}"], 1, r"every one of the 2 training steps was skipped for non-finite values"),
    # ------------------------------------------------------------- evaluate and generate
    ("evaluate nowhere", lambda f: ["evaluate", "/no/such/run"], 2, r"/no/such/run is not a cell directory \(no config\.yaml\)"),
    ("evaluate depth zero", lambda f: ["evaluate", f["finished"], "--steps", "0"], 2, r"--steps must be loop depths >= 1"),
    ("evaluate an unfinished grid", lambda f: ["evaluate", f["unfinished"]], 2,
     r"unfinished holds no finished cells \(no \*/summary\.json\); train it with python -m slr_zoo\.fit first"),
    ("generate bad halting", lambda f: ["generate", f["finished"], "--prompt", "1 2 ?", "--halting", "act"], 2, r"--halting act has learned parameters"),
    ("generate empty prompt", lambda f: ["generate", f["finished"], "--prompt", "1 2 ?", "--prompt", " "], 2, r"--prompt 2 is empty"),
    ("generate unknown words", lambda f: ["generate", f["finished"], "--prompt", "1 zebra 2 ? quagga"], 0, r"warning: --prompt 1 has 2 word\(s\) the model's vocabulary lacks, read as \[UNK\]: zebra, quagga"),
    ("generate unknown halting", lambda f: ["generate", f["finished"], "--prompt", "1 2 ?", "--halting", "kl", "treshold=1"], 2, r"--halting\.treshold: unknown key for halting 'kl' \(did you mean 'threshold'"),
]

if not __import__("transformers.utils", fromlist=["x"]).is_flash_attn_2_available():
    ROWS.append(("flash attention without flash-attn", lambda f: ["fit", f["recipe"], "backbone.attn_implementation=flash_attention_2"], 2, r"backbone\.attn_implementation: flash_attention_2 needs the flash-attn package"))


@pytest.fixture(scope="module")
def results(world):
    """Every row run once, two at a time; the finished run's files before and after."""
    base, files, runs = world
    before = fingerprint(runs)

    def one(row):
        name, command, _, _ = row
        args = [str(a) for a in command(files)]
        if args[0] == "fit":
            args += [f"output_dir={base / 'out' / name.replace(' ', '_')}"]
        return name, run(args, base)

    with ThreadPoolExecutor(2) as pool:
        outcome = dict(pool.map(one, ROWS))
    return outcome, before, fingerprint(runs)


@pytest.mark.parametrize("name, command, status, message", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_gets_its_exit_status_a_named_message_and_no_traceback(results, world, name, command, status,
                                                                        message):
    import re

    outcome, before, after = results
    done = outcome[name]
    assert done.returncode == status, (done.returncode, done.stderr[-3000:])
    assert re.search(message, done.stderr), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    out = world[0] / "out" / name.replace(" ", "_")
    if status == 2:  # refused before anything ran: no folder at all
        assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))
    assert before == after  # the finished run is untouched by every row


def test_a_corrupt_checkpoint_of_a_finished_run_is_named_and_the_run_left_alone(world, tmp_path):
    import shutil

    base, files, _ = world
    runs = tmp_path / "runs"
    shutil.copytree(files["finished"].parent, runs / "bad")
    last = runs / "bad" / "default" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = fingerprint(runs)
    for extra in ([], ["--resume"]):
        done = run(["fit", str(files["recipe"]), f"output_dir={runs}", *extra], base)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert "does not match the checkpoint this finished run wrote" in done.stderr and "--rerun" in done.stderr
    done = run(["evaluate", str(runs / "bad" / "default"), "--steps", "1"], base)
    assert done.returncode == 2 and "--rerun" in done.stderr and "Traceback" not in done.stderr
    assert fingerprint(runs) == before


def test_a_refused_recipe_is_answered_before_lightning_is_imported(tmp_path):
    """A typo is reported as soon as the recipe is read: Lightning (half of a training command's
    start-up) is loaded only for a cell that trains."""
    recipe = write(tmp_path / "typo.yaml", tiny(loop__max_stepz=2))
    probe = ("import sys; from slr_zoo.fit import main; code = main([sys.argv[1]]); "
             "print(code, 'lightning' in sys.modules, 'torchmetrics' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe, str(recipe)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600)
    assert "loop.max_stepz: unknown key" in done.stderr
    assert done.stdout.split() == ["2", "False", "False"], done.stderr[-2000:]


def test_a_finished_cell_whose_config_is_damaged_is_not_skipped_as_done(world, tmp_path):
    """fit cannot tell whether such a cell ran this recipe, so it stops, names the file and
    --rerun, and touches nothing; --resume of such a cell with nothing trained is refused."""
    import shutil

    base, files, _ = world
    runs = tmp_path / "runs"
    shutil.copytree(files["finished"].parent, runs / "bad")
    write(runs / "bad" / "default" / "config.yaml", "loop: {max_steps: 2\n")
    before = fingerprint(runs)
    done = run(["fit", str(files["recipe"]), f"output_dir={runs}"], base)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "holds a finished run whose recipe cannot be read (cannot parse" in done.stderr
    assert "--rerun trains it again" in done.stderr
    assert fingerprint(runs) == before
    nothing_trained = runs / "bad" / "default"  # the same damage where no checkpoint is lost
    shutil.rmtree(nothing_trained / "checkpoints")
    (nothing_trained / "summary.json").unlink()
    done = run(["fit", str(files["recipe"]), f"output_dir={runs}", "--resume"], base)
    assert done.returncode == 2 and "--resume: there is no checkpoint to resume from" in done.stderr, done.stderr[-2000:]
    file = write(tmp_path / "a_file", "x")
    done = run(["fit", str(files["recipe"]), f"output_dir={file}"], base)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"output_dir: '{file}' is a file, where '{file}/bad' needs a folder (set output_dir or name)" in done.stderr


def test_one_damaged_cell_leaves_the_rest_of_a_grid_evaluated_and_reported(world, tmp_path):
    """evaluate goes on past a cell it cannot load, and report leaves out what it cannot read (a
    damaged config.yaml, eval.json or val_curve.csv), naming each, instead of stopping halfway."""
    import shutil

    base, files, _ = world
    grid = tmp_path / "grid"
    for cell in ("a", "b", "c"):
        shutil.copytree(files["finished"], grid / cell)
    write(grid / "b" / "config.yaml", "loop: {max_steps: 2\n")
    done = run(["evaluate", str(grid), "--steps", "1", "--limit", "4", "--show", "0"], base)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "b: failed: cannot parse" in done.stderr
    assert (grid / "a" / "eval.json").is_file() and (grid / "c" / "eval.json").is_file()
    write(grid / "a" / "eval.json", "{not json")
    with (grid / "c" / "val_curve.csv").open("a") as f:
        f.write("garbage,row,here\n")
    done = run(["report", str(grid)], base)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "report: b: its recipe is left out (cannot parse" in done.stderr
    assert "report: a: eval.json left out of the plots" in done.stderr
    assert "report: c: val_curve.csv left out of the plots" in done.stderr
    assert (grid / "results.md").is_file() and (grid / "hparams").is_dir()


def test_a_cell_reads_its_relative_files_from_where_it_was_trained(tmp_path):
    """A recipe's val_file is relative to the directory fit ran in; evaluate started elsewhere,
    or given the cell through a link, reads the file the cell was validated on."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "data").mkdir(parents=True)
    elsewhere.mkdir()
    write(project / "data" / "ok.json", json.dumps([{"question": "1 2 ?", "answer": "2"}] * 8))
    recipe = write(project / "tiny.yaml", tiny(task={"name": "json", "train": "data/ok.json", "val": "data/ok.json"}))
    done = run(["fit", str(recipe)], project)
    assert done.returncode == 0, done.stderr[-2000:]
    cell = project / "runs" / "bad" / "default"
    (elsewhere / "linked").symlink_to(project / "runs")  # runs reached through a link, as on a cluster's scratch
    for path in (cell, elsewhere / "linked" / "bad" / "default"):
        done = run(["evaluate", str(path), "--steps", "1", "--show", "0"], elsewhere)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert "8 val records" in done.stdout, done.stdout
