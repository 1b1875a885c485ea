"""``python -m slr_zoo.evaluate RUN_DIR [--steps 1 2 4 8] [--thoughts 0 2 4 6] [--split val | --data FILE | --ood] [--show 3]``

Evaluates a trained cell (the directory holding its ``config.yaml``, tokenizer and checkpoints) by
cached greedy generation, scored with the task's own extraction and exact match (the same
``Task.score`` as the answer format of training-time validation), and reads its intermediate
states. ``eval.json`` has the sections:

- ``by_depth``: accuracy at each loop depth, past the trained depth, overall and by hop count, with
  the iterations every generated token used (RQ2);
- ``by_thoughts`` (with ``--thoughts``): accuracy against the number of continuous thoughts (or
  pause tokens) before the answer, as Coconut reads its models: n thoughts are curriculum stage
  n / c, so the steps the stage has not replaced are written out before the answer, with the
  tokens and sequential passes each answer took (RQ2 for thoughts; past the trained number,
  extrapolation);
- ``depth_histogram``: iterations used under the recipe's halting policy at the trained depth;
- ``mistakes``: the records answered wrongly at the trained depth (index, hops, gold answer and
  the generated text), so that what a model misses can be read without a script; null when
  ``--steps`` leaves the trained depth out (an empty list would claim none was wrong);
- ``stability``: per iteration, the relative change and norm of the state, the fraction of samples
  that diverge, and whether and when the state converges (``metrics/states.py``), run to twice the
  trained depth; with Parcae's diagonal injection, its contraction factor;
- ``logit_lens``: what each iteration's state decodes to at the answer position, for a few examples;
- ``probes``: per iteration, a linear classifier trained on h_t to read the current reasoning
  step's entity (with a shuffled-label control), and the reach probe's table where the model has
  one (RQ3).
- ``thoughts`` (a ``loop.mode: thoughts`` cell): what each continuous thought decodes to through
  the head (``metrics/thoughts.py``): the top tokens for a few examples; where the task labels
  reach steps, the probability each thought puts on the question's words and its split by reach
  step (ProsQA: a concept's distance from the root; RQ3 as Coconut read its thoughts); and where
  the answer names one of two options, how often each thought already ranks it above the other.

``--data FILE`` evaluates any Coconut-format json file; ``--ood`` the task's harder generated split
(ProsQA: 7-8 hops over larger graphs). PNGs beside ``eval.json``: ``accuracy_vs_steps.png``,
``depth_histogram.png``, ``stability.png``, ``probes.png``, ``accuracy_vs_thoughts.png`` and
``thoughts_reach.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

from slr_zoo.files import write_json
from slr_zoo.arguments import non_negative_int, positive_int
from slr_zoo.generate import check_thoughts_inference, precision_context
from slr_zoo.recipe import load_cell
from slr_zoo.tasks.encoding import prompt_ids
from slr_zoo.training.checkpoint import CheckpointError


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m slr_zoo.evaluate", description=__doc__.split("\n\n")[1])
    parser.add_argument("run_dir", type=Path, help="a cell directory, runs/<name>/<cell>, or a grid's folder, "
                        "runs/<name>, to evaluate each finished cell and write the grid's report")
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="loop depths to evaluate (default: 1 .. 2 x the trained max_steps; a "
                        "loop.mode: thoughts cell, its trained depth alone)")
    parser.add_argument("--thoughts", type=non_negative_int, nargs="+", default=None,
                        help="continuous thoughts (or pause tokens) before the answer to evaluate, each a "
                        "multiple of the cell's thoughts per step: accuracy against the number of thoughts")
    parser.add_argument("--split", default="val", choices=["train", "val"])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, default=None, help="a Coconut-format json file to evaluate instead")
    source.add_argument("--ood", action="store_true", help="the task's harder generated split")
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N records only")
    parser.add_argument("--show", type=non_negative_int, default=3, help="examples whose intermediate states are shown")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--rerun", action="store_true",
                        help="on a grid: evaluate cells again that already have an eval.json of these arguments")
    return parser.parse_args(argv)


def _records(task, split: str, data: Path | None, ood: bool) -> tuple[list[dict], str]:
    from slr_zoo.tasks.base import check_record

    if data is not None:
        from slr_zoo.tasks.json_file import read_records

        return list(read_records(data)), str(data)
    if ood:
        harder = task.harder()
        if harder is None:
            raise ValueError(f"task {type(task).__name__} has no harder split (--ood); pass --data FILE instead")
        return [check_record(r, i, "the harder split") for i, r in enumerate(harder.records("val"))], "ood"
    return [check_record(r, i, f"the {split} split") for i, r in enumerate(task.records(split))], split


def _prompt_batch(model, tokenizer, encoding, records):
    """Left-padded prompts as the model was trained to read them, their mask and question extent."""
    from slr_zoo.inference.answers import left_padded

    prompts = [encoding.prompt(r, tokenizer) for r in records]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_padded(prompts, pad, next(model.parameters()).device)
    query = torch.zeros_like(mask, dtype=torch.bool)
    for row, (prompt, r) in enumerate(zip(prompts, records)):
        start = ids.size(1) - len(prompt)
        query[row, start:start + len(prompt_ids(tokenizer, r["question"]))] = True
    return ids, mask, query


@torch.no_grad()
def loop_states(model, ids, mask, query, steps: int) -> list[torch.Tensor]:
    """[h_0, h_1, ..., h_steps] of a forward pass (no halting, no finiteness check: a diverging
    state is measured, not stopped)."""
    from slr_zoo.halting.fixed import FixedHalting

    check, model.check_finite = model.check_finite, False
    try:
        out = model(ids, mask, steps=steps, query_mask=query, record=("states",), halting=FixedHalting(),
                    compact=False)
    finally:
        model.check_finite = check
    return [out.initial_state, *out.states]


def step_entity(record: dict, t: int) -> str | None:
    """The entity the reasoning reaches at step t: the last word of step min(t, steps)."""
    steps = record.get("steps") or []
    if not steps:
        return None
    words = steps[min(t, len(steps)) - 1].replace(".", " ").split()
    return words[-1] if words else None


@torch.no_grad()
def logit_lens(model, tokenizer, ids, mask, query, steps: int, top: int = 3) -> list[list[str]]:
    """Per example, per iteration: the top tokens its state decodes to at the last position (the
    one that predicts the first answer token)."""
    states = loop_states(model, ids, mask, query, steps)[1:]
    ctx = model.backbone.context(ids, mask, prefix=query)
    out = []
    for row in range(ids.size(0)):
        lines = []
        for t, state in enumerate(states, start=1):
            probs = model.decoder(state[row:row + 1], model.backbone, _row_ctx(ctx, row))[0, -1].float().softmax(-1)
            p, idx = probs.topk(top)
            words = ", ".join(f"{tokenizer.convert_ids_to_tokens(int(i))} {float(q):.2f}" for q, i in zip(p, idx))
            lines.append(f"    step {t}: {words}")
        out.append(lines)
    return out


def _row_ctx(ctx, row: int):
    return ctx.select(torch.tensor([row], device=ctx.position_ids.device)) if ctx.position_ids.size(0) > 1 else ctx


def _score(model, tokenizer, task, records, batch_size: int, encoding, steps):
    """({accuracy, tokens and passes per answer, accuracy by hops}, correct, token steps, texts)
    of greedy answers to ``records``, batch by batch."""
    from slr_zoo.inference.answers import score_answers

    correct, token_steps, texts, passes = [], [], [], []
    for start in range(0, len(records), batch_size):
        scored = score_answers(model, tokenizer, task, records[start:start + batch_size], steps=steps,
                               first_index=start, encoding=encoding)
        correct += scored.correct
        token_steps += scored.steps
        texts += scored.texts
        passes += scored.passes
    by_hops: dict[str, list[bool]] = {}
    for record, ok in zip(records, correct):
        by_hops.setdefault(str(record.get("hops", "?")), []).append(ok)
    row = {
        "accuracy": round(sum(correct) / len(correct), 4),
        "tokens_per_answer": round(sum(len(r) for r in token_steps) / len(records), 3),
        "passes_per_answer": round(sum(passes) / len(records), 3),
        "accuracy_by_hops": {h: round(sum(v) / len(v), 4) for h, v in sorted(by_hops.items())},
    }
    return row, correct, token_steps, texts


def evaluate(run_dir: Path, depths=None, split="val", limit=None, show=3, batch_size=64, data: Path | None = None,
             ood: bool = False, thoughts: list[int] | None = None) -> dict:
    from tqdm import tqdm

    from slr_zoo.metrics.states import stability

    parts = load_cell(run_dir)
    task, tokenizer, model = parts.task, parts.tokenizer, parts.module.model
    encoding = parts.module.answer_scorer.encoding  # the prompt, thoughts and answer format it was trained with
    trained = model.max_steps
    depths = depths or _default_depths(trained, model.mode)
    for steps in depths:
        check_thoughts_inference(model, steps)
    records, source = _records(task, split, data, ood)
    records = records[:limit]
    if not records:
        raise ValueError(f"no records to evaluate in {source!r}")
    _warn_unknown_words(tokenizer, records, str(data) if data is not None else f"the {source} split")
    rows, histogram, mistakes = [], {}, None
    device = next(model.parameters()).device
    try:  # a count the cell cannot answer with is refused before any answer is scored
        staged = [encoding.with_thoughts(n) for n in thoughts or []]
    except ValueError as err:
        raise ValueError(f"--thoughts {err}") from None
    by_thoughts = []
    with precision_context(parts.trainer.precision, device):
        for steps in tqdm(depths, desc="accuracy by depth", file=sys.stderr):
            row, correct, token_steps, texts = _score(model, tokenizer, task, records, batch_size, encoding, steps)
            every = [s for r in token_steps for s in r]
            first = [r[0] for r in token_steps if r]
            if steps == trained:
                histogram = {"steps": trained, "first_token": _counts(first), "every_token": _counts(every)}
                mistakes = [{"index": i, "hops": r.get("hops"), "answer": str(r["answer"]), "generated": text}
                            for i, (r, ok, text) in enumerate(zip(records, correct, texts)) if not ok]
            rows.append({
                "steps": steps, "accuracy": row["accuracy"],
                # the iterations of every generated token, its EOS included
                "mean_steps": round(sum(every) / max(1, len(every)), 3),
                "mean_steps_first_token": round(sum(first) / max(1, len(first)), 3),
                "generated_tokens": len(every),
                "accuracy_by_hops": row["accuracy_by_hops"],
            })
        for n, stage in zip(thoughts or [], tqdm(staged, desc="accuracy by thoughts", file=sys.stderr)):
            row, *_ = _score(model, tokenizer, task, records, batch_size, stage, None)
            by_thoughts.append({"thoughts": n, **row})
        depth = trained if model.mode == "thoughts" else 2 * trained  # a thought's pass has T rows of its own
        chunks = [records[i:i + batch_size] for i in range(0, len(records), batch_size)]
        states_by_t: list[list[torch.Tensor]] = [[] for _ in range(depth + 1)]
        runs = []
        probe = parts.module.objectives["reach"] if "reach" in parts.module.objectives else None
        probe_rows = []
        for chunk in tqdm(chunks, desc="states", file=sys.stderr):
            ids, mask, query = _prompt_batch(model, tokenizer, encoding, chunk)
            states = loop_states(model, ids, mask, query, depth)
            runs.append(stability(states, mask.bool()))
            for t, h in enumerate(states):
                states_by_t[t].append(h[:, -1].float().cpu())
            if probe is not None:
                probe_rows.append(_reach_batch(probe, states, chunk, tokenizer, task, ids, query))
        thoughts_read = None
        if model.mode == "thoughts" and encoding.thoughts() > 0:
            thoughts_read = _read_thoughts(model, tokenizer, task, encoding, records, batch_size, show)
        lens_lines = []
        if show > 0:
            lens_ids, lens_mask, lens_query = _prompt_batch(model, tokenizer, encoding, records[:show])
            lens_lines = logit_lens(model, tokenizer, lens_ids, lens_mask, lens_query, trained)
    lens = {r["question"]: {"answer": str(r["answer"]), "states": lines} for r, lines in zip(records[:show], lens_lines)}
    report = {
        "run_dir": str(run_dir), "split": source, "records": len(records), "trained_max_steps": trained,
        "arguments": _arguments(depths, source, limit, thoughts),
        "by_depth": rows,
        "by_thoughts": by_thoughts,
        "depth_histogram": histogram,
        "mistakes": mistakes,
        "stability": _merged_stability(runs, [len(c) for c in chunks], model),
        "logit_lens": lens,
        "probes": {"entity": _entity_probes(states_by_t, records), "reach": _reach_summary(probe_rows, trained)},
        "thoughts": thoughts_read,
    }
    write_json(run_dir / "eval.json", report)
    _plot(rows, trained, run_dir / "accuracy_vs_steps.png")
    if by_thoughts:
        _plot(by_thoughts, encoding.thoughts(), run_dir / "accuracy_vs_thoughts.png", x="thoughts")
    _plot_histogram(histogram, run_dir / "depth_histogram.png")
    _plot_stability(report["stability"], trained, run_dir / "stability.png")
    _plot_probes(report["probes"]["entity"], trained, run_dir / "probes.png")
    if thoughts_read and thoughts_read["reach"]:
        _plot_thought_reach(thoughts_read["reach"], run_dir / "thoughts_reach.png")
    return report


def _read_thoughts(model, tokenizer, task, encoding, records, batch_size: int, show: int, top: int = 3) -> dict:
    """The ``thoughts`` section: each continuous thought decoded through the head."""
    from slr_zoo.metrics.thoughts import decoded_thoughts, first_tokens, reach_shares, summarise_shares
    from slr_zoo.tasks.base import UNREACHED
    from slr_zoo.tasks.tokenizer import text_ids, token_words

    n = encoding.thoughts()
    lens, shares, ahead = {}, [], []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        ids, mask, query = _prompt_batch(model, tokenizer, encoding, chunk)
        probs = decoded_thoughts(model, ids, mask, query, n).cpu()
        for index, (record, p) in enumerate(zip(chunk, probs), start=start):
            if index < show:
                top_p, top_ids = p.topk(top)
                lens[record["question"]] = {"answer": str(record["answer"]), "thoughts": [
                    f"    thought {t}: " + ", ".join(f"{tokenizer.convert_ids_to_tokens(int(i))} {float(q):.2f}"
                                                  for q, i in zip(qs, ix))
                    for t, (qs, ix) in enumerate(zip(top_p, top_ids), start=1)]}
            words = first_tokens(token_words(tokenizer, record["question"]), text_ids(tokenizer, record["question"]))
            steps = task.reach_steps(record) or {}
            tokens = {words[w]: step for w, step in steps.items() if w in words}
            if tokens:
                shares.append(reach_shares(p, tokens))
            options = _options(record)
            if options and all(w in words for w in options):
                target, other = (words[w] for w in options)
                ahead.append((p[:, target] > p[:, other]).tolist())
    return {
        "thoughts": n, "lens": lens,
        "reach": summarise_shares(shares, UNREACHED) if shares else None,
        # per thought: how often the gold option already outweighs the other
        "target_ahead": [round(sum(col) / len(ahead), 4) for col in zip(*ahead)] if ahead else None,
    }


def _options(record: dict) -> tuple[str, str] | None:
    """(gold option, other option) where the answer names one of two (ProsQA); ProntoQA's files
    carry a target and a neg_target too, but its answer is True or False."""
    symbols = record.get("idx_to_symbol")
    if symbols and "target" in record and "neg_target" in record and symbols[record["target"]] in record.get("answer", ""):
        return symbols[record["target"]], symbols[record["neg_target"]]
    return None


def _warn_unknown_words(tokenizer, records: list[dict], source: str) -> None:
    """A word the cell's vocabulary lacks is read as its unknown token, so a file of another task
    scores near zero for that reason alone: said before the accuracy is (as generate says it of a
    prompt). The answer counts too: a word the model cannot write is an answer it cannot give."""
    from slr_zoo.tasks.tokenizer import unknown_words

    words, affected = {}, 0
    for record in records:
        found = unknown_words(tokenizer, f"{record['question']} {record['answer']}")
        affected += bool(found)
        words.update(dict.fromkeys(found))
    if affected:
        print(f"evaluate: warning: {affected} of {len(records)} records of {source} have words the model's "
              f"vocabulary lacks, read as {tokenizer.unk_token}: {', '.join(list(words)[:8])}", file=sys.stderr)


def _arguments(depths, source: str, limit, thoughts=None) -> dict:
    """What an eval.json was made with: a grid evaluation skips the cells that already have it."""
    return {"steps": list(depths), "split": source, "limit": limit, **({"thoughts": list(thoughts)} if thoughts else {})}


def _default_depths(trained: int, mode: str = "depth") -> list[int]:
    """1 .. twice the trained depth; a thoughts-mode cell has no depth but its trained one
    (``generate.check_thoughts_inference``)."""
    return [trained] if mode == "thoughts" else sorted({1, *range(1, 2 * trained + 1)})


def _evaluated(cell: Path, depths, source: str, limit, thoughts=None) -> bool:
    """Whether the cell's eval.json was made with these arguments."""
    from slr_zoo.recipe import read_config

    try:
        stored = json.loads((cell / "eval.json").read_text()).get("arguments")
        loop = read_config(cell / "config.yaml")["loop"]
        default = _default_depths(loop["max_steps"], loop.get("mode", "depth"))
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return stored == _arguments(depths or default, source, limit, thoughts)


