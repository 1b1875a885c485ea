"""Tasks: generators, the Coconut-format loader, scoring, the word-level tokenizer, lean encoding."""

from __future__ import annotations

import json
import random
import re
from collections import deque
from pathlib import Path

import pytest

from slr_zoo.recipe import build_curriculum, build_task, load, validate
from slr_zoo.registry import ComponentError
from slr_zoo.tasks import TASKS, check_record
from slr_zoo.tasks.encoding import IGNORE, encode
from slr_zoo.tasks.json_file import read_records
from slr_zoo.tasks.prosqa import generate as prosqa_generate
from slr_zoo.tasks.scoring import extract_boolean, extract_digits, extract_number, normalize_text
from slr_zoo.tasks.tokenizer import UNK, build_word_tokenizer
from slr_zoo.training.data import EncodedDataset, encode_split

REPO = Path(__file__).resolve().parents[1]
PROSQA_VALID = REPO.parent / "shared" / "data" / "prosqa" / "valid.json"
needs_prosqa = pytest.mark.skipif(not PROSQA_VALID.is_file(), reason="published ProsQA split not present")

GENERATORS = {
    "iterate": {"n_train": 6, "n_val": 3},
    "walk": {"n_train": 6, "n_val": 3},
    "prosqa": {"n_train": 6, "n_val": 3},
    "prontoqa": {"n_train": 6, "n_val": 3},
    "multiplication": {"n_train": 6, "n_val": 3, "digits": [4, 5]},
}


def build(node: dict, seed: int = 0):
    return TASKS.build(node, "task", seed=seed)


def reach(edges, source: int) -> dict[int, int]:
    children: dict[int, list[int]] = {}
    for p, c in edges:
        children.setdefault(p, []).append(c)
    dist, queue = {source: 0}, deque([source])
    while queue:
        node = queue.popleft()
        for child in children.get(node, []):
            if child not in dist:
                dist[child] = dist[node] + 1
                queue.append(child)
    return dist


# ---------------------------------------------------------------------------------------- generators
@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_are_deterministic_by_seed(name):
    node = {"name": name, **GENERATORS[name]}
    first = list(build(node, seed=3).records("train"))
    assert first == list(build(node, seed=3).records("train"))
    assert first != list(build(node, seed=4).records("train"))
    assert list(build(node, seed=3).records("val")) != first[:3]  # splits draw different streams


def test_prosqa_records_satisfy_their_own_graph():
    for record in build({"name": "prosqa", "n_train": 60, "n_val": 1}).records("train"):
        sym, edges = record["idx_to_symbol"], record["edges"]
        root, target, neg = record["root"], record["target"], record["neg_target"]
        dist = reach(edges, root)
        assert target in dist and neg not in dist
        assert record["hops"] == dist[target] == len(record["steps"]) and 3 <= record["hops"] <= 6
        assert target in reach(edges, 1 - root) or neg in reach(edges, 1 - root)
        question = record["question"]
        assert question.endswith("?")
        asked = re.fullmatch(r".* Is (\w+) a (\w+) or (\w+)\?", question).groups()
        assert asked[0] == sym[root] and set(asked[1:]) == {sym[target], sym[neg]}
        assert record["answer"] == f"{sym[root]} is a {sym[target]}."
        people = set(range(len(sym))) - {c for _, c in edges}
        facts = [f"{sym[p]} is a {sym[c]}." if p in people else f"Every {sym[p]} is a {sym[c]}." for p, c in edges]
        sentences = [s.strip() for s in re.findall(r"[^.?]+[.?]", question)]
        assert sorted(sentences[:-1]) == sorted(facts)  # every edge stated once, nothing else
        assert all(step in facts for step in record["steps"])  # the chain of thought quotes the graph
        assert record["steps"][0].startswith(f"{sym[root]} is a ")
        assert record["steps"][-1].endswith(f" is a {sym[target]}.")
        assert all(name[0].isupper() == (i in people) for i, name in enumerate(sym))
        check_record(record, 0)


