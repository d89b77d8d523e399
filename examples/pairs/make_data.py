"""python examples/pairs/make_data.py [--seed 0] [--out DIR]

Build the embedded sentence-pair example: ``train.tsv`` (720 rows) and ``dev.tsv`` (240 rows) next to
this script unless ``--out`` says otherwise.

Each row pairs two sentences about a place. Sentence A states two or three facts about it, taken from
the hand-checked fact table of the geo example; sentence B, worded differently, makes one claim. The
``relation`` is ``entailment`` when A states B's claim, ``contradiction`` when A states its opposite
and ``neutral`` when A says nothing about it, so the label follows from the two sentences alone. The dev
rows are about places that no train row mentions. The same seed always yields the same rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
TRAIN_ROWS = 720
DEV_ROWS = 240
DEV_PLACE_SHARE = 0.2
RELATIONS = ("entailment", "contradiction", "neutral")


def _geo_places() -> tuple:
    """The fact table of examples/geo/make_data.py (one source of truth for the facts)."""
    spec = importlib.util.spec_from_file_location("geo_make_data", HERE.parent / "geo" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PLACES


# attribute: (sentence A when true, sentence A when false, sentence B claims true, sentence B claims false)
PHRASES: dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...]]] = {
    "sea": (
        "is on the seashore",
        "is nowhere near the sea",
        ("is a coastal city", "lies by the sea"),
        ("is landlocked", "has no coastline"),
    ),
    "mountains": (
        "is in the mountains",
        "is not in the mountains",
        ("is a mountain town", "lies among high peaks"),
        ("is far from any mountains", "has no mountains around it"),
    ),
    "desert": (
        "is in a desert",
        "is not in a desert",
        ("is surrounded by desert", "has a desert climate"),
        ("is nowhere near a desert", "has no desert around it"),
    ),
    "big": (
        "has over a million people",
        "has fewer than a million people",
        ("is a city of millions", "is a large metropolis"),
        ("is a small place", "has under a million inhabitants"),
    ),
    "capital": (
        "is a national capital",
        "is not a national capital",
        ("is the capital of its country", "hosts its country's government"),
        ("is not its country's capital", "is not where its government sits"),
    ),
    "south": (
        "is in the Southern Hemisphere",
        "is in the Northern Hemisphere",
        ("lies south of the equator", "is in the southern half of the globe"),
        ("lies north of the equator", "is in the northern half of the globe"),
    ),
    "river": (
        "stands on a major river",
        "is not on a major river",
        ("is a river city", "has a big river running through it"),
        ("has no major river", "is not built on a big river"),
    ),
    "europe": (
        "is in Europe",
        "is outside Europe",
        ("is a European city", "lies on the European continent"),
        ("is not in Europe", "lies on another continent"),
    ),
}


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def make_row(rng: random.Random, place: tuple, relation: str) -> dict[str, str]:
    """Sentence A with 2-3 true facts about `place`, sentence B with one claim, and their relation."""
    facts = place._asdict()
    attributes = list(PHRASES)
    stated = rng.sample(attributes, rng.choice((2, 3)))
    sentence_a = f"{place.name} " + _join([PHRASES[a][0 if facts[a] else 1] for a in stated]) + "."
    if relation == "neutral":
        about = rng.choice([a for a in attributes if a not in stated])
        claim = rng.random() < 0.5
    else:
        about = rng.choice(stated)
        claim = facts[about] if relation == "entailment" else not facts[about]
    sentence_b = f"{place.name} {rng.choice(PHRASES[about][2 if claim else 3])}."
    return {"sentence_a": sentence_a, "sentence_b": sentence_b, "relation": relation}


def make_split(rng: random.Random, n_rows: int, places: list) -> pd.DataFrame:
    relations = [RELATIONS[i % len(RELATIONS)] for i in range(n_rows)]
    rng.shuffle(relations)
    return pd.DataFrame([make_row(rng, rng.choice(places), relation) for relation in relations])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    places = list(_geo_places())
    rng.shuffle(places)
    n_dev = round(len(places) * DEV_PLACE_SHARE)
    dev_places, train_places = places[:n_dev], places[n_dev:]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, n_rows, pool in (("train", TRAIN_ROWS, train_places), ("dev", DEV_ROWS, dev_places)):
        frame = make_split(rng, n_rows, pool)
        frame.to_csv(args.out / f"{name}.tsv", sep="\t", index=False)
        counts = frame["relation"].value_counts().to_dict()
        print(f"{name}: {len(frame)} rows about {len(pool)} places, {counts}")


if __name__ == "__main__":
    main()
