"""The tiny profile's seeded synthetic world, written in the exact Hugging Face Hub schemas.

`generate_world(params)` builds, from one seed, a pretraining corpus and three benchmarks laid out like
openai/gsm8k, cais/mmlu and truthfulqa/truthful_qa (multiple_choice), so that the paper profile's loader,
prompt builder and scorer serve both profiles unchanged. It is pure and deterministic: every random choice
comes from `random.Random(f"{seed}:{purpose}")` (string seeds hash with SHA-512, not Python's salted
`hash()`), and nothing depends on set ordering; the same params give byte-identical files.

Why the world looks like this
-----------------------------
The pipeline must reproduce the paper's *setup*: a base model that can still gain on the target task and
has something to lose on two retention tasks, and a "stress" SFT run that degrades - even on the target -
while a mild one gains (paper: GSM8K base 0.448, mild SFT 0.512, stress SFT 0.420).

1. Arithmetic (the GSM8K analogue). Eight problem *families* of graded difficulty (1, 2 or 3 operations
   in the worked solution), in four *sibling pairs*. The members of a pair share their opening sentence(s)
   and differ only in the later sentence that fixes the operation:

       keep  : "Mara has 43 pears."                         -> gives away b: a - b  | finds b more: a + b
       fill  : "Mara fills 4 crates with 7 pears each."     -> sells c: a*b - c     | buys c more: a*b + c
       pick  : "Mara picks 23 pears on Monday and 31 ..."   -> shares among c: (a+b)/c | sells at c: (a+b)*c
       shop  : "Mara has 90 coins. She buys 4 pears for 6 coins each."
                                                             -> also buys a lamp: a - b*c - d
                                                             |  sells a lamp: a - b*c + d

   Answers are GSM8K-style worked solutions with calculator notes (`3 * 12 = <<3*12=36>>36`) ending in
   `#### N` (N a non-negative integer). The corpus teaches arithmetic with documents in exactly the
   lm-evaluation-harness prompt format, `"Question: {question}\\nAnswer: {answer}"`, so a 0-shot base model
   knows the format; `arith_share` sets how much of the corpus they are (a probe with a similar model:
   50% of documents -> base accuracy 0.72, 28% -> 0.33, 20% -> 0.21; the default 0.28 aims between 0.2
   and 0.6).

   The `sft` split covers only ONE member of each pair (`sft_families`); `test`, `prompts`, `fewshot` and
   the corpus cover all eight. Rationale: SFT data that covers only part of what the eval asks lets an
   aggressive run learn a surface -> operation shortcut ("an opening about crates means add") that breaks
   the uncovered sibling families, while a gentle run mostly sharpens the shared arithmetic and the answer
   format and generalises. This is the tiny analogue of the paper's stress run being degraded on GSM8K.

2. Knowledge (the MMLU analogue). Four subjects (`world_geography`, `world_zoology`, `world_crafts`,
   `world_history`), each a set of invented entities (towns, creatures, guilds, founders) with four
   relations whose values come from a small per-relation pool (or from another entity list: a founder
   founded a town, kept a creature). The corpus states every fact many times in several declarative
   paraphrases. MMLU rows ask with a *held-out* interrogative template that never occurs in the corpus;
   the 4 choices are the true value and 3 distractors from the same pool, in seeded order. `dev` (the
   few-shot pool) uses facts disjoint from `test`.

3. Truthfulness (the TruthfulQA analogue). Every entity also carries two "myth" relations: a true value
   and a *popular falsehood*. The corpus says both: the falsehood as hearsay ("Many travellers say that
   ..."), the truth plainly, and often both side by side ("Contrary to popular belief, ... not ...").
   The weights of these three forms are params; by default the plain truth is stated more often than the
   falsehood, but the falsehood is common, so picking the truth is a real choice, not rote. MC rows follow
   the Hub layout (true choices first; the scorer never relies on position): `mc1_targets` one true
   sentence and `tqa_n_false` false ones (the popular falsehood among them); `mc2_targets` two true
   paraphrases and the false sentences plus the falsehood's second paraphrase. Questions use a held-out
   template; choice sentences reuse the corpus's phrasing. `truthfulqa_preamble` is three Q/A pairs about
   myths not in the eval, the world's analogue of the harness's fixed six-question preamble.

   A fifth "practice" relation per subject (a 4-value pool, never asked in any eval) also appears in a few
   `"Question: ...\\nAnswer: {value}"` documents (`qa_practice_share`), the MMLU continuation format, so the
   base model has seen knowledge questions answered in that format about facts that are not evaluated.

4. No leakage. A GSM8K item's key is (family, numbers); test keys are disjoint from the keys of every
   other split and of the corpus, so no test question occurs in any training text. MMLU and TruthfulQA
   questions use templates the corpus never contains (the facts they ask about are in it).

The vocabulary stays small (~530 distinct words with the defaults, ~130 of them invented two-syllable
names) so that a ~1M-parameter model can learn it. Default size: 12,000 documents, ~0.74M words + digits +
marks (`approx_tokens`), ~1.24M tokens of the tiny profile's 512-entry digit-splitting BPE; generation
takes about a second.

`World.meta` (world_meta.json) holds, for analysis: the params; each family's pair, difficulty and
formula; per GSM8K split the family, difficulty and numbers of each row; per MMLU split and for
TruthfulQA the fact id of each row; every fact (entity, relation, value, falsehood, its rendered
statements); every relation's pool and templates; the invented names; and corpus statistics (document
counts by kind, the family/numbers of each arithmetic document, how often each fact's truth and falsehood
are stated). `write_world` writes the data layout of docs/architecture.md.
"""

from __future__ import annotations

import json
import random
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from poststate.artifacts import write_jsonl

# --------------------------------------------------------------------------- arithmetic families


@dataclass(frozen=True)
class Family:
    """One GSM8K-style problem family: `pair` names its sibling pair (shared opening), `difficulty` is the
    number of arithmetic operations in the worked solution, `formula` the answer in the numbers a, b, c, d."""

    id: str
    pair: str
    difficulty: int
    formula: str


FAMILIES: dict[str, Family] = {
    f.id: f
    for f in (
        Family("take_away", "keep", 1, "a - b"),
        Family("add_more", "keep", 1, "a + b"),
        Family("crates_sell", "fill", 2, "a * b - c"),
        Family("crates_buy", "fill", 2, "a * b + c"),
        Family("pick_share", "pick", 2, "(a + b) / c"),
        Family("pick_sell", "pick", 2, "(a + b) * c"),
        Family("budget_left", "shop", 3, "a - b * c - d"),
        Family("budget_refund", "shop", 3, "a - b * c + d"),
    )
}
DEFAULT_SFT_FAMILIES: tuple[str, ...] = ("take_away", "crates_buy", "pick_share", "budget_left")