@pytest.mark.parametrize("layout", ["pairs", "words", "table"])
def test_walk_answer_is_the_root_reached_in_exactly_hops_lookups(layout):
    for record in build({"name": "walk", "n_train": 50, "layout": layout, "hops": [1, 5]}).records("train"):
        entries, start = record["question"].split(" ? ")
        if layout == "table":
            table = dict(zip("abcdefghijklmnopqrstuvwxyz", entries.split()))
        else:
            words = entries.split()
            pairs = [(w[0], w[1]) for w in words] if layout == "words" else list(zip(words[::2], words[1::2]))
            table = dict(pairs)
        v, path = start, [start]
        for _ in range(record["hops"]):
            v = table[v]
            path.append(v)
        assert v == record["answer"] and table[v] == v  # a fixed point, reached after exactly k lookups
        assert len(set(path)) == record["hops"] + 1
        assert [s.split() for s in record["steps"]] == [[a, b] for a, b in zip(path, path[1:])]


def test_prosqa_difficulty_is_a_parameter():
    easy = list(build({"name": "prosqa", "n_train": 40, "n_val": 1, "hops": [1, 2], "nodes": [6, 9]}).records("train"))
    assert {r["hops"] for r in easy} == {1, 2}
    assert max(len(r["idx_to_symbol"]) for r in easy) <= 9
    with pytest.raises(ValueError, match="task.nodes"):
        build({"name": "prosqa", "hops": [3, 8], "nodes": [6, 9]})


def prontoqa_solve(question: str) -> str:
    """Forward chaining over the rendered sentences: an independent check of the generator's logic."""
    facts, statement = question.split(" True or false: ")
    singular = lambda w: w.lower()[:-2] if w.lower().endswith("es") else w.lower()  # noqa: E731
    isa, props, entity_concepts = {}, {}, set()
    for s in re.findall(r"[^.]+\.", facts):
        s = s.strip()[:-1]
        if m := re.fullmatch(r"(?:Every|Each) (\w+) is an? (\w+)", s):
            isa.setdefault(m[1], []).append(m[2])
        elif m := re.fullmatch(r"(\w+) are (\w+es)", s):
            isa.setdefault(singular(m[1]), []).append(singular(m[2]))
        elif m := re.fullmatch(r"(?:Every|Each) (\w+) is (not )?(\w+)", s):
            props.setdefault(m[1], []).append((m[3], not m[2]))
        elif m := re.fullmatch(r"(\w+) are (not )?(\w+)", s):
            props.setdefault(singular(m[1]), []).append((m[3], not m[2]))
        elif m := re.fullmatch(r"([A-Z]\w+) is an? (\w+)", s):
            entity_concepts.add(m[2])
    m = re.fullmatch(r"\w+ is (not )?(\w+)\.", statement)
    concepts, frontier = set(entity_concepts), list(entity_concepts)
    while frontier:
        for nxt in isa.get(frontier.pop(), []):
            if nxt not in concepts:
                concepts.add(nxt)
                frontier.append(nxt)
    held = {(p, v) for c in concepts for p, v in props.get(c, [])}
    truth = [v for p, v in held if p == m[2]]
    assert len(truth) == 1, (question, truth)
    return "True" if truth[0] == (not m[1]) else "False"


def test_prontoqa_answers_follow_from_the_rules():
    records = list(build({"name": "prontoqa", "n_train": 200, "n_val": 1}).records("train"))
    assert {r["hops"] for r in records} == {1, 2, 3, 4, 5}
    assert {r["answer"] for r in records} == {"True", "False"}
    for r in records:
        assert prontoqa_solve(r["question"]) == r["answer"]
        assert len(r["steps"]) == r["hops"] + 1  # one per rule applied, then the conclusion
        for step in r["steps"][:-1]:  # "<entity> is a <concept>. <the rule it applies>."
            membership, rule = re.findall(r"[^.]+\.", step)
            assert rule.strip() in r["question"], (step, r["question"])
        assert r["steps"][0].split(". ")[0] + "." in r["question"]  # the entity's concept is given


def test_prontoqa_generates_at_every_allowed_depth_and_refuses_a_deeper_one():
    from slr_zoo.tasks.prontoqa import MAX_HOPS

    deepest = list(build({"name": "prontoqa", "n_train": 40, "n_val": 1, "hops": [MAX_HOPS, MAX_HOPS]}).records("train"))
    for r in deepest:
        assert r["hops"] == MAX_HOPS and prontoqa_solve(r["question"]) == r["answer"]
    with pytest.raises(ValueError, match=f"task.hops.*<= {MAX_HOPS}"):
        build({"name": "prontoqa", "hops": [1, MAX_HOPS + 1]})