def evaluate_grid(run_dir: Path, depths=None, split="val", limit=None, show=3, batch_size=64,
                  data: Path | None = None, ood: bool = False, rerun: bool = False,
                  thoughts: list[int] | None = None) -> tuple[list[str], list[str]]:
    """``evaluate`` on each finished cell of a grid, one after another, then the grid's report again
    (its results.md gains accuracy by inference depth, mean ± std over seeds). Each cell's eval.json
    is written when that cell is done, so a run stopped halfway keeps what it evaluated, and running
    it again skips cells already evaluated with the same arguments. Returns the evaluated and the
    failed cells."""
    from slr_zoo import report as grid_report
    from slr_zoo.files import read_summary

    cells = sorted(p.parent for p in run_dir.glob("*/summary.json") if not p.parent.name.startswith("."))
    if not cells:
        raise FileNotFoundError(f"{run_dir} holds no finished cells (no */summary.json); train it with "
                                "python -m slr_zoo.fit first")
    source = str(data) if data is not None else ("ood" if ood else split)
    done, failed = [], []
    for i, cell in enumerate(cells, start=1):
        try:
            summary = read_summary(cell / "summary.json")
        except ValueError as err:
            print(f"[{i}/{len(cells)}] {cell.name}: skipped ({err})", file=sys.stderr)
            continue
        if summary.get("status", "ok") != "ok":
            print(f"[{i}/{len(cells)}] {cell.name}: skipped (status {summary.get('status')!r})")
            continue
        if not rerun and _evaluated(cell, depths, source, limit, thoughts):
            print(f"[{i}/{len(cells)}] {cell.name}: already evaluated (--rerun evaluates it again)")
            done.append(cell.name)
            continue
        try:
            report = evaluate(cell, depths, split, limit, show, batch_size, data=data, ood=ood, thoughts=thoughts)
        except (FileNotFoundError, ValueError, CheckpointError) as err:
            print(f"[{i}/{len(cells)}] {cell.name}: failed: {err}", file=sys.stderr)
            failed.append(cell.name)
            continue
        done.append(cell.name)
        print(f"[{i}/{len(cells)}] {cell.name}: " + " ".join(f"T={r['steps']}:{100 * r['accuracy']:.1f}"
                                                            for r in report["by_depth"]), flush=True)
    grid_report.main([str(run_dir)])
    return done, failed


