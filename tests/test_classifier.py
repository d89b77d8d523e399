"""The classifier approach on tiny random models: label mapping, inputs, loss, merge, pipeline, flow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, pipeline

from loraflow.cli import main
from loraflow.config import ClassifierSettings, ContractSettings, LoraSettings, TrainSettings
from loraflow.errors import ConfigError, DataError
from loraflow.flows.classifier import train_classifier
from loraflow.loading import load_config
from loraflow.tasks.classifier.merge import merge_adapter
from loraflow.tasks.classifier.prepare import (
    LABEL_ID,
    TEXT,
    TEXT_PAIR,
    join_inputs,
    prepare_inputs,
    read_label_map,
)
from loraflow.tasks.classifier.scoring import classifier_tokenizer, load_classifier, predict_logits, tokenize
from loraflow.tasks.classifier.train import class_weights, train_adapter, weighted_cross_entropy
from loraflow.tasks.contracts import check_contract
from loraflow.tasks.ingest import ingest_table, read_split
from loraflow.tasks.merging import QUANTIZED_TOLERANCE
from loraflow.tasks.models import load_tokenizer
from loraflow.tasks.store import Ref
from tests.tiny import build_tiny_bert

pytestmark = pytest.mark.flow
TRAIN = TrainSettings(max_steps=4, batch_size=4, lr=0.01, save_steps=2, logging_steps=2, max_length=48)
PLACES = ["Lima", "Zurich", "Cairo", "Oslo", "Denver", "Perth", "Quito", "Doha"]


def pair_rows(n: int, seed: int = 0) -> pd.DataFrame:
    """n rows of (sentence_a, sentence_b, relation) with three balanced string labels, varied lengths."""
    rng = np.random.default_rng(seed)
    relations = ["entailment", "contradiction", "neutral"]
    rows = []
    for i in range(n):
        place = PLACES[int(rng.integers(len(PLACES)))]
        rows.append(
            {
                "sentence_a": f"{place} is on the seashore" + " and in a desert" * int(rng.integers(3)),
                "sentence_b": f"{place} is {'not ' * (i % 2)}a capital.",
                "relation": relations[i % 3],
            }
        )
    return pd.DataFrame(rows)


def write_pair_config(folder: Path, model: Path, **sections: dict) -> Path:
    """A sentence-pair classifier config with train/dev .tsv files; sections override."""
    folder.mkdir(parents=True, exist_ok=True)
    pair_rows(36).to_csv(folder / "train.tsv", sep="\t", index=False)
    pair_rows(12, seed=1).to_csv(folder / "dev.tsv", sep="\t", index=False)
    config = {
        "name": "tiny-pairs",
        "approach": "classifier",
        "data": {
            "train": "train.tsv",
            "dev": "dev.tsv",
            "text_columns": ["sentence_a", "sentence_b"],
            "label_column": "relation",
        },
        "model": {"name": str(model)},
        "lora": {"r": 4},
        "train": TRAIN.model_dump(exclude_defaults=True),
        "contract": {"min_rows_per_class": 2},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    path = folder / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@pytest.fixture
def encoded(tmp_path: Path, tiny_model: Path) -> tuple[Ref, Ref, str]:
    """The tiny pair data ingested and label-mapped, the tiny Llama's ref, and the store."""
    config = load_config(write_pair_config(tmp_path / "task", tiny_model))
    store = str(tmp_path / "store")
    splits = ingest_table.fn(config.data, config.input_columns, store)
    return (
        prepare_inputs.fn(splits, config.input_columns, config.classifier, store),
        Ref(path=str(tiny_model), digest="tiny"),
        store,
    )


