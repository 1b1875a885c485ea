"""ProntoQA-style deduction (Saparov & He 2023, "Language Models Are Greedy Reasoners"; the
true/false format Coconut trains on).

An entity belongs to the first concept of a chain of made-up concepts, each a subtype of the next
("Every wumpus is a yumpus."), and every concept of the chain has one property, positive or
negated ("Yumpuses are not bright."). The question asks whether the entity has the property of
the ``hops``-th concept of the chain, or its negation:

    question: "... Max is a rompus. Max is a wumpus. True or false: Max is not bright."
    steps:    ["Max is a wumpus. Every wumpus is a yumpus.", "Max is a yumpus. Yumpuses are not bright.",
               "Max is not bright."]
    answer:   "True"

as in the published ProntoQA files Coconut uses: each step states what the entity is and quotes
the rule it applies, and the last states the conclusion. ``hops`` counts the rules applied:
``hops - 1`` subtype rules and one property rule. Distractors keep the answer from being read off
the surface: a concept outside the chain with the opposite polarity of the queried property, the
chain continuing past the queried concept, a subtype of the entity's concept with a property of
its own (the entity is not one, so it inherits nothing), and a second concept the entity belongs
to, with a property of its own. Sentences are shuffled; each rule is written with one of several
templates. The properties are the published files' adjectives.
"""

from __future__ import annotations

import random
import re
from typing import Optional

from slr_zoo.registry import ArgumentError
from slr_zoo.tasks.base import TASKS, UNREACHED, Record, Task, distances

CONCEPTS = (
    "wumpus yumpus zumpus dumpus rompus numpus tumpus vumpus impus jompus gorpus shumpus lempus sterpus "
    "grimpus lorpus brimpus kerpus"
).split()
# property families: a record uses at most one member of each, so no two properties of one entity
# contradict each other in plain English ("bright" and "dull")
PROPERTIES = [f.split() for f in (
    "bright dull", "opaque transparent", "large small", "hot cold", "happy sad", "red blue brown orange",
    "sour sweet bitter", "wooden metallic", "shy aggressive", "earthy fruity floral", "luminous", "kind mean angry",
    "nervous feisty", "amenable", "liquid", "temperate", "spicy", "fast slow", "loud moderate muffled",
    "melodic discordant", "windy sunny overcast rainy snowy",
)]
ENTITIES = "Alex Bob Fae Max Polly Rex Sally Sam Stella Wren".split()
EXTRA_CHAIN = 2  # the chain continues up to this many concepts past the queried one
FIXED_CONCEPTS = 4  # the unreached subtype, the distractor, the entity's other concept and its supertype
MAX_HOPS = len(CONCEPTS) - FIXED_CONCEPTS - EXTRA_CHAIN
BRANCH_PROPERTY = 0.75  # how often a branch concept has a property of its own


def article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def plural(noun: str) -> str:
    return noun + "es" if noun.endswith("s") else noun + "s"


def subtype_rule(rng: random.Random, a: str, b: str) -> str:
    return rng.choice([
        f"Every {a} is {article(b)} {b}.",
        f"Each {a} is {article(b)} {b}.",
        f"{plural(a).capitalize()} are {plural(b)}.",
    ])


def property_rule(rng: random.Random, concept: str, prop: str, positive: bool) -> str:
    verb = "is" if positive else "is not"
    return rng.choice([
        f"Every {concept} {verb} {prop}.",
        f"Each {concept} {verb} {prop}.",
        f"{plural(concept).capitalize()} are {'' if positive else 'not '}{prop}.",
    ])


def read_facts(question: str) -> tuple[list[str], list[list[int]], list[tuple[str, str, bool]]]:
    """The question's facts: (nodes, each node's children, property rules). Node 0 is the entity,
    whose children are the concepts it is said to belong to; a subtype rule adds an edge from the
    subtype to its supertype. A property rule is (concept, property, positive). The statement
    asked about (after "True or false:") is not a fact. Read from the text, so published records
    (question, steps and answer only) give the same facts as generated ones."""
    singular = {form: c for c in CONCEPTS for form in (c, plural(c))}
    nodes, children, index = [], [], {}

    def node(name: str) -> int:
        if name not in index:
            index[name] = len(nodes)
            nodes.append(name)
            children.append([])
        return index[name]

    entity = None
    edges, rules = [], []
    for sentence in re.split(r"(?<=\.)\s+", question):
        sentence = sentence.strip().rstrip(".")
        if ":" in sentence:
            continue
        if m := re.fullmatch(r"(?:Every|Each) (\w+) is an? (\w+)", sentence):
            a, b = m.groups()
        elif m := re.fullmatch(r"(?:Every|Each) (\w+) is (not )?(\w+)", sentence):
            if m.group(1) in singular:
                rules.append((singular[m.group(1)], m.group(3), m.group(2) is None))
            continue
        elif m := re.fullmatch(r"(\w+) are (not )?(\w+)", sentence):
            a, b = m.group(1).lower(), m.group(3)
            if b not in singular:
                if a in singular:
                    rules.append((singular[a], b, m.group(2) is None))
                continue
        elif m := re.fullmatch(r"(\w+) is an? (\w+)", sentence):  # a membership: "Max is a wumpus"
            entity = m.group(1)
            a, b = entity, m.group(2)
        else:
            continue
        if b in singular and (a == entity or a in singular):
            edges.append((a if a == entity else singular[a], singular[b]))
    if entity is None:
        return [], [], []
    node(entity)
    for a, b in edges:
        children[node(a)].append(node(b))
    return nodes, children, rules