def _counts(values: list[int]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(values).items())}


def _merged_stability(runs: list[dict], sizes: list[int], model) -> dict:
    """Batch results weighted by batch size; the contraction factor of a diagonal injection."""
    total = sum(sizes)

    def mean(values):
        pairs = [(v, n) for v, n in zip(values, sizes) if v is not None and v == v]
        return round(sum(v * n for v, n in pairs) / sum(n for _, n in pairs), 6) if pairs else None

    merged = {
        "delta": [mean([r["delta"][t] for r in runs]) for t in range(len(runs[0]["delta"]))],
        "norm": [mean([r["norm"][t] for r in runs]) for t in range(len(runs[0]["norm"]))],
        "diverged_fraction": round(sum(r["diverged_fraction"] * n for r, n in zip(runs, sizes)) / total, 4),
        "converged_fraction": round(sum(r["converged_fraction"] * n for r, n in zip(runs, sizes)) / total, 4),
        "converged_at": mean([r["converged_at"] for r in runs]),
        "tolerance": runs[0]["tolerance"], "bound": runs[0]["bound"],
    }
    if hasattr(model.injection, "decay"):  # Parcae's diagonal injection: h <- exp(-dt A) h + dt B h0
        merged["contraction"] = {k: round(v, 6) for k, v in model.injection.monitors().items()}
    return merged