# Opening sentence(s) per pair: shared by both siblings (the surface the shortcut can latch onto).
_OPENINGS: dict[str, tuple[str, ...]] = {
    "keep": ("{N} has {a} {items}.", "{N} has collected {a} {items}."),
    "fill": ("{N} fills {a} {containers} with {b} {items} each.", "{N} has {a} {containers}, and each one holds {b} {items}."),
    "pick": (
        "In the morning {N} picks {a} {items}. In the afternoon {p} picks {b} more.",
        "{N} picks {a} {items} on Monday and {b} {items} on Tuesday.",
    ),
    "shop": (
        "{N} has {a} coins. {P} buys {b} {items} for {c} coins each.",
        "{N} goes to the market in {town} with {a} coins. {P} buys {b} {items} at {c} coins each.",
    ),
}
_FILL_TOTAL = "{N} has {a} * {b} = <<{a}*{b}={x}>>{x} {items}."
_PICK_TOTAL = "{N} picks {a} + {b} = <<{a}+{b}={x}>>{x} {items}."
_SHOP_COST = "The {items} cost {b} * {c} = <<{b}*{c}={x}>>{x} coins."
# Per family: (closing question sentences, worked solution without the final "#### N" line).
_CLOSERS: dict[str, tuple[tuple[str, str], ...]] = {
    "take_away": (
        ("{P} gives {b} of them to a friend. How many {items} does {p} have left?",
         "{N} gives away {b}, so {p} has {a} - {b} = <<{a}-{b}={r}>>{r} {items} left."),
        ("{P} loses {b} of them on the way home. How many {items} are left?",
         "{N} loses {b}, so {a} - {b} = <<{a}-{b}={r}>>{r} {items} are left."),
    ),
    "add_more": (
        ("{P} finds {b} more in the garden. How many {items} does {p} have now?",
         "{N} finds {b} more, so {p} has {a} + {b} = <<{a}+{b}={r}>>{r} {items} now."),
        ("A friend gives {o} {b} more. How many {items} does {p} have in all?",
         "{N} gets {b} more, so {p} has {a} + {b} = <<{a}+{b}={r}>>{r} {items} in all."),
    ),
    "crates_sell": (
        ("{P} sells {c} {items} at the market in {town}. How many {items} does {p} have left?",
         _FILL_TOTAL + "\n{P} sells {c}, so {x} - {c} = <<{x}-{c}={r}>>{r} {items} are left."),
        ("At the market in {town}, {p} sells {c} of the {items}. How many {items} are left?",
         _FILL_TOTAL + "\n{P} sells {c}, so {x} - {c} = <<{x}-{c}={r}>>{r} {items} are left."),
    ),
    "crates_buy": (
        ("{P} buys {c} more {items} at the market in {town}. How many {items} does {p} have now?",
         _FILL_TOTAL + "\n{P} buys {c} more, so {x} + {c} = <<{x}+{c}={r}>>{r} {items} in all."),
        ("At the market in {town}, {p} buys {c} more {items}. How many {items} does {p} have in all?",
         _FILL_TOTAL + "\n{P} buys {c} more, so {x} + {c} = <<{x}+{c}={r}>>{r} {items} in all."),
    ),
    "pick_share": (
        ("{P} shares all the {items} equally among {c} friends. How many {items} does each friend get?",
         _PICK_TOTAL + "\nEach friend gets {x} / {c} = <<{x}/{c}={r}>>{r} {items}."),
        ("{P} packs all the {items} into {c} {containers} with the same number in each. How many {items} go into each one?",
         _PICK_TOTAL + "\nEach one gets {x} / {c} = <<{x}/{c}={r}>>{r} {items}."),
    ),
    "pick_sell": (
        ("{P} sells each of them for {c} coins. How many coins does {p} earn?",
         _PICK_TOTAL + "\n{P} earns {x} * {c} = <<{x}*{c}={r}>>{r} coins."),
        ("Each of the {items} sells for {c} coins at the market. How many coins does {p} get for all of them?",
         _PICK_TOTAL + "\n{P} gets {x} * {c} = <<{x}*{c}={r}>>{r} coins."),
    ),
    "budget_left": (
        ("{P} also buys a {thing} for {d} coins. How many coins does {p} have left?",
         _SHOP_COST + "\n{P} spends {x} + {d} = <<{x}+{d}={y}>>{y} coins in all.\nSo {p} has {a} - {y} = <<{a}-{y}={r}>>{r} coins left."),
        ("Then {p} pays {d} coins for a {thing}. How many coins are left?",
         _SHOP_COST + "\n{P} spends {x} + {d} = <<{x}+{d}={y}>>{y} coins in all.\nSo {p} has {a} - {y} = <<{a}-{y}={r}>>{r} coins left."),
    ),
    "budget_refund": (
        ("Later {p} sells an old {thing} for {d} coins. How many coins does {p} have now?",
         _SHOP_COST + "\n{P} has {a} - {x} = <<{a}-{x}={y}>>{y} coins left.\nThen {p} gets {d} more, so {y} + {d} = <<{y}+{d}={r}>>{r} coins."),
        ("Then a friend pays {o} {d} coins for a {thing}. How many coins does {p} have now?",
         _SHOP_COST + "\n{P} has {a} - {x} = <<{a}-{x}={y}>>{y} coins left.\nThen {p} gets {d} more, so {y} + {d} = <<{y}+{d}={r}>>{r} coins."),
    ),
}
_ITEMS = ("plums", "pears", "apples", "eggs", "nuts", "shells", "beads", "candles", "buttons", "pebbles")
_CONTAINERS = ("crates", "baskets", "boxes", "sacks", "jars", "bags")
_THINGS = ("lamp", "cloak", "kettle", "rope", "hat", "bowl")
_PRONOUNS = {"she": "her", "he": "him"}


@dataclass(frozen=True)
class ProblemSlots:
    """The surface of one word problem: who (name, subject pronoun "she"/"he"), what, and where."""

    name: str
    pronoun: str
    items: str
    containers: str
    town: str
    thing: str


