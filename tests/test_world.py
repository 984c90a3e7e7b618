"""The tiny profile's synthetic world: determinism, Hub schemas, arithmetic, leakage, coverage, layout."""

from __future__ import annotations

import ast
import json
import operator
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from poststate.world import DEFAULT_SFT_FAMILIES, FAMILIES, ProblemSlots, WorldParams, generate_world, render_problem, write_world

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SMALL = dict(n_corpus_docs=3000, gsm8k_n_sft=400, gsm8k_n_prompts=120, gsm8k_n_fewshot=16, gsm8k_n_test=120,
             mmlu_n_test=80, tqa_n_items=40)


@pytest.fixture(scope="module")
def world():
    return generate_world(WorldParams(**SMALL))


@pytest.fixture(scope="module")
def default_world():
    return generate_world(WorldParams())


# --------------------------------------------------------------------------- helpers

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _calc(expr: str) -> float:
    """Evaluate a calculator note's expression: integers and + - * / only."""
    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        raise ValueError(f"unexpected calculator expression {expr!r}")
    return ev(ast.parse(expr, mode="eval").body)


def _key(meta_row: dict) -> tuple:
    return meta_row["family"], tuple(meta_row["numbers"])


def _corpus_lower(w) -> str:
    return "\n\n".join(w.corpus).lower()


# --------------------------------------------------------------------------- determinism


def test_same_params_give_identical_world_and_another_seed_differs(world):
    again = generate_world(WorldParams(**SMALL))
    assert again == world
    assert json.dumps(again.meta) == json.dumps(world.meta)
    other = generate_world(WorldParams(**SMALL, seed=1))
    assert other.corpus != world.corpus
    assert other.gsm8k["test"] != world.gsm8k["test"]
    assert other.mmlu["test"] != world.mmlu["test"]
    assert other.truthfulqa != world.truthfulqa


# --------------------------------------------------------------------------- schemas


def test_rows_match_the_hub_schemas_exactly(world):
    assert sorted(world.gsm8k) == ["fewshot", "prompts", "prompts_heldout", "sft", "sft_heldout", "test"]
    for rows in world.gsm8k.values():
        for r in rows:
            assert list(r) == ["question", "answer"] and all(isinstance(v, str) and v for v in r.values())
    assert sorted(world.mmlu) == ["dev", "test"]
    for rows in world.mmlu.values():
        for r in rows:
            assert list(r) == ["question", "subject", "choices", "answer"]
            assert isinstance(r["question"], str) and re.fullmatch(r"[a-z]+(_[a-z]+)+", r["subject"])
            assert len(r["choices"]) == 4 and all(isinstance(c, str) and c for c in r["choices"])
            assert len(set(r["choices"])) == 4
            assert type(r["answer"]) is int and 0 <= r["answer"] <= 3
    for r in world.truthfulqa:
        assert list(r) == ["question", "mc1_targets", "mc2_targets"]
        for key, n_true in (("mc1_targets", 1), ("mc2_targets", 2)):
            t = r[key]
            assert list(t) == ["choices", "labels"] and len(t["choices"]) == len(t["labels"])
            assert all(type(x) is int and x in (0, 1) for x in t["labels"])
            assert t["labels"] == [1] * n_true + [0] * (len(t["labels"]) - n_true)  # Hub layout: true first
            assert 3 <= len(t["labels"]) - n_true <= 5 and len(set(t["choices"])) == len(t["choices"])


@pytest.mark.parametrize("relpath, ours", [
    ("gsm8k/test.jsonl", lambda w: w.gsm8k["test"][0]),
    ("mmlu/dev.jsonl", lambda w: w.mmlu["dev"][0]),
    ("truthfulqa/multiple_choice.jsonl", lambda w: w.truthfulqa[0]),
])
def test_row_layout_equals_the_real_benchmark_rows(world, relpath, ours):
    path = SHARED_DATA / relpath
    if not path.is_file():
        pytest.skip(f"offline benchmark copy not found at {path}")
    real = json.loads(path.open(encoding="utf-8").readline())

    def layout(x):
        if isinstance(x, dict):
            return {k: layout(v) for k, v in x.items()}
        return type(x).__name__ if not isinstance(x, list) else ["list", layout(x[0])]

    assert list(ours(world)) == list(real)  # key order too
    assert layout(ours(world)) == layout(real)