def test_prontoqa_questions_have_the_published_files_shape():
    """Like the published files' ontologies: every concept of the chain has a branch supertype the
    entity also reaches, so about 26 sentences, 14 concepts and 12 property rules at 5 hops."""
    from slr_zoo.tasks.prontoqa import read_facts

    records = list(build({"name": "prontoqa", "n_train": 100, "n_val": 1, "hops": [5, 5]}).records("train"))
    sentences, concepts, properties = [], [], []
    for r in records:
        nodes, _, rules = read_facts(r["question"])
        sentences.append(len(re.findall(r"[^.:]+[.:]", r["question"])) - 1)  # "True or false:" is not one
        concepts.append(len(nodes))
        properties.append(len(rules))
    assert 24 <= sum(sentences) / len(records) <= 29
    assert 13 <= sum(concepts) / len(records) <= 16
    assert 11 <= sum(properties) / len(records) <= 14


@pytest.mark.parametrize("order", ["lsd", "msd"])
def test_multiplication_steps_are_partial_products(order):
    task = build({"name": "multiplication", "n_train": 30, "n_val": 1, "digits": [4, 5], "order": order})
    number = (lambda s: int("".join(s.split())[::-1])) if order == "lsd" else (lambda s: int("".join(s.split())))
    for r in task.records("train"):
        a_text, b_text = r["question"].split(" * ")
        a, b = number(a_text), number(b_text)
        assert (a, b) == (r["a"], r["b"]) and len(str(a)) == len(str(b)) == r["hops"] == len(r["steps"])
        assert number(r["answer"]) == a * b
        total = 0
        for j, step in enumerate(r["steps"]):
            partial, _, running = step.partition(" ( ")
            assert number(partial) == a * int(str(b)[::-1][j]) * 10**j
            total += number(partial)
            if j:
                assert number(running.rstrip(" )")) == total
        assert task.score(r["answer"], r) and task.normalize(r["answer"]) == str(a * b)
        assert not task.score(r["answer"] + " 1", r)
        # step supervision: after hop t the running sum a * (b mod 10^t), as many digits as the answer
        hop_answers = task.step_answers(r)
        assert [number(h) for h in hop_answers] == [a * (b % 10**t) for t in range(1, r["hops"] + 1)]
        assert hop_answers[-1] == r["answer"] and {len(h.split()) for h in hop_answers} == {len(r["answer"].split())}