@pytest.mark.parametrize(
    ("values", "labels"),
    [
        (["spam", "ham", "eggs"], ["eggs", "ham", "spam"]),
        ([2, 0, 1], ["0", "1", "2"]),
        ([1.0, 0.0, 10.0], ["0", "1", "10"]),  # Excel stores whole numbers as floats
        ([True, False, True], ["false", "true"]),
    ],
    ids=["strings", "ints", "whole-floats", "bools"],
)
def test_label_ids_are_inferred_from_any_label_type(tmp_path: Path, values: list, labels: list[str]) -> None:
    frame = pd.DataFrame({"review": [f"row {i}" for i in range(12)], "y": (values * 4)[:12]})
    frame.to_excel(tmp_path / "t.xlsx", index=False, engine="openpyxl")
    config = load_config(
        write_pair_config(tmp_path, Path("unused")),
        [
            f"data.train={tmp_path / 't.xlsx'}",
            "data.dev=null",
            "data.text_columns=[review]",
            "data.label_column=y",
        ],
    )
    splits = ingest_table.fn(config.data, config.input_columns, str(tmp_path / "store"))
    ref = prepare_inputs.fn(splits, config.input_columns, config.classifier, str(tmp_path / "store"))
    label_map = read_label_map(ref)
    assert label_map["labels"] == labels
    assert label_map["label2id"] == {label: i for i, label in enumerate(labels)}
    train = read_split(ref, "train")
    assert [labels[i] for i in train[LABEL_ID]] == train["label"].tolist()


def test_explicit_label2id_sets_the_order(tmp_path: Path) -> None:
    config = load_config(
        write_pair_config(tmp_path, Path("unused")),
        ["data.labels={neutral: 2, entailment: 0, contradiction: 1}"],
    )
    splits = ingest_table.fn(config.data, config.input_columns, str(tmp_path / "store"))
    ref = prepare_inputs.fn(splits, config.input_columns, config.classifier, str(tmp_path / "store"))
    assert read_label_map(ref)["labels"] == ["entailment", "contradiction", "neutral"]
    with pytest.raises(ConfigError, match=r"label ids must be 0\.\.1"):
        load_config(write_pair_config(tmp_path, Path("unused")), ["data.labels={a: 0, b: 2}"])


def test_one_two_and_more_text_columns(tiny_model: Path, tmp_path: Path) -> None:
    frame = pd.DataFrame({"title": ["A day", "Rain"], "body": ["Sun {x}.", "Wet."], "tag": ["t1", "t2"]})
    one = join_inputs(frame, ["body"], None)
    assert one[TEXT].tolist() == ["Sun {x}.", "Wet."] and TEXT_PAIR not in one
    two = join_inputs(frame, ["title", "body"], None)
    assert two[TEXT].tolist() == ["A day", "Rain"] and two[TEXT_PAIR].tolist() == ["Sun {x}.", "Wet."]
    three = join_inputs(frame, ["title", "body", "tag"], "{title}\n\n{body} [{tag}]")
    assert three[TEXT].tolist() == ["A day\n\nSun {x}. [t1]", "Rain\n\nWet. [t2]"]
    assert join_inputs(frame, ["title", "body", "tag"], None)[TEXT][1] == "Rain\n\nWet.\n\nt2"
    # Two columns reach the model as the tokenizer's pair encoding; a decoder tokenizer that would glue
    # the texts together gets its eos token between them, and keeps it when saved and reloaded.
    tokenizer = classifier_tokenizer(tiny_model)
    tokens, truncated = tokenize(tokenizer, two, max_length=64)
    plain = load_tokenizer(tiny_model)
    glued = plain("A day")["input_ids"] + plain("Sun {x}.")["input_ids"]
    assert plain("A day", "Sun {x}.")["input_ids"] == glued
    separated = plain("A day")["input_ids"] + [plain.eos_token_id] + plain("Sun {x}.")["input_ids"]
    assert tokens["input_ids"][0] == separated and truncated == 0
    tokenizer.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path)("A day", "Sun {x}.")["input_ids"] == separated
    assert classifier_tokenizer(tmp_path)("A day", "Sun {x}.")["input_ids"] == separated  # idempotent
    cut, truncated = tokenize(tokenizer, two, max_length=3)
    assert truncated == 2 and all(len(ids) == 3 for ids in cut["input_ids"])