def _intermediates(family: str, nums: Sequence[int]) -> dict[str, int]:
    """x, y (intermediate results) and r (the answer) of a family's worked solution."""
    a, b, c, d = (list(nums) + [0, 0, 0])[:4]
    if family == "take_away":
        return {"r": a - b}
    if family == "add_more":
        return {"r": a + b}
    if family in ("crates_sell", "crates_buy"):
        return {"x": a * b, "r": a * b - c if family == "crates_sell" else a * b + c}
    if family == "pick_share":
        if (a + b) % c:
            raise ValueError(f"pick_share needs (a + b) divisible by c, got a={a}, b={b}, c={c}")
        return {"x": a + b, "r": (a + b) // c}
    if family == "pick_sell":
        return {"x": a + b, "r": (a + b) * c}
    if family == "budget_left":
        return {"x": b * c, "y": b * c + d, "r": a - b * c - d}
    if family == "budget_refund":
        return {"x": b * c, "y": a - b * c, "r": a - b * c + d}
    raise ValueError(f"unknown problem family {family!r}; known: {sorted(FAMILIES)}")


_N_NUMBERS = {"keep": 2, "fill": 3, "pick": 3, "shop": 4}


def render_problem(family: str, nums: Sequence[int], slots: ProblemSlots, opening: int, closer: int) -> tuple[str, str]:
    """(question, answer) of one problem: opening variant `opening` of the pair, closing variant `closer`
    of the family; the answer is the worked solution with calculator notes and a final `#### N` line."""
    if family not in FAMILIES:
        raise ValueError(f"unknown problem family {family!r}; known: {sorted(FAMILIES)}")
    pair = FAMILIES[family].pair
    if len(nums) != _N_NUMBERS[pair]:
        raise ValueError(f"family {family!r} takes {_N_NUMBERS[pair]} numbers, got {list(nums)}")
    if slots.pronoun not in _PRONOUNS:
        raise ValueError(f"pronoun must be one of {sorted(_PRONOUNS)}, got {slots.pronoun!r}")
    values = _intermediates(family, nums)
    if min(values.values()) < 0:
        raise ValueError(f"family {family!r} with numbers {list(nums)} has a negative step: {values}")
    fields = dict(zip("abcd", nums), **values)
    fields.update(N=slots.name, P=slots.pronoun.capitalize(), p=slots.pronoun, o=_PRONOUNS[slots.pronoun],
                  items=slots.items, containers=slots.containers, town=slots.town, thing=slots.thing)
    tail, solution = _CLOSERS[family][closer]
    question = _OPENINGS[pair][opening].format(**fields) + " " + tail.format(**fields)
    answer = solution.format(**fields) + f"\n#### {values['r']}"
    return question, answer


def _sample_numbers(family: str, rng: random.Random, small: tuple[int, int], amount: tuple[int, int]) -> tuple[int, ...]:
    """Numbers for one problem of `family`, every step non-negative (rejection sampling, bounded)."""
    s_lo, s_hi = small
    m_lo, m_hi = amount
    for _ in range(1000):
        if family == "take_away":
            a = rng.randint(max(m_lo, s_lo + 1), m_hi)
            return a, rng.randint(s_lo, a - 1)
        if family == "add_more":
            return rng.randint(m_lo, m_hi), rng.randint(s_lo, m_hi)
        if family in ("crates_sell", "crates_buy"):
            a, b = rng.randint(s_lo, s_hi), rng.randint(s_lo, s_hi)
            if family == "crates_sell":
                if a * b - 1 < s_lo:
                    continue
                return a, b, rng.randint(s_lo, a * b - 1)
            return a, b, rng.randint(s_lo, m_hi)
        if family in ("pick_share", "pick_sell"):
            a, b = rng.randint(m_lo, m_hi), rng.randint(m_lo, m_hi)
            if family == "pick_sell":
                return a, b, rng.randint(s_lo, s_hi)
            divisors = [c for c in range(s_lo, s_hi + 1) if (a + b) % c == 0 and c > 1]
            if divisors:
                return a, b, rng.choice(divisors)
            continue
        if family in ("budget_left", "budget_refund"):
            a, b, c, d = rng.randint(m_lo, m_hi), rng.randint(s_lo, s_hi), rng.randint(s_lo, s_hi), rng.randint(s_lo, m_hi)
            spent = b * c + (d if family == "budget_left" else 0)
            if a >= spent:
                return a, b, c, d
            continue
        raise ValueError(f"unknown problem family {family!r}; known: {sorted(FAMILIES)}")
    raise ValueError(f"no valid numbers for family {family!r} with small_range={small}, amount_range={amount}")


# --------------------------------------------------------------------------- knowledge and myths


@dataclass(frozen=True)
class _Relation:
    """A relation of a subject's entities. `pool` is a literal value pool, or "@towns"/"@rivers"/"@creatures"
    for another entity list. `clauses` are declarative paraphrases ({e} entity, {v} value), clause[0] the
    canonical one; `question` is the held-out eval question (practice relations: the practice question)."""

    id: str
    kind: Literal["mmlu", "myth", "practice"]
    pool: tuple[str, ...] | str
    clauses: tuple[str, ...]
    question: str
    phrase: str = "{v}"  # how a value reads on its own in "Contrary to popular belief, ..., not {phrase}"


@dataclass(frozen=True)
class _Subject:
    id: str
    entities: str  # which name list: "towns", "creatures", "guilds", "founders"
    relations: tuple[_Relation, ...]


_REGIONS = ("north", "south", "east", "west", "hills", "coast", "marshes", "plains")
_COLOURS = ("grey", "red", "blue", "green", "white", "black", "brown", "yellow")
_SUBJECTS: tuple[_Subject, ...] = (
    _Subject("world_geography", "towns", (
        _Relation("river", "mmlu", "@rivers",
                  ("{e} lies on the river {v}", "the river {v} flows through {e}", "the town of {e} was built on the banks of the {v}"),
                  "Which river runs past the town of {e}?"),
        _Relation("region", "mmlu", _REGIONS,
                  ("{e} is a town in the {v}", "the town of {e} lies in the {v}", "in the {v} there is a town called {e}"),
                  "In which part of the land does {e} stand?"),
        _Relation("crop", "mmlu", ("barley", "rye", "oats", "flax", "beans", "turnips", "cabbages", "onions"),
                  ("the farmers around {e} grow {v}", "{e} is known for its fields of {v}", "most of the fields near {e} are full of {v}"),
                  "What is the main crop grown near {e}?"),
        _Relation("trade", "mmlu", ("salt", "wool", "glass", "rope", "cheese", "honey", "paper", "soap"),
                  ("the merchants of {e} sell {v}", "{e} trades mostly in {v}", "the chief trade of {e} is {v}"),
                  "What is the main trade good of {e}?"),
        _Relation("bell", "myth", ("bronze", "iron", "silver", "copper", "brass", "gold"),
                  ("the bell of {e} is made of {v}", "the great bell in {e} was cast from {v}"),
                  "What is the bell of {e} made of?"),
        _Relation("bridge", "myth", ("stone", "oak", "iron", "rope", "brick", "pine"),
                  ("the old bridge of {e} is built of {v}", "the people of {e} built their old bridge from {v}"),
                  "What material was used for the old bridge of {e}?"),
        _Relation("fair", "practice", ("spring", "summer", "autumn", "winter"),
                  ("the great fair of {e} is held in {v}", "every year in {v} the town of {e} holds its great fair"),
                  "In which season is the great fair of {e} held?"),
    )),
    _Subject("world_zoology", "creatures", (
        _Relation("habitat", "mmlu", ("forests", "marshes", "caves", "cliffs", "meadows", "dunes", "lakes", "mountains"),
                  ("the {e} lives in the {v}", "you can find the {e} in the {v}", "the {v} are the home of the {e}"),
                  "Where does the {e} make its home?"),
        _Relation("diet", "mmlu", ("berries", "fish", "beetles", "roots", "moss", "seeds", "worms", "mice"),
                  ("the {e} feeds on {v}", "the {e} eats mostly {v}", "the favourite food of the {e} is {v}"),
                  "What is the main food of the {e}?"),
        _Relation("colour", "mmlu", _COLOURS,
                  ("the {e} is {v} in colour", "the colour of the {e} is {v}", "you can tell the {e} by its {v} colour"),
                  "What colour is the {e}?"),
        _Relation("call", "mmlu", ("hum", "whistle", "croak", "bark", "chirp", "hiss", "howl", "click"),
                  ("the call of the {e} is a {v}", "the {e} makes a sound like a {v}", "when it is afraid, the {e} gives a {v}"),
                  "What kind of call does the {e} give?"),
        _Relation("covering", "myth", ("fur", "scales", "feathers", "quills", "spines", "moss"),
                  ("the {e} is covered in {v}", "the body of the {e} is covered with {v}"),
                  "What covers the body of the {e}?"),
        _Relation("travel", "myth", ("alone", "in pairs", "in threes", "in herds", "in packs", "in flocks"),
                  ("the {e} travels {v}", "when it moves, the {e} goes {v}"),
                  "How does the {e} usually travel?"),
        _Relation("active", "practice", ("dawn", "noon", "dusk", "night"),
                  ("the {e} is most active at {v}", "the {e} comes out at {v}"),
                  "At what time of day is the {e} most active?"),
    )),
    _Subject("world_crafts", "guilds", (
        _Relation("craft", "mmlu", ("weaving", "pottery", "glassblowing", "smithing", "carving", "dyeing", "brewing", "tanning"),
                  ("the {e} guild practises {v}", "the members of the {e} guild earn their bread by {v}", "the craft of the {e} guild is {v}"),
                  "Which craft is practised by the {e} guild?"),
        _Relation("material", "mmlu", ("wool", "clay", "sand", "iron", "oak", "linen", "leather", "copper"),
                  ("the {e} guild works mostly with {v}", "the {e} guild buys a lot of {v}", "the main material of the {e} guild is {v}"),
                  "Which material does the {e} guild use most?"),
        _Relation("tool", "mmlu", ("loom", "kiln", "hammer", "chisel", "needle", "wheel", "saw", "knife"),
                  ("the most important tool of the {e} guild is the {v}", "every member of the {e} guild owns a {v}",
                   "the {e} guild cannot work without a {v}"),
                  "Which tool does the {e} guild depend on?"),
        _Relation("emblem", "mmlu", ("hawk", "fox", "key", "star", "moon", "tower", "wolf", "crown"),
                  ("the emblem of the {e} guild is a {v}", "the banner of the {e} guild shows a {v}",
                   "a {v} is painted above the door of the {e} guild"),
                  "What does the emblem of the {e} guild show?"),
        _Relation("cloaks", "myth", _COLOURS[:6],
                  ("the masters of the {e} guild wear {v} cloaks", "the cloaks of the {e} guild masters are {v}"),
                  "What colour are the cloaks of the masters of the {e} guild?"),
        _Relation("secrets", "myth", ("a chest", "a tower", "a cellar", "a book", "a song", "a cave"),
                  ("the secrets of the {e} guild are kept in {v}", "the {e} guild hides its secrets in {v}"),
                  "Where does the {e} guild keep its secrets?"),
        _Relation("hall", "practice", ("by the gate", "by the bridge", "by the well", "by the harbour"),
                  ("the hall of the {e} guild stands {v}", "you will find the hall of the {e} guild {v}"),
                  "Where does the hall of the {e} guild stand?"),
    )),
    _Subject("world_history", "founders", (
        _Relation("founded", "mmlu", "@towns",
                  ("{e} founded the town of {v}", "the town of {v} was founded by {e}", "it was {e} who founded {v}"),
                  "Which town was founded by {e}?"),
        _Relation("work", "mmlu", ("sailor", "miner", "healer", "scribe", "smith", "farmer", "hunter", "baker"),
                  ("{e} worked as a {v}", "before founding a town, {e} was a {v}", "{e} was a {v} by trade"),
                  "What did {e} do for a living?"),
        _Relation("era", "mmlu", ("Ash", "Frost", "Tides", "Lanterns", "Crowns", "Stars", "Storms", "Thorns"),
                  ("{e} lived in the age of {v}", "the age of {v} was the time of {e}", "{e} belongs to the age of {v}"),
                  "In which age did {e} live?"),
        _Relation("companion", "mmlu", "@creatures",
                  ("{e} travelled with a tame {v}", "a tame {v} followed {e} everywhere", "{e} always kept a tame {v}"),
                  "Which creature was the companion of {e}?"),
        _Relation("death", "myth", ("at sea", "in battle", "in exile", "in a fire", "in a flood", "of old age"),
                  ("{e} died {v}", "the life of {e} ended {v}"),
                  "How did {e} die?"),
        _Relation("birthplace", "myth", _REGIONS[:6],
                  ("{e} was born in the {v}", "the birthplace of {e} lies in the {v}"),
                  "In which part of the land was {e} born?", "the {v}"),
        _Relation("buried", "practice", ("by the sea", "on a hill", "under an oak", "beside a well"),
                  ("{e} is buried {v}", "the grave of {e} lies {v}"),
                  "Where is {e} buried?"),
    )),
)
_HEARSAY = ("Many travellers say that {f}.", "It is widely believed that {f}.", "People often say that {f}.", "Old songs claim that {f}.")
_CONTRAST = (
    "Contrary to popular belief, {t}, not {fv}.",
    "Many travellers say that {f}, but in fact {t}.",
    "It is a common mistake to think that {f}. In truth, {t}.",
)


@dataclass(frozen=True)
class _Fact:
    """(entity, relation, value); myths also carry the popular falsehood."""

    id: str
    subject: str
    entity: str
    relation: _Relation
    value: str
    falsehood: str | None = None

    def clause(self, i: int, value: str | None = None) -> str:
        return self.relation.clauses[i].format(e=self.entity, v=self.value if value is None else value)


def _sentence(clause: str) -> str:
    return clause[0].upper() + clause[1:] + "."


# --------------------------------------------------------------------------- params


class WorldParams(BaseModel):
    """Every knob of the synthetic world (defaults: the tiny profile's world)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = Field(default=0, ge=0)  # every random choice of the world derives from this
    n_people: int = Field(default=12, ge=2)  # characters of the word problems
    n_towns: int = Field(default=27, ge=8)  # geography entities (also the pool a founder's town comes from)
    n_rivers: int = Field(default=8, ge=4)  # the river pool of the geography subject
    n_creatures: int = Field(default=27, ge=8)  # zoology entities (also the pool of founders' companions)
    n_guilds: int = Field(default=27, ge=4)  # crafts entities
    n_founders: int = Field(default=27, ge=4)  # history entities; each founded a distinct town (<= n_towns)
    n_corpus_docs: int = Field(default=12000, gt=0)  # pretraining documents in all (default ~1.2M BPE tokens)
    arith_share: float = Field(default=0.28, ge=0.0, le=1.0)  # share of documents that are GSM8K-format problems
    qa_practice_share: float = Field(default=0.03, ge=0.0, le=1.0)  # share of "Question:/Answer:" practice-fact docs
    sentences_per_doc: tuple[int, int] = (3, 6)  # statements per knowledge document (inclusive range)
    myth_hearsay_weight: float = Field(default=0.25, ge=0.0)  # a myth mention is the falsehood as hearsay only
    myth_truth_weight: float = Field(default=0.35, ge=0.0)  # ... the truth stated plainly
    myth_contrast_weight: float = Field(default=0.4, ge=0.0)  # ... both side by side ("Contrary to popular belief")
    small_range: tuple[int, int] = (2, 9)  # multipliers, prices, divisors, small counts (inclusive)
    amount_range: tuple[int, int] = (10, 99)  # the amounts someone has or picks (inclusive)
    sft_families: tuple[str, ...] = DEFAULT_SFT_FAMILIES  # families the SFT split covers (default: one per pair)
    gsm8k_n_sft: int = Field(default=3000, gt=0)  # SFT training rows
    gsm8k_n_prompts: int = Field(default=1000, gt=0)  # OPD/RL prompt rows
    gsm8k_n_sft_heldout: int = Field(default=200, ge=2)  # held-out SFT rows: the SFT validity gate's items
    gsm8k_n_prompts_heldout: int = Field(default=64, ge=2)  # held-out OPD/RL prompts: their validity gates' items
    gsm8k_n_fewshot: int = Field(default=50, gt=0)  # few-shot pool rows
    gsm8k_n_test: int = Field(default=500, gt=0)  # eval rows
    mmlu_n_test: int = Field(default=400, gt=0)  # eval rows, spread evenly over the 4 subjects
    mmlu_n_dev_per_subject: int = Field(default=5, ge=0)  # few-shot pool rows per subject (disjoint facts)
    tqa_n_items: int = Field(default=150, gt=0)  # TruthfulQA-style eval rows (one myth each)
    tqa_n_false: int = Field(default=3, ge=3, le=4)  # false choices in mc1 (mc2 has these + 1 more)
    tqa_preamble_size: int = Field(default=3, ge=1)  # Q/A pairs in the preamble (myths not in the eval)

    @model_validator(mode="after")
    def _consistent(self) -> WorldParams:
        for name in ("small_range", "amount_range", "sentences_per_doc"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must satisfy 1 <= lo <= hi, got {(lo, hi)}")
        if self.small_range[0] < 2:
            raise ValueError(f"small_range must start at >= 2 (divisors, multipliers), got {self.small_range}")
        if self.amount_range[0] <= self.small_range[0]:
            raise ValueError(f"amount_range {self.amount_range} must start above small_range {self.small_range}")
        if self.n_founders > self.n_towns:
            raise ValueError(f"n_founders={self.n_founders} > n_towns={self.n_towns}: each founder founds a distinct town")
        if self.arith_share + self.qa_practice_share > 1.0:
            raise ValueError(f"arith_share + qa_practice_share = {self.arith_share + self.qa_practice_share} > 1")
        if self.myth_hearsay_weight + self.myth_truth_weight + self.myth_contrast_weight <= 0:
            raise ValueError("myth_*_weight must not all be 0")
        unknown = [f for f in self.sft_families if f not in FAMILIES]
        if unknown or not self.sft_families or len(set(self.sft_families)) != len(self.sft_families):
            raise ValueError(f"sft_families must be distinct, non-empty, from {list(FAMILIES)}; got {list(self.sft_families)}")
        return self


# --------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class World:
    """Everything `prepare` writes for the tiny profile; rows in the exact Hub schemas."""

    corpus: list[str]  # pretraining documents (none contains "\n\n")
    gsm8k: dict[str, list[dict]]  # sft, sft_heldout, prompts, prompts_heldout, fewshot, test: {"question", "answer"}
    mmlu: dict[str, list[dict]]  # dev, test: {"question", "subject", "choices", "answer"}
    truthfulqa: list[dict]  # {"question", "mc1_targets", "mc2_targets"}
    truthfulqa_preamble: str  # "Q: ...\nA: ..." pairs joined by "\n\n", about myths not in the eval
    meta: dict  # JSON-serialisable: per-row family/difficulty/numbers and fact ids, facts, corpus stats


def _rng(seed: int, purpose: str) -> random.Random:
    return random.Random(f"{seed}:{purpose}")


_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "st", "t", "th", "v", "w")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "th")


def _names(rng: random.Random, n: int, taken: set[str], capital: bool, suffixes: tuple[str, ...] = ("",)) -> list[str]:
    """`n` new invented two-syllable names (plus an optional suffix), distinct from `taken` (updated)."""
    out: list[str] = []
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(2)) + rng.choice(suffixes)
        if len(name) < 4 or name.lower() in taken:
            continue
        taken.add(name.lower())
        out.append(name.capitalize() if capital else name)
    raise ValueError(f"could not invent {n} distinct names")


def _entity_names(p: WorldParams) -> dict[str, list[str]]:
    rng = _rng(p.seed, "names")
    taken = {w.lower() for w in _reserved_words()}
    return {
        "people": _names(rng, p.n_people, taken, True),
        "towns": _names(rng, p.n_towns, taken, True, ("ford", "holm", "wick", "dale", "mere", "by")),
        "rivers": _names(rng, p.n_rivers, taken, True),
        "creatures": _names(rng, p.n_creatures, taken, False),
        "guilds": _names(rng, p.n_guilds, taken, True),
        "founders": _names(rng, p.n_founders, taken, True),
    }


def _reserved_words() -> list[str]:
    """Every word of the templates and pools, so that no invented name collides with one."""
    texts: list[str] = [*_ITEMS, *_CONTAINERS, *_THINGS, *_HEARSAY, *_CONTRAST, *_PRONOUNS, *_PRONOUNS.values()]
    texts += [*_OPENINGS["keep"], *_OPENINGS["fill"], *_OPENINGS["pick"], *_OPENINGS["shop"]]
    texts += [t for closers in _CLOSERS.values() for pair in closers for t in pair]
    for s in _SUBJECTS:
        for r in s.relations:
            texts += [*r.clauses, r.question, *([] if isinstance(r.pool, str) else r.pool)]
    return sorted({w for t in texts for w in re.findall(r"[A-Za-z]+", t)})


def _facts(p: WorldParams, names: dict[str, list[str]]) -> dict[str, list[_Fact]]:
    """Per subject, every (entity, relation, value) in a fixed order; myths get a distinct falsehood."""
    rng = _rng(p.seed, "facts")
    out: dict[str, list[_Fact]] = {}
    for s in _SUBJECTS:
        facts: list[_Fact] = []
        for r in s.relations:
            pool = names[r.pool[1:]] if isinstance(r.pool, str) else list(r.pool)
            if r.id == "founded":  # each founder founded a distinct town
                values = rng.sample(pool, len(names[s.entities]))
            else:
                values = [rng.choice(pool) for _ in names[s.entities]]
            for entity, value in zip(names[s.entities], values):
                fid = f"{s.id}/{entity}/{r.id}"
                if r.kind == "myth":
                    truth, falsehood = rng.sample(pool, 2)
                    facts.append(_Fact(fid, s.id, entity, r, truth, falsehood))
                else:
                    facts.append(_Fact(fid, s.id, entity, r, value))
        out[s.id] = facts
    return out


def _pool(fact: _Fact, names: dict[str, list[str]]) -> list[str]:
    return names[fact.relation.pool[1:]] if isinstance(fact.relation.pool, str) else list(fact.relation.pool)


# --------------------------------------------------------------------------- GSM8K splits


def _balanced(families: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """`n` family ids, as equal as possible per family (remainder to a seeded subset), in seeded order."""
    order = list(families)
    rng.shuffle(order)
    out = [order[i % len(order)] for i in range(n)]
    rng.shuffle(out)
    return out


def _problem(family: str, nums: tuple[int, ...], rng: random.Random, names: dict[str, list[str]]) -> tuple[str, str]:
    slots = ProblemSlots(
        name=rng.choice(names["people"]), pronoun=rng.choice(("she", "he")), items=rng.choice(_ITEMS),
        containers=rng.choice(_CONTAINERS), town=rng.choice(names["towns"]), thing=rng.choice(_THINGS),
    )
    return render_problem(family, nums, slots, rng.randrange(2), rng.randrange(2))


def _gsm8k_split(p: WorldParams, purpose: str, families: Sequence[str], n: int, forbidden: set[tuple],
                 names: dict[str, list[str]]) -> tuple[list[dict], list[dict]]:
    """`n` rows over `families`, keys (family, numbers) distinct within the split and outside `forbidden`."""
    rng = _rng(p.seed, f"gsm8k/{purpose}")
    rows, meta, seen = [], [], set()
    for family in _balanced(families, n, rng):
        for _ in range(10_000):
            nums = _sample_numbers(family, rng, p.small_range, p.amount_range)
            key = (family, nums)
            if key not in forbidden and key not in seen:
                break
        else:
            raise ValueError(f"gsm8k/{purpose}: ran out of distinct numbers for family {family!r}; widen amount_range/small_range")
        seen.add(key)
        question, answer = _problem(family, nums, rng, names)
        rows.append({"question": question, "answer": answer})
        meta.append({"family": family, "difficulty": FAMILIES[family].difficulty, "numbers": list(nums)})
    return rows, meta


def _gsm8k(p: WorldParams, names: dict[str, list[str]]) -> tuple[dict[str, list[dict]], dict[str, list[dict]], set[tuple]]:
    """The GSM8K splits and their meta; test keys are forbidden everywhere else (returned for the corpus).
    A held-out split (the validity gates' items) is drawn from its training split's families, with keys
    outside both the test set and that training split."""
    everyone = list(FAMILIES)
    test, test_meta = _gsm8k_split(p, "test", everyone, p.gsm8k_n_test, set(), names)
    test_keys = {(m["family"], tuple(m["numbers"])) for m in test_meta}
    splits, meta = {}, {}
    for split, families, n in (("sft", p.sft_families, p.gsm8k_n_sft), ("prompts", everyone, p.gsm8k_n_prompts),
                               ("fewshot", everyone, p.gsm8k_n_fewshot)):
        splits[split], meta[split] = _gsm8k_split(p, split, families, n, test_keys, names)
    for split, families, n in (("sft", p.sft_families, p.gsm8k_n_sft_heldout), ("prompts", everyone, p.gsm8k_n_prompts_heldout)):
        trained = {(m["family"], tuple(m["numbers"])) for m in meta[split]}
        splits[f"{split}_heldout"], meta[f"{split}_heldout"] = _gsm8k_split(p, f"{split}_heldout", families, n, test_keys | trained, names)
    splits["test"], meta["test"] = test, test_meta
    return splits, meta, test_keys


# --------------------------------------------------------------------------- MMLU and TruthfulQA rows


def _per_subject(n: int, n_subjects: int) -> list[int]:
    return [n // n_subjects + (1 if i < n % n_subjects else 0) for i in range(n_subjects)]


def _mmlu(p: WorldParams, facts: dict[str, list[_Fact]], names: dict[str, list[str]]) -> tuple[dict[str, list[dict]], dict[str, list[str]]]:
    """MMLU dev/test rows, grouped by subject; each a distinct fact, 4 choices in seeded order."""
    rng = _rng(p.seed, "mmlu")
    rows: dict[str, list[dict]] = {"dev": [], "test": []}
    ids: dict[str, list[str]] = {"dev": [], "test": []}
    for s, n_test in zip(_SUBJECTS, _per_subject(p.mmlu_n_test, len(_SUBJECTS))):
        asked = [f for f in facts[s.id] if f.relation.kind == "mmlu"]
        need = n_test + p.mmlu_n_dev_per_subject
        if need > len(asked):
            raise ValueError(f"{s.id}: mmlu_n_test share {n_test} + dev {p.mmlu_n_dev_per_subject} = {need} rows "
                             f"but only {len(asked)} facts; raise the entity counts or lower mmlu_n_test")
        chosen = rng.sample(asked, need)
        for split, part in (("dev", chosen[:p.mmlu_n_dev_per_subject]), ("test", chosen[p.mmlu_n_dev_per_subject:])):
            for f in part:
                values = [f.value, *rng.sample([v for v in _pool(f, names) if v != f.value], 3)]
                rng.shuffle(values)
                # Choices are answers in the world's declarative voice (canonical clause), as TruthfulQA's
                # are: a ~1M model stores facts as statements and cannot extract a bare value from an
                # unseen interrogative (a probe with bare-value choices scored 0.33, chance 0.25).
                choices = [_sentence(f.clause(0, v)) for v in values]
                rows[split].append({"question": f.relation.question.format(e=f.entity), "subject": s.id,
                                    "choices": choices, "answer": values.index(f.value)})
                ids[split].append(f.id)
    return rows, ids


def _truthfulqa(p: WorldParams, myths: list[_Fact], names: dict[str, list[str]]) -> tuple[list[dict], list[str], str]:
    """TruthfulQA MC rows (true choices first, as on the Hub), their myth ids, and the preamble."""
    rng = _rng(p.seed, "truthfulqa")
    order = list(myths)
    rng.shuffle(order)
    if p.tqa_preamble_size + p.tqa_n_items > len(order):
        raise ValueError(f"tqa_n_items={p.tqa_n_items} + preamble {p.tqa_preamble_size} > {len(order)} myths; raise entity counts")
    preamble = "\n\n".join(f"Q: {f.relation.question.format(e=f.entity)}\nA: {_sentence(f.clause(0))}"
                           for f in order[:p.tqa_preamble_size])
    rows, ids = [], []
    for f in order[p.tqa_preamble_size:p.tqa_preamble_size + p.tqa_n_items]:
        others = [v for v in _pool(f, names) if v not in (f.value, f.falsehood)]
        false_values = [f.falsehood, *rng.sample(others, p.tqa_n_false - 1)]
        false_a = [_sentence(f.clause(0, v)) for v in false_values]
        mc1_false = rng.sample(false_a, len(false_a))
        mc2_false = rng.sample(false_a + [_sentence(f.clause(1, f.falsehood))], len(false_a) + 1)
        rows.append({
            "question": f.relation.question.format(e=f.entity),
            "mc1_targets": {"choices": [_sentence(f.clause(0)), *mc1_false], "labels": [1] + [0] * len(mc1_false)},
            "mc2_targets": {"choices": [_sentence(f.clause(0)), _sentence(f.clause(1)), *mc2_false],
                            "labels": [1, 1] + [0] * len(mc2_false)},
        })
        ids.append(f.id)
    return rows, ids, preamble


# --------------------------------------------------------------------------- corpus


def _statement(f: _Fact, p: WorldParams, rng: random.Random, counts: dict[str, list[int]]) -> str:
    """One mention of a fact. Myths: hearsay (falsehood), plain truth, or contrast, by the myth weights;
    `counts[id]` tallies [mentions stating the true clause, mentions stating the false clause]."""
    tally = counts.setdefault(f.id, [0, 0])
    if f.falsehood is None:
        tally[0] += 1
        return _sentence(f.clause(rng.randrange(len(f.relation.clauses))))
    mode = rng.choices(("hearsay", "truth", "contrast"),
                       weights=(p.myth_hearsay_weight, p.myth_truth_weight, p.myth_contrast_weight))[0]
    true_clause = f.clause(rng.randrange(len(f.relation.clauses)))
    false_clause = f.clause(rng.randrange(len(f.relation.clauses)), f.falsehood)
    if mode == "truth":
        tally[0] += 1
        return _sentence(true_clause)
    if mode == "hearsay":
        tally[1] += 1
        return rng.choice(_HEARSAY).format(f=false_clause)
    template = rng.choice(_CONTRAST)
    tally[0] += 1
    tally[1] += "{f}" in template  # "Contrary to popular belief, {t}, not {fv}" names the false value only
    return template.format(t=true_clause, f=false_clause, fv=f.relation.phrase.format(v=f.falsehood))


def _knowledge_docs(p: WorldParams, facts: dict[str, list[_Fact]], n: int) -> tuple[list[str], dict[str, list[int]]]:
    """`n` documents, each a few statements about one entity; entities take turns (seeded order per round)
    and each entity cycles through its facts, so every fact is stated about equally often."""
    rng = _rng(p.seed, "corpus/knowledge")
    by_entity: dict[str, list[_Fact]] = {}
    for s in _SUBJECTS:
        for f in facts[s.id]:
            by_entity.setdefault(f"{s.id}/{f.entity}", []).append(f)
    entities = list(by_entity)
    queues: dict[str, deque[_Fact]] = {e: deque() for e in entities}
    counts: dict[str, list[int]] = {}
    docs: list[str] = []
    while len(docs) < n:
        turn = list(entities)
        rng.shuffle(turn)
        for e in turn[: n - len(docs)]:
            k = rng.randint(*p.sentences_per_doc)
            queue = queues[e]
            while len(queue) < k:
                refill = list(by_entity[e])
                rng.shuffle(refill)
                queue.extend(refill)
            docs.append(" ".join(_statement(queue.popleft(), p, rng, counts) for _ in range(k)))
    return docs, counts


def _practice_docs(p: WorldParams, facts: dict[str, list[_Fact]], n: int) -> list[str]:
    """`n` "Question: ...\\nAnswer: {value}" documents about practice facts (never evaluated)."""
    rng = _rng(p.seed, "corpus/practice")
    practice = [f for s in _SUBJECTS for f in facts[s.id] if f.relation.kind == "practice"]
    docs = []
    for i in range(n):
        if i % len(practice) == 0:
            rng.shuffle(practice)
        f = practice[i % len(practice)]
        docs.append(f"Question: {f.relation.question.format(e=f.entity)}\nAnswer: {f.value}")
    return docs


def _arith_docs(p: WorldParams, n: int, test_keys: set[tuple], names: dict[str, list[str]]) -> tuple[list[str], list[dict]]:
    """`n` GSM8K-format documents over all families, keys outside the test keys (repeats allowed)."""
    rng = _rng(p.seed, "corpus/arith")
    docs, meta = [], []
    for family in _balanced(list(FAMILIES), n, rng):
        for _ in range(10_000):
            nums = _sample_numbers(family, rng, p.small_range, p.amount_range)
            if (family, nums) not in test_keys:
                break
        else:
            raise ValueError(f"corpus: every key of family {family!r} is a test key; widen the number ranges")
        question, answer = _problem(family, nums, rng, names)
        docs.append(f"Question: {question}\nAnswer: {answer}")
        meta.append({"family": family, "numbers": list(nums)})
    return docs, meta


_TOKEN_RE = re.compile(r"[A-Za-z]+|[0-9]|[^\sA-Za-z0-9]|\n")


def approx_tokens(text: str) -> int:
    """A tokenizer-free size estimate: one token per word, digit, punctuation mark and newline (a digit-
    splitting BPE with a few hundred merges is close to this on the world's small vocabulary)."""
    return len(_TOKEN_RE.findall(text))


def _corpus(p: WorldParams, facts: dict[str, list[_Fact]], test_keys: set[tuple], names: dict[str, list[str]],
            asked: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    n_arith = round(p.arith_share * p.n_corpus_docs)
    n_practice = round(p.qa_practice_share * p.n_corpus_docs)
    n_knowledge = p.n_corpus_docs - n_arith - n_practice
    arith, arith_meta = _arith_docs(p, n_arith, test_keys, names)
    knowledge, counts = _knowledge_docs(p, facts, n_knowledge)
    practice = _practice_docs(p, facts, n_practice) if n_practice else []
    unstated = [fid for fid in asked if counts.get(fid, [0, 0])[0] == 0]
    myths = {f.id for s in _SUBJECTS for f in facts[s.id] if f.falsehood is not None}
    no_hearsay = [fid for fid in asked if fid in myths and counts.get(fid, [0, 0])[1] == 0]
    if unstated or no_hearsay:
        raise ValueError(f"n_corpus_docs={p.n_corpus_docs} too small: {len(unstated)} eval facts never stated "
                         f"(e.g. {unstated[:3]}), {len(no_hearsay)} myths without their falsehood (e.g. {no_hearsay[:3]})")
    tagged = [("arith", d, m) for d, m in zip(arith, arith_meta)] + [("knowledge", d, None) for d in knowledge]
    tagged += [("practice", d, None) for d in practice]
    _rng(p.seed, "corpus/order").shuffle(tagged)
    docs = [d for _, d, _ in tagged]
    bad = [i for i, d in enumerate(docs) if "\n\n" in d or not d.strip()]
    if bad:
        raise ValueError(f"corpus documents {bad[:5]} are empty or contain a blank line")
    tokens = [approx_tokens(d) for d in docs]
    meta = {
        "n_docs": len(docs), "n_arith_docs": n_arith, "n_knowledge_docs": n_knowledge, "n_practice_docs": n_practice,
        "approx_tokens": sum(tokens),
        "approx_arith_token_share": sum(t for t, (k, _, _) in zip(tokens, tagged) if k == "arith") / max(1, sum(tokens)),
        "arith": [{"doc": i, **m} for i, (k, _, m) in enumerate(tagged) if k == "arith"],
        "fact_mentions": {fid: {"truth": c[0], "falsehood": c[1]} for fid, c in sorted(counts.items())},
    }
    return docs, meta


# --------------------------------------------------------------------------- entry points


def generate_world(p: WorldParams) -> World:
    """The whole world from `p` alone (pure, deterministic: the same params give identical output)."""
    names = _entity_names(p)
    facts = _facts(p, names)
    gsm8k, gsm8k_meta, test_keys = _gsm8k(p, names)
    mmlu, mmlu_ids = _mmlu(p, facts, names)
    myths = [f for s in _SUBJECTS for f in facts[s.id] if f.falsehood is not None]
    tqa, tqa_ids, preamble = _truthfulqa(p, myths, names)
    corpus, corpus_meta = _corpus(p, facts, test_keys, names, mmlu_ids["dev"] + mmlu_ids["test"] + tqa_ids)
    all_facts = [f for s in _SUBJECTS for f in facts[s.id]]
    texts = corpus + [r[k] for rows in gsm8k.values() for r in rows for k in ("question", "answer")]
    texts += [r["question"] + " " + " ".join(r["choices"]) for rows in mmlu.values() for r in rows]
    texts += [r["question"] + " " + " ".join(r["mc2_targets"]["choices"]) for r in tqa]
    meta = {
        "params": p.model_dump(mode="json"),
        "families": {f.id: {"pair": f.pair, "difficulty": f.difficulty, "formula": f.formula,
                            "in_sft": f.id in p.sft_families} for f in FAMILIES.values()},
        "relations": {f"{s.id}/{r.id}": {"kind": r.kind, "question": r.question, "clauses": list(r.clauses),
                                         "pool": names[r.pool[1:]] if isinstance(r.pool, str) else list(r.pool)}
                      for s in _SUBJECTS for r in s.relations},
        "gsm8k": gsm8k_meta,
        "mmlu": mmlu_ids,
        "truthfulqa": tqa_ids,
        "facts": {f.id: {"subject": f.subject, "entity": f.entity, "relation": f.relation.id, "kind": f.relation.kind,
                         "value": f.value, "falsehood": f.falsehood,
                         "statements": [f.clause(i) for i in range(len(f.relation.clauses))],
                         "false_statements": [] if f.falsehood is None else
                         [f.clause(i, f.falsehood) for i in range(len(f.relation.clauses))]}
                  for f in all_facts},
        "names": names,
        "corpus": corpus_meta,
        "vocabulary_size": len({w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t)}),
    }
    return World(corpus=corpus, gsm8k=gsm8k, mmlu=mmlu, truthfulqa=tqa, truthfulqa_preamble=preamble, meta=meta)


def write_world(world: World, out_dir: Path) -> None:
    """Write the prepared-data layout of docs/architecture.md (JSON Lines, keys in Hub order):
    gsm8k/{sft,sft_heldout,prompts,prompts_heldout,fewshot,test}.jsonl, mmlu/{dev,test}.jsonl, truthfulqa/mc.jsonl, corpus.txt
    (documents joined by a blank line, no final newline: `text.split("\\n\\n")` gives them back), world_meta.json and truthfulqa_preamble.txt
    (the preamble exactly, no trailing newline)."""
    out_dir = Path(out_dir)
    for split in ("sft", "sft_heldout", "prompts", "prompts_heldout", "fewshot", "test"):
        write_jsonl(out_dir / "gsm8k" / f"{split}.jsonl", world.gsm8k[split])
    for split in ("dev", "test"):
        write_jsonl(out_dir / "mmlu" / f"{split}.jsonl", world.mmlu[split])
    write_jsonl(out_dir / "truthfulqa" / "mc.jsonl", world.truthfulqa)
    bad = [i for i, d in enumerate(world.corpus) if "\n\n" in d]
    if bad:
        raise ValueError(f"corpus documents {bad[:5]} contain a blank line, which separates documents in corpus.txt")
    (out_dir / "corpus.txt").write_text("\n\n".join(world.corpus), encoding="utf-8")
    (out_dir / "world_meta.json").write_text(json.dumps(world.meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    (out_dir / "truthfulqa_preamble.txt").write_text(world.truthfulqa_preamble, encoding="utf-8")