def _entity_probes(states_by_t: list[list[torch.Tensor]], records: list[dict]) -> list[dict]:
    """Per iteration t >= 1: a linear probe on h_t (the answer position) for step t's entity, and
    the same probe on shuffled labels (what chance looks like with this many classes)."""
    from slr_zoo.metrics.states import linear_probe

    out = []
    generator = torch.Generator().manual_seed(0)
    for t in range(1, len(states_by_t)):
        labels = [step_entity(r, t) for r in records]
        keep = [i for i, label in enumerate(labels) if label is not None]
        if len(keep) < 8:
            return []
        names = sorted({labels[i] for i in keep})
        y = torch.tensor([names.index(labels[i]) for i in keep])
        x = torch.cat(states_by_t[t])[keep]
        shuffled = y[torch.randperm(len(y), generator=generator)]
        real, control = linear_probe(x, y), linear_probe(x, shuffled)
        out.append({"t": t, "accuracy": real["accuracy"], "chance": real["chance"], "classes": real["classes"],
                    "shuffled_accuracy": control["accuracy"]})
    return out


def _reach_batch(probe, states, records, tokenizer, task, ids, query) -> dict:
    """The reach probe's logits on a batch, with each question token's reach step, and its choice
    between the question's two options (the option whose mentions it marks more strongly)."""
    from slr_zoo.tasks.base import UNREACHED
    from slr_zoo.tasks.tokenizer import token_words

    reach = torch.full(ids.shape, -100, dtype=torch.long)
    options = []
    for row, record in enumerate(records):
        steps = task.reach_steps(record) or {}
        words = token_words(tokenizer, record["question"])
        start = int(query[row].nonzero()[0])
        for i, word in enumerate(words):
            if word is not None and word in steps:
                reach[row, start + i] = steps[word]
        named = _options(record)
        if named:
            options.append((row, *([start + i for i, w in enumerate(words) if w == name] for name in named)))
    logits = [probe.probe(h.float()).squeeze(-1).cpu() for h in states]
    chosen = []
    for row, gold, other in options:
        if gold and other:
            chosen.append(bool(logits[-1][row, gold].mean() > logits[-1][row, other].mean()))
    return {"logits": logits, "reach": reach, "unreached": UNREACHED, "chosen": chosen}


