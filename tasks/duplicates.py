"""Conflicts and near-duplicates: the same text twice with two labels, and dev rows that are near-copies of
train rows (the dev score then measures memory, not skill). Counted in the data contract and listed in
review.xlsx (tasks/review.py).

"The same text" is the input columns joined, NFKC-normalised, case-folded, with punctuation and whitespace
runs as one space. Near means a cosine similarity of character 3-5-gram TF-IDF vectors (within word
boundaries, sublinear tf) at or above `review.similarity`: character n-grams see a copy with a word changed,
a typo or other spacing as near, where word overlap needs the exact words; an exact copy scores 1. Each dev
row is compared with every train row, a block of dev rows at a time, and keeps its most similar one (past
MAX_PAIRS pairs, a seeded sample of the dev rows).
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer

from loraflow.tasks.classical import input_text
from loraflow.tasks.corrections import ACTION, ROW_NUMBER, SPLIT
from loraflow.tasks.ingest import LABEL, ROW
from loraflow.tasks.store import run_logger

_PUNCTUATION = re.compile(r"[\W_]+")


def normalised_text(frame: pd.DataFrame, columns: list[str]) -> list[str]:
    """Each row's input columns as one text, NFKC-normalised, case-folded, punctuation and whitespace runs
    as one space: what "the same text" means to conflicts and near-duplicates."""
    joined = input_text(frame, columns, None)
    return [_PUNCTUATION.sub(" ", unicodedata.normalize("NFKC", t).casefold()).strip() for t in joined]


def row_cells(frame: pd.DataFrame, split: str, columns: list[str]) -> pd.DataFrame:
    """split, row (the user's file) and the text columns of `frame`'s rows: how every sheet names a row."""
    out = pd.DataFrame({SPLIT: split, ROW_NUMBER: frame[ROW].astype(int).to_numpy()})
    for column in columns:
        out[column if column not in (SPLIT, ROW_NUMBER, ACTION) else f"text {column}"] = frame[
            column
        ].to_numpy()
    return out


def find_conflicts(frames: dict[str, pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    """Rows of any split whose normalised text another row has with a different label, grouped (`group`),
    the largest groups first."""
    parts = [
        row_cells(frame, split, columns).assign(
            label=frame[LABEL].to_numpy(), _key=normalised_text(frame, columns)
        )
        for split, frame in frames.items()
    ]
    rows = pd.concat(parts, ignore_index=True).dropna(subset=["label"])
    rows = rows[rows["_key"] != ""]  # punctuation only: the contract's blank-cell checks speak of those
    labels_per_text = rows.groupby("_key")["label"].transform("nunique")
    rows = rows[labels_per_text > 1].copy()
    if rows.empty:
        rows = rows.drop(columns=["_key"]).assign(rows_in_group=0, labels_in_group="")
        return rows.reindex(columns=["group", *rows.columns])
    rows["rows_in_group"] = rows.groupby("_key")["label"].transform("size")
    rows["labels_in_group"] = rows.groupby("_key")["label"].transform(lambda v: ", ".join(sorted(set(v))))
    rows = rows.sort_values(
        ["rows_in_group", "_key", SPLIT, ROW_NUMBER], ascending=[False, True, False, True]
    )
    rows.insert(0, "group", rows["_key"].factorize()[0] + 1)
    return rows.drop(columns=["_key"]).reset_index(drop=True)


# Most (dev row, train row) pairs compared: the comparison is quadratic (20,000 dev × 80,000 train rows took
# minutes on 2 cores); past it a seeded sample of the dev rows is compared, and the log says so.
MAX_PAIRS = 20_000_000


def find_near_duplicates(
    train: pd.DataFrame,
    dev: pd.DataFrame,
    columns: list[str],
    similarity: float,
    chunk: int = 512,
    max_pairs: int = MAX_PAIRS,
) -> pd.DataFrame:
    """Each dev row whose most similar train row (cosine of character 3-5-gram TF-IDF of the normalised text)
    reaches `similarity`, with that train row, most similar first. Past `max_pairs` pairs, a seeded sample
    of the dev rows (max_pairs / train rows of them) is compared instead of every one."""
    if len(train) and len(dev) * len(train) > max_pairs:
        kept = max(1, max_pairs // len(train))
        run_logger().warning(
            "near-duplicates: %d dev × %d train rows is past %d pairs; comparing a seeded sample of %d dev "
            "rows",
            len(dev),
            len(train),
            max_pairs,
            kept,
        )
        dev = dev.sample(kept, random_state=0).sort_index()
    train_text, dev_text = normalised_text(train, columns), normalised_text(dev, columns)
    best, score = np.zeros(len(dev), dtype=int), np.zeros(len(dev))
    if train_text and dev_text and any(train_text + dev_text):  # an empty split, or nothing but punctuation
        vectors = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True)
        vectors.fit(train_text + dev_text)
        train_vectors, dev_vectors = vectors.transform(train_text), vectors.transform(dev_text)
        for start in range(0, len(dev), chunk):  # dev × train similarities a block of dev rows at a time
            block = (dev_vectors[start : start + chunk] @ train_vectors.T).toarray()
            best[start : start + chunk], score[start : start + chunk] = block.argmax(1), block.max(1)
    near = np.flatnonzero(score >= similarity - 1e-9)
    near = near[np.argsort(-score[near], kind="stable")]
    out = row_cells(dev.iloc[near], "dev", columns)
    out.insert(0, "similarity", score[near].round(4))
    out["label"] = dev[LABEL].iloc[near].to_numpy()
    matched = train.iloc[best[near]]
    out["train_row"] = matched[ROW].astype(int).to_numpy()
    for column in columns:
        out[f"train {column}"] = matched[column].to_numpy()
    out["train_label"] = matched[LABEL].to_numpy()
    out["same_label"] = out["label"].to_numpy() == out["train_label"].to_numpy()
    return out.reset_index(drop=True)
