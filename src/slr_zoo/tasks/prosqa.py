"""ProsQA-style graph reasoning (Coconut, Hao et al. 2024, "Training Large Language Models to
Reason in a Continuous Latent Space", section 4 and appendix A).

A random DAG over made-up concepts ("wumpus", ...) whose sources are people ("Tom", ...) is stated
edge by edge in random order ("Tom is a terpus.", "Every terpus is a brimpus."); the question asks
"Is Tom a lempus or scrompus?" where exactly one of the two leaves is reachable from Tom. The
chain of thought is a shortest path; the answer is a sentence ("Tom is a lempus.").

How a graph is grown (our construction; its statistics are compared with the published
validation split by ``python -m slr_zoo.tasks.stats``): two people, 0 and 1, start it. Every new
node draws a Poisson number of parents among the earlier nodes, preferring deep ones; a node drawn
with no parent is one more person. Each node records which of people 0 and 1 reach it, and a
node's parents are drawn, with fixed probabilities, only among nodes not reached from 1, only among
nodes not reached from 0, or among all. That keeps large parts of the graph private to one of the
two people, so a target reachable from one only and a distractor reachable from the other only
exist, while shared nodes make the two parts interleave. People who ended up with no edge are
dropped. One of 0 and 1 becomes the root; the target is the deepest leaf reached from the root
only whose shortest distance lies in the ``hops`` range; the distractor is a random leaf reached
from the other person only.
"""

from __future__ import annotations

import math
import random
from typing import Optional

from slr_zoo.registry import ArgumentError
from slr_zoo.tasks.base import TASKS, UNREACHED, Record, Task, distances

# The made-up names of the published data, so a word-level vocabulary built from generated
# training records covers the real validation split.
CONCEPTS = (
    "boompus bompus brimpus chorpus dumpus felpus fompus gerpus gorpus grimpus gwompus hilpus impus "
    "jelpus jompus kerpus lempus lorpus numpus quimpus rempus rompus rorpus scrompus shumpus sterpus "
    "storpus terpus timpus tumpus vumpus worpus wumpus yerpus yimpus yumpus zhorpus zumpus"
).split()
PEOPLE = "Alex Bob Carol Davis Eva Fae Gabriel Jack Max Oliver Polly Rex Sally Sam Stella Tom Wren".split()

# Growth parameters, tuned so the generated statistics match the published split (docs/tasks.md).
PARENTS_MEAN = 1.6      # Poisson mean of a new node's parent count
SIDE_PROB = 0.4         # probability of drawing parents only among nodes not reached from 1 (same for 0)
DEPTH_WEIGHT = 0.5      # a candidate parent at depth d has weight 1 + DEPTH_WEIGHT * d
PERSON_PROB = 0.15      # a node drawn with no parent is a new person with this probability, else it gets one
MAX_ATTEMPTS = 1000


def poisson(rng: random.Random, mean: float) -> int:
    """Knuth's multiplication method; exact and deterministic for a seeded ``random.Random``."""
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def weighted_sample(rng: random.Random, items: list[int], weights: list[float], k: int) -> list[int]:
    """``k`` distinct items, each draw proportional to the remaining weights."""
    items, weights, chosen = list(items), list(weights), []
    for _ in range(min(k, len(items))):
        u, acc = rng.random() * sum(weights), 0.0
        for j, w in enumerate(weights):
            acc += w
            if u < acc or j == len(weights) - 1:
                chosen.append(items.pop(j))
                weights.pop(j)
                break
    return chosen


def grow_graph(rng: random.Random, n_nodes: int) -> tuple[list[list[int]], list[int]]:
    """Parents of each node and which of people 0/1 reach it (bit 1: person 0, bit 2: person 1)."""
    parents: list[list[int]] = [[], []]
    reach, depth = [1, 2], [0, 0]
    for node in range(2, n_nodes):
        k = poisson(rng, PARENTS_MEAN)
        if k == 0 and rng.random() >= PERSON_PROB:
            k = 1
        u = rng.random()
        if u < SIDE_PROB:
            pool = [j for j in range(node) if not reach[j] & 2]
        elif u < 2 * SIDE_PROB:
            pool = [j for j in range(node) if not reach[j] & 1]
        else:
            pool = list(range(node))
        chosen = sorted(weighted_sample(rng, pool, [1 + DEPTH_WEIGHT * depth[j] for j in pool], k))
        parents.append(chosen)
        reach.append(0)
        for p in chosen:
            reach[node] |= reach[p]
        depth.append(1 + max(depth[p] for p in chosen) if chosen else 0)
    return parents, reach