def _reach_summary(batches: list[dict], trained: int) -> dict | None:
    from slr_zoo.metrics.states import reach_table

    if not batches:
        return None
    width = max(b["reach"].size(1) for b in batches)

    def pad(x, value):
        return torch.nn.functional.pad(x, (width - x.size(1), 0), value=value)

    reach = torch.cat([pad(b["reach"], -100) for b in batches])
    logits = [torch.cat([pad(b["logits"][t], -1.0) for b in batches]) for t in range(len(batches[0]["logits"]))]
    chosen = [c for b in batches for c in b["chosen"]]
    return {"table": reach_table(logits, reach, batches[0]["unreached"]),
            "option_choice_accuracy": round(sum(chosen) / len(chosen), 4) if chosen else None,
            "trained_max_steps": trained}


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def _axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(5, 3.5))


def _plot(rows, trained: int, path: Path, x: str = "steps") -> None:
    """Accuracy overall and by hop count against ``x``: loop iterations, or thoughts."""
    fig, ax = _axes()
    xs = [r[x] for r in rows]
    ax.plot(xs, [r["accuracy"] for r in rows], marker="o", label="all")
    hops = sorted({h for r in rows for h in r["accuracy_by_hops"]}, key=lambda h: (len(h), h))
    if len(hops) > 1:
        for h in hops:
            ax.plot(xs, [r["accuracy_by_hops"].get(h, float("nan")) for r in rows], lw=1, alpha=0.6, label=f"{h} hops")
    ax.axvline(trained, color="grey", ls=":", label="trained depth" if x == "steps" else "trained thoughts")
    ax.set_xlabel("loop iterations at inference" if x == "steps" else "continuous thoughts before the answer")
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    _save(fig, path)