# --------------------------------------------------------------------------- arithmetic


def test_every_answer_has_correct_calculator_notes_and_a_final_integer(world):
    rows = [r for rows in world.gsm8k.values() for r in rows]
    rows += [{"answer": d.split("\nAnswer: ", 1)[1]} for d in world.corpus if "####" in d]
    assert len(rows) > 1000
    for r in rows:
        *steps, last = r["answer"].split("\n")
        final = re.fullmatch(r"#### (\d+)", last)
        assert final, r["answer"]
        notes = re.findall(r"<<([^=<>]+)=([^<>]+)>>(\d+)", r["answer"])
        assert notes and len(notes) == len(re.findall("<<", r["answer"]))
        for expr, val, shown in notes:
            assert _calc(expr) == int(val) == int(shown), (expr, val, shown)
        assert int(notes[-1][1]) == int(final.group(1))


@pytest.mark.parametrize("family, nums, opening, closer, question, answer", [
    ("take_away", (43, 7), 0, 0,
     "Mara has 43 pears. She gives 7 of them to a friend. How many pears does she have left?",
     "Mara gives away 7, so she has 43 - 7 = <<43-7=36>>36 pears left.\n#### 36"),
    ("crates_sell", (3, 12, 7), 0, 0,
     "Mara fills 3 crates with 12 pears each. She sells 7 pears at the market in Velby. How many pears does she have left?",
     "Mara has 3 * 12 = <<3*12=36>>36 pears.\nShe sells 7, so 36 - 7 = <<36-7=29>>29 pears are left.\n#### 29"),
    ("pick_share", (23, 31, 6), 1, 0,
     "Mara picks 23 pears on Monday and 31 pears on Tuesday. She shares all the pears equally among 6 friends. "
     "How many pears does each friend get?",
     "Mara picks 23 + 31 = <<23+31=54>>54 pears.\nEach friend gets 54 / 6 = <<54/6=9>>9 pears.\n#### 9"),
    ("budget_refund", (40, 4, 6, 15), 0, 1,
     "Mara has 40 coins. She buys 4 pears for 6 coins each. Then a friend pays her 15 coins for a lamp. "
     "How many coins does she have now?",
     "The pears cost 4 * 6 = <<4*6=24>>24 coins.\nShe has 40 - 24 = <<40-24=16>>16 coins left.\n"
     "Then she gets 15 more, so 16 + 15 = <<16+15=31>>31 coins.\n#### 31"),
])
def test_render_problem_matches_hand_written_gsm8k_rows(family, nums, opening, closer, question, answer):
    slots = ProblemSlots(name="Mara", pronoun="she", items="pears", containers="crates", town="Velby", thing="lamp")
    assert render_problem(family, nums, slots, opening, closer) == (question, answer)


@pytest.mark.parametrize("family, nums", [("pick_share", (23, 31, 4)), ("budget_left", (10, 4, 6, 1)), ("nope", (1, 2))])
def test_render_problem_rejects_invalid_problems(family, nums):
    slots = ProblemSlots(name="Mara", pronoun="she", items="pears", containers="crates", town="Velby", thing="lamp")
    with pytest.raises(ValueError, match=family if family == "nope" else "pick_share|negative"):
        render_problem(family, nums, slots, 0, 0)


