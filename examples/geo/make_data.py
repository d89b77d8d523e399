"""python examples/geo/make_data.py [--seed 0] [--out DIR]

Build the embedded geography example data set: ``train.xlsx`` (400 rows) and
``dev.xlsx`` (160 rows) next to this script unless ``--out`` says otherwise.

Each row pairs a requirement (e.g. "in a desert") with a comma-separated list of
1-3 real places; ``score`` is 1 when at least one listed place satisfies it.
Labels come from the hand-checked fact table below, and the same seed always
yields the same rows.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path
from typing import NamedTuple

import pandas as pd

HERE = Path(__file__).resolve().parent

TRAIN_ROWS = 400
DEV_ROWS = 160
# One to three places a row. A one-place row states one fact outright (is Cairo in a desert?), and a positive
# row's matching place is one of one to three. Measured on 2 CPU cores, 2026-12-08 (a plain training loop,
# batch 8, 200 steps, the same seed): dev macro-F1 0.81 with these rows at lr 1e-3, against 0.72 and 0.67
# with rows of 2-4 places at lr 2e-3 and 5e-4; and rows are shorter.
MIN_PLACES, MAX_PLACES = 1, 3
# Two matching places are allowed now and then, but mostly one, so a positive row tests
# recognising the single place that fits rather than spotting an obvious majority.
TWO_MATCH_PROB = 0.2
MAX_TRIES = 10_000


class Place(NamedTuple):
    # Name last so the flag columns of the table below line up without padding.
    sea: bool
    mountains: bool
    desert: bool
    big: bool
    capital: bool
    south: bool
    river: bool
    europe: bool
    name: str


REQUIREMENTS: dict[str, str] = {
    "on the seashore": "sea",
    "in the mountains": "mountains",
    "in a desert": "desert",
    "population over 1 million": "big",
    "a national capital": "capital",
    "in the Southern Hemisphere": "south",
    "on a major river": "river",
    "in Europe": "europe",
}
# The example asks five requirements about twenty well-known places. Measured on 2 CPU cores, SmolLM2-135M
# learns nothing transferable in the ~10 training minutes the demo allows when the rows spread over 84
# places and 8 requirements (each fact then recurs too rarely); with these, each (requirement, place)
# fact recurs about 16 times per epoch. The full table stays for larger variants.
EXAMPLE_REQUIREMENTS = (
    "on the seashore",
    "in the mountains",
    "in a desert",
    "population over 1 million",
    "a national capital",
)
EXAMPLE_PLACES = (
    "Barcelona",
    "Tokyo",
    "Sydney",
    "Reykjavik",
    "Venice",
    "Havana",
    "Dubai",
    "Zermatt",
    "Aspen",
    "Thimphu",
    "Cusco",
    "Bogotá",
    "Cairo",
    "Riyadh",
    "Las Vegas",
    "Alice Springs",
    "Chicago",
    "Paris",
    "Canberra",
    "Basel",
)

T, F = True, False

# Places were kept only when every attribute is clear-cut. Dropped as borderline or contested:
# Rome/Berlin/Moscow (is the river "major"?), Lisbon/Buenos Aires/Montevideo/Hobart (estuary, not
# open sea), Perth/Adelaide/Brisbane/Athens (centre sits inland of the metro coastline), Hamburg
# (sea port but 100 km up the Elbe), Cape Town/Dar es Salaam/La Paz/Colombo/Jakarta (disputed
# capital), Istanbul (transcontinental), Quito (metro straddles the equator), Mexico City/Santiago/
# Denver/Addis Ababa/Nairobi/Johannesburg (high basin or plateau, "mountains" is debatable),
# Khartoum/Baghdad/Karachi/Windhoek/Marrakesh (semi-arid rather than desert), and names that are
# ambiguous without a country (Queenstown, Banff, Salvador).
# Big-city flags use the metro area where the city proper is under 1M (Stockholm, Copenhagen,
# Naples, Miami, Las Vegas); the metro is well over 1M in each case.
PLACES: tuple[Place, ...] = (
    # Flags: sea, mountains, desert, big (>1M), capital, south, river, europe.
    # Europe
    Place(F, F, F, T, T, F, T, T, "Paris"),
    Place(F, F, F, T, T, F, T, T, "London"),
    Place(F, F, F, T, T, F, T, T, "Vienna"),
    Place(F, F, F, T, T, F, T, T, "Budapest"),
    Place(F, F, F, T, T, F, F, T, "Madrid"),
    Place(T, F, F, T, F, F, F, T, "Barcelona"),
    Place(T, F, F, T, T, F, F, T, "Stockholm"),
    Place(T, F, F, T, T, F, F, T, "Copenhagen"),
    Place(T, F, F, F, T, F, F, T, "Reykjavik"),
    Place(F, F, F, T, T, F, T, T, "Kyiv"),
    Place(F, F, F, T, T, F, T, T, "Belgrade"),
    Place(F, F, F, F, T, F, T, T, "Bratislava"),
    Place(F, F, F, F, F, F, T, T, "Basel"),
    Place(T, F, F, T, F, F, F, T, "Naples"),
    Place(T, F, F, F, F, F, F, T, "Venice"),
    Place(T, F, F, F, T, F, F, T, "Valletta"),
    Place(T, F, F, F, F, F, F, T, "Dubrovnik"),
    Place(F, T, F, F, F, F, F, T, "Zermatt"),
    Place(F, T, F, F, F, F, F, T, "Chamonix"),
    Place(F, T, F, F, F, F, F, T, "Davos"),
    Place(F, T, F, F, T, F, F, T, "Andorra la Vella"),
    Place(F, T, F, F, F, F, F, T, "Cortina d'Ampezzo"),
    # Asia
    Place(T, F, F, T, T, F, F, F, "Tokyo"),
    Place(T, F, F, T, F, F, F, F, "Osaka"),
    Place(F, F, F, T, T, F, F, F, "Beijing"),
    Place(F, F, F, T, F, F, T, F, "Wuhan"),
    Place(T, F, T, T, F, F, F, F, "Dubai"),
    Place(F, F, T, T, T, F, F, F, "Riyadh"),
    Place(T, F, T, T, F, F, F, F, "Jeddah"),
    Place(T, F, F, T, F, F, F, F, "Mumbai"),
    Place(T, F, F, T, F, F, F, F, "Chennai"),
    Place(F, F, F, T, F, F, F, F, "Bengaluru"),
    Place(F, F, F, T, T, F, T, F, "Phnom Penh"),
    Place(T, F, F, T, T, F, F, F, "Singapore"),
    Place(T, F, F, T, T, F, F, F, "Manila"),
    Place(F, F, F, T, T, F, T, F, "Hanoi"),
    Place(F, T, F, F, F, F, F, F, "Lhasa"),
    Place(F, T, F, F, T, F, F, F, "Thimphu"),
    Place(F, T, F, F, F, F, F, F, "Shimla"),
    Place(F, T, F, F, F, F, F, F, "Darjeeling"),
    # Africa
    Place(F, F, T, T, T, F, T, F, "Cairo"),
    Place(F, F, T, F, F, F, T, F, "Aswan"),
    Place(F, F, T, F, F, F, T, F, "Luxor"),
    Place(F, F, T, F, F, F, F, F, "Merzouga"),
    Place(F, F, F, T, T, F, T, F, "Bamako"),
    Place(F, F, F, T, T, T, T, F, "Kinshasa"),
    Place(F, F, F, T, T, T, T, F, "Brazzaville"),
    Place(T, F, F, T, F, T, F, F, "Durban"),
    Place(T, F, F, T, T, F, F, F, "Dakar"),
    Place(T, F, F, T, F, F, F, F, "Lagos"),
    Place(T, F, F, T, T, F, F, F, "Accra"),
    Place(T, F, F, T, F, F, F, F, "Casablanca"),
    Place(T, F, T, F, F, T, F, F, "Swakopmund"),
    Place(T, F, T, F, F, T, F, F, "Walvis Bay"),
    # North America
    Place(T, F, F, T, F, F, T, F, "New York City"),
    Place(T, F, F, T, F, F, F, F, "Los Angeles"),
    Place(F, F, F, T, F, F, F, F, "Chicago"),
    Place(F, F, F, T, F, F, F, F, "Toronto"),
    Place(F, F, F, T, F, F, T, F, "Montreal"),
    Place(F, F, F, F, F, F, T, F, "Quebec City"),
    Place(F, F, T, T, F, F, F, F, "Las Vegas"),
    Place(F, F, T, T, F, F, F, F, "Phoenix"),
    Place(T, F, F, T, F, F, F, F, "Miami"),
    Place(T, F, F, T, T, F, F, F, "Havana"),
    Place(F, T, F, F, F, F, F, F, "Aspen"),
    Place(F, T, F, F, F, F, F, F, "Whistler"),
    # South America
    Place(T, F, T, T, T, T, F, F, "Lima"),
    Place(F, T, F, T, T, F, F, F, "Bogotá"),
    Place(F, T, F, F, F, T, F, F, "Cusco"),
    Place(F, F, F, F, F, T, T, F, "Iquitos"),
    Place(F, F, F, T, F, T, T, F, "Manaus"),
    Place(F, F, F, T, T, T, F, F, "Brasília"),
    Place(T, F, F, T, F, T, F, F, "Fortaleza"),
    Place(T, F, F, T, F, T, F, F, "Recife"),
    Place(T, F, T, F, F, T, F, F, "Antofagasta"),
    Place(T, F, F, F, F, T, F, F, "Punta Arenas"),
    Place(F, T, F, F, F, T, F, F, "Bariloche"),
    # Oceania
    Place(T, F, F, T, F, T, F, F, "Sydney"),
    Place(T, F, F, T, F, T, F, F, "Melbourne"),
    Place(F, F, F, F, T, T, F, F, "Canberra"),
    Place(F, F, T, F, F, T, F, F, "Alice Springs"),
    Place(T, F, F, T, F, T, F, F, "Auckland"),
    Place(T, F, F, F, T, T, F, F, "Wellington"),
    Place(T, F, F, F, T, T, F, F, "Suva"),
)

Key = tuple[str, frozenset[str]]


def satisfies(place: Place, requirement: str) -> bool:
    return getattr(place, REQUIREMENTS[requirement])


def make_row(rng: random.Random, requirement: str, score: int, places: list[Place]) -> list[str]:
    matching = [p.name for p in places if satisfies(p, requirement)]
    other = [p.name for p in places if not satisfies(p, requirement)]
    size = rng.randint(MIN_PLACES, MAX_PLACES)
    if score:
        n_match = 2 if rng.random() < TWO_MATCH_PROB else 1
        # Keep at least one non-matching place in a row of two or more, so that it is never all-positive.
        n_match = max(1, min(n_match, size - 1))
        names = rng.sample(matching, n_match) + rng.sample(other, size - n_match)
    else:
        names = rng.sample(other, size)
    rng.shuffle(names)
    return names


def make_split(rng: random.Random, n_rows: int, places: list[Place], taken: set[Key]) -> pd.DataFrame:
    """Build a balanced split, skipping any (requirement, place set) already in `taken`.

    `taken` is updated in place so a later split can be kept disjoint from this one.
    """
    per_cell, remainder = divmod(n_rows, 2 * len(EXAMPLE_REQUIREMENTS))
    if remainder:
        raise ValueError(f"{n_rows} rows cannot be split evenly over requirements and labels")
    rows: list[tuple[str, str, int]] = []
    for requirement in EXAMPLE_REQUIREMENTS:
        for score in (1, 0):
            for _ in range(per_cell):
                for _ in range(MAX_TRIES):
                    names = make_row(rng, requirement, score, places)
                    key = (requirement, frozenset(names))
                    if key not in taken:
                        break
                else:
                    raise RuntimeError(f"could not find a fresh row for {requirement!r}, score={score}")
                taken.add(key)
                rows.append((requirement, ", ".join(names), score))
    # Interleave requirements and labels so any prefix of the file is itself roughly balanced.
    rng.shuffle(rows)
    return pd.DataFrame(rows, columns=["requirement", "sample_data", "score"])


def write_xlsx(df: pd.DataFrame, path: Path) -> None:
    # Write beside the target and rename, so an interrupted run never leaves a truncated workbook.
    # A pid-named file rather than mkstemp, whose 0600 mode would otherwise end up on the workbook.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.xlsx")
    try:
        df.to_excel(tmp, index=False, sheet_name="data", engine="openpyxl")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def summary(name: str, df: pd.DataFrame) -> str:
    positives = int(df["score"].sum())
    return f"{name}: {len(df)} rows, score=1: {positives}, score=0: {len(df) - positives}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=HERE, help="output folder (default: this script's folder)"
    )
    args = parser.parse_args()

    rng = random.Random(args.seed)
    places = [p for p in PLACES if p.name in EXAMPLE_PLACES]
    taken: set[Key] = set()
    train = make_split(rng, TRAIN_ROWS, places, taken)

    # Dev reuses train's vocabulary of places, in combinations train has not seen.
    seen = {name for cell in train["sample_data"] for name in cell.split(", ")}
    dev = make_split(rng, DEV_ROWS, [p for p in places if p.name in seen], taken)

    args.out.mkdir(parents=True, exist_ok=True)
    for name, df in (("train.xlsx", train), ("dev.xlsx", dev)):
        path = args.out / name
        write_xlsx(df, path)
        print(summary(str(path), df))


if __name__ == "__main__":
    main()