def _plot_histogram(histogram: dict, path: Path) -> None:
    fig, ax = _axes()
    drawn = False
    for key, label in (("first_token", "first answer token (per sample)"), ("every_token", "every generated token")):
        counts = histogram.get(key) or {}
        if counts:
            total = sum(counts.values())
            ax.bar([int(k) + (-0.2 if key == "first_token" else 0.2) for k in counts], [v / total for v in counts.values()],
                   width=0.4, label=label)
            drawn = True
    ax.set_xlabel("loop iterations used (recipe's halting policy)")
    ax.set_ylabel("fraction")
    if drawn:
        ax.legend(fontsize=7)
    else:  # the trained depth was not among the evaluated ones (--steps)
        ax.text(0.5, 0.5, "the trained depth was not evaluated", ha="center", va="center", transform=ax.transAxes)
    _save(fig, path)


def _plot_stability(stats: dict, trained: int, path: Path) -> None:
    fig, ax = _axes()
    ts = list(range(1, len(stats["delta"]) + 1))
    ax.plot(ts, stats["delta"], marker="o", label="||h_t - h_t-1|| / ||h_t-1||")
    ax.set_yscale("log")
    ax.set_xlabel("loop iteration t")
    ax.set_ylabel("relative state change")
    ax.axvline(trained, color="grey", ls=":", label="trained depth")
    twin = ax.twinx()
    twin.plot(ts, stats["norm"], color="tab:orange", marker=".", label="||h_t|| per position")
    twin.set_ylabel("state norm per position")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7)
    _save(fig, path)