def test_sibling_families_share_their_opening_and_differ_after_it():
    slots = ProblemSlots(name="Mara", pronoun="she", items="pears", containers="crates", town="Velby", thing="lamp")
    nums = {"keep": (40, 6), "fill": (4, 5, 6), "pick": (20, 22, 6), "shop": (90, 4, 6, 10)}
    pairs: dict[str, list[str]] = {}
    for f in FAMILIES.values():
        pairs.setdefault(f.pair, []).append(f.id)
    assert sorted(len(v) for v in pairs.values()) == [2, 2, 2, 2]
    assert {f.difficulty for f in FAMILIES.values()} == {1, 2, 3}
    for pair, (x, y) in pairs.items():
        for opening in (0, 1):
            qx, ax = render_problem(x, nums[pair], slots, opening, 0)
            qy, ay = render_problem(y, nums[pair], slots, opening, 0)
            n_open = 2 if pair == "shop" or (pair, opening) == ("pick", 0) else 1  # sentences in the opening
            sx, sy = qx.split(". "), qy.split(". ")
            assert sx[:n_open] == sy[:n_open] and sx[n_open] != sy[n_open], (qx, qy)
            assert ax.split("\n")[-1] != ay.split("\n")[-1]
    assert all(sum(f in DEFAULT_SFT_FAMILIES for f in v) == 1 for v in pairs.values())


def test_question_numbers_are_the_item_key(world):
    for split, rows in world.gsm8k.items():
        for r, m in zip(rows, world.meta["gsm8k"][split], strict=True):
            assert [int(x) for x in re.findall(r"\d+", r["question"])] == m["numbers"]
            assert m["difficulty"] == FAMILIES[m["family"]].difficulty
    for m in world.meta["corpus"]["arith"]:
        question = world.corpus[m["doc"]].split("\nAnswer: ")[0]
        assert [int(x) for x in re.findall(r"\d+", question)] == m["numbers"]


def test_gsm8k_test_keys_and_questions_never_reach_training_text(world):
    test_keys = {_key(m) for m in world.meta["gsm8k"]["test"]}
    assert len(test_keys) == len(world.gsm8k["test"])
    for split in ("sft", "prompts", "fewshot"):
        keys = [_key(m) for m in world.meta["gsm8k"][split]]
        assert len(set(keys)) == len(keys) and not test_keys & set(keys), split
    assert not test_keys & {_key(m) for m in world.meta["corpus"]["arith"]}
    corpus = "\n\n".join(world.corpus)
    train_questions = {r["question"] for s in ("sft", "prompts", "fewshot") for r in world.gsm8k[s]}
    for r in world.gsm8k["test"]:
        assert r["question"] not in corpus and r["question"] not in train_questions


def test_heldout_splits_are_disjoint_from_their_training_split_and_the_test_set(world):
    test_keys = {_key(m) for m in world.meta["gsm8k"]["test"]}
    for split in ("sft", "prompts"):
        trained = {_key(m) for m in world.meta["gsm8k"][split]}
        held = [_key(m) for m in world.meta["gsm8k"][f"{split}_heldout"]]
        assert held and len(set(held)) == len(held)
        assert not set(held) & trained and not set(held) & test_keys, split
    sft_families = {m["family"] for m in world.meta["gsm8k"]["sft"]}
    assert {m["family"] for m in world.meta["gsm8k"]["sft_heldout"]} == sft_families  # the SFT distribution
    assert {m["family"] for m in world.meta["gsm8k"]["prompts_heldout"]} == set(FAMILIES)


def test_sft_covers_only_its_families_while_the_rest_cover_all(world):
    fam = {split: [m["family"] for m in rows] for split, rows in world.meta["gsm8k"].items()}
    assert set(fam["sft"]) == set(DEFAULT_SFT_FAMILIES)
    for split in ("test", "prompts", "fewshot"):
        assert set(fam[split]) == set(FAMILIES), split
    assert {m["family"] for m in world.meta["corpus"]["arith"]} == set(FAMILIES)
    counts = [fam["test"].count(f) for f in FAMILIES]
    assert max(counts) - min(counts) <= 1  # balanced over families
    custom = generate_world(WorldParams(**SMALL, sft_families=("add_more", "pick_sell")))
    assert {m["family"] for m in custom.meta["gsm8k"]["sft"]} == {"add_more", "pick_sell"}