def test_classifier_config_needs_columns_and_rejects_a_prompt(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("approach: classifier\ndata: {train: t.tsv, label_column: y}\n")
    with pytest.raises(ConfigError, match="needs data.text_columns"):
        load_config(path)
    path.write_text(
        "approach: classifier\ndata: {train: t.tsv, label_column: y}\n"
        "classifier: {template: '{title}: {body}'}\n"
    )
    assert load_config(path).input_columns == ["body", "title"]
    path.write_text(
        "approach: classifier\ndata: {train: t.tsv, label_column: y, text_columns: [a]}\n"
        "prompt: {template: '{a}'}\n"
    )
    with pytest.raises(ConfigError, match="`prompt` is used by the generative approach only"):
        load_config(path)
    path.write_text(
        "approach: classifier\ndata: {train: t.tsv, label_column: y, text_columns: [a]}\n"
        "train: {loss: choice}\n"
    )
    with pytest.raises(ConfigError, match="train.loss: choice is for the generative approach"):
        load_config(path)


def test_class_weights_change_the_loss() -> None:
    labels = ["a", "b", "c"]
    ids = [0, 0, 0, 0, 1, 1, 2, 2]
    balanced = class_weights("balanced", labels, ids)
    torch.testing.assert_close(balanced, torch.tensor([8 / 12, 8 / 6, 8 / 6]))
    given = class_weights({"b": 3.0}, labels, ids)
    torch.testing.assert_close(given, torch.tensor([1.0, 3.0, 1.0]))
    assert class_weights("none", labels, ids) is None
    with pytest.raises(ConfigError, match=r"'z' not among the labels"):
        class_weights({"z": 2}, labels, ids)

    class Out:
        logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 3.0]])

    targets = torch.tensor([0, 1, 1, 0])
    per_row = torch.nn.functional.cross_entropy(Out.logits, targets, reduction="none")
    plain = weighted_cross_entropy(None)(Out(), targets)
    weighted = weighted_cross_entropy(given)(Out(), targets)
    torch.testing.assert_close(plain, per_row.mean())
    torch.testing.assert_close(weighted, (per_row * torch.tensor([1.0, 3.0, 3.0, 1.0])).sum() / 4)
    assert not torch.isclose(plain, weighted)
    # With gradient accumulation the Trainer passes the rows of the whole accumulated batch.
    torch.testing.assert_close(
        weighted_cross_entropy(None)(Out(), targets, num_items_in_batch=8), per_row.sum() / 8
    )