def _plot_probes(rows: list[dict], trained: int, path: Path) -> None:
    fig, ax = _axes()
    if rows:
        ts = [r["t"] for r in rows]
        ax.plot(ts, [r["accuracy"] for r in rows], marker="o", label="probe on h_t")
        ax.plot(ts, [r["shuffled_accuracy"] for r in rows], ls="--", label="shuffled labels")
        ax.plot(ts, [r["chance"] for r in rows], ls=":", color="grey", label="majority class")
        ax.axvline(trained, color="grey", ls=":")
        ax.legend(fontsize=7)
    else:  # the records have no per-step entity (too few labelled records, or no steps at all)
        ax.text(0.5, 0.5, "no step entities to probe in these records", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("loop iteration t")
    ax.set_ylabel("held-out accuracy: step t's entity")
    ax.set_ylim(0, 1.02)
    _save(fig, path)


def _plot_thought_reach(reach: dict, path: Path) -> None:
    """Thoughts down, reach steps across: each cell the share of the thought's probability on the
    question's words that falls on words at that step (a frontier kept by the thoughts is a
    diagonal)."""
    rows = reach["rows"]
    steps = list(rows[0]["share_by_reach_step"])
    # a thought with no probability on the question's words has no split: left blank
    grid = [[float("nan") if r["share_by_reach_step"][s] is None else r["share_by_reach_step"][s] for s in steps]
            for r in rows]
    fig, ax = _axes()
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            if value == value:
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.5 else "black")
    ax.set_xticks(range(len(steps)), steps)
    ax.set_yticks(range(len(rows)), [str(r["thought"]) for r in rows])
    ax.set_xlabel("reach step of the word (ProsQA: distance from the root)")
    ax.set_ylabel("continuous thought")
    fig.colorbar(image, ax=ax, label="share of the thought's probability on question words")
    _save(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.steps and min(args.steps) < 1:
        print(f"evaluate: --steps must be loop depths >= 1, got {args.steps}", file=sys.stderr)
        return 2
    if not (args.run_dir / "config.yaml").is_file() and any(args.run_dir.glob("*/config.yaml")):
        try:
            _, failed = evaluate_grid(args.run_dir, args.steps, args.split, args.limit, args.show, args.batch_size,
                                      data=args.data, ood=args.ood, rerun=args.rerun, thoughts=args.thoughts)
        except FileNotFoundError as err:
            print(f"evaluate: {err}", file=sys.stderr)
            return 2
        return 1 if failed else 0
    try:
        report = evaluate(args.run_dir, args.steps, args.split, args.limit, args.show, args.batch_size,
                          data=args.data, ood=args.ood, thoughts=args.thoughts)
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return 2
    records = f"records of {args.data}" if args.data is not None else f"{report['split']} records"
    print(f"{report['records']} {records}, trained at max_steps={report['trained_max_steps']}")
    print("| steps | accuracy | iterations per generated token | by hops |")
    print("|---|---|---|---|")
    for r in report["by_depth"]:
        hops = " ".join(f"{h}:{a:.2f}" for h, a in r["accuracy_by_hops"].items())
        print(f"| {r['steps']} | {r['accuracy']:.3f} | {r['mean_steps']:.2f} | {hops} |")
    if report["by_thoughts"]:
        print("\n| thoughts | accuracy | tokens per answer | sequential passes | by hops |")
        print("|---|---|---|---|---|")
        for r in report["by_thoughts"]:
            hops = " ".join(f"{h}:{a:.2f}" for h, a in r["accuracy_by_hops"].items())
            print(f"| {r['thoughts']} | {r['accuracy']:.3f} | {r['tokens_per_answer']:.2f} | {r['passes_per_answer']:.2f} "
                  f"| {hops} |")
    if report["mistakes"] is None:
        print(f"the trained depth ({report['trained_max_steps']}) was not among --steps: no mistakes listed")
    else:
        print(f"{len(report['mistakes'])} answered wrongly at the trained depth (eval.json: mistakes)")
    for question, item in report["logit_lens"].items():
        print(f"\n{question}  -> gold {item['answer']}")
        print("\n".join(item["states"]))
    stats = report["stability"]
    print(f"\nstability to t = {len(stats['delta'])}: change " + " ".join(f"{d:.2g}" for d in stats["delta"] if d is not None)
          + f"; diverged {stats['diverged_fraction']:.1%}, converged {stats['converged_fraction']:.1%}"
          + (f" (by t = {stats['converged_at']:.1f})" if stats["converged_at"] else ""))
    for row in report["probes"]["entity"]:
        print(f"probe t={row['t']}: step entity {row['accuracy']:.2f} (shuffled {row['shuffled_accuracy']:.2f}, "
              f"majority {row['chance']:.2f}, {row['classes']} classes)")
    reach = report["probes"]["reach"]
    if reach:
        print("reach probe, fraction marked reached: " + "; ".join(
            f"t={r['t']} reached {r['reached']} unreached {r['unreached']} never {r['never']}" for r in reach["table"]))
        if reach["option_choice_accuracy"] is not None:
            print(f"reach probe's choice between the two options: {reach['option_choice_accuracy']}")
    read = report["thoughts"]
    if read:
        for question, item in read["lens"].items():
            print(f"\n{question}  -> gold {item['answer']}")
            print("\n".join(item["thoughts"]))
        if read["reach"]:
            steps = list(read["reach"]["rows"][0]["share_by_reach_step"])
            print(f"\neach thought decoded: its probability on the question's words, and that probability's share "
                  f"by reach step ({read['reach']['records']} records)")
            print("| thought | on question words | " + " | ".join(steps) + " |")
            print("|---|---|" + "---|" * len(steps))
            for r in read["reach"]["rows"]:
                print(f"| {r['thought']} | {r['mass_on_question_words']:.3f} | "
                      + " | ".join("—" if v is None else f"{v:.3f}" for v in r["share_by_reach_step"].values())
                      + " |")
        if read["target_ahead"]:
            print("gold option decoded above the other, by thought: "
                  + " ".join(f"{v:.3f}" for v in read["target_ahead"]))
    print(f"\nwrote {args.run_dir}/eval.json, accuracy_vs_steps.png, depth_histogram.png, stability.png, probes.png"
          + (", accuracy_vs_thoughts.png" if report["by_thoughts"] else "")
          + (", thoughts_reach.png" if read and read["reach"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