# --------------------------------------------------------------------------- knowledge and myths


def test_mmlu_rows_ask_distinct_facts_with_the_gold_at_answer(world):
    facts = world.meta["facts"]
    ids = world.meta["mmlu"]
    assert len(ids["test"]) == len(world.mmlu["test"]) == 80 and len(ids["dev"]) == len(world.mmlu["dev"]) == 20
    assert not set(ids["dev"]) & set(ids["test"]) and len(set(ids["test"])) == 80
    for split in ("dev", "test"):
        for r, fid in zip(world.mmlu[split], ids[split], strict=True):
            f = facts[fid]
            assert f["kind"] == "mmlu" and f["subject"] == r["subject"]
            assert f["entity"] in r["question"]
            # choices are the canonical declarative clause with the gold value / three pool distractors
            gold = f["statements"][0][0].upper() + f["statements"][0][1:] + "."
            assert r["choices"][r["answer"]] == gold
            pool = world.meta["relations"][f"{f['subject']}/{f['relation']}"]["pool"]
            values = [next(v for v in pool if gold.replace(f["value"], v) == c) for c in r["choices"]]
            assert len(set(values)) == 4 and values[r["answer"]] == f["value"]
    subjects = [r["subject"] for r in world.mmlu["test"]]
    assert {s: subjects.count(s) for s in set(subjects)} == dict.fromkeys(
        ["world_geography", "world_zoology", "world_crafts", "world_history"], 20)
    assert {r["answer"] for r in world.mmlu["test"]} == {0, 1, 2, 3}


def test_every_eval_fact_is_stated_in_the_corpus_but_no_eval_question_is(world):
    corpus = _corpus_lower(world)
    facts = world.meta["facts"]
    for fid in world.meta["mmlu"]["dev"] + world.meta["mmlu"]["test"]:
        assert any(s.lower() in corpus for s in facts[fid]["statements"]), fid
    for r, fid in zip(world.truthfulqa, world.meta["truthfulqa"], strict=True):
        f = facts[fid]
        assert f["kind"] == "myth" and f["value"] != f["falsehood"]
        assert any(s.lower() in corpus for s in f["statements"]), fid  # the truth
        assert any(s.lower() in corpus for s in f["false_statements"]), fid  # the popular falsehood
        true_sentence = f["statements"][0][0].upper() + f["statements"][0][1:] + "."
        false_sentence = f["false_statements"][0][0].upper() + f["false_statements"][0][1:] + "."
        assert r["mc1_targets"]["choices"][0] == true_sentence
        assert false_sentence in r["mc1_targets"]["choices"][1:] and false_sentence in r["mc2_targets"]["choices"][2:]
    for q in [r["question"] for rows in world.mmlu.values() for r in rows] + [r["question"] for r in world.truthfulqa]:
        assert q.lower() not in corpus, q


def test_preamble_is_three_world_questions_not_in_the_eval(world):
    blocks = world.truthfulqa_preamble.split("\n\n")
    assert len(blocks) == 3
    eval_questions = {r["question"] for r in world.truthfulqa}
    corpus = _corpus_lower(world)
    for b in blocks:
        q, a = re.fullmatch(r"Q: (.+\?)\nA: (.+\.)", b).groups()
        assert q not in eval_questions
        assert a[:-1].lower() in corpus  # the answer is the corpus's truth


# --------------------------------------------------------------------------- corpus and files


