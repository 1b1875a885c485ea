"""Does slr_zoo's looped model learn like a hand-written one? A learnability check, not a speed one.

    python benchmarks/plain_reference.py [--steps 1500 --loop-steps 6 --backbone gpt2] [--json PATH]

Trains two models of the same dims on the same fresh batches of the default ``iterate`` task, step
for step: slr_zoo's ``LoopedLM`` (built through the recipe path, every stabiliser ``none``) and a
plain PyTorch looped transformer written out below in thirty lines (pre-LN blocks, learned
positions, prelude + T x core + coda). Both see the question's tokens and are trained on the answer
at its last position, so the only difference is the library. It prints validation accuracy (overall
and by hop count) for both, side by side, every ``--eval-every`` steps.

If the library's loop had a defect that stopped learning, the reference would pull ahead; if both
plateau together, the plateau belongs to the task and the training budget. With ``--init normal``
(Hugging Face's init) the reference pulls ahead; with the default ``--init torch`` the two are alike
up to the seed (docs/results.md).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from slr_zoo.files import write_json
from slr_zoo.tasks.iterate import IterateTask

VOCAB = [str(d) for d in range(10)] + ["?"]
INDEX = {w: i for i, w in enumerate(VOCAB)}


def batch(task: IterateTask, rng: random.Random, n: int):
    records = [task.make(rng) for _ in range(n)]
    ids = torch.tensor([[INDEX[w] for w in r["question"].split()] for r in records])
    answers = torch.tensor([INDEX[r["answer"]] for r in records])
    hops = torch.tensor([r["hops"] for r in records])
    return ids, answers, hops


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, h, mask):
        a = self.ln1(h)
        h = h + self.attn(a, a, a, attn_mask=mask, need_weights=False)[0]
        return h + self.mlp(self.ln2(h))


class PlainLooped(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, length: int, loop_steps: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(length, d)
        self.prelude, self.core, self.coda = Block(d, heads), Block(d, heads), Block(d, heads)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)
        self.loop_steps = loop_steps

    def forward(self, ids):
        S = ids.size(1)
        mask = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)
        h = self.prelude(self.tok(ids) + self.pos(torch.arange(S)), mask)
        for _ in range(self.loop_steps):
            h = self.core(h, mask)
        return self.head(self.norm(self.coda(h, mask)))[:, -1]


def library_model(args):
    from slr_zoo.recipe import build_backbone, build_model, validate
    from slr_zoo.recipe.schema import defaults

    recipe = defaults()
    recipe["backbone"] = {"name": args.backbone, "hidden_size": args.hidden, "heads": args.heads,
                          "prelude_layers": 1, "core_layers": 1, "coda_layers": 1, "max_positions": 16,
                          "init_std": args.init_std, "init": args.init, "tie_embeddings": args.init == "normal"}
    recipe["loop"]["max_steps"] = args.loop_steps
    validate(recipe)
    model = build_model(recipe, build_backbone(recipe, vocab_size=len(VOCAB)))
    return lambda ids: model(ids).logits[:, -1], model


def accuracy(forward, ids, answers, hops):
    with torch.no_grad():
        right = (forward(ids).argmax(-1) == answers).float()
    by_hops = [right[hops == k].mean().item() for k in sorted(set(hops.tolist()))]
    return right.mean().item(), by_hops


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--loop-steps", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--backbone", default="gpt2", help="slr_zoo backbone (gpt2 has learned positions, like the reference)")
    parser.add_argument("--init", default="torch", choices=["torch", "normal"],
                        help="slr_zoo's backbone.init: 'torch' (the reference's scheme, untied head) or "
                             "'normal' (Hugging Face's N(0, init_std), tied head: learns the lookup only)")
    parser.add_argument("--init-std", type=float, default=None, help="with --init normal: backbone.init_std (default hidden ** -0.5)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write the validation curves here")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    task = IterateTask(hops=[1, 6])
    val = batch(task, random.Random("val"), 1000)
    torch.manual_seed(0)
    reference = PlainLooped(len(VOCAB), args.hidden, args.heads, val[0].size(1), args.loop_steps)
    library_forward, library = library_model(args)
    models = {"slr_zoo": (library_forward, library), "reference": (reference, reference)}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.01) for name, (_, m) in models.items()}
    for name, (_, m) in models.items():
        print(f"{name}: {sum(p.numel() for p in m.parameters()):,} parameters")

    rng = random.Random("train")
    print("step | slr_zoo acc | reference acc | slr_zoo by hops 1..6 | reference by hops 1..6")
    curves = []
    for step in range(1, args.steps + 1):
        ids, answers, _ = batch(task, rng, args.batch)
        for name, (forward, module) in models.items():
            module.train()
            loss = F.cross_entropy(forward(ids), answers)
            optimizers[name].zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimizers[name].step()
        if step % args.eval_every == 0 or step == args.steps:
            rows = {}
            for name, (forward, module) in models.items():
                module.eval()
                rows[name] = accuracy(forward, *val)
            (a, ah), (b, bh) = rows["slr_zoo"], rows["reference"]
            fmt = lambda xs: " ".join(f"{x:.2f}" for x in xs)  # noqa: E731
            print(f"{step} | {a:.3f} | {b:.3f} | {fmt(ah)} | {fmt(bh)}", flush=True)
            curves.append({"step": step, "slr_zoo": round(a, 4), "reference": round(b, 4),
                           "slr_zoo_by_hops": [round(x, 4) for x in ah], "reference_by_hops": [round(x, 4) for x in bh]})
            if args.json:  # after every evaluation, so that a run stopped early keeps its curve
                write_json(args.json, {"setting": {k: v for k, v in vars(args).items() if k != "json"}, "curves": curves})


if __name__ == "__main__":
    main()
