"""Prompt formatting (generative approach): rows → chat messages, labels → the answers the model gives.

Cell values are inserted literally (braces, quotes, newlines and emoji in cells are safe): the template is
split into literal text and `{column}` fields once, and values are joined in, never re-parsed. The model's
chat template is applied later, by the trainer and the scorer, from the same messages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task

from loraflow.config import LabelKey, PromptSettings, normalize_label, render
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

PROMPT = "prompt"  # list of {"role", "content"} messages: system (optional) + user
COMPLETION = "completion"  # one assistant message holding the label's answer


def build_messages(prompt: PromptSettings, row: dict[str, Any]) -> list[dict[str, str]]:
    """System message (when set) + the rendered user message."""
    messages = [{"role": "system", "content": prompt.system}] if prompt.system.strip() else []
    messages.append({"role": "user", "content": render(prompt.template, row)})
    return messages


def answer_map(labels: list[str], answers: dict[LabelKey, str]) -> dict[str, str]:
    """Each allowed label's answer text: the configured one, else the label itself."""
    given = {normalize_label(k): str(v).strip() for k, v in answers.items()}
    return {label: given.get(label, label) for label in labels}


@task(name="format-prompts", task_run_name=named_for_config("format-prompts"), cache_policy=CONTENT_CACHE)
def prepare_inputs(splits: Ref, prompt: PromptSettings, answers: dict[LabelKey, str], store: str) -> Ref:
    """Write train/dev(/test) parquet files with `prompt` and `completion` messages, plus answers.json."""
    key = digest_of("prompts", splits.digest, prompt, {str(k): v for k, v in answers.items()})
    folder, result = step_output(store, "prompts", key)
    if is_complete(folder):
        return result
    labels = read_meta(splits)["labels"]
    verbal = answer_map(labels, answers)
    with building(folder) as tmp:
        for split in split_names(splits):
            frame = read_split(splits, split)
            rows = frame.to_dict("records")
            frame[PROMPT] = [build_messages(prompt, row) for row in rows]
            frame[COMPLETION] = [[{"role": "assistant", "content": verbal[row[LABEL]]}] for row in rows]
            frame.to_parquet(tmp / f"{split}.parquet", index=False)
        (tmp / "answers.json").write_text(json.dumps({"labels": labels, "answers": verbal}, indent=1))
    return result


def read_prompts(ref: Ref, split: str) -> pd.DataFrame:
    """One split written by `prepare_inputs` (messages as lists of dicts)."""
    frame = read_split(ref, split)
    for column in (PROMPT, COMPLETION):
        frame[column] = frame[column].map(lambda messages: [dict(m) for m in messages])
    return frame


def read_answers(ref: Ref) -> tuple[list[str], list[str]]:
    """(labels, answers) in label order, as written by `prepare_inputs`."""
    meta = json.loads((Path(ref.path) / "answers.json").read_text())
    return meta["labels"], [meta["answers"][label] for label in meta["labels"]]


def train_token_lengths(prompts: Ref, tokenizer: Any) -> list[int]:
    """Each train row's length in tokens as training encodes it: prompt and answer through the chat
    template (what `loraflow plan` and the memory check before training measure)."""
    frame = read_prompts(prompts, "train")
    lengths = []
    for prompt, completion in zip(frame[PROMPT], frame[COMPLETION], strict=True):
        text = tokenizer.apply_chat_template(
            [dict(m) for m in prompt] + [dict(m) for m in completion], tokenize=False
        )
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return lengths