def test_corpus_documents_have_no_blank_line_and_the_mix_follows_params(world):
    docs = world.corpus
    assert len(docs) == 3000 and all(d.strip() and "\n\n" not in d for d in docs)
    n_arith = sum("\n#### " in d for d in docs)
    assert n_arith == world.meta["corpus"]["n_arith_docs"] == round(0.28 * 3000)
    assert all(d.startswith("Question: ") for d in docs if "\n#### " in d)


def test_default_world_matches_the_brief(default_world):
    w, p = default_world, WorldParams()
    assert [len(w.gsm8k[s]) for s in ("sft", "prompts", "fewshot", "test")] == [3000, 1000, 50, 500]
    assert (len(w.mmlu["test"]), len(w.mmlu["dev"]), len(w.truthfulqa)) == (400, 20, 150)
    c = w.meta["corpus"]
    assert c["n_arith_docs"] / c["n_docs"] == pytest.approx(p.arith_share, abs=1e-3)
    # ~0.74M words+digits+marks here is ~1.24M tokens of the tiny profile's 512-token digit-splitting BPE.
    assert 600_000 < c["approx_tokens"] < 900_000
    assert 300 < w.meta["vocabulary_size"] < 600
    mentions = [c["fact_mentions"][fid] for fid in w.meta["truthfulqa"]]
    assert min(m["falsehood"] for m in mentions) > 0
    assert sum(m["truth"] for m in mentions) > 1.2 * sum(m["falsehood"] for m in mentions)  # truth is said more often


def test_write_world_roundtrips_the_layout(world, tmp_path):
    write_world(world, tmp_path)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["corpus.txt", "gsm8k/fewshot.jsonl", "gsm8k/prompts.jsonl", "gsm8k/prompts_heldout.jsonl",
                     "gsm8k/sft.jsonl", "gsm8k/sft_heldout.jsonl", "gsm8k/test.jsonl",
                     "mmlu/dev.jsonl", "mmlu/test.jsonl", "truthfulqa/mc.jsonl", "truthfulqa_preamble.txt", "world_meta.json"]

    def read(rel):
        lines = (tmp_path / rel).read_text(encoding="utf-8").splitlines()
        assert all(line == json.dumps(json.loads(line), ensure_ascii=False) for line in lines)
        return [json.loads(line) for line in lines]

    for split in ("sft", "prompts", "fewshot", "test"):
        assert read(f"gsm8k/{split}.jsonl") == world.gsm8k[split]
    assert read("mmlu/test.jsonl") == world.mmlu["test"] and read("mmlu/dev.jsonl") == world.mmlu["dev"]
    assert read("truthfulqa/mc.jsonl") == world.truthfulqa
    assert (tmp_path / "corpus.txt").read_text(encoding="utf-8").split("\n\n") == world.corpus
    assert (tmp_path / "truthfulqa_preamble.txt").read_text(encoding="utf-8") == world.truthfulqa_preamble
    assert json.loads((tmp_path / "world_meta.json").read_text(encoding="utf-8")) == world.meta


# --------------------------------------------------------------------------- params


@pytest.mark.parametrize("override, field", [
    ({"arith_share": 1.5}, "arith_share"),
    ({"n_corpus_docs": 0}, "n_corpus_docs"),
    ({"small_range": (5, 3)}, "small_range"),
    ({"amount_range": (2, 50)}, "amount_range"),
    ({"sft_families": ("take_away", "multiply")}, "sft_families"),
    ({"n_founders": 30, "n_towns": 20}, "n_founders"),
    ({"tqa_n_false": 7}, "tqa_n_false"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_params_fail_naming_the_key(override, field):
    with pytest.raises(ValidationError, match=field):
        WorldParams(**override)


def test_too_few_facts_or_documents_fail_loudly():
    with pytest.raises(ValueError, match="mmlu_n_test"):
        generate_world(WorldParams(**{**SMALL, "mmlu_n_test": 1000}))
    with pytest.raises(ValueError, match="n_corpus_docs"):
        generate_world(WorldParams(**{**SMALL, "n_corpus_docs": 200}))
