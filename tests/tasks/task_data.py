"""Small generated data for the task workflow tests: tagged sentences and SQuAD-style questions.

Generated (not real text): names, companies and places from short lists placed in templates, so a few
training steps learn them and a gold answer is known exactly.
"""

from __future__ import annotations

import json
import random

PEOPLE = ["Anna Berg", "Tom", "Maria Lopez", "Ken Ito", "Olga", "Paul Smith", "Lena Park"]
ORGS = ["Acme Corp", "Globex", "Initech", "Umbrella Bank", "Hooli"]
PLACES = ["Paris", "New York", "Oslo", "Cape Town", "Lima", "Kyoto"]
FILLER = "the a of and in to on with for today after new".split()
TEMPLATES = [
    ["{PER}", "works", "at", "{ORG}", "in", "{LOC}"],
    ["yesterday", "{PER}", "visited", "{LOC}"],
    ["{ORG}", "opened", "an", "office", "in", "{LOC}", "with", "{PER}"],
    ["{PER}", "and", "{PER}", "met", "today"],
]


def tagged_sentences(n: int, seed: int) -> list[dict]:
    """``n`` rows ``{"tokens", "tags"}`` in IOB2 (PER, ORG, LOC; multi-word names give I- tags)."""
    rng = random.Random(seed)
    pools = {"PER": PEOPLE, "ORG": ORGS, "LOC": PLACES}
    rows = []
    for i in range(n):
        tokens, tags = [], []
        for slot in TEMPLATES[i % len(TEMPLATES)]:
            if slot.startswith("{"):
                kind = slot[1:-1]
                words = rng.choice(pools[kind]).split()
                tokens += words
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
            else:
                tokens.append(slot)
                tags.append("O")
        if rng.random() < 0.5:
            tokens.append(rng.choice(FILLER))
            tags.append("O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def squad_examples(n: int, seed: int, *, impossible: float = 0.0) -> list[dict]:
    """``n`` JSONL rows ``{"id", "question", "context", "answers"}``: a short biography and a question on it;
    a share ``impossible`` asks about a person the context does not name (no answer: SQuAD v2)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        person, place, org = rng.choice(PEOPLE), rng.choice(PLACES), rng.choice(ORGS)
        filler = " ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 6)))
        context = f"{person} was born in {place}. Later {person} worked for {org} {filler}."
        kind = i % 2
        question, answer = ((f"Where was {person} born?", place) if kind == 0 else
                            (f"Which company did {person} work for?", org))
        answers = {"text": [answer], "answer_start": [context.index(answer)]}
        if rng.random() < impossible:
            other = next(p for p in PEOPLE if p != person)
            question = question.replace(person, other)
            answers = {"text": [], "answer_start": []}
        rows.append({"id": f"q{i}", "question": question, "context": context, "answers": answers})
    return rows


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)
