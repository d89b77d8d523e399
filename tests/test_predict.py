"""The predict flow and `loraflow predict`: tiny merged models of both approaches label new tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from loraflow.cli import main
from loraflow.config import ClassifierSettings, LoraSettings
from loraflow.flows.predict import predict
from loraflow.loading import load_config
from loraflow.tasks.classifier.merge import merge_adapter as merge_classifier
from loraflow.tasks.classifier.prepare import prepare_inputs as map_labels
from loraflow.tasks.classifier.train import train_adapter as train_classifier_head
from loraflow.tasks.generative.merge import merge_adapter
from loraflow.tasks.generative.prepare import prepare_inputs as format_prompts
from loraflow.tasks.generative.train import train_adapter
from loraflow.tasks.ingest import ingest_table
from loraflow.tasks.predict import PREDICTED
from loraflow.tasks.store import Ref
from tests.conftest import write_config
from tests.test_classifier import TRAIN as CLS_TRAIN
from tests.test_classifier import pair_rows, write_pair_config
from tests.tiny import geo_rows

pytestmark = pytest.mark.flow


@pytest.fixture(scope="module")
def generative_model(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A merged tiny generative model (the geo task), as `loraflow run` leaves it."""
    folder = tmp_path_factory.mktemp("gen")
    config = load_config(write_config(folder / "task", tiny_model))
    store, model = str(folder / "store"), Ref(path=str(tiny_model), digest="tiny")
    splits = ingest_table.fn(config.data, config.input_columns, store)
    prompts = format_prompts.fn(splits, config.prompt, config.data.answers, store)
    adapter = train_adapter.fn(prompts, model, config.lora, config.train, "float32", store)
    return Path(merge_adapter.fn(adapter, model, prompts, config.prompt, "float32", store).path)


@pytest.fixture(scope="module")
def classifier_model(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A merged tiny sentence-pair classifier."""
    folder = tmp_path_factory.mktemp("cls")
    config = load_config(write_pair_config(folder / "task", tiny_model))
    store, model = str(folder / "store"), Ref(path=str(tiny_model), digest="tiny")
    splits = ingest_table.fn(config.data, config.input_columns, store)
    encoded = map_labels.fn(splits, config.input_columns, config.classifier, store)
    adapter = train_classifier_head.fn(
        encoded, model, LoraSettings(r=4), CLS_TRAIN, ClassifierSettings(), "float32", store
    )
    return Path(merge_classifier.fn(adapter, model, encoded, CLS_TRAIN.max_length, "float32", store).path)


def _check_predictions(out: pd.DataFrame, source: pd.DataFrame, labels: list[str]) -> None:
    probabilities = out[[f"prob_{label}" for label in labels]].to_numpy()
    assert list(out.columns) == [*source.columns, PREDICTED, *(f"prob_{label}" for label in labels)]
    pd.testing.assert_frame_equal(out[source.columns], source, check_dtype=False)  # rows kept, in order
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert (out[PREDICTED].astype(str) == [labels[i] for i in probabilities.argmax(axis=1)]).all()


def test_generative_model_labels_an_xlsx_into_an_xlsx(
    prefect_server: None, generative_model: Path, tmp_path: Path
) -> None:
    source = geo_rows(20, seed=7).drop(columns=["score"])
    source.insert(0, "id", range(100, 120))  # columns the model doesn't read travel along
    source.to_excel(tmp_path / "new.xlsx", index=False, sheet_name="batch", engine="openpyxl")
    written = predict(
        model=str(generative_model.parent.parent / "merge"),  # not a model: checked below
        input=str(tmp_path / "new.xlsx"),
        output=str(tmp_path / "out.xlsx"),
        return_state=True,
    )
    assert written.is_failed() and "not a loraflow model" in str(written.result(raise_on_failure=False))
    path = predict(
        model=str(generative_model),
        input=str(tmp_path / "new.xlsx"),
        output=str(tmp_path / "out.xlsx"),
        sheet="batch",
    )
    out = pd.read_excel(path, engine="openpyxl")
    _check_predictions(out, source, ["0", "1"])


def test_classifier_labels_a_tsv_into_parquet_batched_as_row_by_row(
    prefect_server: None, classifier_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = pair_rows(15, seed=3).drop(columns=["relation"])
    source.to_csv(tmp_path / "new.tsv", sep="\t", index=False)
    args = ["predict", "--model", str(classifier_model), "--input", str(tmp_path / "new.tsv")]
    assert main([*args, "--output", str(tmp_path / "out.parquet")]) == 0
    assert "predictions:" in capsys.readouterr().out
    out = pd.read_parquet(tmp_path / "out.parquet")
    labels = ["contradiction", "entailment", "neutral"]
    _check_predictions(out, source, labels)
    # Length-sorted batches give what one row at a time gives.
    assert main([*args, "--output", str(tmp_path / "one.csv"), "--batch-size", "1"]) == 0
    one = pd.read_csv(tmp_path / "one.csv")
    assert (one[PREDICTED] == out[PREDICTED]).all()
    np.testing.assert_allclose(
        one[[f"prob_{x}" for x in labels]], out[[f"prob_{x}" for x in labels]], atol=1e-5
    )


def test_missing_or_blank_input_columns_fail_clearly_and_write_nothing(
    prefect_server: None, classifier_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = pair_rows(6).drop(columns=["relation"]).rename(columns={"sentence_b": "sentence_2"})
    source.to_csv(tmp_path / "renamed.csv", index=False)
    args = ["predict", "--model", str(classifier_model), "--output", str(tmp_path / "out.xlsx")]
    assert main([*args, "--input", str(tmp_path / "renamed.csv")]) == 2
    error = capsys.readouterr().err
    assert "'sentence_b'" in error and "not found" in error and "Traceback" not in error

    blank = pair_rows(6).drop(columns=["relation"])
    blank.loc[3, "sentence_a"] = "   "
    blank.to_csv(tmp_path / "blank.csv", index=False)
    assert main([*args, "--input", str(tmp_path / "blank.csv")]) == 2
    error = capsys.readouterr().err
    assert "sentence_a" in error and "row=5" in error  # the header is line 1: data row 3 is line 5
    assert not (tmp_path / "out.xlsx").exists()


def test_each_approach_reads_and_writes_every_format(
    prefect_server: None, generative_model: Path, classifier_model: Path, tmp_path: Path
) -> None:
    """The other pairings: a classifier from .xlsx to .xlsx, a generative model from .tsv to .parquet."""
    pairs = pair_rows(9, seed=4).drop(columns=["relation"])
    pairs.to_excel(tmp_path / "pairs.xlsx", index=False, engine="openpyxl")
    path = predict(
        model=str(classifier_model), input=str(tmp_path / "pairs.xlsx"), output=str(tmp_path / "p.xlsx")
    )
    _check_predictions(
        pd.read_excel(path, engine="openpyxl"), pairs, ["contradiction", "entailment", "neutral"]
    )

    geo = geo_rows(11, seed=9).drop(columns=["score"])
    geo.to_csv(tmp_path / "geo.tsv", sep="\t", index=False)
    path = predict(
        model=str(generative_model), input=str(tmp_path / "geo.tsv"), output=str(tmp_path / "g.parquet")
    )
    _check_predictions(pd.read_parquet(path), geo, ["0", "1"])
