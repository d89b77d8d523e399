"""Preparation of the classifier approach: labels → ids (labels.json) and rows → model inputs (one text,
a tokenizer pair, or a join template).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task

from loraflow.config import ClassifierSettings
from loraflow.tasks.classical import input_text
from loraflow.tasks.ingest import LABEL, read_meta, read_split, split_names
from loraflow.tasks.store import (
    CONTENT_CACHE,
    Ref,
    building,
    digest_of,
    is_complete,
    named_for_config,
    step_output,
)

# Reserved names (a leading underscore, like ingest's `_row`): a user's own `text` column cannot collide.
TEXT, TEXT_PAIR, LABEL_ID = "_text", "_text_pair", "_label_id"


LABEL_MAP = "labels.json"


def join_inputs(frame: pd.DataFrame, columns: list[str], template: str | None) -> pd.DataFrame:
    """`text` (and `text_pair` for two columns without a template) from the input columns of each row."""
    out = pd.DataFrame(index=frame.index)
    if template is None and len(columns) == 2:
        out[TEXT], out[TEXT_PAIR] = frame[columns[0]], frame[columns[1]]
    else:  # the template rendered; one column as is; more joined by blank lines
        out[TEXT] = input_text(frame, columns, template)
    return out


@task(name="map-labels", task_run_name=named_for_config("map-labels"), cache_policy=CONTENT_CACHE)
def prepare_inputs(splits: Ref, columns: list[str], classifier: ClassifierSettings, store: str) -> Ref:
    """Write train/dev parquet files with the model inputs (`text`, `text_pair`), `label_id`, labels.json."""
    key = digest_of("labels", splits.digest, columns, classifier.template)
    folder, result = step_output(store, "labels", key)
    if is_complete(folder):
        return result
    labels = read_meta(splits)["labels"]
    label2id = {label: i for i, label in enumerate(labels)}
    with building(folder) as tmp:
        for split in split_names(splits):
            frame = read_split(splits, split)
            frame = pd.concat([frame, join_inputs(frame, columns, classifier.template)], axis=1)
            frame[LABEL_ID] = frame[LABEL].map(label2id).astype("int64")
            frame.to_parquet(tmp / f"{split}.parquet", index=False)
        label_map = {
            "labels": labels,
            "label2id": label2id,
            "id2label": {str(i): label for label, i in label2id.items()},
            "columns": columns,
            "template": classifier.template,
        }
        (tmp / LABEL_MAP).write_text(json.dumps(label_map, indent=1))
    return result


def read_label_map(ref: Ref) -> dict[str, Any]:
    """labels.json written by `prepare_inputs`: labels in id order, label2id, id2label, columns, template."""
    return json.loads((Path(ref.path) / LABEL_MAP).read_text())
