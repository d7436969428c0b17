"""Write the small MMLU- and HellaSwag-format samples shipped in ``fedalign/data/assets``.

The rows follow the hub schemas (``cais/mmlu``: question, subject, choices, answer;
``Rowan/hellaswag``: ind, activity_label, ctx_a, ctx_b, ctx, endings, source_id, split,
split_type, label) but are written here from small fact tables, so they carry no licence
of their own and need no network. Four groups of 12 rows each: enough for a Dirichlet
partition over the group and a held-out test set in offline tests and demos.

Usage: ``python scripts/build_choice_samples.py`` (deterministic; rewrites both files).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "src" / "fedalign" / "data" / "assets"

CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Norway", "Oslo"),
    ("Australia", "Canberra"),
    ("Spain", "Madrid"),
    ("Greece", "Athens"),
    ("Argentina", "Buenos Aires"),
    ("Thailand", "Bangkok"),
    ("Poland", "Warsaw"),
]
ELEMENTS = [
    ("Fe", "iron"),
    ("Na", "sodium"),
    ("K", "potassium"),
    ("Au", "gold"),
    ("Ag", "silver"),
    ("Cu", "copper"),
    ("Pb", "lead"),
    ("Hg", "mercury"),
    ("Sn", "tin"),
    ("He", "helium"),
    ("O", "oxygen"),
    ("C", "carbon"),
    ("Ca", "calcium"),
    ("Cl", "chlorine"),
]
ANIMALS = [
    ("dolphin", "mammal"),
    ("eagle", "bird"),
    ("salmon", "fish"),
    ("frog", "amphibian"),
    ("crocodile", "reptile"),
    ("bat", "mammal"),
    ("penguin", "bird"),
    ("shark", "fish"),
    ("salamander", "amphibian"),
    ("tortoise", "reptile"),
    ("whale", "mammal"),
    ("ostrich", "bird"),
    ("newt", "amphibian"),
    ("python", "reptile"),
]
CLASSES = ["mammal", "bird", "fish", "amphibian", "reptile"]

ACTIVITIES = {
    "Baking cookies": [
        "a woman takes butter and sugar out of the cupboard",
        "she creams the butter and sugar together in a large bowl",
        "she cracks two eggs into the bowl and stirs them in",
        "she sifts flour into the mixture and folds it gently",
        "she adds a handful of chocolate chips to the dough",
        "she rolls the dough into small balls with her hands",
        "she places the balls on a baking tray lined with paper",
        "she slides the tray into the hot oven",
        "she sets a timer for twelve minutes",
        "she takes the golden cookies out of the oven",
        "she lets the cookies cool on a wire rack",
        "she stacks the cookies on a plate",
        "she offers a cookie to her son",
    ],
    "Washing a car": [
        "a man parks his car in the driveway",
        "he fills a bucket with warm soapy water",
        "he sprays the car with a garden hose",
        "he scrubs the roof with a large sponge",
        "he washes the doors and the windows",
        "he cleans the wheels with a stiff brush",
        "he rinses the soap off with the hose",
        "he dries the car with a soft towel",
        "he applies wax to the hood in small circles",
        "he polishes the wax off until it shines",
        "he vacuums the seats and the floor mats",
        "he wipes the dashboard with a damp cloth",
        "he steps back and admires the clean car",
    ],
    "Playing guitar": [
        "a young man sits down on a stool holding a guitar",
        "he tunes each string while listening closely",
        "he places his fingers on the frets to form a chord",
        "he strums the strings slowly with a pick",
        "he switches to a different chord",
        "he plays a fast rhythm with his right hand",
        "he hums the melody of a song",
        "he picks out a short solo on the high strings",
        "he taps his foot to keep the beat",
        "he slows down for the final verse",
        "he lets the last chord ring out",
        "he rests the guitar on his knee",
        "he smiles at the camera and waves",
    ],
    "Planting a tree": [
        "a girl carries a young tree to the garden",
        "she marks a spot in the lawn with a stick",
        "she digs a wide hole with a shovel",
        "she loosens the soil at the bottom of the hole",
        "she lifts the tree out of its plastic pot",
        "she sets the roots gently in the hole",
        "she fills the hole with soil around the roots",
        "she presses the soil down with her boots",
        "she spreads mulch around the base of the trunk",
        "she ties the trunk to a wooden stake",
        "she waters the tree with a watering can",
        "she brushes the dirt off her gloves",
        "she takes a photo of the new tree",
    ],
}


def mmlu_rows(rng: random.Random) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []

    def add(subject: str, question: str, answer: str, wrong: list[str]) -> None:
        choices = [answer, *rng.sample(wrong, 3)]
        rng.shuffle(choices)
        rows.append(
            {
                "question": question,
                "subject": subject,
                "choices": choices,
                "answer": choices.index(answer),
            }
        )

    for country, capital in CAPITALS[:12]:
        others = [c for _, c in CAPITALS if c != capital]
        add("high_school_geography", f"What is the capital city of {country}?", capital, others)
    for symbol, name in ELEMENTS[:12]:
        others = [n for _, n in ELEMENTS if n != name]
        add(
            "high_school_chemistry",
            f"Which element has the chemical symbol {symbol}?",
            name,
            others,
        )
    for animal, group in ANIMALS[:12]:
        others = [c for c in CLASSES if c != group]
        add(
            "high_school_biology",
            f"To which class of vertebrates does the {animal} belong?",
            group,
            others,
        )
    for _ in range(12):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        answer = a + b
        wrong = [str(answer + d) for d in (-10, -2, -1, 1, 2, 10)]
        add("elementary_mathematics", f"What is {a} + {b}?", str(answer), wrong)
    return rows


def hellaswag_rows(rng: random.Random) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    names = list(ACTIVITIES)
    for activity, steps in ACTIVITIES.items():
        others = [s for other in names if other != activity for s in ACTIVITIES[other]]
        for i in range(12):
            first, rest = steps[i].split(" ", 2)[:2], steps[i].split(" ", 2)[2]
            ctx_a = f"{first[0].capitalize()} {first[1]} {rest}."
            following = steps[i + 1]
            pronoun, remainder = following.split(" ", 1)
            ctx_b = pronoun
            endings = [f"{remainder}.", *(f"{s.split(' ', 1)[1]}." for s in rng.sample(others, 3))]
            rng.shuffle(endings)
            rows.append(
                {
                    "ind": len(rows),
                    "activity_label": activity,
                    "ctx_a": ctx_a,
                    "ctx_b": ctx_b,
                    "ctx": f"{ctx_a} {ctx_b}",
                    "endings": endings,
                    "source_id": f"fedalign-sample~{activity.lower().replace(' ', '-')}-{i}",
                    "split": "train",
                    "split_type": "indomain",
                    "label": str(endings.index(f"{remainder}.")),
                }
            )
    return rows


def write(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"wrote {len(rows)} rows to {path}")


def main() -> None:
    write(ASSETS / "mmlu_sample.jsonl", mmlu_rows(random.Random(12)))
    write(ASSETS / "hellaswag_sample.jsonl", hellaswag_rows(random.Random(13)))


if __name__ == "__main__":
    main()