def test_batches_with_padding_give_the_same_logits_as_single_rows(encoded: tuple, tiny_model: Path) -> None:
    ref, _, _ = encoded
    dev = read_split(ref, "dev")
    assert dev[TEXT].str.len().nunique() > 1  # rows of different lengths: batches need padding
    tokenizer = classifier_tokenizer(tiny_model)
    model = load_classifier(tiny_model, read_label_map(ref)["labels"], tokenizer, "float32")
    batched = predict_logits(model, tokenizer, dev, max_length=48, batch_size=5)
    single = predict_logits(model, tokenizer, dev, max_length=48, batch_size=1)
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_head_survives_merge_and_reload_and_pipeline_names_the_labels(encoded: tuple) -> None:
    ref, model, store = encoded
    adapter = train_adapter.fn(ref, model, LoraSettings(r=4), TRAIN, ClassifierSettings(), "float32", store)
    saved = load_file(Path(adapter.path) / "adapter" / "adapter_model.safetensors")
    head = [name for name in saved if ".score." in name]
    assert head and any("lora_B" in name for name in saved)  # the whole head is saved with the adapter

    merged = merge_adapter.fn(adapter, model, ref, TRAIN.max_length, "float32", store)
    labels = read_label_map(ref)["labels"]
    reloaded = AutoModelForSequenceClassification.from_pretrained(merged.path).eval()
    assert reloaded.config.id2label == dict(enumerate(labels))
    assert reloaded.config.pad_token_id == load_tokenizer(merged.path).pad_token_id
    tokenizer = load_tokenizer(merged.path)
    base = load_classifier(model.path, labels, tokenizer, "float32")
    adapted = PeftModel.from_pretrained(base, str(Path(adapter.path) / "adapter")).eval()
    dev = read_split(ref, "dev")
    merged_logits = predict_logits(reloaded, tokenizer, dev, TRAIN.max_length)
    np.testing.assert_allclose(
        merged_logits, predict_logits(adapted, tokenizer, dev, TRAIN.max_length), atol=1e-4
    )
    untrained = load_classifier(model.path, labels, tokenizer, "float32")
    assert np.abs(merged_logits - predict_logits(untrained, tokenizer, dev, TRAIN.max_length)).max() > 1e-3

    classify = pipeline("text-classification", model=merged.path, device="cpu")
    row = dev.iloc[0]
    answer = classify({"text": row[TEXT], "text_pair": row[TEXT_PAIR]}, top_k=None)
    assert sorted(a["label"] for a in answer) == sorted(labels)
    assert sum(a["score"] for a in answer) == pytest.approx(1.0, abs=1e-5)
    best = labels[int(merged_logits[0].argmax())]
    assert classify({"text": row[TEXT], "text_pair": row[TEXT_PAIR]})["label"] == best