def make_record(rng: random.Random, hops: tuple[int, int], nodes: tuple[int, int]) -> Optional[Record]:
    """One ProsQA record, or None when this graph has no target at a distance in ``hops``."""
    parents, reach = grow_graph(rng, rng.randint(*nodes))
    has_child = {p for ps in parents for p in ps}
    keep = [i for i in range(len(parents)) if parents[i] or i in has_child]
    if keep[:2] != [0, 1]:
        return None
    index = {old: new for new, old in enumerate(keep)}
    edges = [[index[p], index[c]] for c in keep for p in parents[c]]  # sorted by child, like the published data
    n = len(keep)
    children: list[list[int]] = [[] for _ in range(n)]
    for p, c in edges:
        children[p].append(c)
    people = [i for i in range(n) if not parents[keep[i]]]
    if len(people) > len(PEOPLE) or n - len(people) > len(CONCEPTS):
        return None
    label = [reach[old] for old in keep]

    # the root is the person whose private leaves lie deeper (as in the published split)
    leaves = [i for i in range(n) if not children[i]]
    dists = [distances(children, 0), distances(children, 1)]
    private = [[i for i in leaves if label[i] == 1 << person] for person in (0, 1)]
    if not private[0] or not private[1]:
        return None
    depth = [max(dists[person][i] for i in private[person]) for person in (0, 1)]
    root = rng.randrange(2) if depth[0] == depth[1] else int(depth[1] > depth[0])
    other, dist = 1 - root, dists[root]
    targets = [i for i in private[root] if hops[0] <= dist[i] <= hops[1]]
    negatives = private[other]
    if not targets:
        return None
    deepest = max(dist[i] for i in targets)
    target = rng.choice([i for i in targets if dist[i] == deepest])
    neg_target = rng.choice(negatives)

    names = iter(rng.sample(PEOPLE, len(people)))
    concepts = iter(rng.sample(CONCEPTS, n - len(people)))
    person = set(people)
    symbols = [next(names) if i in person else next(concepts) for i in range(n)]

    def sentence(p: int, c: int) -> str:
        return f"{symbols[p]} is a {symbols[c]}." if p in person else f"Every {symbols[p]} is a {symbols[c]}."

    path = [target]  # walk back along some shortest path, choosing among equally short parents at random
    parents_of: list[list[int]] = [[] for _ in range(n)]
    for p, c in edges:
        parents_of[c].append(p)
    while path[-1] != root:
        node = path[-1]
        path.append(rng.choice([p for p in parents_of[node] if dist.get(p) == dist[node] - 1]))
    path.reverse()

    facts = [sentence(p, c) for p, c in edges]
    rng.shuffle(facts)
    options = [symbols[target], symbols[neg_target]]
    rng.shuffle(options)
    question = " ".join(facts) + f" Is {symbols[root]} a {options[0]} or {options[1]}?"
    return {
        "question": question,
        "steps": [sentence(p, c) for p, c in zip(path, path[1:])],
        "answer": f"{symbols[root]} is a {symbols[target]}.",
        "idx_to_symbol": symbols,
        "edges": edges,
        "root": root,
        "target": target,
        "neg_target": neg_target,
        "hops": deepest,
    }


def generate(rng: random.Random, hops: tuple[int, int] = (3, 6), nodes: tuple[int, int] = (20, 26)) -> Record:
    """Draw graphs until one has a target in the ``hops`` range. Smaller ``nodes`` and ``hops``
    give easier problems (a curriculum)."""
    for _ in range(MAX_ATTEMPTS):
        record = make_record(rng, hops, nodes)
        if record is not None:
            return record
    raise ValueError(f"no ProsQA graph with {nodes[0]}-{nodes[1]} nodes had a target {hops[0]}-{hops[1]} hops "
                     f"away in {MAX_ATTEMPTS} attempts; use more nodes or fewer hops")


@TASKS.register("prosqa")
class ProsQATask(Task):
    """Generated ProsQA records; ``val_file`` (a Coconut-format json file, e.g. the published
    validation split) replaces the generated validation records."""

    path_args = ("val_file",)

    def __init__(
        self,
        n_train: int = 20000,
        n_val: int = 500,
        hops: list[int] = [3, 6],  # noqa: B006  (recipes give lists; never mutated)
        nodes: list[int] = [20, 26],  # noqa: B006  (nodes grown before people without edges are dropped)
        val_file: Optional[str] = None,
        seed: int = 0,
    ):
        if len(hops) != 2 or not 1 <= hops[0] <= hops[1]:
            raise ArgumentError("hops", f"must be [min, max] with 1 <= min <= max, got {hops}")
        if len(nodes) != 2 or not hops[1] + 2 <= nodes[0] <= nodes[1]:
            raise ArgumentError("nodes", f"must be [min, max] with max hops + 2 <= min <= max, got {nodes}")
        self.n = {"train": n_train, "val": n_val}
        self.hops, self.nodes, self.val_file, self.seed = tuple(hops), tuple(nodes), val_file, seed

    def records_file(self, split):
        return self.val_file if split == "val" and self.val_file else None

    def records(self, split):
        if split == "val" and self.val_file:
            from slr_zoo.tasks.json_file import read_records

            yield from read_records(self.val_file)
            return
        rng = random.Random(f"prosqa/{self.seed}/{split}")
        for _ in range(self.n[split]):
            yield generate(rng, self.hops, self.nodes)

    def harder(self):
        """7-8 hops over graphs larger than any trained on (no published system reports it)."""
        top = max(self.nodes[1], 26)
        return ProsQATask(n_train=0, n_val=self.n["val"], hops=[7, 8], nodes=[top + 4, top + 10], seed=self.seed + 7919)

    def step_answers(self, record):
        """After hop t, "<person> is a <t-th concept on the path>.": the steps read "Tom is a A.",
        "Every A is a B.", ...; the last one is the answer."""
        steps = record["steps"]
        if not steps:
            return None
        person = steps[0].split(" is a ")[0]
        return [f"{person} is a {step.rstrip('.').split()[-1]}." for step in steps]

    def reach_steps(self, record):
        """Every node's distance from the root (people other than the root are never reached):
        after t hops, the mentions of nodes at distance <= t are reached. Works on published
        records too, from their ``edges`` and ``root``; a record without its graph (a file of
        questions alone, read by ``evaluate --data``) has none."""
        if not all(key in record for key in ("idx_to_symbol", "edges", "root")):
            return None
        symbols = record["idx_to_symbol"]
        children: list[list[int]] = [[] for _ in symbols]
        for parent, child in record["edges"]:
            children[parent].append(child)
        dist = distances(children, record["root"])
        return {name: dist.get(i, UNREACHED) for i, name in enumerate(symbols)}