def generate(rng: random.Random, hops: tuple[int, int] = (1, 5)) -> Record:
    k = rng.randint(*hops)
    n_chain = k + rng.randint(0, EXTRA_CHAIN)
    # the entity also belongs to a branch supertype of each concept of its chain up to the queried
    # one, as in the published files' ontologies, as far as fresh names and properties allow
    n_branch = min(k, len(CONCEPTS) - n_chain - FIXED_CONCEPTS, len(PROPERTIES) - n_chain - 2)
    names = rng.sample(CONCEPTS, n_chain + FIXED_CONCEPTS + n_branch)
    chain, (child, other, also, also_super) = names[:n_chain], names[n_chain:n_chain + FIXED_CONCEPTS]
    branches = names[n_chain + FIXED_CONCEPTS:]
    props = [rng.choice(family) for family in rng.sample(PROPERTIES, n_chain + 2 + n_branch)]
    polarity = [rng.random() < 0.5 for _ in props]
    entity = rng.choice(ENTITIES)
    queried, positive = props[k - 1], polarity[k - 1]

    rules = {}  # first-order facts by their role, so the chain of thought can quote them verbatim
    for i in range(n_chain - 1):
        rules[("sub", i)] = subtype_rule(rng, chain[i], chain[i + 1])
    for i in range(n_chain):
        rules[("prop", i)] = property_rule(rng, chain[i], props[i], polarity[i])
    facts = list(rules.values()) + [
        subtype_rule(rng, child, chain[0]),                         # the entity is not a `child`
        property_rule(rng, child, props[n_chain], polarity[n_chain]),
        property_rule(rng, other, queried, not positive),           # same property, opposite polarity
        property_rule(rng, also, props[n_chain + 1], polarity[n_chain + 1]),  # the entity's other concept
    ]
    if rng.random() < 0.5:
        facts.append(subtype_rule(rng, also, also_super))
    for i, branch in enumerate(branches):  # reached, with properties of their own, never the queried one
        facts.append(subtype_rule(rng, chain[i], branch))
        if rng.random() < BRANCH_PROPERTY:
            j = n_chain + 2 + i
            facts.append(property_rule(rng, branch, props[j], polarity[j]))
    rng.shuffle(facts)

    def member(concept: str) -> str:
        return f"{entity} is {article(concept)} {concept}."

    steps = [f"{member(chain[i])} {rules[('sub', i)]}" for i in range(k - 1)]
    conclusion = f"{entity} is {'' if positive else 'not '}{queried}."
    steps += [f"{member(chain[k - 1])} {rules[('prop', k - 1)]}", conclusion]

    asked_positive = rng.random() < 0.5
    statement = f"{entity} is {'' if asked_positive else 'not '}{queried}."
    memberships = [member(chain[0]), member(also)]
    rng.shuffle(memberships)
    question = " ".join(facts + memberships) + f" True or false: {statement}"
    return {
        "question": question,
        "steps": steps,
        "answer": "True" if asked_positive == positive else "False",
        "entity": entity,
        "chain": chain,
        "property": queried,
        "hops": k,
    }


@TASKS.register("prontoqa")
class ProntoQATask(Task):
    """Generated ProntoQA records; ``val_file`` (a Coconut-format json file, e.g. the published
    validation split) replaces the generated validation records."""

    answer_format = "boolean"
    path_args = ("val_file",)

    def __init__(
        self,
        n_train: int = 20000,
        n_val: int = 500,
        hops: list[int] = [1, 5],  # noqa: B006  (recipes give lists; never mutated)
        val_file: Optional[str] = None,
        seed: int = 0,
    ):
        if len(hops) != 2 or not 1 <= hops[0] <= hops[1] <= MAX_HOPS:
            raise ArgumentError("hops", f"must be [min, max] with 1 <= min <= max <= {MAX_HOPS}, got {hops}")
        self.n = {"train": n_train, "val": n_val}
        self.hops, self.seed, self.val_file = tuple(hops), seed, val_file

    def reach_steps(self, record):
        """The entity at hop 0, each concept it belongs to at hop 1, a concept t subtype rules
        further up at hop t + 1, and a property one hop after the first concept that gives it to
        the entity: after t hops, the mentions (singular or plural, capitalised or not) of the
        concepts the entity is known to be, and of the properties it is known to have, are
        reached. What the entity is not (a subtype of its concept, a distractor) and the properties
        it lacks (negated for it, or another concept's) are never reached. A property is labelled at
        every mention, the statement asked about included, so the probe asks the loop to hold
        there whether the entity has it."""
        nodes, children, rules = read_facts(record["question"])
        if not nodes:
            return None
        dist = distances(children, 0)
        hop = {name: dist.get(i, UNREACHED) for i, name in enumerate(nodes)}
        steps = {nodes[0]: 0}
        for concept in CONCEPTS:
            for form in (concept, plural(concept)):
                steps[form] = steps[form.capitalize()] = hop.get(concept, UNREACHED)
        for concept, prop, positive in rules:
            has = hop.get(concept, UNREACHED) + 1 if positive and concept in hop else UNREACHED
            steps[prop] = min(steps.get(prop, UNREACHED), has)
        return steps

    def records_file(self, split):
        return self.val_file if split == "val" and self.val_file else None

    def records(self, split):
        if split == "val" and self.val_file:
            from slr_zoo.tasks.json_file import read_records

            yield from read_records(self.val_file)
            return
        rng = random.Random(f"prontoqa/{self.seed}/{split}")
        for _ in range(self.n[split]):
            yield generate(rng, self.hops)