def test_multiplication_without_separator_is_one_token_per_digit_for_a_tokenizer_that_splits_digits():
    """``separator: ""`` writes the spaced records' digits together; a tokenizer that splits
    numbers into digits (as Llama 3's and SmolLM2's do) then gives one token per digit, and every
    hop's running sum as many tokens as the answer (which step supervision needs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from slr_zoo.tasks.encoding import encode

    spaced = build({"name": "multiplication", "n_train": 20, "n_val": 1, "digits": [3, 5]})
    joined = build({"name": "multiplication", "n_train": 20, "n_val": 1, "digits": [3, 5], "separator": ""})
    vocab = {t: i for i, t in enumerate(["<eos>", "[SEP]", " ", "*", "(", ")", *"0123456789"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", sep_token="[SEP]")
    for s, j in zip(spaced.records("train"), joined.records("train")):
        for key in ("question", "answer"):
            assert j[key] == s[key].replace(" ", "").replace("*", " * ")
        assert j["steps"] == [step.replace(" ", "").replace("(", " ( ").replace(")", " )") for step in s["steps"]]
        assert joined.step_answers(j) == [h.replace(" ", "") for h in spaced.step_answers(s)]
        assert joined.score(s["answer"], j) and joined.normalize(j["answer"]) == str(j["a"] * j["b"])
        encoded = encode(j, tokenizer, joined.step_answers(j))
        answer_tokens = sum(label != -100 for label in encoded.labels) - 1  # the end token aside
        assert answer_tokens == len(str(j["a"] * j["b"])) == len(encoded.step_targets[0])
    with pytest.raises(ComponentError, match=r"task\.separator: expected Literal\[. ., ..\], got str .,."):
        build({"name": "multiplication", "separator": ","})


@pytest.mark.parametrize("name", TASKS.names())
def test_every_registered_task_yields_checked_encodable_records(name, tmp_path):
    if name == "json":
        path = tmp_path / "records.json"
        path.write_text(json.dumps([{"question": "a b ?", "steps": ["a"], "answer": "b"}] * 3))
        task = build({"name": "json", "train": str(path), "val": str(path)})
    else:
        task = build({"name": name, **GENERATORS.get(name, {"n_train": 6, "n_val": 3})})
    records = list(task.records("train")) + list(task.records("val"))
    assert records
    tokenizer = build_word_tokenizer(records)
    for i, record in enumerate(records):
        check_record(record, i)
        assert isinstance(record.get("hops", 0), int)
        encoded = encode(record, tokenizer)
        assert len(encoded.input_ids) == len(encoded.labels)
        assert tokenizer.unk_token_id not in encoded.input_ids
        answer = [t for t in encoded.labels if t != IGNORE][:-1]  # the answer tokens, without the end token
        assert task.score(tokenizer.decode(answer), record), (record["answer"], tokenizer.decode(answer))


# ---------------------------------------------------------------------------------------- json loader
@needs_prosqa
def test_published_prosqa_loads_and_scores_through_the_json_task():
    task = build({"name": "json", "train": str(PROSQA_VALID), "val": str(PROSQA_VALID)})
    records = list(task.records("val"))
    assert len(records) == 300
    tokenizer = build_word_tokenizer(records)
    for r in records:
        sym = r["idx_to_symbol"]
        assert r["hops"] == len(r["steps"]) and r["target"] in reach(r["edges"], r["root"])
        assert task.score(r["answer"], r)
        decoded = tokenizer.decode(tokenizer.encode(r["answer"], add_special_tokens=False))
        assert decoded == r["answer"] and task.score(decoded, r)  # exact round trip
        assert task.score("Tom is a lempus .".replace("Tom is a lempus", r["answer"].rstrip(".")), r)
        assert task.score(r["answer"].upper().rstrip("."), r)
        assert not task.score(f"{sym[r['root']]} is a {sym[r['neg_target']]}.", r)


@needs_prosqa
def test_word_tokenizer_from_generated_prosqa_covers_the_published_split():
    rng = random.Random(0)
    tokenizer = build_word_tokenizer(prosqa_generate(rng) for _ in range(1000))
    for r in read_records(PROSQA_VALID):
        for text in [r["question"], *r["steps"], r["answer"]]:
            assert tokenizer.unk_token_id not in tokenizer.encode(text, add_special_tokens=False), text


def test_json_reads_coconut_files_unchanged(tmp_path):
    prosqa = {"question": "Tom is a wumpus. Is Tom a wumpus or yumpus?", "steps": ["Tom is a wumpus."],
              "answer": "Tom is a wumpus.", "idx_to_symbol": "['Tom', 'wumpus', 'yumpus', 'Bob']",
              "edges": "[[0, 1], [3, 2]]", "root": "0", "target": 1, "neg_target": 2}
    gsm = {"question": "Tom has 3 apples and buys 4 more. How many?", "steps": ["<<3+4=7>>"], "answer": 7}
    pronto = {"question": "Every wumpus is bright. Max is a wumpus. True or false: Max is bright.",
              "steps": ["Max is a wumpus.", "Every wumpus is bright.", "Max is bright."], "answer": "True"}
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([prosqa, gsm, pronto]))
    lines = tmp_path / "lines.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in [prosqa, gsm, pronto]) + "\n")
    for path in (listed, lines):
        a, b, c = read_records(path)
        assert a["edges"] == [[0, 1], [3, 2]] and a["idx_to_symbol"][3] == "Bob" and a["root"] == 0
        assert a["hops"] == 1 and b["answer"] == "7" and b["steps"] == ["<<3+4=7>>"] and c["hops"] == 3
        task = build({"name": "json", "train": str(path), "val": str(path)})
        assert task.score("The answer is #### 7", b) and task.score("so 7 apples", b)
        assert not task.score("3 + 4 = 8", b)
        assert task.score("true", c) and not task.score("False", c)
        assert task.score("tom is a wumpus", a) and not task.score("Tom is a yumpus.", a)


@pytest.mark.parametrize("bad, message", [
    ({"question": "q ?", "steps": []}, r"record 1 of .*bad\.json: field 'answer' must be a non-empty string"),
    ({"question": "q ?", "steps": "a b", "answer": "x"}, r"record 1 of .*: field 'steps' must be a list of strings"),
    ({"question": "q ?", "steps": [], "answer": "x", "idx_to_symbol": "['a', 'b']", "edges": "[[0, 1]"},
     r"record 1 of .*bad\.json: field 'edges' is not a Python literal"),
    ({"question": "q ?", "steps": [], "answer": "x", "idx_to_symbol": ["a", "b"], "edges": [[0, 5]]},
     r"record 1 of .*: edge \[0, 5\] is not a pair of node indices in \[0, 2\)"),
    ({"question": "q ?", "steps": [], "answer": "x", "idx_to_symbol": ["a"], "edges": [], "target": 3},
     r"record 1 of .*: field 'target' must be a node index"),
    ([1, 2], r"record 1 of .*: expected an object"),
])
def test_malformed_record_stops_with_its_index_file_and_reason(tmp_path, bad, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"question": "q ?", "steps": [], "answer": "a"}, bad]))
    with pytest.raises(ValueError, match=message):
        list(read_records(path))


@pytest.mark.parametrize("text", ["[]", "", "\n\n"])
def test_a_file_without_records_is_named(tmp_path, text):
    path = tmp_path / "empty.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"empty\.json holds no records"):
        list(read_records(path))


@pytest.mark.parametrize("text, message", [
    (json.dumps({"records": [{"question": "q ?", "answer": "a"}]}),
     (r"obj\.json holds a JSON object with its records under 'records'; a records file is a JSON list of "
      r"records, or JSON Lines")),
    (json.dumps({"records": [{"question": "q ?", "answer": "a"}]}, indent=2),
     r"obj\.json holds a JSON object with its records under 'records'"),
    (json.dumps([{"question": "q ?", "answer": "a", "hops": "two"}]),
     r"^record 0 of .*obj\.json: field 'hops' is not a Python literal: 'two'$"),
], ids=["object", "pretty-printed object", "hops a word"])
def test_a_file_that_is_not_a_list_of_records_or_a_bad_literal_is_told_as_written(tmp_path, text, message):
    path = tmp_path / "obj.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        list(read_records(path))


def test_a_directory_is_named_as_one_not_as_a_missing_file(tmp_path):
    (tmp_path / "tiny").mkdir()
    with pytest.raises(ValueError, match=r"tiny is a directory, not a records file"):
        list(read_records(tmp_path / "tiny"))
    task = build({"name": "json", "train": str(tmp_path / "tiny"), "val": str(tmp_path / "tiny")})
    with pytest.raises(ValueError, match=r"tiny is a directory, not a records file"):  # what fit's check reads
        next(iter(task.records("train")))


def test_json_task_paths_are_checked_at_validation(tmp_path):
    recipe = load(REPO / "recipes" / "quickstart.yaml", [f"task={{name: json, train: {tmp_path}/no.json, val: x}}"])
    with pytest.raises(ComponentError, match=r"task\.train: no such file"):
        validate(recipe)
    recipe = load(REPO / "recipes" / "quickstart.yaml", [f"task={{name: prosqa, val_file: {tmp_path}/no.json}}"])
    with pytest.raises(ComponentError, match=r"task\.val_file: no such file"):
        validate(recipe)


# ---------------------------------------------------------------------------------------- scoring
def test_answer_extractors():
    assert normalize_text("Tom  is a wumpus .") == normalize_text("tom is a wumpus") == "tom is a wumpus"
    assert extract_number("She pays $1,250.00 in total.\n#### 1,250") == "1250"
    assert extract_number("so 18 eggs, then 3 left") == "3" and extract_number("no digits") == ""
    assert extract_number("#### -4") == "-4" and extract_number("0.50") == "0.5"
    assert extract_boolean("Max is bright. True") == "true" and extract_boolean("maybe") == ""
    assert extract_digits("0 0 1 #### 5 6 1") == "561"


def test_prosqa_task_scores_sentences_and_reads_val_file(tmp_path):
    record = prosqa_generate(random.Random(1))
    path = tmp_path / "val.json"
    path.write_text(json.dumps([record]))
    task = build({"name": "prosqa", "n_train": 4, "n_val": 9, "val_file": str(path)})
    assert list(task.records("val")) == [json.loads(json.dumps(record))]
    sym = record["idx_to_symbol"]
    assert task.score(record["answer"].replace(".", " ."), record)
    assert not task.score(f"{sym[record['root']]} is a {sym[record['neg_target']]}.", record)
    assert not task.score("", record)


# ---------------------------------------------------------------------------------------- tokenizer
def test_word_tokenizer_round_trips_splits_punctuation_maps_unknowns_and_saves(tmp_path):
    from transformers import PreTrainedTokenizerFast

    records = list(build({"name": "prontoqa", "n_train": 50, "n_val": 1}).records("train"))
    tokenizer = build_word_tokenizer(records)
    ids = tokenizer.encode("Tom is a wumpus.", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == ["[UNK]", "▁is", "▁a", "▁wumpus", "."]  # no Tom in ProntoQA
    text = records[0]["question"]
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text                                   # exactly, spaces and all
    assert tokenizer.convert_ids_to_tokens(ids)[:2] == ["▁" + w for w in text.split()[:2]]
    unknown = tokenizer.encode("Zorblax is a glorp!", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(unknown) == [UNK, "▁is", "▁a", UNK, UNK]
    tokenizer.save_pretrained(str(tmp_path))
    loaded = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert loaded.encode(text, add_special_tokens=False) == ids and loaded.decode(ids) == tokenizer.decode(ids)
    assert (loaded.pad_token_id, loaded.sep_token_id, loaded.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.sep_token_id, tokenizer.eos_token_id)


def test_fast_word_split_gives_exactly_the_tokenizer_ids(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from slr_zoo.tasks.tokenizer import text_ids

    records = list(build({"name": "prosqa", "n_train": 30, "n_val": 1}).records("train"))
    records.append({"question": "GSM: 12*3=36, $4.50 (each)? <<3+4=7>> x_y\ttab\nline", "answer": "####  7"})
    tokenizer = build_word_tokenizer(records)
    loaded_dir = tmp_path / "tok"
    tokenizer.save_pretrained(str(loaded_dir))
    loaded = PreTrainedTokenizerFast.from_pretrained(str(loaded_dir))
    texts = [t for r in records for t in (r["question"], *r.get("steps", []), " " + r["answer"])] + [
        "Tom [SEP] is a [THINK] wumpus.", "Zoë is a wümpus ٣.", "unseen-words, here!", ""]
    for tok in (tokenizer, loaded):
        for text in texts:
            assert text_ids(tok, text) == tok.encode(text, add_special_tokens=False), text


# ---------------------------------------------------------------------------------------- encoding
def test_encoded_dataset_is_flat_and_returns_what_encode_gave():
    task = build({"name": "prosqa", "n_train": 20, "n_val": 2})
    tokenizer = build_word_tokenizer(task.records("train"))
    dataset = encode_split(task, "train", tokenizer)
    assert dataset.ids.typecode == "h" and len(dataset) == 20
    for i, record in enumerate(task.records("train")):
        example, hops = dataset[i]
        assert example == encode(record, tokenizer) and hops == record["hops"]
    wide = EncodedDataset((encode(r, tokenizer) for r in task.records("val")), [1, 2], typecode="i")
    assert len(wide) == 2 and wide[1][1] == 2 and wide.ids.itemsize == 4


def test_shipped_prosqa_recipe_trains_on_generated_data_and_validates_on_the_published_split(monkeypatch):
    monkeypatch.chdir(REPO)  # recipe paths are relative to the repository root
    recipe = load(REPO / "recipes" / "prosqa.yaml")
    if PROSQA_VALID.is_file():
        validate(recipe)
    task = build_task(recipe)
    assert recipe["task"]["name"] == "prosqa" and not recipe["task"].get("train")
    assert Path(recipe["task"]["val_file"]).resolve() == PROSQA_VALID.resolve()
    train_questions = {r["question"] for r in _take(task.records("train"), 200)}
    for _, stage in build_curriculum(recipe):   # the easier stages are generated too
        train_questions |= {r["question"] for r in _take(stage.records("train"), 200)}
    if PROSQA_VALID.is_file():
        assert not train_questions & {r["question"] for r in read_records(PROSQA_VALID)}


def _take(records, n):
    return [r for _, r in zip(range(n), records)]
