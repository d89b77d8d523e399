"""python bench/geo_knowledge.py [--model embedded:smollm2-135m-instruct]

Does the model know the facts behind the geo example? Each (requirement, place) fact of
examples/geo/make_data.py's table (8 requirements × 84 places) asked alone, zero-shot, with the example's
own system prompt and a one-place version of its template ("Sample data: Tokyo"), scored the way loraflow
evaluates (the answers' log-probabilities, tasks/generative/scoring.py): the ROC AUC of P(Yes) against
the table, per requirement. An AUC near 0.5 means the model cannot tell the places apart: a fine-tune on
the example then has to memorise the facts from the labels of place lists, not recall them. Writes
bench/results/geo_knowledge.md and prints it.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from loraflow.config import ModelSettings
from loraflow.loading import load_config
from loraflow.tasks.generative.prepare import build_messages
from loraflow.tasks.generative.scoring import score_labels
from loraflow.tasks.models import default_cache_dir, load_causal_lm, load_tokenizer, resolve_model

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "geo"


def fact_table() -> object:
    """examples/geo/make_data.py as a module (its PLACES, REQUIREMENTS and EXAMPLE_* selections)."""
    spec = importlib.util.spec_from_file_location("geo_make_data", EXAMPLE / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    args = parser.parse_args()
    facts = fact_table()
    config = load_config(EXAMPLE / "config.yaml")
    path = resolve_model.fn(ModelSettings(name=args.model), default_cache_dir()).path
    model, tokenizer = load_causal_lm(path, "float32"), load_tokenizer(path)
    given = {str(label): answer for label, answer in config.data.answers.items()}
    answers = [given["1"], given["0"]]  # Yes, No
    rows = [
        "| requirement | places (yes) | AUC, all 84 places | AUC, the example's 20 |",
        "|---|---|---|---|",
    ]
    started = time.perf_counter()
    for requirement, flag in facts.REQUIREMENTS.items():
        prompts = [
            build_messages(config.prompt, {"requirement": requirement, "sample_data": place.name})
            for place in facts.PLACES
        ]
        scores = score_labels(model, tokenizer, prompts, answers)
        yes = scores[:, 0] - scores[:, 1]
        gold = np.array([getattr(place, flag) for place in facts.PLACES])
        chosen = np.array([place.name in facts.EXAMPLE_PLACES for place in facts.PLACES])
        example = (
            f"{roc_auc_score(gold[chosen], yes[chosen]):.2f}"
            if requirement in facts.EXAMPLE_REQUIREMENTS and 0 < gold[chosen].sum() < chosen.sum()
            else "-"
        )
        rows.append(f"| {requirement} | {gold.sum()} | {roc_auc_score(gold, yes):.2f} | {example} |")
    seconds = time.perf_counter() - started
    text = (
        f"Zero-shot knowledge of the geo facts, {args.model}, {len(facts.PLACES)} places × "
        f"{len(facts.REQUIREMENTS)} requirements, scored in {seconds:.0f} s "
        "(`python bench/geo_knowledge.py`).\n\n" + "\n".join(rows) + "\n"
    )
    out = REPO / "bench" / "results" / "geo_knowledge.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