def test_a_4bit_classifier_keeps_its_head_in_full_precision_and_merges_into_a_standard_model(
    tmp_path: Path, tiny_model_64: Path
) -> None:
    config = load_config(write_pair_config(tmp_path / "task", tiny_model_64))
    store = str(tmp_path / "store")
    splits = ingest_table.fn(config.data, config.input_columns, store)
    ref = prepare_inputs.fn(splits, config.input_columns, config.classifier, store)
    model = Ref(path=str(tiny_model_64), digest="tiny64")
    labels = read_label_map(ref)["labels"]
    tokenizer = load_tokenizer(model.path)
    quantized = load_classifier(model.path, labels, tokenizer, "float32", "4bit")
    assert type(quantized.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert type(quantized.score).__name__ == "Linear" and quantized.score.weight.dtype == torch.float32

    adapter = train_adapter.fn(
        ref, model, LoraSettings(r=4), TRAIN, ClassifierSettings(), "float32", store, quantization="4bit"
    )
    saved = load_file(Path(adapter.path) / "adapter" / "adapter_model.safetensors")
    assert [name for name in saved if ".score." in name] and any("lora_B" in name for name in saved)
    merged = merge_adapter.fn(adapter, model, ref, TRAIN.max_length, "float32", store, "4bit")
    assert "quantization_config" not in json.loads((Path(merged.path) / "config.json").read_text())
    check = json.loads((Path(merged.path) / "loraflow.json").read_text())["merge_check"]
    assert (
        check["against"] == "the 4bit-quantised adapter model"
        and check["max_abs_diff"] <= QUANTIZED_TOLERANCE
    )
    reloaded = AutoModelForSequenceClassification.from_pretrained(merged.path).eval()
    assert reloaded.config.id2label == dict(enumerate(labels))


def test_an_encoder_model_trains_and_merges_too(encoded: tuple, tmp_path: Path) -> None:
    ref, _, store = encoded
    bert = build_tiny_bert(tmp_path / "tiny-bert")
    model = Ref(path=str(bert), digest="tiny-bert")
    adapter = train_adapter.fn(ref, model, LoraSettings(r=4), TRAIN, ClassifierSettings(), "float32", store)
    merged = merge_adapter.fn(adapter, model, ref, TRAIN.max_length, "float32", store)
    info = json.loads((Path(merged.path) / "loraflow.json").read_text())
    assert info["merge_check"]["max_abs_diff"] <= 1e-3
    classify = pipeline("text-classification", model=merged.path, device="cpu")
    assert classify("lima is on the seashore")[0]["label"] in read_label_map(ref)["labels"]


def test_dev_label_unseen_in_train_fails_the_contract(
    tmp_path: Path, tiny_model: Path, prefect_server: None
) -> None:
    path = write_pair_config(tmp_path / "task", tiny_model)
    dev = pair_rows(12, seed=1)
    dev.loc[4, "relation"] = "unrelated"
    dev.to_csv(tmp_path / "task" / "dev.tsv", sep="\t", index=False)
    config = load_config(path)
    store = str(tmp_path / "store")
    splits = ingest_table.fn(config.data, config.input_columns, store)
    with pytest.raises(DataError) as error:
        check_contract.fn(splits, config.input_columns, ContractSettings(min_rows_per_class=2), store)
    message = str(error.value)
    assert (
        "dev: expect_column_values_to_be_in_set on column 'label': 1 offending row(s): e.g. row=6" in message
    )
    assert "label='unrelated'" in message and "dev.tsv" in message


def test_an_input_column_named_like_the_model_inputs_is_kept_apart(tmp_path: Path) -> None:
    """A user's own `text`, `text_pair` or `label_id` column does not collide with the prepared inputs."""
    from loraflow.config import DataSettings

    frame = pd.DataFrame(
        {"text": [f"row {i}" for i in range(12)], "label_id": ["x"] * 12, "label": ["a", "b"] * 6}
    )
    frame.to_csv(tmp_path / "train.tsv", sep="\t", index=False)
    data = DataSettings(train=tmp_path / "train.tsv", text_columns=["text", "label_id"], label_column="label")
    store = str(tmp_path / "store")
    splits = ingest_table.fn(data, ["text", "label_id"], store)
    encoded = prepare_inputs.fn(splits, ["text", "label_id"], ClassifierSettings(), store)
    train = read_split(encoded, "train")
    assert train["text"].str.startswith("row ").all() and (train["label_id"] == "x").all()
    assert train[TEXT].equals(train["text"]) and train[TEXT_PAIR].eq("x").all()
    assert sorted(train[LABEL_ID].unique()) == [0, 1]


def test_classifier_flow_end_to_end(prefect_server: None, tmp_path: Path, tiny_model: Path, capsys) -> None:
    path = write_pair_config(tmp_path / "task", tiny_model, train={"max_length": 12})
    run = Path(train_classifier(load_config(path)))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["approach"] == "classifier" and metrics["labels"] == [
        "contradiction",
        "entailment",
        "neutral",
    ]
    assert metrics["baseline"]["kind"] == "majority" and metrics["finetuned"]["kind"] == "finetuned"
    assert metrics["train"]["truncated_rows"] > 0 and metrics["eval"]["truncated_rows"] > 0
    assert metrics["train"]["steps"] == 4
    predictions = pd.read_parquet(run / "predictions.parquet")
    assert len(predictions) == 12 and {"gold", "predicted", "baseline_predicted"} <= set(predictions.columns)
    probabilities = predictions[[f"prob_{label}" for label in metrics["labels"]]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert set(predictions["baseline_predicted"]) == {"contradiction"}  # ties go to the first label
    config = json.loads((run / "merged" / "config.json").read_text())
    assert config["id2label"] == {"0": "contradiction", "1": "entailment", "2": "neutral"}
    assert (run / "report.md").read_text().startswith("# tiny-pairs: classifier fine-tune")

    # The CLI picks the flow from the config's approach; the rerun is served from the cache.
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| majority class |" in out and "| fine-tuned tiny-llama0 (LoRA r=4) |" in out
    # A class weight for a label the data does not have is a user error: message, exit 2, no retry.
    assert main(["run", str(path), "--set", "classifier.class_weights={neutral: 2, nuetral: 3}"]) == 2
    assert "classifier.class_weights: 'nuetral' not among the labels" in capsys.readouterr().err
